"""HEIC/HEIF decoding with pillow-heif: the libheif (and libde265 HEVC decoder) of its wheels.

pyvips-binary's libvips has libheif without an HEVC decoder, so it opens HEIC
headers but no pixels. pillow-heif's own API (``open_heif``) is used, not its
Pillow plugin: the plugin resets the EXIF orientation and copies the pixels once
more into a Pillow image, where here libheif's plane goes to libvips as it is.

What the file says, and what is done with it:

* The primary image (``pitm``) of a file with several (a burst, a collection):
  ``HeifFile.primary_index``. The others are not converted.
* ``irot``/``imir``/``clap``: libheif applies them while decoding, and the
  header's size is already the transformed one. HEIF says EXIF orientation is
  informative only (ISO/IEC 23008-12, 6.5.1; iPhones write both), so it is not
  applied again: the EXIF kept by ``--metadata all`` says orientation 1
  (``pillow_heif.set_orientation``, which also drops XMP's ``tiff:Orientation``).
* 10- and 12-bit: kept as 16-bit (full range, v * 65535 / max) when a colour
  transform follows (``--srgb`` or ``--metadata none`` with a profile), which
  is then done on 16 bits; otherwise scaled to 8 bits here, rounded to nearest
  (libvips' 16-to-8-bit conversion truncates: v >> 8).
* Alpha: straight alpha as libheif gives it; premultiplied alpha is divided out.
* Colour: an ICC profile (``prof``/``rICC``) is kept. An nclx description with
  sRGB's (BT.709) primaries needs none: untagged WebP is sRGB. Other primaries
  (Display P3, BT.2020) get an equivalent ICC profile (``nclx_icc``), so the
  gamut is kept and ``--srgb`` converts it as it converts any tagged image. HDR
  transfers (PQ, HLG) are not tone-mapped: drawn with the sRGB curve.
"""

from __future__ import annotations

from typing import Any

import pillow_heif
import pyvips

from optimizr.budget import Header
from optimizr.config import EncodeOptions
from optimizr.decoders.nclx_icc import SRGB_LIKE_PRIMARIES, icc_from_nclx
from optimizr.errors import CorruptImage, ImageError, TruncatedImage, UnsupportedImage

__all__ = ["decode", "header"]

_FORMAT = "heic"
# libheif's words for a file cut short (an iloc extent past the end, a box cut off).
_TRUNCATED_HINTS = ("unexpected end", "end of data", "insufficient input data", "truncat")


def _open(source: str | bytes) -> Any:
    """The file's images, parsed but not decoded (pixels are decoded on ``.data``)."""
    try:
        # convert_hdr_to_8bit=False: 10/12-bit pixels come as 16-bit, shifted left.
        return pillow_heif.open_heif(source, convert_hdr_to_8bit=False)
    except (ValueError, EOFError, SyntaxError, RuntimeError) as exc:
        raise _classify(exc) from None


def _classify(exc: Exception) -> ImageError:
    """pillow-heif raises libheif's errors as EOFError (data ends early), ValueError
    (invalid input), SyntaxError (unsupported feature or file type), RuntimeError."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    lower = reason.lower()
    if isinstance(exc, EOFError) or any(hint in lower for hint in _TRUNCATED_HINTS):
        return TruncatedImage(f"heic: {reason}")
    if isinstance(exc, SyntaxError) and "unsupported" in lower:
        return UnsupportedImage(f"heic: {reason}")
    return CorruptImage(f"heic: {reason}")


def _bands(mode: str) -> int:
    channels: int = pillow_heif.misc.MODE_INFO[mode][0]
    return channels


def header(source: str | bytes) -> Header:
    """The decoder table's header reader (``optimizr.decoders``): the primary image's
    size after ``irot``/``imir``, from the boxes alone."""
    primary = _primary(_open(source))
    width, height = primary.size
    return Header(_FORMAT, width, height, _bands(primary.mode))


def _primary(heif: Any) -> Any:
    if len(heif) == 0:
        raise CorruptImage("heic: the file holds no image")
    return heif[heif.primary_index]


def decode(source: str | bytes, options: EncodeOptions) -> pyvips.Image:
    """The decoder table's decoder (``optimizr.decoders``)."""
    from optimizr.encode import check_pixels

    primary = _primary(_open(source))
    width, height = primary.size
    check_pixels(width, height, 1, options)
    info: dict[str, Any] = primary.info
    try:
        data = primary.data
    except (ValueError, EOFError, SyntaxError, RuntimeError) as exc:
        raise _classify(exc) from None
    width, height = primary.size  # as decoded (libheif's own, after transformations)
    bands = _bands(primary.mode)
    bits = int(info.get("bit_depth", 8))
    profile = _profile(info)
    deep = bits > 8 and profile is not None and (options.srgb or options.metadata == "none")
    image = _to_vips(data, width, height, bands, bits, deep)
    if primary.premultiplied_alpha:
        top = 65535 if image.format == "ushort" else 255
        image = image.unpremultiply(max_alpha=top).cast(image.format)
    image = image.copy(interpretation=_interpretation(bands, image.format))
    if profile is not None:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    if options.metadata == "all":
        _attach_metadata(image, info)
    return image


def _to_vips(data: Any, width: int, height: int, bands: int, bits: int, deep: bool) -> Any:
    if bits <= 8:
        # libheif's plane, shared: pyvips keeps a reference to the view.
        return pyvips.Image.new_from_memory(data, width, height, bands, "uchar")
    top = (1 << bits) - 1
    # pillow-heif shifts 10/12-bit samples to the top of 16 bits; shifted back
    # they are exact, then scaled to the full range, rounded to nearest. Done by
    # libvips as the encoder pulls rows: no whole-image temporaries (numpy's
    # cost 55 bytes a pixel here). The quotient is a double, exact enough below
    # 2**53 that its floor is the integer quotient.
    stored = pyvips.Image.new_from_memory(data, width, height, bands, "ushort")
    samples = (stored >> (16 - bits)).cast("double")
    full = 65535 if deep else 255
    scaled = ((samples * full + top // 2) / top).floor()
    return scaled.cast("ushort" if deep else "uchar")


def _interpretation(bands: int, fmt: str) -> str:
    grey = bands <= 2
    if fmt == "ushort":
        return "grey16" if grey else "rgb16"
    return "b-w" if grey else "srgb"


def _profile(info: dict[str, Any]) -> bytes | None:
    icc = info.get("icc_profile")
    if icc:
        return bytes(icc)
    nclx = info.get("nclx_profile")
    if nclx and int(nclx.get("color_primaries", 2)) not in SRGB_LIKE_PRIMARIES:
        return icc_from_nclx(nclx)
    return None


def _attach_metadata(image: Any, info: dict[str, Any]) -> None:
    """EXIF and XMP for ``--metadata all``, saying the image is upright."""
    kept = {"exif": info.get("exif"), "xmp": info.get("xmp")}
    pillow_heif.set_orientation(kept)  # libheif has applied irot/imir already
    exif, xmp = kept["exif"], kept["xmp"]
    if exif:
        # libvips keeps EXIF as JPEG's APP1 payload: "Exif\0\0" and the TIFF block.
        blob = bytes(exif) if bytes(exif).startswith(b"Exif\0\0") else b"Exif\0\0" + bytes(exif)
        image.set_type(pyvips.GValue.blob_type, "exif-data", blob)
    if xmp:
        image.set_type(pyvips.GValue.blob_type, "xmp-data", bytes(xmp).rstrip(b"\0"))
