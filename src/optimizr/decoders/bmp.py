"""BMP decoder: the libvips in ``pyvips-binary`` has no BMP loader, so pixels are decoded here.

Supported: Windows BITMAPINFOHEADER and its V2/V3/V4/V5 extensions, OS/2 v1 (12-byte core)
and OS/2 v2 (16..64-byte) headers; 1/2/4/8-bit palettes, RLE8, RLE4, OS/2 RLE24, 16-bit
(default 5-5-5 or BITFIELDS), 24-bit, 32-bit (BI_RGB, BITFIELDS, ALPHABITFIELDS); bottom-up and
top-down rows; an ICC profile embedded in a V5 header.

Choices where the format (or practice) leaves room:

* Pixels an RLE stream never writes (skipped by delta or end-of-line escapes) become transparent
  black, as browsers show them; the image is RGBA only when at least one pixel was skipped.
* An RLE stream that stops, by end-of-bitmap or by running out of data, before it reaches the last
  row is :class:`TruncatedImage`: whole missing rows mean a cut file far more often than intent.
* A palette index past the end of the palette reads as black (Pillow and Firefox agree).
* Alpha is kept only when it carries information: an alpha channel whose values are all 0
  (common in 32-bit BI_RGB files, whose fourth byte is "reserved") or all 255 gives RGB.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyvips

from optimizr.budget import Header
from optimizr.config import EncodeOptions
from optimizr.decoders.source import read_source
from optimizr.errors import (
    CorruptImage,
    ImageError,
    NotAnImage,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
)

__all__ = ["BmpHeader", "decode_bmp", "read_bmp_header"]

BI_RGB = 0
BI_RLE8 = 1
BI_RLE4 = 2
BI_BITFIELDS = 3
BI_ALPHABITFIELDS = 6
OS2_HUFFMAN1D = 3
OS2_RLE24 = 4

_FILE_HEADER = 14
_WINDOWS_SIZES = (40, 52, 56, 108, 124)
_PROFILE_EMBEDDED = 0x4D424544  # 'MBED'
_VALID_BITS = (1, 2, 4, 8, 16, 24, 32)

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]


@dataclass(frozen=True)
class BmpHeader:
    width: int
    height: int  # always positive (top-down files are flagged separately)
    bits_per_pixel: int
    compression: int
    has_alpha: bool  # True if the file can carry a meaningful alpha channel
    top_down: bool


@dataclass(frozen=True)
class _Layout:
    """Everything the pixel decoders need, derived from the headers alone."""

    header: BmpHeader
    os2: bool
    masks: tuple[int, int, int, int]  # R, G, B, A; only meaningful for 16/24/32-bit
    palette_start: int
    palette_entry: int  # 3 for the OS/2 v1 core header, else 4
    colors_used: int
    pixel_offset: int
    icc_profile: bytes | None


def _u32(data: bytes, pos: int) -> int:
    return int(struct.unpack_from("<I", data, pos)[0])


def _parse(data: bytes) -> _Layout:
    if len(data) < 2 or data[:2] != b"BM":
        if data[:2] in (b"BA", b"CI", b"CP", b"IC", b"PT"):
            raise UnsupportedImage("OS/2 bitmap arrays and icons are not supported")
        raise NotAnImage("no 'BM' signature at the start of the BMP file")
    if len(data) < _FILE_HEADER + 4:
        raise TruncatedImage(f"BMP file header ends at byte {len(data)} of 18 needed")
    pixel_offset = _u32(data, 10)
    size = _u32(data, _FILE_HEADER)
    if size < 12 or size > 4096:
        raise CorruptImage(f"BMP info header size {size} is not a known header size")
    # Windows and OS/2 v2 headers may be shorter than their nominal size; read what is present.
    if len(data) < _FILE_HEADER + min(size, 40):
        raise TruncatedImage(
            f"BMP header ends at byte {len(data)} of {_FILE_HEADER + min(size, 40)} needed"
        )
    dib = data[_FILE_HEADER : _FILE_HEADER + size].ljust(max(size, 124), b"\0")

    os2 = size == 12 or (size not in _WINDOWS_SIZES and size <= 64)
    if size == 12:
        width, height, _planes, bits = struct.unpack_from("<HHHH", dib, 4)
        compression = colors_used = 0
    else:
        width, height, _planes, bits, compression = struct.unpack_from("<iiHHI", dib, 4)
        colors_used = _u32(dib, 32)
    top_down = height < 0
    height = abs(height)

    if os2 and compression == OS2_HUFFMAN1D:
        raise UnsupportedImage("OS/2 Huffman 1D compressed BMP is not supported")
    if not os2 and compression in (4, 5):
        kind = "JPEG" if compression == 4 else "PNG"
        raise UnsupportedImage(f"BMP with embedded {kind} data is not supported")
    if not os2 and compression in (11, 12, 13):
        raise UnsupportedImage(f"CMYK BMP (compression {compression}) is not supported")
    extra = (OS2_RLE24,) if os2 else (BI_BITFIELDS, BI_ALPHABITFIELDS)
    if compression not in (BI_RGB, BI_RLE8, BI_RLE4, *extra):
        raise CorruptImage(f"unknown BMP compression {compression}")
    if width <= 0 or height == 0:
        raise CorruptImage(f"BMP has impossible dimensions {width}x{height}")
    if bits not in _VALID_BITS:
        raise CorruptImage(f"BMP bit count {bits} is not 1, 2, 4, 8, 16, 24 or 32")
    allowed: dict[int, tuple[int, ...]] = {BI_RLE8: (8,), BI_RLE4: (4,)}
    if os2:
        allowed[OS2_RLE24] = (24,)
    else:
        allowed[BI_BITFIELDS] = allowed[BI_ALPHABITFIELDS] = (16, 24, 32)
    if bits not in allowed.get(compression, _VALID_BITS):
        raise CorruptImage(f"BMP compression {compression} cannot have {bits} bits per pixel")

    header_end = _FILE_HEADER + size
    masks = _masks(data, dib, size, bits, compression, header_end)

    rle = compression in (BI_RLE8, BI_RLE4) or (os2 and compression == OS2_RLE24)
    if bits == 32 and compression == BI_RGB:
        has_alpha = True  # the "reserved" byte is alpha whenever it is not all zero
    else:
        has_alpha = rle or masks[3] != 0

    icc: bytes | None = None
    if size >= 124 and _u32(dib, 56) == _PROFILE_EMBEDDED:
        start = _FILE_HEADER + _u32(dib, 112)
        length = _u32(dib, 116)
        # A profile that points outside the file is ignored: the pixels are still good.
        if length and start + length <= len(data):
            icc = data[start : start + length]

    return _Layout(
        header=BmpHeader(width, height, bits, compression, has_alpha, top_down),
        os2=os2,
        masks=masks,
        palette_start=header_end,  # only <= 8-bit images read it, and they have no masks
        palette_entry=3 if size == 12 else 4,
        colors_used=colors_used,
        pixel_offset=pixel_offset,
        icc_profile=icc,
    )


def _masks(
    data: bytes, dib: bytes, size: int, bits: int, compression: int, header_end: int
) -> tuple[int, int, int, int]:
    if compression in (BI_BITFIELDS, BI_ALPHABITFIELDS):
        if size >= 52:
            r, g, b = struct.unpack_from("<III", dib, 40)
            a = _u32(dib, 52) if size >= 56 or compression == BI_ALPHABITFIELDS else 0
        else:
            count = 4 if compression == BI_ALPHABITFIELDS else 3
            if len(data) < header_end + 4 * count:
                raise TruncatedImage(
                    f"BMP colour masks end at byte {len(data)} of {header_end + 4 * count} needed"
                )
            r, g, b, a = (*struct.unpack_from(f"<{count}I", data, header_end), 0)[:4]
        limit = (1 << bits) - 1
        return r & limit, g & limit, b & limit, a & limit
    if bits == 16:
        return 0x7C00, 0x03E0, 0x001F, 0
    if bits == 32:
        alpha = _u32(dib, 52) if size >= 56 else 0
        return 0xFF0000, 0xFF00, 0xFF, alpha or 0xFF000000
    return 0xFF0000, 0xFF00, 0xFF, 0


def read_bmp_header(data: bytes) -> BmpHeader:
    """Parse the file and DIB headers without touching the pixel data."""
    try:
        return _parse(data).header
    except ImageError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError) as exc:
        raise CorruptImage(f"unreadable BMP header: {exc}") from None


def decode_bmp(data: bytes, *, max_pixels: int) -> pyvips.Image:
    """Decode a BMP file into an 8-bit sRGB (3-band) or RGBA (4-band) pyvips image."""
    try:
        layout = _parse(data)
        hdr = layout.header
        if hdr.width * hdr.height > max_pixels:
            raise TooLarge(
                f"{hdr.width}x{hdr.height} = {hdr.width * hdr.height:,} px exceeds "
                f"--max-pixels {max_pixels:,}"
            )
        if layout.pixel_offset > len(data):
            raise TruncatedImage(
                f"BMP pixel data starts at byte {layout.pixel_offset:,} "
                f"but the file ends at byte {len(data):,}"
            )
        if hdr.compression in (BI_RLE8, BI_RLE4) or (layout.os2 and hdr.compression == OS2_RLE24):
            pixels = _decode_rle(data, layout)
        else:
            pixels = _decode_plain(data, layout)
        if not hdr.top_down:
            pixels = pixels[::-1]
        pixels = np.ascontiguousarray(pixels)
        bands = pixels.shape[2]
        image = pyvips.Image.new_from_memory(
            pixels.tobytes(), hdr.width, hdr.height, bands, "uchar"
        ).copy(interpretation="srgb")
        if layout.icc_profile:
            image.set_type(pyvips.GValue.blob_type, "icc-profile-data", layout.icc_profile)
        return image
    except ImageError:
        raise
    except (struct.error, ValueError, IndexError, OverflowError, pyvips.Error) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptImage(f"undecodable BMP: {message}") from None


def _palette(data: bytes, layout: _Layout) -> U8:
    """The palette as 256 RGB rows; entries the file does not provide are black."""
    bits = layout.header.bits_per_pixel
    count = min(layout.colors_used or (1 << bits), 1 << bits)
    if layout.pixel_offset > layout.palette_start:
        # Some writers (OS/2 v1 especially) store fewer entries than 2**bits.
        room = (layout.pixel_offset - layout.palette_start) // layout.palette_entry
        count = min(count, room)
    raw = data[layout.palette_start : layout.palette_start + count * layout.palette_entry]
    count = len(raw) // layout.palette_entry
    entries = np.frombuffer(raw, np.uint8, count * layout.palette_entry)
    palette = np.zeros((256, 3), np.uint8)
    palette[:count] = entries.reshape(count, layout.palette_entry)[:, 2::-1]
    return palette


def _decode_plain(data: bytes, layout: _Layout) -> U8:
    """Uncompressed and BITFIELDS rows, in file order (bottom-up unless flagged top-down)."""
    hdr = layout.header
    w, h, bits = hdr.width, hdr.height, hdr.bits_per_pixel
    stride = (w * bits + 31) // 32 * 4
    row_bytes = (w * bits + 7) // 8
    start = layout.pixel_offset
    # The last row's padding is often missing; every byte that carries a pixel must be there.
    needed = start + stride * (h - 1) + row_bytes
    if len(data) < needed:
        raise TruncatedImage(f"BMP pixel data ends at byte {len(data):,} of {needed:,} needed")
    buf = data if len(data) >= start + stride * h else data + bytes(start + stride * h - len(data))
    rows: U8 = np.ndarray((h, stride), np.uint8, buf, start)

    if bits <= 8:
        if bits == 8:
            indices = rows[:, :w]
        else:
            per_byte = 8 // bits
            shifts = np.arange(8 - bits, -1, -bits, dtype=np.uint8)
            unpacked = (rows[:, :row_bytes, None] >> shifts) & np.uint8((1 << bits) - 1)
            indices = unpacked.reshape(h, row_bytes * per_byte)[:, :w]
        return _palette(data, layout)[indices]

    if bits == 24 and hdr.compression == BI_RGB:
        return rows[:, : w * 3].reshape(h, w, 3)[:, :, ::-1]

    values: U32
    if bits == 24:
        trip = rows[:, : w * 3].reshape(h, w, 3).astype(np.uint32)
        values = trip[:, :, 0] | (trip[:, :, 1] << np.uint32(8)) | (trip[:, :, 2] << np.uint32(16))
    else:
        dtype = np.dtype("<u2") if bits == 16 else np.dtype("<u4")
        values = np.ndarray((h, w), dtype, buf, start, (stride, dtype.itemsize)).astype(np.uint32)

    r, g, b, a = layout.masks
    channels = [_channel(values, mask) for mask in (r, g, b)]
    alpha = _channel(values, a) if a else None
    if alpha is not None and (not alpha.any() or bool((alpha == 255).all())):
        alpha = None
    if alpha is not None:
        channels.append(alpha)
    return np.stack(channels, axis=2)


def _channel(values: U32, mask: int) -> U8:
    """Extract one masked field and scale its n bits to 8 (v * 255 / (2**n - 1), rounded)."""
    if mask == 0:
        return np.zeros(values.shape, np.uint8)
    shift = (mask & -mask).bit_length() - 1
    top = mask >> shift
    field = (values & np.uint32(mask)) >> np.uint32(shift)
    if top == 255:
        return field.astype(np.uint8)
    # uint32 is enough while top * 255 + top // 2 stays below 2**32, i.e. fields up to 24 bits.
    wide = field.astype(np.uint64) if top >= 1 << 24 else field
    scaled = (wide * 255 + top // 2) // top
    return scaled.astype(np.uint8)


def _decode_rle(data: bytes, layout: _Layout) -> U8:
    """Run an RLE8/RLE4/RLE24 stream into rows in file order; unwritten pixels are transparent."""
    hdr = layout.header
    w, h, comp = hdr.width, hdr.height, hdr.compression
    depth = 3 if comp == OS2_RLE24 else 1  # bytes per decoded pixel: BGR or a palette index
    out = bytearray(w * h * depth)
    # The cursor only ever moves forward in raster order, so the pixels never written are exactly
    # the stretches it jumps over (end-of-line, delta, early end); recording those is far cheaper
    # than marking every written pixel.
    gaps: list[tuple[int, int]] = []
    pos, end = layout.pixel_offset, len(data)
    x = y = 0
    finished = False

    while y < h and pos + 2 <= end:
        n, code = data[pos], data[pos + 1]
        pos += 2
        if n or code > 2:
            if n:
                if comp == BI_RLE8:
                    chunk = bytes((code,)) * n
                elif comp == BI_RLE4:
                    chunk = bytes((code >> 4, code & 15)) * ((n + 1) // 2)
                else:
                    if pos + 2 > end:
                        break
                    chunk = bytes((code, data[pos], data[pos + 1])) * n
                    pos += 2
            else:
                n = code
                size = (n + 1) // 2 if comp == BI_RLE4 else n * depth
                if pos + size > end:
                    break
                chunk = data[pos : pos + size]
                if comp == BI_RLE4:
                    chunk = bytes(v for byte in chunk for v in (byte >> 4, byte & 15))
                pos += size + (size & 1)
            # Pixels past the right edge are dropped: a run never wraps onto the next row.
            count = min(n, w - x)
            if count > 0:
                at = (y * w + x) * depth
                out[at : at + count * depth] = chunk[: count * depth]
            x += n
        elif code == 1:
            finished = True
            break
        else:
            if code == 2:
                if pos + 2 > end:
                    break
                nx, ny = x + data[pos], y + data[pos + 1]
                pos += 2
            else:
                nx, ny = 0, y + 1
            gaps.append((y * w + min(x, w), min(ny * w + min(nx, w), w * h)))
            x, y = nx, ny

    complete = y >= h or (y == h - 1 and (finished or x >= w))
    if not complete:
        if finished:
            raise TruncatedImage(f"BMP RLE stream ends at row {y + 1} of {h}")
        raise TruncatedImage(f"BMP RLE data ends at byte {end:,} in row {y + 1} of {h}")
    if y < h:
        gaps.append((y * w + min(x, w), w * h))

    pixels = np.frombuffer(bytes(out), np.uint8).reshape(h, w, depth)
    rgb = pixels[:, :, ::-1] if depth == 3 else _palette(data, layout)[pixels[:, :, 0]]
    gaps = [(a, b) for a, b in gaps if b > a]
    if not gaps:
        return rgb
    flat = np.full(w * h, 255, np.uint8)
    for a, b in gaps:
        flat[a:b] = 0
    alpha = flat.reshape(h, w)
    rgb = np.where(alpha[:, :, None] == 0, np.uint8(0), rgb)
    return np.concatenate([rgb, alpha[:, :, None]], axis=2)


def header(source: str | bytes) -> Header:
    """The decoder table's header reader (``optimizr.decoders``)."""
    bmp = read_bmp_header(read_source(source, 4096))
    return Header("bmp", bmp.width, bmp.height, 4 if bmp.has_alpha else 3)


def decode(source: str | bytes, options: EncodeOptions) -> pyvips.Image:
    """The decoder table's decoder (``optimizr.decoders``)."""
    return decode_bmp(read_source(source), max_pixels=options.max_pixels)
