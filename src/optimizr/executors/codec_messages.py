"""libvips' own messages about one image, caught while that image converts.

libvips reports recoverable damage (a JPEG with broken restart markers gives
``error in tile 0 x 320`` and, when the read is freed, ``read gave 100
warnings``) through GLib's log, which pyvips forwards to the Python logger
``pyvips``; a codec library may also print straight to fd 2. Either way the
message is about the image being converted, so it belongs on that image's
result and log event. Left alone it reached the terminal as raw
``VIPS-WARNING **`` lines and blank lines, and stderr under ``--log-format
json`` stopped being JSON (issue 10).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from types import TracebackType

#: At most this many messages per image, each at most this long: a badly damaged
#: file can make a decoder repeat itself thousands of times.
MAX_MESSAGES = 20
MAX_LENGTH = 300

# GLib's default handler: "(process:7885): VIPS-WARNING **: 09:16:10.363: text".
_GLIB_LINE = re.compile(
    r"^\([^)]*\): (?P<domain>[\w.-]+)-(?:WARNING|CRITICAL|ERROR|MESSAGE|INFO|DEBUG) \*\*: "
    r"(?:\d\d:\d\d:\d\d\.\d+:\s*)?(?P<text>.*)$"
)
# A domain with nothing after it: libvips logs its (by then empty) error buffer
# right after "read gave N warnings".
_EMPTY = re.compile(r"^[\w.-]+:$")


class CodecMessages(logging.Handler):
    """Collects what libvips logs (warnings and worse) while it is entered.

    The ``pyvips`` logger is opened to warnings and kept from propagating for
    that time: the messages go on the image's result, not a second time on the
    log (and the CLI quiets that logger to errors for its own stream).
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._lines: list[str] = []
        self._saved: tuple[int, bool] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called from libvips' own threads too; list.append is atomic.
        self._lines.append(record.getMessage())

    def take(self) -> list[str]:
        """The messages caught since the last call."""
        lines, self._lines = self._lines, []
        return lines

    def __enter__(self) -> CodecMessages:
        logger = logging.getLogger("pyvips")
        self._saved = (logger.level, logger.propagate)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.addHandler(self)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        logger = logging.getLogger("pyvips")
        logger.removeHandler(self)
        if self._saved is not None:
            logger.setLevel(self._saved[0])
            logger.propagate = self._saved[1]


def tidy(texts: Iterable[str]) -> tuple[str, ...]:
    """One message per line: GLib's prefix taken off, blank, empty and repeated
    lines dropped, bounded in number and length."""
    seen: dict[str, None] = {}
    dropped = 0
    for text in texts:
        for raw in text.splitlines():
            line = raw.strip()
            glib = _GLIB_LINE.match(line)
            if glib is not None:
                line = f"{glib['domain']}: {glib['text'].strip()}".strip()
            line = line[:MAX_LENGTH]
            if not line or _EMPTY.match(line) or line in seen:
                continue
            if len(seen) == MAX_MESSAGES:
                dropped += 1
                continue
            seen[line] = None
    lines = tuple(seen)
    return (*lines, f"... and {dropped} more") if dropped else lines


def last_line(text: str) -> str:
    """The last non-blank line of what a process printed (a traceback's verdict)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:MAX_LENGTH] if lines else ""
