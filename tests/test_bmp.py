"""Tests for the pure-Python BMP decoder (libvips in pyvips-binary cannot load BMP)."""

from __future__ import annotations

import io
import os
import random
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import pyvips
from PIL import Image

from optimizr.decoders.bmp import BmpHeader, decode_bmp, read_bmp_header
from optimizr.errors import (
    CorruptImage,
    ImageError,
    NotAnImage,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
)

BIG = 100_000_000
U8 = npt.NDArray[np.uint8]


# --- helpers -------------------------------------------------------------------------------


def pixels(image: pyvips.Image) -> U8:
    """The decoded image as an (h, w, bands) uint8 array, after checking its format."""
    assert image.format == "uchar"
    assert image.interpretation == "srgb"
    arr = np.frombuffer(image.write_to_memory(), dtype=np.uint8)
    return arr.reshape(image.height, image.width, image.bands)


def pillow_bmp(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="BMP")
    return buf.getvalue()


def build_bmp(
    width: int,
    height: int,
    bits: int,
    data: bytes,
    *,
    compression: int = 0,
    palette: bytes = b"",
    header_size: int = 40,
    masks: tuple[int, ...] = (),
    colors_used: int = 0,
    icc: bytes = b"",
) -> bytes:
    """A BMP file with a Windows header of ``header_size`` (40, 108 or 124) or a 12-byte core."""
    if header_size == 12:
        dib = struct.pack("<IHHHH", 12, width, height, 1, bits)
    else:
        dib = struct.pack(
            "<IiiHHIIiiII",
            header_size,
            width,
            height,
            1,
            bits,
            compression,
            len(data),
            2835,
            2835,
            colors_used,
            0,
        )
        if header_size == 40:
            dib += struct.pack(f"<{len(masks)}I", *masks)  # masks follow a 40-byte header
        else:
            full = (*masks, 0, 0, 0, 0)[:4]
            cs_type = 0x4D424544 if icc else 0x73524742  # 'MBED' or 'sRGB'
            dib += struct.pack("<4II", *full, cs_type) + bytes(36 + 12)
            if header_size == 124:
                start = 124 + len(palette) + len(data)  # the profile follows the pixels
                dib += struct.pack("<IIII", 4, start, len(icc), 0)
    offset = 14 + len(dib) + len(palette)
    body = dib + palette + data + icc
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, offset) + body


def rows_bottom_up(rows: list[bytes]) -> bytes:
    """Pad each top-to-bottom row to 4 bytes and store them bottom-up, as BMP does."""
    return b"".join(r + bytes(-len(r) % 4) for r in reversed(rows))


def bgrx(colors: list[tuple[int, int, int]]) -> bytes:
    return b"".join(bytes((b, g, r, 0)) for r, g, b in colors)


def scale(v: U8 | npt.NDArray[np.int64], bits: int) -> U8:
    """Reference n-bit -> 8-bit scaling, computed in floating point."""
    return np.rint(np.asarray(v, dtype=np.float64) * 255 / ((1 << bits) - 1)).astype(np.uint8)


# --- Pillow-written files ------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "size"), [("1", (37, 11)), ("L", (13, 9)), ("RGB", (13, 7))])
def test_pillow_written_matches_pillow(mode: str, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    w, h = size
    if mode == "RGB":
        src = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    else:
        src = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
    data = pillow_bmp(src)
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    got = pixels(decode_bmp(data, max_pixels=BIG))
    assert got.shape == (h, w, 3)
    np.testing.assert_array_equal(got, expected)


def test_pillow_palette_8bit() -> None:
    rng = np.random.default_rng(2)
    src = Image.fromarray(rng.integers(0, 200, (10, 21), dtype=np.uint8), mode="L").convert("P")
    src.putpalette(rng.integers(0, 256, 600, dtype=np.uint8).tobytes())
    data = pillow_bmp(src)
    assert read_bmp_header(data).bits_per_pixel == 8
    np.testing.assert_array_equal(
        pixels(decode_bmp(data, max_pixels=BIG)), np.asarray(src.convert("RGB"))
    )


def test_pillow_rgba_keeps_alpha() -> None:
    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (6, 9, 4), dtype=np.uint8)
    data = pillow_bmp(Image.fromarray(arr))
    hdr = read_bmp_header(data)
    assert (hdr.bits_per_pixel, hdr.compression, hdr.has_alpha) == (32, 0, True)
    np.testing.assert_array_equal(pixels(decode_bmp(data, max_pixels=BIG)), arr)


