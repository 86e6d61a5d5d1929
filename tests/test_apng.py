"""Tests for optimizr.decoders.apng.

Most APNGs here are written by Pillow and the decoded frames are compared with
Pillow's own decode. Pillow's APNG reader deviates from the specification in
two places, so those cases are checked against an independent reference
instead (see test_over_blend_partial_alpha and test_dispose_previous_with_over):

- blend_op OVER is done with ``paste(frame, mask=frame)``, which lerps the alpha
  channel too instead of compositing it;
- after a frame blended with OVER, its "previous" snapshot is the same object
  as the canvas, so dispose_op PREVIOUS restores the frame's own pixels.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import pyvips
from PIL import Image, ImageCms

from optimizr.decoders.apng import ApngInfo, decode_apng, read_apng_info
from optimizr.errors import (
    CorruptImage,
    ImageError,
    NotAnImage,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
)

BIG = 10**9
SIG = b"\x89PNG\r\n\x1a\n"
Frames = npt.NDArray[np.uint8]


# ---------------------------------------------------------------- helpers


def pillow_apng(frames: list[Image.Image], **options: object) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:], **options)
    return buf.getvalue()


def our_frames(image: pyvips.Image) -> Frames:
    n, page = image.get("n-pages"), image.get("page-height")
    assert (image.bands, image.format, image.height) == (4, "uchar", n * page)
    return np.frombuffer(image.write_to_memory(), np.uint8).reshape(n, page, image.width, 4)


def pillow_frames(data: bytes) -> tuple[list[Frames], list[float], dict[str, object]]:
    """Pillow's composited animation frames (default image skipped if not a frame)."""
    with Image.open(io.BytesIO(data)) as im:
        first = 1 if im.info.get("default_image") else 0
        frames, durations = [], []
        for index in range(first, int(getattr(im, "n_frames", 1))):
            im.seek(index)
            frames.append(np.asarray(im.convert("RGBA")))
            durations.append(float(im.info["duration"]))
        return frames, durations, {str(key): value for key, value in im.info.items()}


def assert_matches_pillow(data: bytes, tolerance: int = 0) -> pyvips.Image:
    image = decode_apng(data, max_pixels=BIG)
    ours = our_frames(image)
    theirs, durations, _ = pillow_frames(data)
    assert len(ours) == len(theirs)
    for index, (mine, ref) in enumerate(zip(ours, theirs, strict=True)):
        diff = int(np.abs(mine.astype(int) - ref.astype(int)).max())
        assert diff <= tolerance, f"frame {index} differs by {diff}"
    # Pillow reports float ms; APNG delays are rounded half up to whole ms.
    assert image.get("delay") == [int(d + 0.5) for d in durations]
    return image


def visible(frame: Frames) -> Frames:
    """The frame with the invisible colour of fully transparent pixels zeroed."""
    return np.where(frame[..., 3:] == 0, 0, frame).astype(np.uint8)


def chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def chunk_spans(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the length field, data length) of every chunk."""
    spans, pos = [], 8
    while pos + 8 <= len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        spans.append((ctype, pos, length))
        pos += 12 + length
    return spans


def replace_chunk(data: bytes, ctype: bytes, nth: int, body: bytes) -> bytes:
    """Replace the nth chunk of a type with a new body and a valid CRC."""
    _, pos, length = [s for s in chunk_spans(data) if s[0] == ctype][nth]
    return data[:pos] + chunk(ctype, body) + data[pos + 12 + length :]


def chunk_body(data: bytes, ctype: bytes, nth: int = 0) -> bytes:
    _, pos, length = [s for s in chunk_spans(data) if s[0] == ctype][nth]
    return data[pos + 8 : pos + 8 + length]


def patch_fctl(data: bytes, nth: int, **fields: int) -> bytes:
    names = ["seq", "width", "height", "x", "y", "num", "den", "dispose", "blend"]
    values = dict(
        zip(names, struct.unpack(">IIIIIHHBB", chunk_body(data, b"fcTL", nth)), strict=True)
    )
    values.update(fields)
    return replace_chunk(data, b"fcTL", nth, struct.pack(">IIIIIHHBB", *values.values()))


@dataclass
class Frame:
    pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]  # h x w x channels
    x: int = 0
    y: int = 0
    num: int = 1
    den: int = 10
    dispose: int = 0
    blend: int = 0


def build_apng(width: int, height: int, frames: list[Frame], *, plays: int = 0) -> bytes:
    """A hand-made APNG (filter type 0 rows); the first frame is the default image."""
    first = frames[0].pixels
    depth = 16 if first.dtype == np.uint16 else 8
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[first.shape[2]]
    out = [SIG, chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0))]
    out.append(chunk(b"acTL", struct.pack(">II", len(frames), plays)))
    seq = 0
    for index, frame in enumerate(frames):
        h, w = frame.pixels.shape[:2]
        fields = (seq, w, h, frame.x, frame.y, frame.num, frame.den, frame.dispose, frame.blend)
        out.append(chunk(b"fcTL", struct.pack(">IIIIIHHBB", *fields)))
        seq += 1
        rows = frame.pixels.astype(">u2" if depth == 16 else "u1").reshape(h, -1)
        stream = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in rows))
        if index == 0:
            out.append(chunk(b"IDAT", stream))
        else:
            out.append(chunk(b"fdAT", struct.pack(">I", seq) + stream))
            seq += 1
    out.append(chunk(b"IEND", b""))
    return b"".join(out)


def solid(w: int, h: int, rgba: tuple[int, ...]) -> npt.NDArray[np.uint8]:
    return np.tile(np.array(rgba, np.uint8), (h, w, 1))


def shapes(size: tuple[int, int], count: int, seed: int, alphas: list[int]) -> list[Image.Image]:
    """RGBA frames with rectangles of random colour and alpha drawn from `alphas`."""
    rng = random.Random(seed)
    frames = []
    for _ in range(count):
        im = Image.new("RGBA", size, (0, 0, 0, 0))
        for _ in range(3):
            x0, y0 = rng.randrange(size[0] - 2), rng.randrange(size[1] - 2)
            box = (x0, y0, rng.randrange(x0 + 1, size[0]), rng.randrange(y0 + 1, size[1]))
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            im.paste((*colour, rng.choice(alphas)), box)
        frames.append(im)
    return frames


@pytest.fixture(scope="module")
def small_apng() -> bytes:
    return pillow_apng(
        shapes((12, 9), 4, seed=1, alphas=[0, 255]),
        duration=[40, 50, 60, 70],
        loop=2,
        disposal=[0, 1, 2, 0],
        blend=[0, 1, 0, 1],
    )


# ---------------------------------------------------------------- read_apng_info


def test_read_apng_info_animated(small_apng: bytes) -> None:
    assert read_apng_info(small_apng) == ApngInfo(12, 9, 4, 2, True)


def test_read_apng_info_separate_default_image() -> None:
    frames = shapes((7, 5), 3, seed=2, alphas=[255])
    data = pillow_apng(frames, default_image=True, duration=10, loop=0)
    assert read_apng_info(data) == ApngInfo(7, 5, 2, 0, False)


def test_read_apng_info_not_animated() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (5, 5), "red").save(buf, format="PNG")
    assert read_apng_info(buf.getvalue()) is None
    # A one-frame save_all is written as a plain PNG, without acTL.
    assert read_apng_info(pillow_apng([Image.new("RGBA", (4, 4))], duration=5)) is None
    assert read_apng_info(b"GIF89a" + bytes(40)) is None
    assert read_apng_info(b"") is None


def test_read_apng_info_rejects_zero_frames_and_acTL_after_idat(small_apng: bytes) -> None:
    assert read_apng_info(replace_chunk(small_apng, b"acTL", 0, struct.pack(">II", 0, 0))) is None
    spans = chunk_spans(small_apng)
    _, actl_pos, _ = next(s for s in spans if s[0] == b"acTL")
    actl = small_apng[actl_pos : actl_pos + 20]
    without = small_apng[:actl_pos] + small_apng[actl_pos + 20 :]
    _, iend_pos, _ = chunk_spans(without)[-1]
    assert read_apng_info(without[:iend_pos] + actl + without[iend_pos:]) is None


def test_read_apng_info_of_truncated_apng_still_reports_animation(small_apng: bytes) -> None:
    _, idat_pos, _ = next(s for s in chunk_spans(small_apng) if s[0] == b"IDAT")
    assert read_apng_info(small_apng[: idat_pos + 20]) == ApngInfo(12, 9, 4, 2, True)


# ---------------------------------------------------------------- decoding


def test_metadata_layout_and_webp_round_trip() -> None:
    frames = shapes((10, 6), 3, seed=3, alphas=[255])
    # 62.5 ms is stored as 1/16 s; rounding half up gives 63.
    data = pillow_apng(frames, duration=[100, 62.5, 1000], loop=3)
    image = assert_matches_pillow(data)
    assert (image.width, image.height, image.interpretation) == (10, 18, "srgb")
    assert (image.get("page-height"), image.get("n-pages"), image.get("loop")) == (6, 3, 3)
    assert image.get("delay") == [100, 63, 1000]
    webp = pyvips.Image.new_from_buffer(image.webpsave_buffer(lossless=True), "", n=-1)
    assert (webp.get("n-pages"), webp.get("delay"), webp.get("loop")) == (3, [100, 63, 1000], 3)
    assert webp.height == 18


def test_over_blend_binary_alpha_matches_pillow(small_apng: bytes) -> None:
    assert_matches_pillow(small_apng)


def test_over_blend_partial_alpha() -> None:
    frames = shapes((16, 12), 5, seed=4, alphas=[0, 40, 128, 200, 255])
    data = pillow_apng(frames, duration=30, blend=1)
    # Reference: Pillow's correct straight-alpha 'over' (alpha_composite) applied to
    # each frame's stored region, read back from Pillow's decoder.
    expected, canvas = [], Image.new("RGBA", (16, 12), (0, 0, 0, 0))
    with Image.open(io.BytesIO(data)) as im:
        for index, frame in enumerate(frames):
            im.seek(index)
            box = im.info["bbox"]
            assert im.info["blend"] == 1 and im.info["disposal"] == 0
            canvas.paste(Image.alpha_composite(canvas.crop(box), frame.crop(box)), box)
            expected.append(np.asarray(canvas))
    ours = our_frames(decode_apng(data, max_pixels=BIG))
    assert len(ours) == 5
    for mine, ref in zip(ours, expected, strict=True):
        assert np.abs(mine.astype(int) - ref.astype(int)).max() <= 1  # rounding only
    # The first frame has nothing to blend with, so Pillow's decode is exact there, up to
    # the colour of fully transparent pixels (Pillow keeps the frame's, 'over' gives 0).
    assert np.array_equal(visible(ours[0]), visible(pillow_frames(data)[0][0]))


def test_over_blend_exact_values() -> None:
    # 50% red over 50% blue: alpha = 0.5 + 0.5 * 0.5 = 0.75; red = 0.5 / 0.75 of 255.
    data = build_apng(
        1, 1, [Frame(solid(1, 1, (0, 0, 255, 128))), Frame(solid(1, 1, (255, 0, 0, 128)), blend=1)]
    )
    ours = our_frames(decode_apng(data, max_pixels=BIG))
    assert ours[1, 0, 0].tolist() == [170, 0, 85, 192]


def test_dispose_background_matches_pillow() -> None:
    frames = shapes((14, 10), 5, seed=5, alphas=[0, 255])
    data = pillow_apng(frames, duration=20, disposal=[1, 1, 0, 1, 1], blend=[0, 1, 1, 0, 1])
    assert_matches_pillow(data)


def test_dispose_previous_matches_pillow() -> None:
    # The first frame's PREVIOUS acts as BACKGROUND (spec); blend SOURCE avoids Pillow's bug.
    frames = shapes((14, 10), 6, seed=6, alphas=[0, 100, 255])
    data = pillow_apng(frames, duration=20, disposal=[2, 0, 2, 2, 0, 2], blend=0)
    assert_matches_pillow(data)


def test_dispose_previous_with_over() -> None:
    green, red, clear = (0, 255, 0, 255), (255, 0, 0, 255), (0, 0, 0, 0)
    data = build_apng(
        8,
        4,
        [
            Frame(solid(8, 4, green)),
            Frame(solid(4, 2, red), x=2, y=1, dispose=2, blend=1),
            Frame(solid(1, 1, clear), blend=1),
        ],
    )
    ours = our_frames(decode_apng(data, max_pixels=BIG))
    assert np.array_equal(ours[1][1:3, 2:6], solid(4, 2, red))
    assert np.array_equal(ours[2], solid(8, 4, green))  # red region restored


def test_dispose_background_clears_to_transparent_in_rgb_apng() -> None:
    # Pillow paints the disposed area opaque black in RGB mode; the spec says transparent.
    data = build_apng(
        4,
        4,
        [
            Frame(np.full((4, 4, 3), 90, np.uint8)),
            Frame(np.full((2, 2, 3), 200, np.uint8), x=1, y=1, dispose=1),
            Frame(np.full((1, 1, 3), 10, np.uint8), x=3, y=3),
        ],
    )
    ours = our_frames(decode_apng(data, max_pixels=BIG))
    assert ours[1][1:3, 1:3].tolist() == [[[200, 200, 200, 255]] * 2] * 2
    assert ours[2][1:3, 1:3].tolist() == [[[0, 0, 0, 0]] * 2] * 2
    assert ours[2][0, 0].tolist() == [90, 90, 90, 255]


def test_palette_apng_matches_pillow() -> None:
    palette = [10, 20, 30, 200, 0, 0, 0, 200, 0, 0, 0, 200] * 64
    frames = []
    for index in range(3):
        im = Image.new("P", (9, 7), index)
        im.putpalette(palette)
        im.paste((index + 1) % 4, (1, 2, 6, 5))
        frames.append(im)
    data = pillow_apng(frames, duration=15, transparency=0, blend=[0, 1, 0])
    assert chunk_body(data, b"IHDR")[9] == 3  # really a palette PNG
    image = assert_matches_pillow(data)
    assert our_frames(image)[0][0, 0].tolist() == [10, 20, 30, 0]


def test_grey_alpha_apng_matches_pillow() -> None:
    frames = [Image.new("LA", (6, 5), (40 * i, 60 + 60 * i)) for i in range(3)]
    frames[1].paste((250, 255), (1, 1, 3, 3))
    assert_matches_pillow(pillow_apng(frames, duration=10, disposal=[0, 1, 0]))


def test_16bit_apng() -> None:
    rng = np.random.default_rng(7)
    pixels = [rng.integers(0, 65536, (5, 6, 4), dtype=np.uint16) for _ in range(3)]
    pixels[1] = pixels[1][:2, :3]
    data = build_apng(6, 5, [Frame(pixels[0]), Frame(pixels[1], x=3, y=2), Frame(pixels[2])])
    ours = our_frames(decode_apng(data, max_pixels=BIG))

    def to8(p: npt.NDArray[np.uint16]) -> npt.NDArray[np.int64]:
        return np.rint(p / 257).astype(np.int64)

    expected1 = to8(pixels[0])
    expected1[2:4, 3:6] = to8(pixels[1])
    for mine, ref in zip(ours, [to8(pixels[0]), expected1, to8(pixels[2])], strict=True):
        assert np.array_equal(mine, ref)
    # Pillow keeps the high byte (v >> 8) where we round v / 257: at most 1 level apart.
    theirs = pillow_frames(data)[0]
    assert max(int(np.abs(m.astype(int) - t).max()) for m, t in zip(ours, theirs, strict=True)) <= 1


def test_default_image_not_in_animation() -> None:
    frames = shapes((8, 8), 4, seed=8, alphas=[0, 255])
    frames[0] = Image.new("RGBA", (8, 8), (255, 0, 255, 255))  # must not appear
    data = pillow_apng(frames, default_image=True, duration=[20, 30, 40], loop=1)
    image = assert_matches_pillow(data)
    assert image.get("n-pages") == 3 and image.get("delay") == [20, 30, 40]
    assert not (our_frames(image)[..., :3] == [255, 0, 255]).all(axis=-1).any()


def test_delay_denominator_zero_means_hundredths(small_apng: bytes) -> None:
    data = patch_fctl(small_apng, 1, num=7, den=0)
    assert decode_apng(data, max_pixels=BIG).get("delay")[1] == 70


def test_icc_profile_is_attached() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = pillow_apng(shapes((5, 5), 2, seed=9, alphas=[255]), duration=10, icc_profile=profile)
    image = decode_apng(data, max_pixels=BIG)
    assert image.get("icc-profile-data") == profile
    assert (
        decode_apng(pillow_apng(shapes((5, 5), 2, 9, [255])), max_pixels=BIG).get_typeof(
            "icc-profile-data"
        )
        == 0
    )


def with_chunks_after_ihdr(data: bytes, extra: bytes) -> bytes:
    return data[:33] + extra + data[33:]  # signature (8) + IHDR (25)


def test_icc_profile_choice_follows_libpng() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    good = chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(profile))
    bogus = chunk(b"iCCP", b"junk\0\0" + zlib.compress(b"not an ICC profile" * 4))
    broken_crc = good[:-1] + bytes([good[-1] ^ 1])
    base = pillow_apng(shapes((5, 5), 2, seed=10, alphas=[255]), duration=10)
    # An invalid first profile is skipped, the next valid one used (as for still PNGs).
    image = decode_apng(with_chunks_after_ihdr(base, bogus + good), max_pixels=BIG)
    assert image.get("icc-profile-data") == profile
    # An ancillary chunk with a bad CRC is dropped, not fatal (libpng's default).
    image = decode_apng(with_chunks_after_ihdr(base, broken_crc), max_pixels=BIG)
    assert image.get_typeof("icc-profile-data") == 0
    assert np.array_equal(our_frames(image), our_frames(decode_apng(base, max_pixels=BIG)))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.75, 0.99])
def test_truncated(small_apng: bytes, fraction: float) -> None:
    with pytest.raises(TruncatedImage):
        decode_apng(small_apng[: int(len(small_apng) * fraction)], max_pixels=BIG)


def test_fewer_frames_than_declared(small_apng: bytes) -> None:
    data = replace_chunk(small_apng, b"acTL", 0, struct.pack(">II", 5, 2))
    with pytest.raises(TruncatedImage, match="5 frames but only 4"):
        decode_apng(data, max_pixels=BIG)


def test_more_frames_than_declared(small_apng: bytes) -> None:
    data = replace_chunk(small_apng, b"acTL", 0, struct.pack(">II", 3, 2))
    with pytest.raises(CorruptImage):
        decode_apng(data, max_pixels=BIG)


def test_too_large(small_apng: bytes) -> None:
    assert decode_apng(small_apng, max_pixels=12 * 9 * 4).get("n-pages") == 4
    with pytest.raises(TooLarge, match="12x9 x 4 frames = 432 pixels") as info:
        decode_apng(small_apng, max_pixels=431)
    assert "\n" not in str(info.value)


def test_too_large_is_checked_before_reading_frames() -> None:
    # A 100000 x 100000 canvas with 1000 frames and no data: must not allocate anything.
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 6, 0, 0, 0))
    data = SIG + header + chunk(b"acTL", struct.pack(">II", 1000, 0))
    with pytest.raises(TooLarge):
        decode_apng(data, max_pixels=BIG)


def test_wrong_fdat_sequence_number(small_apng: bytes) -> None:
    body = chunk_body(small_apng, b"fdAT", 0)
    data = replace_chunk(small_apng, b"fdAT", 0, struct.pack(">I", 9) + body[4:])
    with pytest.raises(CorruptImage, match="sequence number 9"):
        decode_apng(data, max_pixels=BIG)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"x": 5, "width": 8}, "outside"),
        ({"height": 0}, "zero size"),
        ({"dispose": 3}, "dispose_op"),
        ({"seq": 0}, "sequence"),
    ],
)
def test_bad_fctl(small_apng: bytes, fields: dict[str, int], message: str) -> None:
    with pytest.raises(CorruptImage, match=message):
        decode_apng(patch_fctl(small_apng, 2, **fields), max_pixels=BIG)


def test_default_frame_must_cover_canvas(small_apng: bytes) -> None:
    with pytest.raises(CorruptImage, match="whole canvas"):
        decode_apng(patch_fctl(small_apng, 0, width=5), max_pixels=BIG)


@pytest.mark.parametrize("ctype", [b"IHDR", b"acTL", b"fcTL", b"IDAT", b"fdAT"])
def test_bad_crc_in_critical_chunk(small_apng: bytes, ctype: bytes) -> None:
    _, pos, length = next(s for s in chunk_spans(small_apng) if s[0] == ctype)
    crc_at = pos + 8 + length
    data = bytearray(small_apng)
    data[crc_at] ^= 0xFF
    with pytest.raises(CorruptImage, match="bad CRC"):
        decode_apng(bytes(data), max_pixels=BIG)


def test_garbage_frame_data(small_apng: bytes) -> None:
    body = chunk_body(small_apng, b"fdAT", 0)
    data = replace_chunk(small_apng, b"fdAT", 0, body[:4] + bytes(len(body) - 4))
    with pytest.raises(CorruptImage, match="APNG frame 1"):
        decode_apng(data, max_pixels=BIG)


def test_not_animated_and_not_png() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, format="PNG")
    with pytest.raises(UnsupportedImage):
        decode_apng(buf.getvalue(), max_pixels=BIG)
    with pytest.raises(NotAnImage):
        decode_apng(b"JFIF" + bytes(50), max_pixels=BIG)


def repair_crcs(data: bytes) -> bytes:
    """Recompute every complete chunk's CRC, so mutations get past the CRC checks."""
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        end = pos + 8 + struct.unpack_from(">I", out, pos)[0]
        if end + 4 > len(out):
            break
        struct.pack_into(">I", out, end, zlib.crc32(out[pos + 4 : end]))
        pos = end + 4
    return bytes(out)


