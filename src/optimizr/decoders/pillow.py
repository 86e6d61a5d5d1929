"""Formats libvips' wheel cannot decode, decoded by Pillow (issue 13).

Pillow is a runtime dependency and a well-kept decoder of the formats an old
image library still holds: ICO/CUR, TGA, QOI, the Netpbm family (PBM, PGM,
PPM, PAM, PFM), PCX, JPEG 2000, PSD, DDS, SGI. BMP and APNG stay with our own
decoders, by measurement (issue 13): Pillow 13 cannot read 4 of the corpus's
16 BMPs (2-bit, RLE24, BI_ALPHABITFIELDS, odd bitfields) nor a V5 header's ICC
profile; its APNG OVER blend interpolates alpha instead of compositing it
(half-transparent blue over opaque black comes out half transparent, 128
near-transparent frames fade an opaque canvas to alpha 97), and read frame by
frame it restores the wrong canvas for dispose-to-previous after OVER.
Each is opened only with its own plugin (``formats=``): a file sniffed as TGA
is never read by the PCX plugin.

``Image.open`` reads only the header, so :func:`header` costs no decoding and
``--max-pixels`` is refused before any pixel is read. Pillow's own
decompression-bomb limit would refuse (or warn about) images optimizr's
``--max-pixels`` allows, and allow some it refuses; it is turned off while we
open a file, and ``encode.check_pixels`` decides instead.

Pillow's modes become what the decoder table promises (see
``optimizr.decoders``): grey stays grey (1 band, 2 with alpha), palettes become
grey or RGB with alpha when they have transparency, 16-bit grey stays ushort
(``encode._prepare_colour`` scales it to 8 bits), 32-bit integer and float
grey are clipped to 16 bits, CMYK stays CMYK for libvips' profile conversion,
and the image is upright as Pillow gives it: TGA's origin bits are Pillow's
to apply, and none of these formats carries an EXIF orientation Pillow reads.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyvips
from PIL import Image, UnidentifiedImageError

from optimizr.budget import Header
from optimizr.config import EncodeOptions
from optimizr.encode import check_pixels
from optimizr.errors import CorruptImage, ImageError, TruncatedImage, UnsupportedImage

__all__ = ["decode", "header"]

#: Our format names (``sniff``) -> the Pillow plugins allowed to read them.
PLUGINS: dict[str, tuple[str, ...]] = {
    "ico": ("ICO",),
    "cur": ("CUR",),
    "tga": ("TGA",),
    "qoi": ("QOI",),
    "pnm": ("PPM", "PFM"),
    "pcx": ("PCX",),
    "jpeg2000": ("JPEG2000",),
    "psd": ("PSD",),
    "dds": ("DDS",),
    "sgi": ("SGI",),
}

_GREY16 = "I;16"
#: Pillow mode -> the mode we take the pixels in (palettes are decided per image).
_TARGET = {
    "1": "L",
    "L": "L",
    "LA": "LA",
    "La": "LA",
    "I;16": _GREY16,
    "I;16L": _GREY16,
    "I;16B": _GREY16,
    "I;16N": _GREY16,
    "I": _GREY16,
    "F": _GREY16,
    "RGB": "RGB",
    "RGBX": "RGB",
    "YCbCr": "RGB",
    "HSV": "RGB",
    "RGBA": "RGBA",
    "RGBa": "RGBA",
    "CMYK": "CMYK",
}
_BANDS = {"L": 1, _GREY16: 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}
_INTERPRETATION = {
    "L": "b-w",
    _GREY16: "grey16",
    "LA": "b-w",
    "RGB": "srgb",
    "RGBA": "srgb",
    "CMYK": "cmyk",
}


@dataclass(frozen=True)
class _Layout:
    kind: str
    width: int
    height: int
    mode: str  # the target mode, a key of _BANDS


@contextmanager
def _opened(source: str | bytes, kind: str) -> Iterator[Any]:
    """The file opened lazily by its own plugin, Pillow's errors made ours."""
    previous = Image.MAX_IMAGE_PIXELS
    # --max-pixels decides what is a bomb, from the header, before decoding.
    Image.MAX_IMAGE_PIXELS = None
    try:
        # Pillow's warnings (a bomb, an ICO entry not of its stated size) do
        # not decide anything here: the pixels it returns are what we convert.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            im = Image.open(fp, formats=PLUGINS[kind])
            try:
                yield im
            finally:
                im.close()  # frees the pixels too, which leaving `with` would not
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is bad input, reported
        raise _image_error(exc, kind) from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous


_TRUNCATED_HINTS = ("truncated", "not enough image data", "truncated file read", "premature end")
_UNSUPPORTED_HINTS = ("unsupported", "not supported", "unknown pixel mode", "cannot handle")