@pytest.mark.parametrize("alpha", [0, 255])
def test_unused_alpha_gives_rgb(alpha: int) -> None:
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (5, 7, 4), dtype=np.uint8)
    arr[:, :, 3] = alpha
    got = pixels(decode_bmp(pillow_bmp(Image.fromarray(arr)), max_pixels=BIG))
    np.testing.assert_array_equal(got, arr[:, :, :3])


# --- hand-built files ----------------------------------------------------------------------


def test_16bit_565_bitfields() -> None:
    rng = np.random.default_rng(5)
    w, h = 5, 3  # 10-byte rows exercise the padding
    values = rng.integers(0, 1 << 16, (h, w), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0xFFFF, 0
    rows = [r.astype("<u2").tobytes() for r in values]
    data = build_bmp(w, h, 16, rows_bottom_up(rows), compression=3, masks=(0xF800, 0x07E0, 0x1F))
    v = values.astype(np.int64)
    expected = np.stack([scale(v >> 11, 5), scale((v >> 5) & 63, 6), scale(v & 31, 5)], axis=2)
    got = pixels(decode_bmp(data, max_pixels=BIG))
    np.testing.assert_array_equal(got, expected)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [0, 0, 0]


def test_16bit_default_555() -> None:
    values = np.array([[0x7C00, 0x03E0, 0x001F, 0x8000 | 0x4210]], dtype=np.uint16)
    data = build_bmp(4, 1, 16, values.astype("<u2").tobytes())
    got = pixels(decode_bmp(data, max_pixels=BIG))
    half = int(scale(np.array(16), 5))
    assert got[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [half, half, half]]


def test_32bit_odd_bitfields_with_alpha_v4() -> None:
    rng = np.random.default_rng(6)
    w, h = 4, 3
    values = rng.integers(0, 1 << 32, (h, w), dtype=np.uint32)
    masks = (0x000003FF, 0x000FFC00, 0x3FF00000, 0xC0000000)  # 10-10-10-2, red lowest
    rows = [r.astype("<u4").tobytes() for r in values]
    data = build_bmp(w, h, 32, rows_bottom_up(rows), compression=3, masks=masks, header_size=108)
    v = values.astype(np.int64)
    expected = np.stack(
        [
            scale(v & 1023, 10),
            scale((v >> 10) & 1023, 10),
            scale((v >> 20) & 1023, 10),
            scale(v >> 30, 2),
        ],
        axis=2,
    )
    assert read_bmp_header(data).has_alpha
    np.testing.assert_array_equal(pixels(decode_bmp(data, max_pixels=BIG)), expected)


def test_alphabitfields_after_40_byte_header() -> None:
    px = [bytes((10, 20, 30, 40)), bytes((50, 60, 70, 80))]  # stored as A B G R
    data = build_bmp(
        2,
        1,
        32,
        b"".join(px),
        compression=6,
        masks=(0x000000FF, 0x0000FF00, 0x00FF0000, 0xFF000000),
    )
    assert read_bmp_header(data) == BmpHeader(2, 1, 32, 6, True, False)
    got = pixels(decode_bmp(data, max_pixels=BIG))
    assert got[0].tolist() == [[10, 20, 30, 40], [50, 60, 70, 80]]


def test_bitfields_without_alpha_mask_is_rgb() -> None:
    data = build_bmp(1, 1, 32, bytes((1, 2, 3, 4)), compression=3, masks=(0xFF0000, 0xFF00, 0xFF))
    assert not read_bmp_header(data).has_alpha
    assert pixels(decode_bmp(data, max_pixels=BIG))[0].tolist() == [[3, 2, 1]]


def test_top_down_and_bottom_up_agree() -> None:
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    rows = [r[:, ::-1].tobytes() for r in arr]  # BGR
    bottom_up = build_bmp(3, 4, 24, rows_bottom_up(rows))
    top_down = build_bmp(3, -4, 24, rows_bottom_up(rows[::-1]))
    hdr = read_bmp_header(top_down)
    assert (hdr.height, hdr.top_down) == (4, True)
    assert not read_bmp_header(bottom_up).top_down
    np.testing.assert_array_equal(pixels(decode_bmp(top_down, max_pixels=BIG)), arr)
    np.testing.assert_array_equal(pixels(decode_bmp(bottom_up, max_pixels=BIG)), arr)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_packed_palettes(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w, h, n = 7, 3, 1 << bits
    colors = [(int(r), int(g), int(b)) for r, g, b in rng.integers(0, 256, (n, 3))]
    idx = rng.integers(0, n, (h, w))
    rows = []
    for r in idx:
        bitstring = "".join(format(int(i), f"0{bits}b") for i in r)
        bitstring += "0" * (-len(bitstring) % 8)
        rows.append(int(bitstring, 2).to_bytes(len(bitstring) // 8, "big"))
    data = build_bmp(w, h, bits, rows_bottom_up(rows), palette=bgrx(colors))
    expected = np.array(colors, dtype=np.uint8)[idx]
    np.testing.assert_array_equal(pixels(decode_bmp(data, max_pixels=BIG)), expected)


def test_os2_core_header_short_three_byte_palette() -> None:
    # Only 3 of 256 entries are stored; index 3 must not read pixel bytes as a palette entry.
    colors = [(255, 0, 0), (0, 128, 255), (7, 8, 9)]
    palette = b"".join(bytes((b, g, r)) for r, g, b in colors)
    stored = rows_bottom_up([bytes((0, 1, 2, 3)), bytes((2, 1, 0, 3))])
    data = build_bmp(4, 2, 8, stored, palette=palette, header_size=12)
    hdr = read_bmp_header(data)
    assert (hdr.width, hdr.height, hdr.bits_per_pixel) == (4, 2, 8)
    got = pixels(decode_bmp(data, max_pixels=BIG))
    black = [0, 0, 0]
    assert got.tolist() == [
        [*[list(c) for c in colors], black],
        [*[list(c) for c in colors[::-1]], black],
    ]


def test_palette_index_beyond_palette_is_black() -> None:
    data = build_bmp(
        2, 1, 8, bytes((1, 200)) + bytes(2), palette=bgrx([(1, 1, 1), (9, 8, 7)]), colors_used=2
    )
    assert pixels(decode_bmp(data, max_pixels=BIG))[0].tolist() == [[9, 8, 7], [0, 0, 0]]


def test_v5_embedded_icc_profile() -> None:
    profile = b"\x00\x00\x00\x30fake-icc-profile-bytes" + bytes(22)
    data = build_bmp(1, 1, 24, bytes((1, 2, 3, 0)), header_size=124, icc=profile)
    image = decode_bmp(data, max_pixels=BIG)
    assert bytes(image.get("icc-profile-data")) == profile
    assert pixels(image)[0].tolist() == [[3, 2, 1]]


def test_v5_profile_running_past_the_end_is_ignored() -> None:
    data = bytearray(build_bmp(1, 1, 24, bytes(4), header_size=124, icc=b"abcd"))
    struct.pack_into("<I", data, 14 + 116, 5000)  # profile size now runs past the file end
    image = decode_bmp(bytes(data), max_pixels=BIG)
    assert "icc-profile-data" not in image.get_fields()
    assert pixels(image).shape == (1, 1, 3)


PALETTE4 = [(10, 20, 30), (255, 0, 0), (0, 255, 0), (0, 0, 255)]  # index 0 is not black


def test_rle8_with_delta_and_eol() -> None:
    w, h = 6, 4
    stream = bytes(
        [
            3,
            1,
            0,
            3,
            2,
            3,
            1,
            0,  # row 0: run of three 1s, absolute [2, 3, 1] + pad
            0,
            0,  # end of line
            2,
            3,
            0,
            2,
            2,
            1,  # row 1: two 3s, then delta right 2, down 1
            4,
            2,
            0,
            0,  # row 2 from x=4: two 2s, end of line
            6,
            1,
            0,
            1,
        ]  # row 3: six 1s, end of bitmap
    )
    data = build_bmp(w, h, 8, stream, compression=1, palette=bgrx(PALETTE4))
    assert read_bmp_header(data).compression == 1
    expected_idx = np.array(
        [[1, 1, 1, 2, 3, 1], [3, 3, -1, -1, -1, -1], [-1, -1, -1, -1, 2, 2], [1] * 6]
    )[::-1]  # the stream is bottom-up
    got = pixels(decode_bmp(data, max_pixels=BIG))
    assert got.shape == (h, w, 4)
    colors = np.array(PALETTE4, dtype=np.uint8)
    for y, x in np.ndindex(h, w):
        i = expected_idx[y, x]
        want = [0, 0, 0, 0] if i < 0 else [*colors[i].tolist(), 255]
        assert got[y, x].tolist() == want, (y, x)


def test_rle4_with_absolute_delta_and_eol() -> None:
    w, h = 7, 3
    stream = bytes(
        [
            5,
            0x12,  # row 0: 1 2 1 2 1
            0,
            2,
            1,
            0,  # delta right 1
            0,
            0,  # end of line
            0,
            3,
            0x32,
            0x10,  # row 1: absolute 3 2 1 (odd count, word padded)
            4,
            0x33,
            0,
            0,  # four 3s, end of line
            5,
            0x01,
            0,
            1,
        ]  # row 2: 0 1 0 1 0, end of bitmap before the row is full
    )
    data = build_bmp(w, h, 4, stream, compression=2, palette=bgrx(PALETTE4))
    expected_idx = np.array(
        [[1, 2, 1, 2, 1, -1, -1], [3, 2, 1, 3, 3, 3, 3], [0, 1, 0, 1, 0, -1, -1]]
    )[::-1]
    got = pixels(decode_bmp(data, max_pixels=BIG))
    colors = np.array(PALETTE4, dtype=np.uint8)
    alpha = np.where(expected_idx < 0, 0, 255).astype(np.uint8)
    rgb = colors[np.maximum(expected_idx, 0)] * (alpha[:, :, None] // 255)
    np.testing.assert_array_equal(got, np.dstack([rgb, alpha]))


def test_fully_written_rle_is_rgb() -> None:
    stream = bytes([2, 1, 0, 0, 1, 2, 1, 3, 0, 1])
    data = build_bmp(2, 2, 8, stream, compression=1, palette=bgrx(PALETTE4))
    assert pixels(decode_bmp(data, max_pixels=BIG)).tolist() == [
        [[0, 255, 0], [0, 0, 255]],
        [[255, 0, 0], [255, 0, 0]],
    ]


def test_os2_rle24() -> None:
    dib = struct.pack("<IiiHHI", 64, 3, 2, 1, 24, 4) + bytes(64 - 20)
    stream = bytes([3, 1, 2, 3, 0, 0, 0, 3, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 1])
    data = b"BM" + struct.pack("<IHHI", 14 + 64 + len(stream), 0, 0, 78) + dib + stream
    hdr = read_bmp_header(data)
    assert (hdr.compression, hdr.bits_per_pixel) == (4, 24)
    got = pixels(decode_bmp(data, max_pixels=BIG))
    assert got.tolist() == [[[7, 8, 9], [4, 5, 6], [1, 2, 3]], [[3, 2, 1]] * 3]


def test_header_only_is_enough_for_read_bmp_header() -> None:
    data = build_bmp(4135, 4135, 32, b"")
    assert read_bmp_header(data) == BmpHeader(4135, 4135, 32, 0, True, False)


# --- errors --------------------------------------------------------------------------------


def test_huge_claim_tiny_file_is_truncated_without_allocating() -> None:
    data = build_bmp(4135, 4135, 32, b"\0\0\0\0", header_size=12)
    assert len(data) == 30
    tracemalloc.start()
    try:
        with pytest.raises(TruncatedImage, match="ends at byte 30 of"):
            decode_bmp(data, max_pixels=268_402_689)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000


def test_missing_last_row_padding_is_tolerated_but_missing_pixels_are_not() -> None:
    full = build_bmp(1, 2, 24, bytes((1, 2, 3, 0, 4, 5, 6, 0)))
    assert pixels(decode_bmp(full[:-1], max_pixels=BIG)).tolist() == [[[6, 5, 4]], [[3, 2, 1]]]
    with pytest.raises(TruncatedImage):
        decode_bmp(full[:-2], max_pixels=BIG)


def test_bad_bit_count_is_corrupt() -> None:
    data = build_bmp(4, 4, 30000, bytes(64))
    with pytest.raises(CorruptImage, match="30000"):
        read_bmp_header(data)
    with pytest.raises(CorruptImage):
        decode_bmp(data, max_pixels=BIG)


@pytest.mark.parametrize(("w", "h"), [(0, 4), (-3, 4), (4, 0)])
def test_impossible_dimensions_are_corrupt(w: int, h: int) -> None:
    with pytest.raises(CorruptImage, match="dimensions"):
        decode_bmp(build_bmp(w, h, 24, bytes(64)), max_pixels=BIG)


def test_too_large() -> None:
    data = build_bmp(100, 20, 24, bytes(300 * 20))
    with pytest.raises(TooLarge, match=r"100x20 = 2,000 px exceeds --max-pixels 1,000"):
        decode_bmp(data, max_pixels=1000)
    assert pixels(decode_bmp(data, max_pixels=2000)).shape == (20, 100, 3)


def test_cut_rle4_stream_is_truncated() -> None:
    stream = bytes([4, 0x12, 0, 0, 4, 0x12, 0, 0, 4, 0x12, 0, 0, 4, 0x12, 0, 0, 0, 1])
    data = build_bmp(4, 4, 4, stream, compression=2, palette=bgrx(PALETTE4))
    assert pixels(decode_bmp(data, max_pixels=BIG)).shape == (4, 4, 3)
    with pytest.raises(TruncatedImage, match="RLE data ends"):
        decode_bmp(data[:-8], max_pixels=BIG)
    with pytest.raises(TruncatedImage, match="RLE data ends"):
        decode_bmp(data[:-9], max_pixels=BIG)  # cut inside a run


def test_early_end_of_bitmap_is_truncated() -> None:
    stream = bytes([4, 0x12, 0, 0, 0, 1])
    data = build_bmp(4, 4, 4, stream, compression=2, palette=bgrx(PALETTE4))
    with pytest.raises(TruncatedImage, match="row 2 of 4"):
        decode_bmp(data, max_pixels=BIG)


@pytest.mark.parametrize(
    ("compression", "header_size", "exc"),
    [
        (4, 40, UnsupportedImage),
        (5, 108, UnsupportedImage),
        (3, 64, UnsupportedImage),
        (99, 40, CorruptImage),
    ],
)
def test_unsupported_compressions(compression: int, header_size: int, exc: type) -> None:
    dib = struct.pack("<IiiHHI", header_size, 2, 2, 1, 24, compression)
    dib += bytes(header_size - len(dib))
    data = b"BM" + struct.pack("<IHHI", 14 + len(dib) + 16, 0, 0, 14 + len(dib)) + dib
    with pytest.raises(exc):
        decode_bmp(data + bytes(16), max_pixels=BIG)


def test_rle_with_wrong_bit_count_is_corrupt() -> None:
    with pytest.raises(CorruptImage, match="compression 1 cannot have 4"):
        read_bmp_header(build_bmp(2, 2, 4, bytes(8), compression=1))


@pytest.mark.parametrize(
    ("data", "exc"),
    [
        (b"", NotAnImage),
        (b"GIF89a", NotAnImage),
        (b"BM" + bytes(10), TruncatedImage),
        (b"BM" + bytes(20), CorruptImage),
    ],
)
def test_not_a_bmp_or_short_header(data: bytes, exc: type) -> None:
    with pytest.raises(exc):
        decode_bmp(data, max_pixels=BIG)


def _fuzz_seeds() -> list[bytes]:
    rng = np.random.default_rng(9)
    rgba = Image.fromarray(rng.integers(0, 256, (5, 6, 4), dtype=np.uint8))
    rle = bytes([3, 1, 0, 3, 2, 3, 1, 0, 0, 0, 2, 3, 0, 2, 2, 1, 4, 2, 0, 0, 6, 1, 0, 1])
    return [
        pillow_bmp(rgba),
        pillow_bmp(rgba.convert("P")),
        build_bmp(6, 4, 8, rle, compression=1, palette=bgrx(PALETTE4)),
        build_bmp(2, 1, 32, bytes(8), compression=3, header_size=124, masks=(0xFF, 0xFF00, 0, 1)),
    ]


def test_fuzzed_files_only_raise_image_errors() -> None:
    rnd = random.Random(0)
    seeds = _fuzz_seeds()
    outcomes: dict[str, int] = {}
    for _ in range(300):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 8)):
            if len(data) < 4:
                break
            roll = rnd.random()
            if roll < 0.6:
                data[rnd.randrange(2, len(data))] = rnd.randrange(256)
            elif roll < 0.8:
                del data[rnd.randrange(2, len(data)) :]
            else:
                pos = rnd.randrange(2, min(len(data), 60))
                data[pos : pos + 4] = struct.pack("<i", rnd.choice([-1, 0, 1, 2**31 - 1, -(2**31)]))
        try:
            image = decode_bmp(bytes(data), max_pixels=1_000_000)
        except ImageError as exc:
            assert "\n" not in str(exc)
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        else:
            assert image.bands in (3, 4) and image.format == "uchar"
            outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert outcomes.get("ok", 0) > 0 and len(outcomes) > 2, outcomes


# --- real corpus ---------------------------------------------------------------------------


def corpus_dir() -> Path:
    root = os.environ.get("OPTIMIZR_CORPUS")
    if not root:
        pytest.skip("OPTIMIZR_CORPUS not set: the real-image corpus tests need it")
    return Path(root)


# Pillow cannot open these; each is checked against a sibling BMP Suite file of the same picture.
NOT_FOR_PILLOW = {"pal2.bmp", "rgb24rle24.bmp", "rgb32bf.bmp", "rgba32abf.bmp"}


def corpus_bmps() -> list[str]:
    root = os.environ.get("OPTIMIZR_CORPUS")
    if not root:
        return ["<OPTIMIZR_CORPUS not set>"]
    return sorted(p.name for p in (Path(root) / "other" / "bmp").glob("*.bmp"))


@pytest.mark.corpus
@pytest.mark.parametrize("name", corpus_bmps())
def test_corpus_bmp_matches_pillow(name: str) -> None:
    path = corpus_dir() / "other" / "bmp" / name
    image = decode_bmp(path.read_bytes(), max_pixels=BIG)
    got = pixels(image)
    if name in NOT_FOR_PILLOW:
        assert got.shape[:2] == (image.height, image.width) and got.size > 0
        return
    with Image.open(path) as src:
        expected = np.asarray(src.convert("RGBA" if got.shape[2] == 4 else "RGB"))
    assert got.shape == expected.shape
    diff = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    # Pillow widens 5/6-bit fields by bit replication; rounding division differs by at most 1.
    bitfields = read_bmp_header(path.read_bytes()).compression == 3
    assert int(diff.max()) <= (1 if bitfields else 0), name


@pytest.mark.corpus
def test_corpus_bmps_pillow_cannot_open() -> None:
    bmp = corpus_dir() / "other" / "bmp"

    def load(name: str) -> U8:
        return pixels(decode_bmp((bmp / name).read_bytes(), max_pixels=BIG)).astype(np.uint8)

    rgb24 = load("rgb24prof.bmp")  # the plain 24-bit BMP Suite picture, plus a profile
    np.testing.assert_array_equal(load("rgb32bf.bmp"), rgb24)
    np.testing.assert_array_equal(load("rgba32abf.bmp"), load("rgba32.bmp"))
    assert load("rgba32abf.bmp").shape[2] == 4
    # The RLE24 file is a dithered, 151-colour version of the same picture.
    rle24 = load("rgb24rle24.bmp").astype(np.float64)[:, :120]
    blocks = [a.reshape(8, 8, 15, 8, 3).mean(axis=(1, 3)) for a in (rle24, rgb24[:, :120])]
    assert np.abs(blocks[0] - blocks[1]).max() < 12
    grey = np.unique(load("pal2.bmp").reshape(-1, 3), axis=0)
    assert grey.tolist() == [[v, v, v] for v in (0, 85, 170, 255)]
    profile = decode_bmp((bmp / "rgb24prof.bmp").read_bytes(), max_pixels=BIG).get(
        "icc-profile-data"
    )
    assert bytes(profile[36:40]) == b"acsp"


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "exc"),
    [
        ("bmp_bad-bitcount.bmp", CorruptImage),
        ("bmp_rle4-cut-short.bmp", TruncatedImage),
        ("bomb_bmp_4135x4135_30-bytes.bmp", TruncatedImage),
        ("bomb_bmp_reallybig.bmp", TooLarge),
    ],
)
def test_corpus_broken_bmps(name: str, exc: type) -> None:
    data = (corpus_dir() / "broken" / name).read_bytes()
    with pytest.raises(exc):
        decode_bmp(data, max_pixels=268_402_689)
