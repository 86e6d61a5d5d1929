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
        ".cur", ".j2c", ".jpf", ".jpx", ".pam", ".pfm", ".pcx", ".dds", ".sgi", ".rgb",
        ".rgba", ".bw", ".icb", ".vda", ".vst",
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
    # TGA has no signature and its first bytes can look like an ICO/CUR's
    # (00 00 01 00 is a colour-mapped TGA): a file named .tga whose 18-byte
    # header is a valid TGA header is a TGA.
    if sniffed.format in (None, "ico", "cur") and _tga_named(getattr(fh, "name", None)):
        if tga_header_is_valid(head):
            return Sniffed("tga", "tga" in SUPPORTED)
    if sniffed.format == "png":
        fh.seek(8)
        return Sniffed("png", True, animated_png=_png_has_actl(fh))
    return sniffed


def sniff_bytes(data: bytes) -> Sniffed:
    sniffed = sniff_head(data[:HEAD_SIZE])
    # Bytes carry no name: a TGA is known by the footer TGA 2.0 puts at its end.
    tga_tail = data.endswith(_TGA_FOOTER)
    if sniffed.format in (None, "ico", "cur") and tga_tail and tga_header_is_valid(data):
        return Sniffed("tga", "tga" in SUPPORTED)
    if sniffed.format == "png":
        import io

        return Sniffed("png", True, animated_png=_png_has_actl(io.BytesIO(data[8:])))
    return sniffed


def _tga_named(name: object) -> bool:
    return isinstance(name, str) and PurePath(name).suffix.lower() in TGA_SUFFIXES


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
    return _pillow_format_of(head) or _unsupported_format_of(head)


def _pillow_format_of(head: bytes) -> str | None:
    # Signatures of formats Pillow decodes (optimizr.decoders.pillow) that the
    # table below does not name: PCX (ZSoft: 0x0A, a known version, RLE, a
    # valid bit depth), SGI (magic 474, RLE flag, 1 or 2 bytes a channel) and
    # PFM (Netpbm's float map). ICO and CUR: an icon directory with at least one entry.
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00") and len(head) >= 6:
        count = struct.unpack_from("<H", head, 4)[0]
        kind = "ico" if head[2] == 1 else "cur"
        return kind if count > 0 else None
    if len(head) >= 12 and head[0] == 0x0A and head[1] in (0, 2, 3, 4, 5) and head[2] == 1:
        xmin, ymin, xmax, ymax = struct.unpack_from("<4H", head, 4)
        if head[3] in (1, 2, 4, 8) and xmax >= xmin and ymax >= ymin:
            return "pcx"
    if len(head) >= 4 and head[:2] == b"\x01\xda" and head[2] in (0, 1) and head[3] in (1, 2):
        return "sgi"
    if head[:2] in (b"PF", b"Pf") and head[2:3] in (b" ", b"\t", b"\r", b"\n"):
        return "pnm"
    return None


#: Names a Truevision TGA file carries: the format has no signature.
TGA_SUFFIXES = frozenset({".tga", ".icb", ".vda", ".vst"})
_TGA_FOOTER = b"TRUEVISION-XFILE.\x00"


def tga_header_is_valid(head: bytes) -> bool:
    """Whether the 18-byte TGA header describes an image Pillow's TGA plugin reads:
    a colour-map type of 0 or 1, a known image type, a pixel depth that type can
    have, a colour map exactly when the type uses one, a non-empty size."""
    if len(head) < 18:
        return False
    colormap_type, image_type = head[1], head[2]
    map_first, map_length, map_depth = struct.unpack_from("<HHB", head, 3)
    width, height, depth, descriptor = struct.unpack_from("<HHBB", head, 12)
    if colormap_type not in (0, 1) or width == 0 or height == 0 or descriptor & 0xC0:
        return False
    base = image_type & ~8  # 9, 10, 11: the RLE forms of 1, 2, 3
    depths = {1: (8,), 2: (15, 16, 24, 32), 3: (1, 8, 16)}
    if image_type not in (1, 2, 3, 9, 10, 11) or depth not in depths[base]:
        return False
    if base == 1:
        return colormap_type == 1 and map_length > 0 and map_depth in (15, 16, 24, 32)
    return colormap_type == 0 or map_first + map_length <= 65536


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
