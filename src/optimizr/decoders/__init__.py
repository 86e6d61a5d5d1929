"""Who decodes what: the one table of formats and the library that decodes each.

libvips decodes what its wheel can, and does it best: streaming, shrink-on-load,
colour management, animation frames. A format it cannot decode goes to a
decoder module that holds the whole image in memory; each such module has

- ``header(source) -> Header``: read in the parent without decoding, for
  ``--max-pixels`` and the memory estimate (it may raise any exception: the
  file then simply has no estimate, and its worker reports the problem);
- ``decode(source, options) -> pyvips.Image``: in the worker, after refusing
  a decompression bomb from the header (``encode.check_pixels``); the image
  upright, 8- or 16-bit, grey or RGB with or without alpha, its ICC profile in
  ``icc-profile-data``, the frames of an animation stacked with
  ``page-height``, ``delay`` and ``loop`` set as libvips' own loaders set them.
  Bad input raises an :class:`~optimizr.errors.ImageError`.

The table is read by sniffing (what is supported), probing (whose header
reader), encoding (whose decoder), the memory estimate (what a decoder holds)
and ``optimizr --version`` (who decodes what, checked once at start). Nothing
here imports a decoder library: that is done where one is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from types import ModuleType
from typing import Any

LIBVIPS = "libvips"


@dataclass(frozen=True)
class Decoder:
    """Which library decodes a format, through which of our modules."""

    #: What users are told decodes it (``optimizr --version``, the README).
    library: str
    #: The module with ``header`` and ``decode``; None: libvips' own loader.
    module: str | None = None
    #: The distribution it needs, when optional: missing, the format is unsupported.
    requires: str | None = None
    #: Bytes the decoder holds per pixel of every frame, per band, beside the
    #: libvips pipeline (the whole decoded image): counted by the memory estimate.
    held_per_band_pixel: float = 0.0
    #: The top-level module ``requires`` installs: found (not imported) at start.
    imports: str | None = None

    def missing(self, kind: str) -> str:
        """The one line a file of ``kind`` is skipped with when ``requires`` is missing."""
        return f"{kind}: {self.requires or self.library} is not installed"


_VIPS = Decoder(LIBVIPS)
#: Pillow holds its decoded image (RGB as 4 bytes a pixel), which we copy out
#: and into libvips. Measured (bench/calibrate_memory.py --measure, 9.1 MP TGA,
#: PPM and QOI, issue 13): an RGB image's peak needs 2.0 bytes per band and
#: pixel beyond the encoder's estimate (lossy; lossless, grey and RGBA need
#: less); 2.5 leaves a margin.
_PILLOW = Decoder(
    "Pillow", "optimizr.decoders.pillow", "pillow", held_per_band_pixel=2.5, imports="PIL"
)

#: Format name (as ``sniff`` names it; "apng" for an animated PNG) -> its decoder.
TABLE: Mapping[str, Decoder] = {
    "jpeg": _VIPS,
    "png": _VIPS,
    "gif": _VIPS,
    "webp": _VIPS,
    "tiff": _VIPS,
    "avif": _VIPS,
    # pyvips-binary's libheif has no HEVC decoder. Held: libheif's RGB plane (2 bytes
    # a sample at 10/12 bits) and libde265's frames; measured (calibrate_memory.py
    # --measure) 2400x1600 lossy: 54 MB 8-bit, 71 MB 10-bit, 84 MB RGBA.
    "heic": Decoder(
        "pillow-heif",
        "optimizr.decoders.heif",
        requires="pillow-heif",
        held_per_band_pixel=3.0,
        imports="pillow_heif",
    ),
    "bmp": Decoder("optimizr", "optimizr.decoders.bmp", held_per_band_pixel=1.0),
    "apng": Decoder("optimizr", "optimizr.decoders.apng", held_per_band_pixel=1.0),
    **dict.fromkeys(
        ("ico", "cur", "tga", "qoi", "pnm", "pcx", "jpeg2000", "psd", "dds", "sgi"), _PILLOW
    ),
}


def decoder_for(kind: str) -> Decoder | None:
    """The decoder of ``kind`` (a sniffed format, "apng" for an animated PNG)."""
    return TABLE.get(kind)


def module_for(kind: str) -> ModuleType | None:
    """The module that decodes ``kind`` in memory; None when libvips does."""
    decoder = TABLE.get(kind)
    if decoder is None or decoder.module is None:
        return None
    try:
        return importlib.import_module(decoder.module)
    except ImportError:
        if decoder.requires is None:
            raise
        # An optional decoder missing: each such file is skipped with this one line
        # (the run said it once at start, from support()), not a traceback per file.
        from optimizr.errors import UnsupportedImage

        raise UnsupportedImage(decoder.missing(kind)) from None


@cache
def _library_version(decoder: Decoder) -> str:
    if decoder.library == LIBVIPS:
        import pyvips

        return f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    if decoder.library == "optimizr":
        from optimizr import __version__

        return __version__
    distribution = decoder.requires or decoder.library.lower()
    return metadata.version(distribution)


def support() -> dict[str, dict[str, Any]]:
    """Each format, the library that decodes it and its version, or why it cannot
    be decoded here (an optional decoder missing): checked once, at start.

    The libraries are found, not imported: importing every decoder here put
    numpy, Pillow and pillow-heif into the parent of every run (45 -> 60 MiB
    measured), whatever its files; a decoder is imported where it is used."""
    table: dict[str, dict[str, Any]] = {}
    for kind, decoder in TABLE.items():
        entry: dict[str, Any] = {"library": decoder.library}
        try:
            entry["version"] = _library_version(decoder)
            if decoder.imports is not None and importlib.util.find_spec(decoder.imports) is None:
                raise ImportError(f"No module named {decoder.imports!r}")
            entry["available"] = True
        except (ImportError, metadata.PackageNotFoundError) as exc:
            entry["available"] = False
            entry["reason"] = f"{decoder.requires or decoder.library} is not installed ({exc})"
            entry["unsupported"] = decoder.missing(kind)
        table[kind] = entry
    return table


__all__ = ["LIBVIPS", "TABLE", "Decoder", "decoder_for", "module_for", "support"]
