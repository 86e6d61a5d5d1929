"""JPEGs with damaged entropy-coded data, which libvips gives up on after 100 warnings.

libjpeg reports recoverable damage inside the compressed data (a restart
marker out of sequence, a data segment cut short) as a warning, resyncs at the
next marker and decodes the rest; every viewer shows such camera files. libvips'
JPEG loader counts those warnings and, whatever ``fail_on`` says, stops at the
100th (``readjpeg_emit_message`` in libvips' ``jpeg2vips.c``), unless asked for
``unlimited``. So the fallback is libvips itself: the same loader, streaming and
shrink-on-load, EXIF orientation and ICC profile, with ``unlimited`` set; the
memory estimate of a JPEG holds for it unchanged.

How many warnings there were is known only to libvips, which logs ``read gave N
warnings`` when the read is freed (Pillow's libjpeg drops them silently). One
pass at 1/8 scale (the entropy data is decoded whole at any scale, so the count
is the same) counts them for the warning recorded on the image.
"""

from __future__ import annotations

import logging
import re
from typing import Any

#: The first words of the warning recorded on an image converted despite damage;
#: the summary counts the images that carry it.
DAMAGE_WARNING = "converted with damage"
#: Where libvips' JPEG loader gives up, unless ``unlimited``.
VIPS_WARNING_LIMIT = 100

_CORRUPT = "corrupt jpeg data"
_READ_GAVE = re.compile(r"read gave (\d+) warnings")
# Lines libvips adds around libjpeg's own message, which say nothing of the cause.
_FRAMING = ("unable to call", "error in tile", "load error")


def corrupt_data_warnings(detail: str) -> list[str] | None:
    """libjpeg's corrupt-data warnings in a libvips error that holds nothing else
    (the warning limit, or ``fail_on=warning``), or None: another reason to refuse."""
    warnings: list[str] = []
    for raw in detail.splitlines():
        line = raw.strip()
        if not line or any(words in line.lower() for words in _FRAMING):
            continue
        text = line.removeprefix("VipsJpeg:").strip()
        if not text.lower().startswith(_CORRUPT):
            return None  # a truncation or a fatal error: not ours to retry
        warnings.append(text)
    return list(dict.fromkeys(warnings)) or None


def describe(count: int | None, warnings: list[str]) -> str:
    """What the damage is, in one line: the count and libjpeg's first messages."""
    if count is None:
        amount = (
            f"at least {VIPS_WARNING_LIMIT} corrupt-data warnings (libvips stops counting there)"
        )
    else:
        amount = f"{count} corrupt-data warning" + ("" if count == 1 else "s")
    first = "; ".join(w.split(":", 1)[-1].strip() for w in warnings[:2])
    return f"{amount} ({first})" if first else amount


class _WarningCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = _READ_GAVE.search(record.getMessage())
        if found is not None:
            self.count = int(found.group(1))


def count_warnings(open_jpeg: Any) -> int | None:
    """libjpeg's warnings over the whole of a JPEG, or None if libvips did not say.

    ``open_jpeg(**loader_options)`` opens the JPEG as a pyvips image. Raises
    pyvips.Error when the file cannot be read to its end (a truncated file).
    """
    import pyvips

    logger = logging.getLogger("pyvips")
    saved = (logger.level, logger.propagate, logger.handlers, pyvips.cache_get_max())
    counter = _WarningCount()
    # libvips logs the count when the read is freed: an operation cache holding
    # the loader would keep it (the worker runs without one; a library caller may not).
    pyvips.cache_set_max(0)
    # What this pass logs is said once, by the image's own warning: not also as
    # codec messages (executors/codec_messages.py) or on the log.
    logger.handlers = [counter]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        image = open_jpeg(unlimited=True, shrink=8, access="sequential")
        image.avg()  # every strip decoded: libjpeg counts as it goes
        del image  # the read is freed here, and libvips logs the count
    finally:
        logger.handlers = saved[2]
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        pyvips.cache_set_max(saved[3])
    return counter.count


__all__ = [
    "DAMAGE_WARNING",
    "VIPS_WARNING_LIMIT",
    "corrupt_data_warnings",
    "count_warnings",
    "describe",
]