def test_fuzz_only_image_errors(small_apng: bytes) -> None:
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    for _ in range(300):
        data = bytearray(small_apng)
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.2:
                del data[rng.randrange(len(data)) :]
            elif data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        # As mutated (mostly stopped by CRC checks) and with CRCs repaired (reaches
        # the frame checks, libpng and the compositor).
        for variant in (bytes(data), repair_crcs(bytes(data))):
            read_apng_info(variant)  # must never raise
            try:
                image = decode_apng(variant, max_pixels=10**6)
            except ImageError as exc:
                outcome = type(exc).__name__
            else:
                assert image.height == image.get("page-height") * image.get("n-pages")
                assert len(image.write_to_memory()) == image.width * image.height * 4
                outcome = "ok"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes["ok"] > 0 and outcomes["CorruptImage"] > 0 and outcomes["TruncatedImage"] > 0


# ---------------------------------------------------------------- real corpus


def corpus_file(name: str) -> bytes:
    root = os.environ.get("OPTIMIZR_CORPUS")
    if not root:
        pytest.skip("OPTIMIZR_CORPUS not set: the shared real-image corpus is needed")
    return (Path(root) / "other" / "apng" / name).read_bytes()


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "frames", "tolerance"),
    [
        ("apng_ball_20-frames.png", 20, 1),
        # 16-bit: Pillow keeps the high byte, we round v / 257, so up to 1 level (2 allowed
        # for the OVER blend rounding on top of that).
        ("apng_rgba16_3-frames.png", 3, 2),
    ],
)
def test_corpus_matches_pillow(name: str, frames: int, tolerance: int) -> None:
    data = corpus_file(name)
    info = read_apng_info(data)
    assert info is not None and info.num_frames == frames
    image = assert_matches_pillow(data, tolerance)
    assert image.get("n-pages") == frames
    assert image.get("loop") == pillow_frames(data)[2]["loop"]


