"""What a file really is, from its first bytes: never from its name.

A PNG named ``.jpg`` is a PNG; a text file named ``.jpg`` is not an image. The
extension is used for one thing only: deciding whether a file that is *not* an
image was meant to be one (``photo.jpg`` full of garbage is a failure, a stray
``notes.txt`` is merely skipped).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import PurePath
from typing import BinaryIO

from optimizr.decoders import TABLE

#: Formats optimizr converts: those of the decoder table (``optimizr.decoders``).
SUPPORTED = frozenset(TABLE)

#: Names that say "I am an image": a file so named that is not one is a failure.
IMAGE_SUFFIXES = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".tif",
        ".tiff", ".bmp", ".dib", ".heic", ".heif", ".avif", ".ico", ".jp2", ".j2k",
        ".psd", ".tga", ".qoi", ".ppm", ".pgm", ".pbm", ".pnm", ".jxl", ".exr",
    }
)  # fmt: skip

HEAD_SIZE = 64

_HEIC_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"}
_AVIF_BRANDS = {b"avif", b"avis"}


@dataclass(frozen=True)
class Sniffed:
    """What the magic bytes say: a format name, whether we convert it, and whether
    it is an animation container we must decode frame by frame."""

    format: str | None  # None: no image signature at all
    supported: bool
    animated_png: bool = False

    @property
    def is_image(self) -> bool:
        return self.format is not None

    @property
    def kind(self) -> str:
        """The format as the decoder table names it ("apng" for an animated PNG)."""
        assert self.format is not None
        return "apng" if self.animated_png else self.format


def sniff_head(head: bytes) -> Sniffed:
    """Classify by signature. ``head`` is at least the first ``HEAD_SIZE`` bytes (or all)."""
    fmt = _format_of(head)
    return Sniffed(fmt, fmt in SUPPORTED)


def sniff_file(fh: BinaryIO) -> Sniffed:
    """Sniff an open binary file; for PNG also walk the chunk headers to spot APNG."""
    head = fh.read(HEAD_SIZE)
    sniffed = sniff_head(head)
    if sniffed.format == "png":
        fh.seek(8)
        return Sniffed("png", True, animated_png=_png_has_actl(fh))
    return sniffed


def sniff_bytes(data: bytes) -> Sniffed:
    sniffed = sniff_head(data[:HEAD_SIZE])
    if sniffed.format == "png":
        import io

        return Sniffed("png", True, animated_png=_png_has_actl(io.BytesIO(data[8:])))
    return sniffed


def looks_like_image_name(path: str | PurePath) -> bool:
    return PurePath(path).suffix.lower() in IMAGE_SUFFIXES


def _png_has_actl(fh: BinaryIO) -> bool:
    # APNG puts acTL before the first IDAT (APNG spec, "Structure"); seeking over
    # chunk bodies keeps this cheap even with megabytes of text chunks up front.
    for _ in range(10_000):
        header = fh.read(8)
        if len(header) < 8:
            return False
        length, ctype = struct.unpack(">I4s", header)
        if ctype == b"acTL":
            return True
        if ctype in (b"IDAT", b"IEND"):
            return False
        fh.seek(length + 4, 1)
    return False


def _format_of(head: bytes) -> str | None:  # noqa: PLR0911 - one branch per signature
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18:
        dib_size = struct.unpack_from("<I", head, 14)[0]
        if dib_size in (12, 16, 40, 52, 56, 64, 108, 124):
            return "bmp"
    if head[4:8] == b"ftyp":
        return _isobmff_brand(head)
    return _unsupported_format_of(head)


def _isobmff_brand(head: bytes) -> str | None:
    box_size = struct.unpack_from(">I", head, 0)[0]
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, min(box_size, len(head)) - 3, 4)]
    if any(b in _AVIF_BRANDS for b in brands):
        return "avif"
    if any(b in _HEIC_BRANDS for b in brands) or head[8:12] in (b"mif1", b"msf1"):
        return "heic"
    if head[8:12] in (b"crx ",):
        return "cr3"
    return None


def _unsupported_format_of(head: bytes) -> str | None:
    # Real image formats we recognise but do not convert: named so the skip
    # reason says what the file is rather than calling it "not an image".
    signatures: tuple[tuple[bytes, str], ...] = (
        (b"\x00\x00\x01\x00", "ico"),
        (b"\x00\x00\x02\x00", "cur"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
        (b"\xff\x4f\xff\x51", "jpeg2000"),
        (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpegxl"),
        (b"\xff\x0a", "jpegxl"),
        (b"8BPS", "psd"),
        (b"qoif", "qoi"),
        (b"%PDF", "pdf"),
        (b"v/1\x01", "openexr"),
        (b"#?RADIANCE", "radiance"),
        (b"#?RGBE", "radiance"),
        (b"DDS ", "dds"),
        (b"\x76\x2f\x31\x01", "openexr"),
        (b"FORM", "iff"),
    )
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "pnm"
    stripped = head.lstrip()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in head):
        return "svg"
    return None
