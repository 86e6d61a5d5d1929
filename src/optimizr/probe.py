"""Read an image's header in the parent, to estimate its memory need before it starts.

Only the header is read (libvips opens images lazily; the in-memory decoders
of ``optimizr.decoders`` have their own header readers). A file whose header
cannot be read gets no estimate here: the worker will meet the same problem
and report it properly.
"""

from __future__ import annotations

from typing import Any

from optimizr import decoders
from optimizr.budget import Header
from optimizr.sniff import Sniffed, sniff_bytes, sniff_file

_ANIMATED = frozenset({"gif", "webp"})


def probe(source: str | bytes) -> Header | None:
    try:
        if isinstance(source, bytes):
            sniffed = sniff_bytes(source)
        else:
            with open(source, "rb") as fh:
                sniffed = sniff_file(fh)
        if not sniffed.supported or sniffed.format is None:
            return None
        return _header(source, sniffed)
    except Exception:  # noqa: BLE001 - any failure here just means "no estimate"
        return None


def _header(source: str | bytes, sniffed: Sniffed) -> Header | None:
    fmt = sniffed.format
    assert fmt is not None
    in_memory = decoders.module_for(sniffed.kind)
    if in_memory is not None:  # a decoder of the table's own header reader
        header: Header | None = in_memory.header(source)
        return header
    import pyvips

    from optimizr.encode import open_vips_source

    # Header reads would otherwise sit in libvips' operation cache, each with
    # its file open; nothing here is ever read twice.
    pyvips.cache_set_max(0)
    image: Any = (
        pyvips.Image.new_from_buffer(source, "", fail_on="none")
        if isinstance(source, bytes)
        else pyvips.Image.new_from_source(open_vips_source(source), "", fail_on="none")
    )
    frames = 1
    if fmt in _ANIMATED and image.get_typeof("n-pages"):
        frames = max(1, int(image.get("n-pages")))
    orientation = int(image.get("orientation")) if image.get_typeof("orientation") else 1
    if not 1 <= orientation <= 8:
        orientation = 1
    return Header(fmt, image.width, image.height, image.bands, frames, orientation)