@pytest.mark.corpus
def test_corpus_dispose_previous() -> None:
    # WPT 016.png: its pass condition is a solid green final frame. Pillow shows red
    # there (its PREVIOUS snapshot aliases the canvas after an OVER blend), so only
    # the frames before that are compared with Pillow.
    data = corpus_file("apng_dispose-previous.png")
    assert read_apng_info(data) == ApngInfo(128, 64, 3, 1, False)
    image = decode_apng(data, max_pixels=BIG)
    ours = our_frames(image)
    theirs, durations, info = pillow_frames(data)
    assert len(ours) == len(theirs) == 3
    assert image.get("delay") == [int(d + 0.5) for d in durations] == [100, 100, 100]
    assert image.get("loop") == info["loop"] == 1
    for mine, ref in zip(ours[:2], theirs[:2], strict=True):
        assert np.abs(mine.astype(int) - ref.astype(int)).max() <= 1
    assert np.array_equal(ours[2], solid(128, 64, (0, 255, 0, 255)))


# ------------------------------------- issue 13: the cases said to be wrong, end to end


def composite_over(canvas: npt.NDArray[np.float64], frame: npt.NDArray[np.float64]) -> None:
    """The APNG spec's OVER (straight alpha), in place, in floating point."""
    sa, da = frame[..., 3:], canvas[..., 3:]
    alpha = sa + da * (1 - sa)
    colour = (frame[..., :3] * sa + canvas[..., :3] * da * (1 - sa)) / np.maximum(alpha, 1e-12)
    canvas[...] = np.concatenate([np.where(alpha > 0, colour, 0), alpha], axis=2)