def _image_error(exc: BaseException, kind: str) -> ImageError:
    if isinstance(exc, UnidentifiedImageError):
        # Its message names the file, which the failure already does.
        return CorruptImage(f"{kind}: the header is not one Pillow's {kind} reader accepts")
    reason = " ".join(str(exc).split()) or type(exc).__name__
    what = f"{kind}: {reason}"
    lowered = reason.lower()
    if isinstance(exc, EOFError) or any(h in lowered for h in _TRUNCATED_HINTS):
        return TruncatedImage(what)
    if isinstance(exc, NotImplementedError) or any(h in lowered for h in _UNSUPPORTED_HINTS):
        return UnsupportedImage(what)
    if isinstance(exc, MemoryError):
        return CorruptImage(f"{kind}: out of memory decoding it")
    return CorruptImage(what)


def _is_grey_palette(im: Any) -> bool:
    palette = im.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


def _target_mode(im: Any) -> str:
    mode = str(im.mode)
    transparent = "transparency" in im.info
    if mode in ("P", "PA"):
        # A TGA colour map of 16- or 32-bit entries has alpha: Pillow's palette is RGBA.
        palette_alpha = im.palette is not None and im.palette.mode == "RGBA"
        alpha = mode == "PA" or transparent or palette_alpha
        if _is_grey_palette(im):
            return "LA" if alpha else "L"
        return "RGBA" if alpha else "RGB"
    if transparent and mode in ("1", "L"):
        return "LA"
    if transparent and mode == "RGB":
        return "RGBA"
    target = _TARGET.get(mode)
    if target is None:  # rarities: Pillow converts what it can (not LAB: unsupported)
        return "RGBA" if "A" in mode else "RGB"
    return target


def _layout(im: Any, kind: str) -> _Layout:
    # One image per file: ICO/CUR's largest (Pillow's default), PSD's composite
    # (its frames are the layers), DDS's top mipmap.
    width, height = im.size
    return _Layout(kind, width, height, _target_mode(im))


def _kind_of(source: str | bytes) -> str:
    """Which of our formats the file is, as sniffing said when it chose this module:
    the plugin that reads it follows from that."""
    from optimizr.sniff import sniff_bytes, sniff_file

    if isinstance(source, bytes):
        sniffed = sniff_bytes(source)
    else:
        with open(source, "rb") as fh:
            sniffed = sniff_file(fh)
    if sniffed.format is None or sniffed.kind not in PLUGINS:
        raise UnsupportedImage(
            f"{sniffed.format or 'this file'} is not a format Pillow decodes here"
        )
    return sniffed.kind


def header(source: str | bytes) -> Header:
    """The header, read without decoding: for ``--max-pixels`` and the memory estimate."""
    kind = _kind_of(source)
    with _opened(source, kind) as im:
        layout = _layout(im, kind)
    return Header(kind, layout.width, layout.height, _BANDS[layout.mode])


def _pixels(frame: Any, mode: str) -> np.ndarray[Any, Any]:
    """The pixels, height x width x bands, in the target mode."""
    array: np.ndarray[Any, Any]
    if mode == _GREY16:
        # I;16, I;16L, I;16B, I;16N: numpy reads each byte order as it is.
        array = np.asarray(frame)
        if frame.mode == "F":  # PFM: 0.0-1.0 is black to white
            array = np.rint(np.clip(array, 0.0, 1.0) * 65535.0)
        grey: np.ndarray[Any, Any] = np.clip(array, 0, 65535).astype(np.uint16)
        return grey[:, :, None]
    if frame.mode != mode:
        frame = frame.convert(mode)
    array = np.asarray(frame)
    return array[:, :, None] if array.ndim == 2 else array


def decode(source: str | bytes, options: EncodeOptions) -> pyvips.Image:
    """The whole image, upright, as the decoder table promises."""
    kind = _kind_of(source)
    with _opened(source, kind) as im:
        layout = _layout(im, kind)
        check_pixels(layout.width, layout.height, 1, options)
        im.load()
        strip = _pixels(im, layout.mode)
        icc = im.info.get("icc_profile")
    # Pillow's image (RGB at 4 bytes a pixel) is closed and gone before
    # libvips copies the pixels: the peak is Pillow's + ours, not all three.
    return _to_vips(strip, layout.mode, icc)


def _to_vips(strip: np.ndarray[Any, Any], mode: str, icc: bytes | None) -> pyvips.Image:
    height, width, bands = strip.shape
    fmt = "ushort" if strip.dtype == np.uint16 else "uchar"
    # copy_memory() gives libvips its own copy: the numpy array may then go
    # (an image made with new_from_memory() would keep pointing into it).
    image = (
        pyvips.Image.new_from_memory(np.ascontiguousarray(strip).data, width, height, bands, fmt)
        .copy(interpretation=_INTERPRETATION[mode])
        .copy_memory()
    )
    if icc:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", bytes(icc))
    return image
