"""encode_webp and convert_file, end to end: one image in, one WebP out.

Every input is made here with numpy + Pillow and every output is read back with
Pillow (the independent decoder) or by walking the WebP RIFF chunks by hand, so
no expectation comes from libvips itself. Expected pixel values come from the
source arrays, from Pillow's own decode of the source, or from Pillow's
LittleCMS binding (ImageCms) for colour conversions.
"""

from __future__ import annotations

import functools
import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms, ImageOps

from conftest import decode, photo_array, save_jpeg, save_png
from optimizr import EncodeOptions, convert_file, encode_webp
from optimizr.config import WEBP_MAX_DIMENSION
from optimizr.errors import (
    ImageError,
    NotAnImage,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
    UsageError,
)

W, H = 320, 240
PNG_SIG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- helpers


def _pillow_bytes(image: Image.Image, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _riff_chunks(webp: bytes) -> list[tuple[bytes, bytes]]:
    """Top-level (fourcc, payload) chunks of a WebP file (RIFF container spec)."""
    assert webp[:4] == b"RIFF" and webp[8:12] == b"WEBP", webp[:16]
    assert struct.unpack_from("<I", webp, 4)[0] + 8 == len(webp), "RIFF size mismatch"
    chunks, pos = [], 12
    while pos + 8 <= len(webp):
        fourcc, size = webp[pos : pos + 4], struct.unpack_from("<I", webp, pos + 4)[0]
        chunks.append((fourcc, webp[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    assert pos == len(webp), "trailing bytes after the last chunk"
    return chunks


def _fourccs(webp: bytes) -> list[bytes]:
    return [fourcc for fourcc, _ in _riff_chunks(webp)]


def _chunk(webp: bytes, fourcc: bytes) -> bytes | None:
    return next((body for cc, body in _riff_chunks(webp) if cc == fourcc), None)


def _vp8x_alpha_flag(webp: bytes) -> bool:
    vp8x = _chunk(webp, b"VP8X")
    return vp8x is not None and bool(vp8x[0] & 0x10)  # the 'L' (alpha) bit


def _arr(data: bytes | Image.Image, mode: str | None = None) -> np.ndarray:
    image = data if isinstance(data, Image.Image) else decode(data)
    return np.asarray(image.convert(mode) if mode else image).astype(np.int32)


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def _frames(webp: bytes) -> tuple[list[np.ndarray], list[int], int]:
    """(RGBA frames, durations in ms, loop) of an animated WebP, decoded by Pillow."""
    frames, durations = [], []
    with Image.open(io.BytesIO(webp)) as image:
        assert image.format == "WEBP"
        for index in range(image.n_frames):
            image.seek(index)
            image.load()
            frames.append(np.asarray(image.convert("RGBA")).astype(np.int32))
            durations.append(int(image.info["duration"]))
        loop = int(image.info["loop"])
    return frames, durations, loop


def _source_frames(data: bytes) -> list[np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        out = []
        for index in range(image.n_frames):
            image.seek(index)
            out.append(np.asarray(image.convert("RGBA")).astype(np.int32))
        return out


def _png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png16(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB/grey+alpha)."""
    height, width = array.shape[:2]
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        PNG_SIG
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def _ramp16(width: int = 256, height: int = 4) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


# A hand-made ICC v2 matrix/TRC display profile whose primaries are sRGB's
# rotated: the file's R channel drives sRGB's green primary, G drives blue and B
# drives red. Keeping it is therefore visibly different from converting it.
_SRGB_D50 = {
    "r": (0.4361, 0.2225, 0.0139),
    "g": (0.3851, 0.7169, 0.0971),
    "b": (0.1431, 0.0606, 0.7141),
}
_D50 = (0.9642, 1.0, 0.8249)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _icc_rotated_primaries(description: str = "GBR rotated test profile") -> bytes:
    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ \0\0\0\0" + _s15(x) + _s15(y) + _s15(z)

    text = description.encode() + b"\0"
    desc = b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 8 + b"\0" * 70
    curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
    tags = [
        (b"desc", desc),
        (b"cprt", b"text\0\0\0\0none\0"),
        (b"wtpt", xyz(*_D50)),
        (b"rXYZ", xyz(*_SRGB_D50["g"])),
        (b"gXYZ", xyz(*_SRGB_D50["b"])),
        (b"bXYZ", xyz(*_SRGB_D50["r"])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        body += b"\0" * (-(offset + len(body)) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    total = offset + len(body)
    header = struct.pack(">I4sI4s4s4s", total, b"none", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0) + b"".join(map(_s15, _D50))
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


@functools.cache
def _srgb_icc() -> bytes:
    # Cached: lcms stamps the profile with its creation time, so two calls a
    # second apart give different bytes and the comparisons below would flake.
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# Four distinct quadrant colours: any flip or rotation moves them.
_QUAD_COLOURS = ((220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 40))


def _quadrants(width: int = 96, height: int = 64) -> np.ndarray:
    array = np.zeros((height, width, 3), np.uint8)
    hh, hw = height // 2, width // 2
    array[:hh, :hw], array[:hh, hw:] = _QUAD_COLOURS[0], _QUAD_COLOURS[1]
    array[hh:, :hw], array[hh:, hw:] = _QUAD_COLOURS[2], _QUAD_COLOURS[3]
    return array


def _assert_quadrants(rgb: np.ndarray, tolerance: int = 16) -> None:
    """Each quadrant's centre patch has its upright colour."""
    height, width = rgb.shape[:2]
    centres = [
        (height // 4, width // 4),
        (height // 4, 3 * width // 4),
        (3 * height // 4, width // 4),
        (3 * height // 4, 3 * width // 4),
    ]
    py, px = max(1, height // 16), max(1, width // 16)
    for (cy, cx), colour in zip(centres, _QUAD_COLOURS, strict=True):
        patch = rgb[cy - py : cy + py, cx - px : cx + px].reshape(-1, 3).mean(axis=0)
        assert np.abs(patch - np.array(colour)).max() <= tolerance, (cy, cx, patch, colour)


# The transform that undoes what EXIF orientation n asks a viewer to do:
# storing upright.transpose(_STORE[n]) makes a file that displays as `upright`.
_STORE = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _oriented_jpeg(upright: np.ndarray, orientation: int, quality: int = 95) -> bytes:
    image = Image.fromarray(upright)
    transform = _STORE[orientation]
    stored = image if transform is None else image.transpose(transform)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pillow_bytes(stored, "JPEG", quality=quality, exif=exif.tobytes())
    # The test data itself is right: Pillow shows it upright.
    shown = ImageOps.exif_transpose(decode(data))
    assert shown.size == image.size
    _assert_quadrants(np.asarray(shown.convert("RGB")))
    return data


# ---------------------------------------------------------------- detection


def test_png_named_jpg_is_detected_as_png(tmp_path: Path) -> None:
    source = photo_array(W, H)
    path = save_png(tmp_path / "really-a-png.jpg", source)
    encoded = encode_webp(str(path), EncodeOptions())
    assert encoded.facts.format == "png"
    assert decode(encoded.webp).size == (W, H)
    assert _mae(_arr(encoded.webp, "RGB"), source) < 8


def test_text_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("these are my holiday notes, not a photo\n" * 20)
    with pytest.raises(NotAnImage) as info:
        encode_webp(str(path), EncodeOptions())
    assert info.value.reason == "not an image"
    result = convert_file(path, tmp_path / "notes.webp")
    assert (result.status, result.reason) == ("failed", "not an image")
    assert not (tmp_path / "notes.webp").exists()


def test_bytes_input_works_like_a_path(make_photo) -> None:
    path = make_photo("photo.jpg")
    options = EncodeOptions(quality=70, max_width=200)
    from_path = encode_webp(str(path), options)
    from_bytes = encode_webp(path.read_bytes(), options)
    assert from_bytes.facts.format == from_path.facts.format == "jpeg"
    assert from_bytes.facts.bytes_in == from_path.facts.bytes_in == path.stat().st_size
    assert decode(from_bytes.webp).size == (200, 150)
    assert from_bytes.webp == from_path.webp  # same decoder, same encoder, same bytes
    full = encode_webp(path.read_bytes(), EncodeOptions())
    assert full.webp == encode_webp(str(path), EncodeOptions()).webp


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("jpegxl", lambda: b"\xff\x0a" + b"\x00" * 200),
        ("openexr", lambda: b"v/1\x01" + b"\x00" * 200),
        ("radiance", lambda: b"#?RADIANCE\n" + b"\x00" * 200),
    ],
)
def test_recognised_but_unsupported_formats(tmp_path: Path, name: str, make) -> None:
    # (ICO, PSD and QOI were examples here until Pillow decoded them: issue 13.)
    path = tmp_path / f"image.{name}"
    path.write_bytes(make())
    with pytest.raises(UnsupportedImage) as info:
        encode_webp(str(path), EncodeOptions())
    assert info.value.reason == "unsupported"
    assert name in info.value.message
    with pytest.raises(UnsupportedImage):
        encode_webp(path.read_bytes(), EncodeOptions())


@pytest.mark.parametrize(
    ("fmt", "expected", "options", "tolerance"),
    [
        ("JPEG", "jpeg", {"quality": 95}, 6),
        ("PNG", "png", {}, 6),
        ("GIF", "gif", {}, 6),  # compared with Pillow's decode of the (palettised) GIF
        ("WEBP", "webp", {"lossless": True}, 6),
        ("TIFF", "tiff", {"compression": "tiff_lzw"}, 6),
        ("BMP", "bmp", {}, 6),
    ],
)
def test_each_input_format_converts(
    tmp_path: Path, fmt: str, expected: str, options: dict[str, object], tolerance: float
) -> None:
    data = _pillow_bytes(Image.fromarray(photo_array(W, H, seed=3)), fmt, **options)
    path = tmp_path / f"input.{expected}"
    path.write_bytes(data)
    encoded = encode_webp(str(path), EncodeOptions(quality=90))
    facts = encoded.facts
    assert facts.format == expected
    assert (facts.width_in, facts.height_in, facts.width_out, facts.height_out) == (W, H, W, H)
    assert (facts.frames, facts.bytes_in, facts.bytes_out) == (1, len(data), len(encoded.webp))
    out = decode(encoded.webp)
    assert out.size == (W, H)
    assert out.mode == "RGB"  # opaque sources give opaque WebPs
    reference = _arr(decode(data), "RGB")
    assert _mae(_arr(out, "RGB"), reference) < tolerance


# ---------------------------------------------------------------- encoder options


@pytest.fixture(scope="module")
def photo_png() -> tuple[bytes, np.ndarray]:
    source = photo_array(W, H, seed=1)
    return _pillow_bytes(Image.fromarray(source), "PNG"), source


def test_higher_quality_is_bigger_and_closer(photo_png) -> None:
    data, source = photo_png
    low = encode_webp(data, EncodeOptions(quality=30)).webp
    high = encode_webp(data, EncodeOptions(quality=90)).webp
    assert len(high) > len(low)
    assert _mae(_arr(high), source) < _mae(_arr(low), source)


def test_effort_0_and_6_both_decode_and_6_is_not_bigger(photo_png) -> None:
    data, source = photo_png
    fast = encode_webp(data, EncodeOptions(effort=0)).webp
    slow = encode_webp(data, EncodeOptions(effort=6)).webp
    for webp in (fast, slow):
        assert _fourccs(webp) == [b"VP8 "]
        assert _mae(_arr(webp), source) < 8
    assert len(slow) <= len(fast)


def test_lossless_rgb_is_pixel_exact(photo_png) -> None:
    data, source = photo_png
    encoded = encode_webp(data, EncodeOptions(lossless=True))
    assert _fourccs(encoded.webp) == [b"VP8L"]
    out = decode(encoded.webp)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), source)


def test_lossless_rgba_is_pixel_exact_where_visible() -> None:
    # Alpha ramps 0..255 left to right, so column 0 is fully transparent.
    source = photo_array(W, H, seed=2)
    alpha = np.tile((np.arange(W) * 255 // (W - 1)).astype(np.uint8), (H, 1))
    rgba = np.dstack([source, alpha])
    encoded = encode_webp(_pillow_bytes(Image.fromarray(rgba), "PNG"), EncodeOptions(lossless=True))
    assert b"VP8L" in _fourccs(encoded.webp)
    out = decode(encoded.webp)
    assert out.mode == "RGBA"
    got = np.asarray(out)
    assert np.array_equal(got[..., 3], alpha)
    visible = alpha > 0
    assert np.array_equal(got[visible], rgba[visible])
    # (The RGB *under* alpha == 0 is not kept: libwebp's default non-"exact"
    # mode rewrites invisible colour. See the report; not asserted either way.)


def test_lossless_rgba_without_transparent_pixels_is_exact() -> None:
    rng = np.random.default_rng(4)
    rgba = np.dstack([photo_array(W, H, seed=4), rng.integers(1, 256, (H, W), dtype=np.uint8)])
    encoded = encode_webp(_pillow_bytes(Image.fromarray(rgba), "PNG"), EncodeOptions(lossless=True))
    assert np.array_equal(np.asarray(decode(encoded.webp)), rgba)


def test_near_lossless_is_lossless_bitstream_with_small_error(photo_png) -> None:
    data, source = photo_png
    near = encode_webp(data, EncodeOptions(near_lossless=60)).webp
    lossless = encode_webp(data, EncodeOptions(lossless=True)).webp
    assert _fourccs(near) == [b"VP8L"]
    assert b"VP8 " not in _fourccs(near)
    err = np.abs(_arr(near) - source)
    assert 0 < err.max() <= 8  # near, not exact...
    assert err.mean() < 2
    assert len(near) < len(lossless)  # ...and that is what buys the smaller file


def test_alpha_quality_changes_the_alpha_plane() -> None:
    # A textured alpha plane, so that lossy alpha has something to save.
    alpha = photo_array(W, H, seed=5)[..., 0]
    rgba = np.dstack([photo_array(W, H, seed=6), alpha])
    data = _pillow_bytes(Image.fromarray(rgba), "PNG")
    full = encode_webp(data, EncodeOptions(alpha_quality=100)).webp
    half = encode_webp(data, EncodeOptions(alpha_quality=50)).webp
    alph_full, alph_half = _chunk(full, b"ALPH"), _chunk(half, b"ALPH")
    assert alph_full is not None and alph_half is not None
    assert len(alph_half) < len(alph_full)
    err_full = np.abs(_arr(full)[..., 3] - alpha)
    err_half = np.abs(_arr(half)[..., 3] - alpha)
    assert err_full.max() == 0  # alpha_quality 100 is lossless alpha (libwebp)
    assert err_half.mean() > err_full.mean()
    assert err_half.mean() < 16


def test_smart_subsample_changes_output(photo_png) -> None:
    data, source = photo_png
    plain = encode_webp(data, EncodeOptions()).webp
    smart = encode_webp(data, EncodeOptions(smart_subsample=True)).webp
    assert smart != plain
    assert _mae(_arr(smart), source) < 8


def test_preset_changes_output(photo_png) -> None:
    data, source = photo_png
    default = encode_webp(data, EncodeOptions()).webp
    outputs = {p: encode_webp(data, EncodeOptions(preset=p)).webp for p in ("drawing", "text")}
    assert any(webp != default for webp in outputs.values())
    for webp in outputs.values():
        assert _mae(_arr(webp), source) < 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"quality": 101},
        {"quality": -1},
        {"effort": 7},
        {"max_width": 0},
        {"max_height": 0},
        {"preset": "x"},
        {"near_lossless": 101},
        {"alpha_quality": 101},
        {"metadata": "exif"},
        {"oversize": "crop"},
        {"max_pixels": 0},
    ],
)
def test_invalid_options_raise_usage_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        EncodeOptions(**kwargs)


# ---------------------------------------------------------------- resizing


@pytest.fixture(scope="module")
def wide_png() -> bytes:
    return _pillow_bytes(Image.fromarray(photo_array(1000, 500, seed=7)), "PNG")


def test_max_width_shrinks_keeping_aspect(wide_png: bytes) -> None:
    encoded = encode_webp(wide_png, EncodeOptions(max_width=300))
    width, height = decode(encoded.webp).size
    assert width == 300 and abs(height - 150) <= 1
    facts = encoded.facts
    assert facts.resized is True
    assert (facts.width_in, facts.height_in) == (1000, 500)
    assert (facts.width_out, facts.height_out) == (width, height)


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((300, 100), (200, 100)),  # height limits
        ((300, 400), (300, 150)),  # width limits
        ((None, 125), (250, 125)),  # height only
    ],
)
def test_box_fits_inside(
    wide_png: bytes, box: tuple[int | None, int], expected: tuple[int, int]
) -> None:
    max_width, max_height = box
    encoded = encode_webp(wide_png, EncodeOptions(max_width=max_width, max_height=max_height))
    width, height = decode(encoded.webp).size
    assert abs(width - expected[0]) <= 1 and abs(height - expected[1]) <= 1
    assert width <= (max_width or width) and height <= max_height
    assert encoded.facts.resized is True


@pytest.mark.parametrize("box", [(2000, None), (None, 2000), (1000, 500), (5000, 5000)], ids=str)
def test_never_upscales(wide_png: bytes, box: tuple[int | None, int | None]) -> None:
    encoded = encode_webp(wide_png, EncodeOptions(max_width=box[0], max_height=box[1]))
    assert decode(encoded.webp).size == (1000, 500)
    assert encoded.facts.resized is False


def test_resize_box_applies_to_the_upright_image() -> None:
    # Stored 64 wide x 96 tall with orientation 6: upright it is 96 x 64.
    upright = _quadrants(96, 64)
    data = _oriented_jpeg(upright, 6)
    assert decode(data).size == (64, 96)
    encoded = encode_webp(data, EncodeOptions(max_height=32))
    out = decode(encoded.webp)
    assert out.size == (48, 32)  # the box applied to the stored image would give 32 x 21
    _assert_quadrants(_arr(out, "RGB"), tolerance=24)
    wide = encode_webp(data, EncodeOptions(max_width=48))
    assert decode(wide.webp).size == (48, 32)


def _animated(fmt: str, *, count: int = 5, size: tuple[int, int] = (64, 48), **save) -> bytes:
    frames = [Image.fromarray(photo_array(*size, seed=10 * i)) for i in range(count)]
    if fmt == "GIF":
        frames = [f.convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    first, rest = frames[0], frames[1:]
    return _pillow_bytes(first, fmt, save_all=True, append_images=rest, **save)


DURATIONS = [100, 200, 300, 100, 50]


@pytest.mark.parametrize(
    ("fmt", "box", "size"),
    [
        ("GIF", {"max_width": 32}, (32, 24)),
        ("GIF", {"max_height": 12}, (16, 12)),
        ("PNG", {"max_width": 32}, (32, 24)),  # APNG: decoded in memory, resized per frame
        ("PNG", {"max_width": 40, "max_height": 20}, (27, 20)),
        ("WEBP", {"max_width": 32}, (32, 24)),
    ],
)
def test_animation_resize_resizes_every_frame(
    fmt: str, box: dict[str, int], size: tuple[int, int]
) -> None:
    save: dict[str, object] = {"duration": DURATIONS, "loop": 0}
    if fmt == "WEBP":
        save["lossless"] = True
    data = _animated(fmt, **save)
    encoded = encode_webp(data, EncodeOptions(**box))
    frames, durations, loop = _frames(encoded.webp)
    width, height = size
    assert len(frames) == 5 and encoded.facts.frames == 5
    for frame in frames:
        assert abs(frame.shape[1] - width) <= 1 and abs(frame.shape[0] - height) <= 1
    assert {f.shape for f in frames} == {frames[0].shape}
    assert (encoded.facts.width_out, encoded.facts.height_out) == frames[0].shape[1::-1]
    assert encoded.facts.resized is True
    assert (durations, loop) == (DURATIONS, 0)
    # Each frame is its own source frame, shrunk (the seeds make them differ).
    out_size = frames[0].shape[1::-1]
    sources = [
        np.asarray(Image.fromarray(s.astype(np.uint8)).resize(out_size, Image.Resampling.LANCZOS))
        for s in _source_frames(data)
    ]
    for index, frame in enumerate(frames):
        errors = [_mae(frame[..., :3], s[..., :3]) for s in sources]
        assert int(np.argmin(errors)) == index, errors
        assert errors[index] < 12


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("max_width", [None, 48], ids=["full", "shrunk"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int, max_width: int | None) -> None:
    upright = _quadrants(96, 64)
    data = _oriented_jpeg(upright, orientation)
    encoded = encode_webp(data, EncodeOptions(metadata="all", max_width=max_width))
    out = decode(encoded.webp)
    expected = (96, 64) if max_width is None else (48, 32)
    assert out.size == expected
    assert (encoded.facts.width_out, encoded.facts.height_out) == expected
    _assert_quadrants(_arr(out, "RGB"), tolerance=16 if max_width is None else 24)
    # Nothing left for a viewer to rotate again: EXIF kept, orientation gone or 1.
    assert _chunk(encoded.webp, b"EXIF") is not None
    assert out.getexif().get(0x0112, 1) == 1


# ---------------------------------------------------------------- metadata


_XMP = (
    b'<?xpacket begin="" id="W5M0MpCehiHzreSzNTczkc9d"?>'
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    b'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/">'
    b"<dc:creator>Test Photographer</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>"
    b'<?xpacket end="w"?>'
)
_GPS = {1: "N", 2: (52.0, 22.0, 1.5), 3: "E", 4: (4.0, 53.0, 2.0)}


@pytest.fixture(scope="module")
def tagged_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    exif[0x0110] = "Model X"  # Model
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.update(_GPS)
    image = Image.fromarray(photo_array(W, H, seed=8))
    data = _pillow_bytes(
        image, "JPEG", quality=92, exif=exif.tobytes(), icc_profile=_srgb_icc(), xmp=_XMP
    )
    src = decode(data)  # the source really carries all three
    assert src.info["icc_profile"] == _srgb_icc() and "xmp" in src.info
    assert src.getexif().get_ifd(ExifTags.IFD.GPSInfo) == _GPS
    return data


def test_metadata_icc_default_keeps_only_the_profile(tagged_jpeg: bytes) -> None:
    encoded = encode_webp(tagged_jpeg, EncodeOptions())
    chunks = _fourccs(encoded.webp)
    assert b"ICCP" in chunks
    assert b"EXIF" not in chunks and b"XMP " not in chunks
    assert _chunk(encoded.webp, b"ICCP") == _srgb_icc()
    assert encoded.facts.icc_kept is True


def test_metadata_none_strips_everything(tagged_jpeg: bytes) -> None:
    encoded = encode_webp(tagged_jpeg, EncodeOptions(metadata="none"))
    chunks = _fourccs(encoded.webp)
    assert not {b"ICCP", b"EXIF", b"XMP "} & set(chunks)
    assert encoded.facts.icc_kept is False
    assert "icc_profile" not in decode(encoded.webp).info


def test_metadata_all_keeps_exif_gps_xmp_and_icc(tagged_jpeg: bytes) -> None:
    encoded = encode_webp(tagged_jpeg, EncodeOptions(metadata="all"))
    chunks = _fourccs(encoded.webp)
    assert {b"ICCP", b"EXIF", b"XMP "} <= set(chunks)
    out = decode(encoded.webp)
    exif = out.getexif()
    assert exif.get(0x010F) == "TestCam" and exif.get(0x0110) == "Model X"
    assert exif.get_ifd(ExifTags.IFD.GPSInfo) == _GPS
    xmp = _chunk(encoded.webp, b"XMP ")
    assert xmp is not None and b"Test Photographer" in xmp
    assert _chunk(encoded.webp, b"ICCP") == _srgb_icc()


@pytest.fixture(scope="module")
def rotated_profile_png() -> tuple[bytes, bytes, np.ndarray, np.ndarray]:
    """(png, profile, stored pixels, the same pixels converted to sRGB by LittleCMS)."""
    profile = _icc_rotated_primaries()
    source = photo_array(W, H, seed=9)
    source[:16, :16] = (255, 0, 0)  # pure "red" in this profile is sRGB green
    png = _pillow_bytes(Image.fromarray(source), "PNG", icc_profile=profile)
    converted = ImageCms.profileToProfile(
        Image.fromarray(source),
        ImageCms.ImageCmsProfile(io.BytesIO(profile)),
        ImageCms.createProfile("sRGB"),
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
    )
    expected = np.asarray(converted).astype(np.int32)
    assert tuple(expected[8, 8]) == (0, 255, 0)  # the profile is decisive
    return png, profile, source, expected


def test_non_srgb_profile_is_kept_byte_for_byte(rotated_profile_png) -> None:
    png, profile, source, _ = rotated_profile_png
    encoded = encode_webp(png, EncodeOptions(lossless=True))
    assert _chunk(encoded.webp, b"ICCP") == profile
    assert np.array_equal(np.asarray(decode(encoded.webp)), source)  # pixels left alone
    assert encoded.facts.icc_kept is True
    assert encoded.facts.converted_to_srgb is False


@pytest.mark.parametrize(
    "options",
    [{"srgb": True}, {"metadata": "none"}, {"srgb": True, "metadata": "all"}],
    ids=["srgb", "metadata-none", "srgb-metadata-all"],
)
def test_non_srgb_profile_is_converted_not_dropped(rotated_profile_png, options) -> None:
    png, _, source, expected = rotated_profile_png
    encoded = encode_webp(png, EncodeOptions(lossless=True, **options))
    assert b"ICCP" not in _fourccs(encoded.webp)
    assert encoded.facts.icc_kept is False
    assert encoded.facts.converted_to_srgb is True
    got = _arr(encoded.webp, "RGB")
    # libvips and Pillow both use LittleCMS; allow a level of rounding.
    assert np.abs(got - expected).max() <= 2
    assert _mae(got, source) > 20  # dropping the profile silently would land here


def test_srgb_profile_with_srgb_option_is_dropped_without_change() -> None:
    source = photo_array(W, H, seed=11)
    png = _pillow_bytes(Image.fromarray(source), "PNG", icc_profile=_srgb_icc())
    encoded = encode_webp(png, EncodeOptions(lossless=True, srgb=True))
    assert b"ICCP" not in _fourccs(encoded.webp)
    assert encoded.facts.converted_to_srgb is False
    assert np.array_equal(np.asarray(decode(encoded.webp)), source)


# ---------------------------------------------------------------- colour models


def test_cmyk_jpeg_becomes_rgb_with_the_right_colours() -> None:
    # Flat CMYK patches (values as Pillow stores them: 255 = full ink) over a photo.
    cmyk = np.asarray(Image.fromarray(photo_array(W, H, seed=12)).convert("CMYK")).copy()
    patches = {
        "white": (0, 0, 0, 0),
        "cyan": (255, 0, 0, 0),
        "magenta": (0, 255, 0, 0),
        "yellow": (0, 0, 255, 0),
        "black": (0, 0, 0, 255),
    }
    for index, ink in enumerate(patches.values()):
        cmyk[:32, index * 40 : index * 40 + 32] = ink
    data = _pillow_bytes(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    assert decode(data).mode == "CMYK"
    encoded = encode_webp(data, EncodeOptions(quality=95))
    out = decode(encoded.webp)
    assert out.mode == "RGB"
    assert encoded.facts.converted_to_srgb is True
    got = _arr(out)
    naive = _arr(decode(data), "RGB")  # Pillow: plain 255 - ink, no profile
    # libvips goes through a CMYK ICC profile, so it is not Pillow's naive
    # formula; measured mean difference ~14 levels. An inverted or channel-swapped
    # decode would be far off (> 45).
    assert _mae(got, naive) < 25
    assert _mae(got, 255 - naive) > 40
    centre = {
        name: got[8:24, i * 40 + 8 : i * 40 + 24].reshape(-1, 3).mean(axis=0)
        for i, name in enumerate(patches)
    }
    assert centre["white"].min() > 235
    assert centre["black"].max() < 70
    for name, weakest in (("cyan", 0), ("magenta", 1), ("yellow", 2)):
        rgb = centre[name]
        others = [rgb[c] for c in range(3) if c != weakest]
        assert rgb[weakest] + 60 < min(others), (name, rgb)


def test_16bit_grey_png_is_scaled_not_clipped() -> None:
    ramp = _ramp16()
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    data = _pillow_bytes(image, "PNG")
    assert decode(data).mode == "I;16"
    out = _arr(encode_webp(data, EncodeOptions(lossless=True)).webp, "RGB")
    expected = np.round(ramp / 257).astype(np.int32)
    assert np.abs(out[..., 0] - expected).max() <= 1
    assert out.min() == 0 and out.max() == 255  # full range, not clipped or halved
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 1
    assert np.abs(out[..., 2] - out[..., 1]).max() <= 1


def test_16bit_rgb_png_is_scaled_not_clipped() -> None:
    ramp = _ramp16()
    rgb16 = np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 0x8000)], axis=-1)
    data = _png16(rgb16, colour_type=2)
    assert decode(data).size == (256, 4)
    out = _arr(encode_webp(data, EncodeOptions(lossless=True)).webp, "RGB")
    expected = np.round(rgb16 / 257).astype(np.int32)
    assert np.abs(out - expected).max() <= 1
    for channel in (0, 1):
        assert out[..., channel].min() == 0 and out[..., channel].max() == 255
    assert abs(int(out[..., 2].mean()) - 128) <= 1


def test_16bit_grey_alpha_png_scales_alpha_too() -> None:
    ramp = _ramp16()
    la16 = np.stack([ramp, ramp[:, ::-1]], axis=-1)
    out = _arr(encode_webp(_png16(la16, colour_type=4), EncodeOptions(lossless=True)).webp)
    assert out.shape == (4, 256, 4)
    expected = np.round(la16 / 257).astype(np.int32)
    assert np.abs(out[..., 3] - expected[..., 1]).max() <= 1
    assert out[..., 3].min() == 0 and out[..., 3].max() == 255
    visible = expected[..., 1] > 0
    assert np.abs(out[..., 0] - expected[..., 0])[visible].max() <= 1


def test_grey_jpeg_stays_grey() -> None:
    grey = photo_array(W, H, seed=13)[..., 1]
    data = _pillow_bytes(Image.fromarray(grey), "JPEG", quality=92)
    assert decode(data).mode == "L"
    out = _arr(encode_webp(data, EncodeOptions()).webp, "RGB")
    assert np.abs(out[..., 0] - out[..., 1]).max() <= 1
    assert np.abs(out[..., 2] - out[..., 1]).max() <= 1
    assert _mae(out[..., 1], grey) < 6


def test_grey_alpha_png_stays_grey_and_keeps_alpha() -> None:
    grey = photo_array(W, H, seed=14)[..., 1]
    alpha = np.tile((np.arange(W) * 255 // (W - 1)).astype(np.uint8), (H, 1))
    data = _pillow_bytes(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG")
    encoded = encode_webp(data, EncodeOptions())
    out = decode(encoded.webp)
    assert out.mode == "RGBA"
    got = _arr(out)
    assert np.abs(got[..., 3] - alpha).max() <= 2
    visible = alpha > 32
    assert np.abs(got[..., 0] - got[..., 1])[visible].max() <= 1
    assert np.abs(got[..., 2] - got[..., 1])[visible].max() <= 1


# ---------------------------------------------------------------- transparency


@pytest.fixture(scope="module")
def partial_alpha_png() -> tuple[bytes, np.ndarray]:
    y, x = np.mgrid[0:H, 0:W]
    alpha = ((x + y) * 255 // (W + H - 2)).astype(np.uint8)
    rgba = np.dstack([photo_array(W, H, seed=15), alpha])
    return _pillow_bytes(Image.fromarray(rgba), "PNG"), rgba


def test_partial_alpha_is_kept_lossy(partial_alpha_png) -> None:
    data, rgba = partial_alpha_png
    encoded = encode_webp(data, EncodeOptions())
    assert b"ALPH" in _fourccs(encoded.webp) and _vp8x_alpha_flag(encoded.webp)
    out = decode(encoded.webp)
    assert out.mode == "RGBA"
    got = _arr(out)
    assert np.abs(got[..., 3] - rgba[..., 3]).max() <= 2
    visible = rgba[..., 3] > 64
    assert np.abs(got[..., :3] - rgba[..., :3])[visible].mean() < 8


def test_partial_alpha_is_exact_lossless(partial_alpha_png) -> None:
    data, rgba = partial_alpha_png
    got = np.asarray(decode(encode_webp(data, EncodeOptions(lossless=True)).webp))
    assert np.array_equal(got[..., 3], rgba[..., 3])
    visible = rgba[..., 3] > 0
    assert np.array_equal(got[visible], rgba[visible])


@pytest.mark.parametrize("lossless", [False, True], ids=["lossy", "lossless"])
def test_palette_png_with_trns_keeps_transparency(lossless: bool) -> None:
    palettised = Image.fromarray(photo_array(W, H, seed=16)).convert(
        "P", palette=Image.Palette.ADAPTIVE, colors=16
    )
    trns = bytes([0, 64, 128, 192] + [255] * 12)
    data = _pillow_bytes(palettised, "PNG", transparency=trns)
    reference = _arr(decode(data), "RGBA")
    assert (reference[..., 3] == 0).any() and (reference[..., 3] == 128).any()
    out = decode(encode_webp(data, EncodeOptions(lossless=lossless)).webp)
    assert out.mode == "RGBA"
    got = _arr(out)
    assert np.abs(got[..., 3] - reference[..., 3]).max() <= (0 if lossless else 2)
    visible = reference[..., 3] > 0
    colour_err = np.abs(got[..., :3] - reference[..., :3])[visible]
    assert (colour_err.max() == 0) if lossless else (colour_err.mean() < 8)


def test_grey_png_with_trns_keeps_transparency() -> None:
    grey = photo_array(W, H, seed=17)[..., 1]
    key = int(grey[0, 0])
    data = _pillow_bytes(Image.fromarray(grey), "PNG", transparency=key)
    reference = _arr(decode(data), "RGBA")
    assert (reference[..., 3] == 0).sum() > 0
    got = _arr(encode_webp(data, EncodeOptions(lossless=True)).webp)
    assert np.array_equal(got[..., 3], reference[..., 3])


@pytest.fixture(scope="module")
def opaque_rgba_png() -> bytes:
    opaque = np.full((H, W), 255, np.uint8)
    data = _pillow_bytes(Image.fromarray(np.dstack([photo_array(W, H, seed=18), opaque])), "PNG")
    assert decode(data).mode == "RGBA"
    return data


@pytest.mark.parametrize("lossless", [False, True], ids=["lossy", "lossless"])
def test_fully_opaque_rgba_comes_out_without_alpha(opaque_rgba_png: bytes, lossless: bool) -> None:
    encoded = encode_webp(opaque_rgba_png, EncodeOptions(lossless=lossless))
    assert b"ALPH" not in _fourccs(encoded.webp)
    assert not _vp8x_alpha_flag(encoded.webp)
    assert decode(encoded.webp).mode == "RGB"


def _has_alpha_cases() -> dict[str, bytes]:
    y, x = np.mgrid[0:96, 0:128]
    alpha = ((x + y) * 255 // (128 + 96 - 2)).astype(np.uint8)
    rgb = photo_array(128, 96, seed=21)
    opaque = np.full((96, 128), 255, np.uint8)
    palettised = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return {
        "rgb": _pillow_bytes(Image.fromarray(rgb), "PNG"),
        "opaque-rgba": _pillow_bytes(Image.fromarray(np.dstack([rgb, opaque])), "PNG"),
        "partial-rgba": _pillow_bytes(Image.fromarray(np.dstack([rgb, alpha])), "PNG"),
        "grey-alpha": _pillow_bytes(Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), "PNG"),
        "palette-trns": _pillow_bytes(palettised, "PNG", transparency=0),
        "opaque-gif": _pillow_bytes(palettised, "GIF"),  # libvips loads GIFs as RGBA
    }


_HAS_ALPHA = _has_alpha_cases()


@pytest.mark.parametrize("lossless", [False, True], ids=["lossy", "lossless"])
@pytest.mark.parametrize("case", sorted(_HAS_ALPHA))
def test_facts_has_alpha_describes_the_output(case: str, lossless: bool) -> None:
    encoded = encode_webp(_HAS_ALPHA[case], EncodeOptions(lossless=lossless))
    in_output = decode(encoded.webp).mode == "RGBA"
    assert in_output == (case in ("partial-rgba", "grey-alpha", "palette-trns"))
    assert encoded.facts.has_alpha is in_output  # a real bool, and about the output


# ---------------------------------------------------------------- animation


def test_animated_gif_becomes_animated_webp() -> None:
    data = _animated("GIF", duration=DURATIONS, loop=3)
    source = decode(data)
    assert source.n_frames == 5 and source.info["loop"] == 3
    encoded = encode_webp(data, EncodeOptions())
    assert encoded.facts.format == "gif" and encoded.facts.frames == 5
    assert b"ANIM" in _fourccs(encoded.webp)
    assert _fourccs(encoded.webp).count(b"ANMF") == 5
    frames, durations, loop = _frames(encoded.webp)
    assert durations == DURATIONS
    # GIF's NETSCAPE2.0 count is *extra* repetitions (3 -> shown 4 times, as browsers
    # play it); WebP's ANIM loop count is total plays. 0 means forever in both.
    assert loop == 3 + 1
    for got, want in zip(frames, _source_frames(data), strict=True):
        assert _mae(got[..., :3], want[..., :3]) < 8


@pytest.mark.parametrize(
    ("gif_loop", "webp_loop"),
    [(None, 1), (0, 0), (1, 2), (3, 4)],
    ids=["no-netscape-once", "forever", "1-repeat", "3-repeats"],
)
def test_gif_loop_count_mapping(gif_loop: int | None, webp_loop: int) -> None:
    save: dict[str, object] = {"duration": 100}
    if gif_loop is not None:
        save["loop"] = gif_loop
    data = _animated("GIF", count=3, size=(16, 12), **save)
    assert decode(data).info.get("loop") == gif_loop
    _, _, loop = _frames(encode_webp(data, EncodeOptions()).webp)
    assert loop == webp_loop


@pytest.mark.parametrize(("fmt", "loop"), [("GIF", 65535), ("PNG", 70000)])
def test_huge_finite_loop_count_does_not_become_infinite(fmt: str, loop: int) -> None:
    data = _animated(fmt, count=3, size=(16, 12), duration=100, loop=loop)
    _, _, webp_loop = _frames(encode_webp(data, EncodeOptions()).webp)
    assert webp_loop == 65535


def test_animated_webp_round_trips() -> None:
    data = _animated("WEBP", duration=DURATIONS, loop=3, lossless=True)
    source_frames, source_durations, source_loop = _frames(data)
    assert (len(source_frames), source_durations, source_loop) == (5, DURATIONS, 3)
    encoded = encode_webp(data, EncodeOptions())
    assert encoded.facts.format == "webp" and encoded.facts.frames == 5
    frames, durations, loop = _frames(encoded.webp)
    assert (len(frames), durations, loop) == (5, DURATIONS, 3)
    for got, want in zip(frames, source_frames, strict=True):
        assert _mae(got[..., :3], want[..., :3]) < 8


def test_apng_becomes_animated_webp() -> None:
    data = _animated("PNG", duration=DURATIONS, loop=3)
    source = decode(data)
    assert source.n_frames == 5 and source.info["loop"] == 3
    encoded = encode_webp(data, EncodeOptions())
    assert encoded.facts.format == "apng" and encoded.facts.frames == 5
    frames, durations, loop = _frames(encoded.webp)
    assert durations == DURATIONS
    assert loop == 3  # APNG num_plays and WebP loop count both count total plays
    for got, want in zip(frames, _source_frames(data), strict=True):
        assert _mae(got[..., :3], want[..., :3]) < 8


# ---------------------------------------------------------------- size limits


@pytest.mark.parametrize("shape", [(10, 20000), (20000, 10)], ids=["wide", "tall"])
def test_over_webp_limit_fails_by_default(shape: tuple[int, int]) -> None:
    strip = (np.arange(shape[0] * shape[1]) % 251).astype(np.uint8).reshape(shape)
    data = _pillow_bytes(Image.fromarray(strip), "PNG")
    with pytest.raises(TooLarge) as info:
        encode_webp(data, EncodeOptions())
    assert info.value.reason == "too large"
    assert "--oversize" in info.value.message


@pytest.mark.parametrize("shape", [(10, 20000), (20000, 10)], ids=["wide", "tall"])
def test_over_webp_limit_fits_with_oversize_fit(shape: tuple[int, int]) -> None:
    strip = (np.arange(shape[0] * shape[1]) % 251).astype(np.uint8).reshape(shape)
    data = _pillow_bytes(Image.fromarray(strip), "PNG")
    encoded = encode_webp(data, EncodeOptions(oversize="fit"))
    width, height = decode(encoded.webp).size
    long_side, short_side = max(width, height), min(width, height)
    assert long_side == WEBP_MAX_DIMENSION
    assert abs(short_side - 10 * WEBP_MAX_DIMENSION / 20000) <= 1
    assert (width > height) == (shape[1] > shape[0])
    assert encoded.facts.resized is True


def test_max_pixels_below_pixel_count_raises(photo_png) -> None:
    data, _ = photo_png
    with pytest.raises(TooLarge) as info:
        encode_webp(data, EncodeOptions(max_pixels=W * H - 1))
    assert f"{W}x{H}" in info.value.message
    assert decode(encode_webp(data, EncodeOptions(max_pixels=W * H)).webp).size == (W, H)


@pytest.mark.timeout(20)
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path) -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = (
        PNG_SIG
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1001))
        + _png_chunk(b"IEND", b"")
    )
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    for source in (bomb, str(path)):
        with pytest.raises(TooLarge) as info:
            encode_webp(source, EncodeOptions())
        assert "100000x100000" in info.value.message  # refused from the header alone


# ---------------------------------------------------------------- convert_file


@pytest.fixture
def flat_png(tmp_path: Path) -> Path:
    """A 1-bit flat PNG: a few hundred bytes that no WebP can beat."""
    path = tmp_path / "src" / "flat.png"
    path.parent.mkdir()
    Image.new("1", (1000, 1000), 1).save(path, optimize=True)
    return path


def test_if_larger_skip_writes_nothing(tmp_path: Path, flat_png: Path) -> None:
    size = flat_png.stat().st_size
    assert len(encode_webp(str(flat_png), EncodeOptions()).webp) > size  # the premise
    dest = tmp_path / "out" / "flat.webp"
    result = convert_file(flat_png, dest, EncodeOptions())
    assert (result.status, result.reason) == ("skipped", "larger than source")
    assert result.output is None and result.bytes_in == size
    assert not dest.exists()


def test_if_larger_write_writes_anyway(tmp_path: Path, flat_png: Path) -> None:
    dest = tmp_path / "out" / "flat.webp"
    result = convert_file(flat_png, dest, EncodeOptions(), if_larger="write")
    assert result.status == "converted"
    assert dest.exists() and result.bytes_out == dest.stat().st_size > result.bytes_in
    assert decode(dest).size == (1000, 1000)


def test_convert_file_writes_atomically(tmp_path: Path, make_photo) -> None:
    src = make_photo("photo.jpg")
    out_dir = tmp_path / "out"
    dest = out_dir / "photo.webp"
    result = convert_file(src, dest, EncodeOptions())
    assert result.status == "converted" and result.reason is None
    assert result.output == str(dest)
    data = dest.read_bytes()
    assert len(data) == result.bytes_out and result.bytes_in == src.stat().st_size
    _riff_chunks(data)  # a complete RIFF: the declared size is the file size
    assert decode(data).size == (W, H)
    assert result.facts is not None and result.facts.bytes_out == len(data)
    assert [n for n in os.listdir(out_dir) if n.endswith(".optimizr-tmp")] == []
    assert os.listdir(out_dir) == ["photo.webp"]


def test_failed_convert_leaves_existing_output_alone(tmp_path: Path) -> None:
    src = tmp_path / "broken.jpg"
    good = _pillow_bytes(Image.fromarray(photo_array(W, H)), "JPEG")
    src.write_bytes(good[: len(good) // 2])
    dest = tmp_path / "out" / "broken.webp"
    dest.parent.mkdir()
    dest.write_bytes(b"previous output")
    result = convert_file(src, dest, EncodeOptions())
    assert (result.status, result.reason) == ("failed", "truncated")
    assert dest.read_bytes() == b"previous output"
    assert [n for n in os.listdir(dest.parent) if n.endswith(".optimizr-tmp")] == []


@pytest.mark.parametrize(
    "options",
    [EncodeOptions(), EncodeOptions(metadata="all", max_width=50, lossless=True)],
    ids=["default", "resize-all-metadata"],
)
def test_convert_file_never_modifies_the_source(tmp_path: Path, options: EncodeOptions) -> None:
    src = tmp_path / "src" / "oriented.jpg"
    src.parent.mkdir()
    src.write_bytes(_oriented_jpeg(_quadrants(96, 64), 6))
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    before = (src.read_bytes(), src.stat().st_mtime_ns, src.stat().st_size)
    result = convert_file(src, tmp_path / "out" / "oriented.webp", options, if_larger="write")
    assert result.status == "converted"
    assert (src.read_bytes(), src.stat().st_mtime_ns, src.stat().st_size) == before
    assert sorted(os.listdir(src.parent)) == ["oriented.jpg"]


# ---------------------------------------------------------------- broken input


@pytest.mark.parametrize("as_path", [False, True], ids=["bytes", "path"])
def test_truncated_jpeg_is_truncated(tmp_path: Path, as_path: bool) -> None:
    good = save_jpeg(tmp_path / "good.jpg", photo_array(W, H)).read_bytes()
    cut = good[: len(good) // 2]
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    with pytest.raises(TruncatedImage) as info:
        encode_webp(str(path) if as_path else cut, EncodeOptions())
    assert info.value.reason == "truncated"


@pytest.mark.parametrize("as_path", [False, True], ids=["bytes", "path"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png_is_truncated(tmp_path: Path, as_path: bool, keep: float) -> None:
    # A PNG cut inside its IDAT data is reported as TruncatedImage (not CorruptImage).
    good = save_png(tmp_path / "good.png", photo_array(W, H)).read_bytes()
    cut = good[: int(len(good) * keep)]
    path = tmp_path / "cut.png"
    path.write_bytes(cut)
    with pytest.raises(TruncatedImage) as info:
        encode_webp(str(path) if as_path else cut, EncodeOptions())
    assert info.value.reason == "truncated"


def _mutants(base: bytes, seed: int, count: int = 100) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(base)
        kind = rng.choice(("flip", "truncate", "both"))
        if kind in ("flip", "both"):
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        if kind in ("truncate", "both"):
            data = data[: rng.randrange(1, len(data))]
        out.append(bytes(data))
    return out


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_fuzzed_inputs_only_raise_image_errors(tmp_path: Path, fmt: str) -> None:
    base = _pillow_bytes(Image.fromarray(photo_array(64, 48, seed=19)), fmt)
    outcomes: dict[str, int] = {}
    for index, data in enumerate(_mutants(base, seed=20240 + len(fmt))):
        source: str | bytes = data
        if index % 2:  # half through the path code, half through the bytes code
            path = tmp_path / f"m{index}.{fmt.lower()}"
            path.write_bytes(data)
            source = str(path)
        try:
            encoded = encode_webp(source, EncodeOptions())
        except ImageError as exc:
            assert exc.reason and exc.message, exc
            outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
        else:
            # Whatever does convert must be a real WebP of the right size.
            assert decode(encoded.webp).size == (64, 48)
            outcomes["converted"] = outcomes.get("converted", 0) + 1
    assert sum(outcomes.values()) == 100
    assert len(outcomes) >= 2, outcomes  # the fuzz really broke some inputs