def webp_frames(webp: bytes) -> Frames:
    image = pyvips.Image.new_from_buffer(webp, "", n=-1)
    pages = image.get("n-pages") if image.get_typeof("n-pages") else 1
    rgba = image if image.bands == 4 else image.bandjoin(255)
    pixels = np.frombuffer(rgba.write_to_memory(), np.uint8)
    return pixels.reshape(pages, image.height // pages, image.width, 4)


def test_many_near_transparent_over_frames_keep_the_canvas_opaque() -> None:
    # 1 opaque green frame, then 128 frames of green at alpha 2 blended OVER it (the APNG
    # suite's blend_op_over_near_transparent): by the spec every frame stays opaque green.
    # (Pillow 13 lerps alpha in OVER and fades it to ~97; issue 13 judged ours against
    # that.) The frames being identical, the WebP is one still picture.
    first = Frame(solid(8, 4, (0, 255, 0, 255)), num=1, den=100)
    rest = [Frame(solid(8, 4, (0, 255, 0, 2)), num=1, den=100, blend=1) for _ in range(128)]
    data = build_apng(8, 4, [first, *rest], plays=3)
    canvas = np.zeros((4, 8, 4))
    for frame in [first, *rest]:
        composite_over(canvas, frame.pixels / 255.0)
    expected = np.rint(canvas * 255).astype(np.uint8)
    assert expected[0, 0].tolist() == [0, 255, 0, 255]
    ours = our_frames(decode_apng(data, max_pixels=BIG))
    assert len(ours) == 129 and all(np.array_equal(f, expected) for f in ours)
    from optimizr import EncodeOptions, encode_webp

    encoded = encode_webp(data, EncodeOptions(lossless=True))
    assert encoded.facts.frames == 129
    frames = webp_frames(encoded.webp)
    # Every frame the same: the WebP is that one picture, opaque green.
    assert len(frames) == 1 and np.array_equal(frames[0], expected)


def test_partial_alpha_over_opaque_in_16_bit_and_1_bit_palette() -> None:
    # Half-transparent blue OVER opaque black is opaque (0, 0, 128): the APNG suite's
    # mode_16bit.png and mode_palette_1bit_alpha.png (Pillow 13 gives alpha 191 and 128).
    black16 = np.zeros((2, 3, 4), np.uint16)
    black16[..., 3] = 65535
    blue16 = np.zeros((2, 3, 4), np.uint16)
    blue16[..., 2], blue16[..., 3] = 65535, 32768
    deep = build_apng(3, 2, [Frame(black16), Frame(blue16, blend=1)])
    palette = Image.new("P", (3, 2), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255])
    second = Image.new("P", (3, 2), 1)
    second.putpalette([0, 0, 0, 0, 0, 255])
    indexed = pillow_apng(
        [palette, second], bits=1, transparency=bytes([255, 128]), blend=1, duration=50
    )
    assert chunk_body(indexed, b"IHDR")[8] == 1  # bit depth 1
    for data, blue_alpha in ((deep, 32768 / 65535), (indexed, 128 / 255)):
        canvas = np.zeros((2, 3, 4))
        composite_over(canvas, np.tile([0.0, 0.0, 0.0, 1.0], (2, 3, 1)))
        composite_over(canvas, np.tile([0.0, 0.0, 1.0, blue_alpha], (2, 3, 1)))
        expected = np.rint(canvas * 255).astype(np.uint8)
        assert expected[0, 0].tolist() == [0, 0, 128, 255]
        ours = our_frames(decode_apng(data, max_pixels=BIG))
        assert np.array_equal(ours[-1], expected)
