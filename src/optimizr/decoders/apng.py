"""Animated PNG (APNG) decoding.

libvips' PNG loader returns only the default image of an APNG, so this module
walks the chunk stream itself (APNG specification 1.0), rebuilds every frame as
a standalone PNG that libvips can decode, and composites the frames onto the
canvas with numpy. The result has the "toilet-roll" layout that libvips' own
animated loaders produce (frames stacked vertically, ``page-height``,
``n-pages``, ``delay``, ``loop``), so ``webpsave`` writes an animated WebP.

Every problem with the input becomes an :class:`~optimizr.errors.ImageError`;
all sizes are checked against the canvas and ``max_pixels`` before anything is
allocated from them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

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

__all__ = ["ApngInfo", "decode_apng", "read_apng_info"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_UINT31 = 0x7FFFFFFF  # PNG's limit for lengths, dimensions and offsets
# Chunks from before the IDAT that a frame's standalone PNG needs (PLTE and tRNS change the
# pixels; the others keep each frame a faithful copy of the file's colour description).
_FRAME_CONTEXT = frozenset({b"PLTE", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP"})
# A bad CRC here makes the frame structure or pixels untrustworthy, so it is fatal.
# Ancillary chunks with a bad CRC are dropped instead, as libpng does.
_CRC_CHECKED = frozenset({b"IHDR", b"PLTE", b"IDAT", b"acTL", b"fcTL", b"fdAT"})
_DISPOSE_NONE, _DISPOSE_BACKGROUND, _DISPOSE_PREVIOUS = 0, 1, 2
_BLEND_SOURCE, _BLEND_OVER = 0, 1

Pixels = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ApngInfo:
    width: int
    height: int
    num_frames: int
    num_plays: int  # 0 = loop forever
    default_image_is_first_frame: bool  # fcTL before IDAT


@dataclass
class _Frame:
    x: int
    y: int
    width: int
    height: int
    delay_ms: int
    dispose: int
    blend: int
    data: list[memoryview] = field(default_factory=list)  # zlib stream pieces


def _chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """Yield ``(type, data offset, data length)`` for every chunk up to and including IEND."""
    if not data.startswith(PNG_SIGNATURE):
        raise NotAnImage("no PNG signature")
    pos = len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise TruncatedImage(f"PNG data ends at byte {len(data)} before the IEND chunk")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        if length > _MAX_UINT31 or not ctype.isalpha():
            raise CorruptImage(f"invalid PNG chunk header at byte {pos}")
        start = pos + 8
        if start + length + 4 > len(data):
            raise TruncatedImage(f"PNG data ends inside the {ctype.decode()} chunk at byte {pos}")
        yield ctype, start, length
        if ctype == b"IEND":
            return
        pos = start + length + 4


def _crc_ok(data: bytes, start: int, length: int) -> bool:
    # The CRC covers the chunk type and data, not the length field.
    stored: int = struct.unpack_from(">I", data, start + length)[0]
    return zlib.crc32(memoryview(data)[start - 4 : start + length]) == stored


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def read_apng_info(data: bytes) -> ApngInfo | None:
    """None unless the PNG is animated: an acTL chunk before the first IDAT (and num_frames >= 1).

    Reads chunk headers only; never decompresses pixels.
    """
    size: tuple[int, int] | None = None
    actl: tuple[int, int] | None = None
    fctl_first = False
    try:
        for ctype, start, length in _chunks(data):
            if size is None:
                if ctype != b"IHDR" or length != 13:
                    return None
                size = struct.unpack_from(">II", data, start)
            elif ctype == b"acTL" and length == 8 and actl is None:
                actl = struct.unpack_from(">II", data, start)
            elif ctype == b"fcTL":
                fctl_first = True
            elif ctype == b"IDAT":
                break
    except ImageError:
        # Data cut after the acTL is still an APNG: routing it to decode_apng lets that
        # report it as truncated instead of the plain PNG loader showing a still image.
        pass
    if size is None or actl is None or actl[0] < 1:
        return None
    width, height = size
    if not (1 <= width <= _MAX_UINT31 and 1 <= height <= _MAX_UINT31):
        return None
    return ApngInfo(width, height, actl[0], actl[1], fctl_first)


def _parse_fctl(body: bytes, width: int, height: int, expected_seq: int) -> _Frame:
    if len(body) != 26:
        raise CorruptImage(f"fcTL chunk has {len(body)} bytes, expected 26")
    seq, w, h, x, y, num, den, dispose, blend = struct.unpack(">IIIIIHHBB", body)
    if seq != expected_seq:
        raise CorruptImage(f"APNG sequence number {seq} where {expected_seq} was expected")
    if w == 0 or h == 0:
        raise CorruptImage(f"APNG frame {w}x{h} has zero size")
    if x + w > width or y + h > height:
        raise CorruptImage(f"APNG frame {w}x{h}+{x}+{y} lies outside the {width}x{height} canvas")
    if dispose > _DISPOSE_PREVIOUS or blend > _BLEND_OVER:
        raise CorruptImage(f"APNG frame has dispose_op {dispose}, blend_op {blend}")
    den = den or 100  # the spec: a zero denominator means 1/100 s
    delay_ms = (num * 2000 + den) // (2 * den)  # num/den seconds, rounded half up
    return _Frame(x, y, w, h, delay_ms, dispose, blend)


def _parse(
    data: bytes, max_pixels: int
) -> tuple[bytes, list[tuple[bytes, bytes]], list[_Frame], int]:
    """Walk and validate the chunk stream; return (IHDR body, context chunks, frames, plays)."""
    view = memoryview(data)
    ihdr: bytes | None = None
    actl: tuple[int, int] | None = None
    context: list[tuple[bytes, bytes]] = []  # (type, whole chunk) in file order
    frames: list[_Frame] = []
    seq = 0
    idat_state = 0  # 0 before the IDAT run, 1 inside it, 2 after it
    fdat_target: _Frame | None = None  # frame that fdAT chunks currently belong to
    width = height = 0
    for ctype, start, length in _chunks(data):
        name = ctype.decode()
        if ctype in _CRC_CHECKED and not _crc_ok(data, start, length):
            raise CorruptImage(f"bad CRC in the {name} chunk at byte {start - 8}")
        body = view[start : start + length]
        if idat_state == 1 and ctype != b"IDAT":
            idat_state = 2
        if ihdr is None:
            if ctype != b"IHDR" or length != 13:
                raise CorruptImage("PNG does not start with an IHDR chunk")
            ihdr = bytes(body)
            width, height = struct.unpack_from(">II", ihdr)
            if not (1 <= width <= _MAX_UINT31 and 1 <= height <= _MAX_UINT31):
                raise CorruptImage(f"invalid PNG size {width}x{height}")
        elif ctype == b"acTL":
            if actl is not None or idat_state:
                continue  # only the first acTL before the image data counts (spec)
            if length != 8:
                raise CorruptImage(f"acTL chunk has {length} bytes, expected 8")
            actl = struct.unpack_from(">II", body)
            if not 1 <= actl[0] <= _MAX_UINT31:
                raise CorruptImage(f"acTL declares {actl[0]} frames")
            total = width * height * actl[0]
            if total > max_pixels:
                raise TooLarge(
                    f"{width}x{height} x {actl[0]} frames = {total} pixels, "
                    f"over the limit of {max_pixels}"
                )
        elif ctype == b"fcTL":
            if frames and not frames[-1].data:
                raise CorruptImage(f"APNG frame {len(frames) - 1} has no image data")
            frame = _parse_fctl(bytes(body), width, height, seq)
            seq += 1
            covers_canvas = (frame.x, frame.y, frame.width, frame.height) == (0, 0, width, height)
            if idat_state == 0 and not covers_canvas:  # the default image is the whole canvas
                raise CorruptImage("the default image's fcTL does not cover the whole canvas")
            frames.append(frame)
            fdat_target = frame if idat_state else None
        elif ctype == b"IDAT":
            if idat_state == 2:
                raise CorruptImage("IDAT chunks are not consecutive")
            if actl is None:
                raise UnsupportedImage("PNG is not animated (no acTL chunk before the IDAT)")
            idat_state = 1
            if frames:  # fcTL before IDAT: the default image is frame 0
                frames[0].data.append(body)
        elif ctype == b"fdAT":
            if fdat_target is None or length < 4:
                raise CorruptImage(f"fdAT chunk at byte {start - 8} belongs to no frame")
            (fdat_seq,) = struct.unpack_from(">I", body)
            if fdat_seq != seq:
                raise CorruptImage(f"APNG sequence number {fdat_seq} where {seq} was expected")
            seq += 1
            fdat_target.data.append(body[4:])
        elif ctype in _FRAME_CONTEXT and idat_state == 0 and _crc_ok(data, start, length):
            # Every iCCP is kept so libpng picks the profile as it would for a still PNG
            # (the first valid one); of the other types only the first copy is used.
            if ctype == b"iCCP" or all(ctype != kept for kept, _ in context):
                context.append((ctype, bytes(view[start - 8 : start + length + 4])))
        elif ctype != b"IEND" and ctype[:1].isupper():
            raise CorruptImage(f"unknown critical chunk {name}")
    if ihdr is None or actl is None or idat_state == 0:
        raise CorruptImage("PNG has no image data")
    if len(frames) > actl[0]:
        raise CorruptImage(f"acTL declares {actl[0]} frames but the file has {len(frames)}")
    if len(frames) < actl[0] or not frames[-1].data:
        found = len(frames) - (0 if frames and frames[-1].data else 1)
        raise TruncatedImage(f"acTL declares {actl[0]} frames but only {found} are present")
    return ihdr, context, frames, actl[1]


def _frame_png(
    ihdr: bytes, context: list[tuple[bytes, bytes]], frame: _Frame, first: bool
) -> bytes:
    """A standalone PNG of one frame: the file's header with the frame's size."""
    # The profile is read from the first frame only. Copying a (possibly huge) iCCP into
    # every frame would let a small file with many tiny frames cost frames x profile size.
    kept = [whole for ctype, whole in context if first or ctype != b"iCCP"]
    header = struct.pack(">II", frame.width, frame.height) + ihdr[8:]
    stream = b"".join(frame.data)
    step = 1 << 30  # keep every IDAT under PNG's 2**31 - 1 chunk length limit
    idats = [_chunk(b"IDAT", stream[i : i + step]) for i in range(0, max(len(stream), 1), step)]
    return b"".join([PNG_SIGNATURE, _chunk(b"IHDR", header), *kept, *idats, _chunk(b"IEND", b"")])


def _vips_error(exc: pyvips.Error, what: str) -> ImageError:
    message = " ".join(str(exc).split())  # libvips messages span lines; ours are one line
    lowered = message.lower()
    if "end of" in lowered or "truncat" in lowered:
        return TruncatedImage(f"{what}: {message}")
    return CorruptImage(f"{what}: {message}")


def _decode_frame(png: bytes, frame: _Frame, index: int) -> tuple[Pixels, bytes | None]:
    """Decode one frame PNG to straight-alpha 8-bit RGBA; also return its ICC profile."""
    try:
        image = pyvips.Image.new_from_buffer(png, "", access="sequential", fail_on="error")
        raw: bytes = image.write_to_memory()
        icc: bytes | None = None
        if image.get_typeof("icc-profile-data") != 0:
            icc = bytes(image.get("icc-profile-data"))
    except pyvips.Error as exc:
        raise _vips_error(exc, f"APNG frame {index}") from exc
    formats: dict[str, type[np.uint8] | type[np.uint16]] = {"uchar": np.uint8, "ushort": np.uint16}
    bands = int(image.bands)
    size = (int(image.width), int(image.height))
    if image.format not in formats or not 1 <= bands <= 4 or size != (frame.width, frame.height):
        raise CorruptImage(f"APNG frame {index} decoded as {image.format} x {bands} at {size}")
    pixels = np.frombuffer(raw, dtype=formats[image.format]).reshape(frame.height, frame.width, -1)
    if pixels.dtype == np.uint16:
        # Round to nearest: 257 is odd, so (v + 128) // 257 is never a tie.
        pixels = (pixels.astype(np.uint32) + 128) // 257
    pixels8 = pixels.astype(np.uint8)
    colour = np.repeat(pixels8[..., :1], 3, axis=2) if bands <= 2 else pixels8[..., :3]
    if bands in (2, 4):
        alpha = pixels8[..., -1:]
    else:
        alpha = np.full((frame.height, frame.width, 1), 255, dtype=np.uint8)
    return np.concatenate([colour, alpha], axis=2), icc


def _over(src: Pixels, dst: Pixels) -> Pixels:
    """Straight-alpha Porter-Duff 'over' (PNG spec, Alpha Channel Processing)."""
    sa = src[..., 3:].astype(np.float32) / 255
    da = dst[..., 3:].astype(np.float32) / 255
    weight = da * (1 - sa)  # share of the destination that shows through
    out_a = sa + weight
    colour = (src[..., :3] * sa + dst[..., :3] * weight) / np.where(out_a > 0, out_a, 1)
    blended = np.rint(np.concatenate([colour, out_a * 255], axis=2)).clip(0, 255)
    # Opaque and fully transparent source pixels are copied untouched so rounding can
    # never alter them (this keeps them bit-identical with other decoders).
    return np.where(sa == 1, src, np.where(sa == 0, dst, blended.astype(np.uint8)))


def decode_apng(data: bytes, *, max_pixels: int) -> pyvips.Image:
    """All animation frames, fully composited onto the canvas, as one 'toilet-roll' pyvips image."""
    ihdr, context, frames, plays = _parse(data, max_pixels)
    width, height = struct.unpack_from(">II", ihdr)
    canvas = np.zeros((height, width, 4), dtype=np.uint8)  # transparent black (spec)
    roll = np.empty((len(frames), height, width, 4), dtype=np.uint8)
    icc: bytes | None = None
    for index, frame in enumerate(frames):
        png = _frame_png(ihdr, context, frame, first=index == 0)
        pixels, frame_icc = _decode_frame(png, frame, index)
        if index == 0:
            icc = frame_icc
        region = (slice(frame.y, frame.y + frame.height), slice(frame.x, frame.x + frame.width))
        dispose = frame.dispose
        if index == 0 and dispose == _DISPOSE_PREVIOUS:
            dispose = _DISPOSE_BACKGROUND  # the spec: nothing "previous" exists yet
        saved = canvas[region].copy() if dispose == _DISPOSE_PREVIOUS else None
        if frame.blend == _BLEND_OVER:
            canvas[region] = _over(pixels, canvas[region])
        else:
            canvas[region] = pixels
        roll[index] = canvas
        if dispose == _DISPOSE_BACKGROUND:
            canvas[region] = 0
        elif saved is not None:
            canvas[region] = saved
    try:
        # copy() makes a partial image, so copy_memory() renders it into memory that libvips
        # owns and severs the link to `roll`. (copy_memory() straight on new_from_memory()
        # would just re-wrap the numpy buffer without pyvips' keep-alive reference.)
        image = (
            pyvips.Image.new_from_memory(roll.data, width, height * len(frames), 4, "uchar")
            .copy(interpretation="srgb")
            .copy_memory()
        )
    except pyvips.Error as exc:
        raise TooLarge(f"{width}x{height} x {len(frames)} frames: {exc.message}") from exc
    image.set_type(pyvips.GValue.gint_type, "page-height", height)
    image.set_type(pyvips.GValue.gint_type, "n-pages", len(frames))
    image.set_type(pyvips.GValue.array_int_type, "delay", [f.delay_ms for f in frames])
    image.set_type(pyvips.GValue.gint_type, "loop", min(plays, _MAX_UINT31))  # gint
    if icc:
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", icc)
    return image


def header(source: str | bytes) -> Header | None:
    """The decoder table's header reader (``optimizr.decoders``)."""
    info = read_apng_info(read_source(source))
    if info is None:
        return None
    return Header("apng", info.width, info.height, 4, info.num_frames)


def decode(source: str | bytes, options: EncodeOptions) -> pyvips.Image:
    """The decoder table's decoder (``optimizr.decoders``)."""
    return decode_apng(read_source(source), max_pixels=options.max_pixels)
