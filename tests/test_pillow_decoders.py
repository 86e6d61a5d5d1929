"""The formats Pillow decodes for us (optimizr.decoders.pillow, issue 13).

Outputs are compared with an independent decode wherever one is small enough to
write here (PPM, QOI, TGA, ICO are parsed with numpy from their specifications);
JPEG 2000 and PSD have no other decoder in this environment (libvips' wheel
has neither), so for those the lossless output is compared with Pillow's own
decode: that checks our conversion of Pillow's modes, not Pillow.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import pyvips
from PIL import Image

from conftest import CollectResults
from optimizr import EncodeOptions, RunConfig, convert_tree, decoders, encode_webp
from optimizr.budget import estimate_peak_bytes
from optimizr.decoders import pillow
from optimizr.errors import TooLarge
from optimizr.probe import probe
from optimizr.sniff import sniff_bytes, sniff_file

LOSSLESS = EncodeOptions(lossless=True)
U8 = npt.NDArray[np.uint8]

PILLOW_KINDS = ("ico", "cur", "tga", "qoi", "pnm", "pcx", "jpeg2000", "psd", "dds", "sgi")


def webp_array(webp: bytes) -> U8:
    """Our output decoded by libvips (not Pillow), height x width x bands."""
    image = pyvips.Image.new_from_buffer(webp, "")
    return np.ndarray(
        buffer=image.write_to_memory(),
        dtype=np.uint8,
        shape=(image.height, image.width, image.bands),
    )


def assert_same_pixels(got: U8, want: U8) -> None:
    """Exact RGB where a pixel is visible, exact alpha; an opaque reference has no alpha."""
    assert got.shape[:2] == want.shape[:2]
    if want.shape[2] == 4 and (want[:, :, 3] < 255).any():
        assert got.shape[2] == 4, "alpha was dropped"
        assert np.array_equal(got[:, :, 3], want[:, :, 3])
        visible = want[:, :, 3] > 0
        assert np.array_equal(got[:, :, :3][visible], want[:, :, :3][visible])
    else:
        assert got.shape[2] == 3, "alpha was added to an opaque image"
        assert np.array_equal(got, want[:, :, :3])


# ------------------------------------------------- independent decoders (from the specs)


def parse_ppm(data: bytes) -> U8:
    """Netpbm P6 with maxval 255: header tokens (with comments), then RGB bytes."""
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        while data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        tokens.append(data[pos:end])
        pos = end
    assert tokens[0] == b"P6" and tokens[3] == b"255"
    width, height = int(tokens[1]), int(tokens[2])
    pixels = np.frombuffer(data, np.uint8, width * height * 3, pos + 1)
    return pixels.reshape(height, width, 3)


def parse_qoi(data: bytes) -> U8:
    """The QOI specification 1.0, op by op."""
    assert data[:4] == b"qoif"
    width, height, channels, _ = struct.unpack_from(">IIBB", data, 4)
    out = np.zeros((width * height, 4), np.uint8)
    seen = [(0, 0, 0, 0)] * 64
    r, g, b, a = 0, 0, 0, 255
    pos, i = 14, 0
    while i < width * height:
        op = data[pos]
        pos += 1
        run = 1
        if op == 0xFE:
            r, g, b = data[pos : pos + 3]
            pos += 3
        elif op == 0xFF:
            r, g, b, a = data[pos : pos + 4]
            pos += 4
        elif op >> 6 == 0:
            r, g, b, a = seen[op]
        elif op >> 6 == 1:
            r, g, b = (
                (r + ((op >> 4) & 3) - 2) & 255,
                (g + ((op >> 2) & 3) - 2) & 255,
                (b + (op & 3) - 2) & 255,
            )
        elif op >> 6 == 2:
            dg = (op & 63) - 32
            second = data[pos]
            pos += 1
            r = (r + dg + (second >> 4) - 8) & 255
            g = (g + dg) & 255
            b = (b + dg + (second & 15) - 8) & 255
        else:
            run = (op & 63) + 1
        seen[(r * 3 + g * 5 + b * 7 + a * 11) % 64] = (r, g, b, a)
        out[i : i + run] = (r, g, b, a)
        i += run
    pixels = out.reshape(height, width, 4)
    return pixels if channels == 4 else pixels[:, :, :3]


def parse_tga(data: bytes) -> U8:
    """Truecolour TGA (types 2 and 10), 24 or 32 bits, either origin."""
    id_length, _, image_type = data[0], data[1], data[2]
    width, height, depth, descriptor = struct.unpack_from("<HHBB", data, 12)
    assert image_type in (2, 10) and depth in (24, 32)
    size = depth // 8
    pos, count = 18 + id_length, width * height
    if image_type == 2:
        raw = data[pos : pos + count * size]
    else:
        chunks, done = [], 0
        while done < count:
            head = data[pos]
            pos += 1
            n = (head & 127) + 1
            if head & 128:
                chunks.append(data[pos : pos + size] * n)
                pos += size
            else:
                chunks.append(data[pos : pos + n * size])
                pos += n * size
            done += n
        raw = b"".join(chunks)
    pixels = np.frombuffer(raw, np.uint8).reshape(height, width, size)
    rgb = pixels[:, :, [2, 1, 0, 3] if size == 4 else [2, 1, 0]]
    if not descriptor & 0x20:  # bottom-left origin: rows stored bottom-up
        rgb = rgb[::-1]
    if descriptor & 0x10:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


def parse_ico_largest(data: bytes) -> U8:
    """The largest entry of an ICO holding 8-bit palette DIBs with their AND masks."""
    count = struct.unpack_from("<H", data, 4)[0]
    entries = [struct.unpack_from("<BBBBHHII", data, 6 + 16 * i) for i in range(count)]
    w, h, _, _, _, bits, _, offset = max(entries, key=lambda e: (e[0] or 256) * (e[1] or 256))
    assert bits == 8
    w, h = w or 256, h or 256
    header = struct.unpack_from("<IiiHH", data, offset)
    palette_at = offset + header[0]
    palette = np.frombuffer(data, np.uint8, 256 * 4, palette_at).reshape(256, 4)[:, [2, 1, 0]]
    pixels_at = palette_at + 256 * 4
    stride = (w + 3) // 4 * 4
    index = np.frombuffer(data, np.uint8, stride * h, pixels_at).reshape(h, stride)[:, :w]
    mask_stride = (w + 31) // 32 * 4
    mask_bytes = np.frombuffer(data, np.uint8, mask_stride * h, pixels_at + stride * h)
    mask = np.unpackbits(mask_bytes.reshape(h, mask_stride), axis=1)[:, :w]
    alpha = np.where(mask == 1, 0, 255).astype(np.uint8)
    rgba = np.concatenate([palette[index], alpha[:, :, None]], axis=2)
    return np.ascontiguousarray(rgba[::-1])


# ------------------------------------------------------------------ the corpus


@pytest.mark.corpus
@pytest.mark.parametrize(
    ("name", "parse"),
    [
        ("rgba-correct.ppm", parse_ppm),
        ("basic-test.qoi", parse_qoi),
        ("targa.tga", parse_tga),
        ("favicon.ico", parse_ico_largest),
    ],
)
def test_corpus_file_matches_an_independent_decode(
    corpus: Path, name: str, parse: Callable[[bytes], U8]
) -> None:
    path = corpus / "other" / "misc" / name
    want = parse(path.read_bytes())
    got = webp_array(encode_webp(str(path), LOSSLESS).webp)
    assert_same_pixels(got, want)


@pytest.mark.corpus
@pytest.mark.parametrize("name", ["image.jp2", "sample.psd"])
def test_corpus_jp2_and_psd_match_pillows_decode(corpus: Path, name: str) -> None:
    path = corpus / "other" / "misc" / name
    with Image.open(path) as im:  # same library: checks our mode conversion only
        want = np.asarray(im.convert("RGBA"))
    got = webp_array(encode_webp(str(path), LOSSLESS).webp)
    assert_same_pixels(got, want)


# ------------------------------------------------------------- made by the suite


def pattern(width: int, height: int, bands: int, seed: int = 1) -> U8:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, bands), dtype=np.uint8)


def saved(im: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def test_tga_and_qoi_rgba_keep_alpha_exactly(tmp_path: Path) -> None:
    rgba = pattern(37, 23, 4)
    rgba[0, 0, 3] = 0
    im = Image.fromarray(rgba, "RGBA")
    for name, data in (
        ("a.tga", saved(im, "TGA", compression="tga_rle")),
        ("a.qoi", saved(im, "QOI")),
    ):
        got = webp_array(encode_webp(write(tmp_path, name, data), LOSSLESS).webp)
        want = parse_tga(data) if name.endswith(".tga") else parse_qoi(data)
        assert_same_pixels(got, want)


@pytest.mark.parametrize(("fmt", "name"), [("PPM", "g.pgm"), ("TGA", "g.tga"), ("PCX", "g.pcx")])
def test_grey_stays_grey(tmp_path: Path, fmt: str, name: str) -> None:
    grey = pattern(40, 30, 1)[:, :, 0]
    path = write(tmp_path, name, saved(Image.fromarray(grey, "L"), fmt))
    image = pillow.decode(path, LOSSLESS)
    assert (image.bands, image.interpretation) == (1, "b-w")
    assert probe(path) is not None and probe(path).bands == 1  # type: ignore[union-attr]
    got = webp_array(encode_webp(path, LOSSLESS).webp)
    assert np.array_equal(got[:, :, 0], grey) and np.array_equal(got[:, :, 1], grey)


def test_16_bit_grey_is_kept_then_scaled_with_rounding(tmp_path: Path) -> None:
    values = np.array([[0, 128, 129, 385, 65535, 32896, 1000, 60000]], np.uint16)
    path = write(tmp_path, "deep.pgm", saved(Image.fromarray(values), "PPM"))
    image = pillow.decode(path, LOSSLESS)
    assert (image.format, image.bands) == ("ushort", 1)
    got = webp_array(encode_webp(path, LOSSLESS).webp)[:, :, 0].astype(int)
    # libvips' 16-to-8-bit conversion (encode._prepare_colour) divides by 256 with
    # rounding: within one level of v / 257, never a clip or a low byte.
    assert np.abs(got - values / 257).max() <= 1


def test_palette_with_alpha_keeps_alpha(tmp_path: Path) -> None:
    # A TGA colour map of 32-bit entries: Pillow's palette is RGBA.
    index = (np.arange(64, dtype=np.uint8) % 4).reshape(8, 8)
    im = Image.fromarray(index, "P")
    entries = [[255, 0, 0, 255], [0, 255, 0, 128], [0, 0, 255, 0], [9, 9, 9, 255]]
    im.putpalette([v for entry in entries for v in entry], "RGBA")
    path = write(tmp_path, "p.tga", saved(im, "TGA"))
    want = np.array(entries, np.uint8)[index]
    assert_same_pixels(webp_array(encode_webp(path, LOSSLESS).webp), want)


def psd_rgb(pixels: U8, profile: bytes | None) -> bytes:
    """A minimal Photoshop file (spec: "Adobe Photoshop File Formats"): 8-bit RGB,
    raw planar composite, the ICC profile as image resource 1039."""
    height, width, channels = pixels.shape
    head = b"8BPS" + struct.pack(">H6xHIIHH", 1, channels, height, width, 8, 3)
    resources = b""
    if profile is not None:
        body = profile + b"\0" * (len(profile) & 1)
        resources = b"8BIM" + struct.pack(">HHI", 1039, 0, len(profile)) + body
    planar = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()
    return (
        head
        + struct.pack(">I", 0)  # no colour-mode data
        + struct.pack(">I", len(resources))
        + resources
        + struct.pack(">I", 0)  # no layers
        + struct.pack(">H", 0)  # raw composite
        + planar
    )


def test_icc_profile_is_carried(tmp_path: Path) -> None:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    pixels = pattern(16, 12, 3)
    path = write(tmp_path, "c.psd", psd_rgb(pixels, profile))
    image = pillow.decode(path, LOSSLESS)
    assert image.get("icc-profile-data") == profile
    plain = pillow.decode(write(tmp_path, "p.psd", psd_rgb(pixels, None)), LOSSLESS)
    assert plain.get_typeof("icc-profile-data") == 0
    assert_same_pixels(webp_array(encode_webp(str(tmp_path / "p.psd"), LOSSLESS).webp), pixels)


def tga_header(width: int, height: int) -> bytes:
    return struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, width, height, 24, 0x20)


BIG = 5000
#: Headers claiming BIG x BIG pixels with (almost) no pixel data after them.
BOMBS = {
    "bomb.tga": tga_header(BIG, BIG) + b"\0" * 30,
    "bomb.qoi": b"qoif" + struct.pack(">IIBB", BIG, BIG, 3, 0) + b"\0" * 30,
    "bomb.ppm": f"P6\n{BIG} {BIG}\n255\n".encode() + b"\0" * 30,
    "bomb.pcx": bytes([10, 5, 1, 8])
    + struct.pack("<6H", 0, 0, BIG - 1, BIG - 1, 72, 72)
    + bytes(48)
    + bytes([0, 3])
    + struct.pack("<H", BIG)
    + bytes(60),
    "bomb.sgi": struct.pack(">HBBHHHH", 474, 0, 1, 3, BIG, BIG, 3) + bytes(500),
}


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_max_pixels_is_refused_from_the_header(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, name, BOMBS[name])
    header = probe(path)
    assert header is not None and (header.width, header.height) == (BIG, BIG)
    # The estimate counts what Pillow holds: the row's bytes per band and pixel.
    held = decoders.TABLE[header.format].held_per_band_pixel * header.bands * BIG * BIG
    assert estimate_peak_bytes(header, EncodeOptions()) > held
    # Decoding would find the data missing (truncated); the header is enough to refuse.
    with pytest.raises(TooLarge, match="exceeds --max-pixels 1,000,000"):
        encode_webp(path, EncodeOptions(max_pixels=1_000_000))


def test_pillows_bomb_limit_does_not_decide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's own limit, set far below the image, would raise DecompressionBombError
    # (warnings are errors in this suite): --max-pixels alone decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    im = Image.fromarray(pattern(64, 64, 3), "RGB")
    path = write(tmp_path, "ok.qoi", saved(im, "QOI"))
    assert_same_pixels(webp_array(encode_webp(path, LOSSLESS).webp), np.asarray(im))
    assert Image.MAX_IMAGE_PIXELS == 100  # and it is left as it was


# ------------------------------------------------------------------------- sniffing


def test_formats_are_recognised_by_content(tmp_path: Path) -> None:
    rgb = Image.fromarray(pattern(8, 8, 3), "RGB")
    grey = Image.fromarray(pattern(8, 8, 1)[:, :, 0], "L")
    made = {
        "pcx": saved(rgb, "PCX"),
        "sgi": saved(rgb, "SGI"),
        "qoi": saved(rgb, "QOI"),
        "pnm": saved(grey, "PPM"),
        "ico": saved(rgb, "ICO"),
        "jpeg2000": saved(rgb, "JPEG2000"),
        "dds": saved(rgb.convert("RGBA"), "DDS"),
    }
    made["pfm"] = saved(grey.convert("F"), "PPM")  # Pillow writes F as PFM
    for kind, data in made.items():
        sniffed = sniff_bytes(data)
        assert sniffed.format == ("pnm" if kind == "pfm" else kind) and sniffed.supported


def test_tga_is_known_by_its_name_and_a_valid_header(tmp_path: Path) -> None:
    # A raw truecolour TGA starts 00 00 02 00 like a CUR: the name and header decide.
    data = saved(Image.fromarray(pattern(8, 8, 3), "RGB"), "TGA")
    assert data[:4] == b"\x00\x00\x02\x00"
    named = tmp_path / "x.tga"
    named.write_bytes(data)
    with open(named, "rb") as fh:
        assert sniff_file(fh).kind == "tga"
    unnamed = tmp_path / "x.bin"
    unnamed.write_bytes(data)
    with open(unnamed, "rb") as fh:
        assert not sniff_file(fh).supported
    garbage = tmp_path / "garbage.tga"
    garbage.write_bytes(b"\x00\x07" + bytes(40))  # colour-map type 7: no TGA
    with open(garbage, "rb") as fh:
        assert sniff_file(fh).format is None
    # Bytes (an object store's) carry no name: TGA 2.0's footer (Pillow writes
    # one) says what they are; without it they are not taken for a TGA.
    assert data.endswith(b"TRUEVISION-XFILE.\x00")
    assert sniff_bytes(data).kind == "tga"
    assert sniff_bytes(data[:-26]).format != "tga"


def test_every_pillow_format_is_in_the_table() -> None:
    for kind in PILLOW_KINDS:
        row = decoders.TABLE[kind]
        assert (row.library, row.requires) == ("Pillow", "pillow")
        assert row.module == "optimizr.decoders.pillow" and row.held_per_band_pixel > 0


# ------------------------------------------------------------- bad input, run goes on


def test_a_broken_file_of_each_kind_fails_in_one_line_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    rgb = Image.fromarray(pattern(64, 48, 3), "RGB")
    grey = Image.fromarray(pattern(64, 48, 1)[:, :, 0], "L")
    good = {
        "tga.tga": saved(rgb, "TGA", compression="tga_rle"),
        "qoi.qoi": saved(rgb, "QOI"),
        "ppm.ppm": saved(rgb, "PPM"),
        "pgm.pgm": saved(grey, "PPM"),
        "pcx.pcx": saved(rgb, "PCX"),
        "sgi.sgi": saved(rgb, "SGI"),
        "ico.ico": saved(rgb, "ICO", sizes=[(48, 48)]),
        "jp2.jp2": saved(rgb, "JPEG2000"),
        "dds.dds": saved(rgb.convert("RGBA"), "DDS"),
    }
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for name, data in good.items():
        (src / name).write_bytes(data)
        (src / f"cut-{name}").write_bytes(data[: max(len(data) // 2, 40)])
    listener = CollectResults()
    convert_tree(src, dest, RunConfig(src=src, dest=dest), listener=listener)
    results = listener.results
    for name in good:
        assert results[name].status == "converted", (name, results[name].message)
        broken = results[f"cut-{name}"]
        assert broken.status == "failed", (name, broken)
        assert broken.reason in ("truncated", "corrupt"), (name, broken.reason, broken.message)
        assert broken.message and "\n" not in broken.message
    assert len(list(dest.rglob("*.webp"))) == len(good)
