"""Acceptance test over the shared real-image corpus ($OPTIMIZR_CORPUS).

Every file is converted with the default :class:`EncodeOptions` (lossy q80, ICC
profile kept) and checked against Pillow, the independent reference decoder:
outcome, size after EXIF orientation, colours (after both sides are brought to
sRGB with LittleCMS), alpha, animation timing; then the whole corpus goes
through one ``convert_tree`` run. Expected outcomes are listed explicitly below
so that any change in what converts, skips or fails is noticed.

Colour metric (``Diff``): per-channel absolute error over RGB, reported as the
worst channel's mean and 99th percentile. Where there is alpha, RGB is compared
premultiplied (what a viewer shows over black), so the invisible colour of fully
transparent pixels is ignored, and alpha is compared on its own (max error).
"""

from __future__ import annotations

import functools
import io
import os
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pillow_heif
import pytest
import pyvips
from PIL import Image, ImageCms, ImageFile, ImageFilter, ImageOps

from conftest import CORPUS_ENV, CollectResults, decode
from optimizr import EncodeOptions, RunConfig, convert_tree, encode_webp
from optimizr.encode import Encoded
from optimizr.errors import ImageError
from optimizr.results import Result

pytestmark = pytest.mark.corpus

# HEIC: no HEVC decoder independent of libheif exists here, so the reference is
# pillow-heif's Pillow plugin (the same libheif, EXIF orientation reset as libheif
# applies irot/imir): it checks the pipeline around the decoder; tests/test_heif.py
# checks the decoder against the pixels it encoded.
pillow_heif.register_heif_opener()

DEFAULT = EncodeOptions()
LOSSLESS = EncodeOptions(lossless=True)
TO_SRGB = EncodeOptions(srgb=True)

# ---------------------------------------------------------------- tolerances
# Measured on this corpus with pyvips-binary (libvips 8.18) and Pillow 13 (figures printed
# by test_tree_summary_table with -s). Each limit has a margin over the worst measured
# file but stays far below what a real colour or geometry bug produces (negative
# controls below: a dropped ICC profile on rgb-to-gbr-test.jpg gives mean ~160, an
# orientation left unapplied or a flip gives mean >= 40).

#: Lossy q80, photographic sources (JPEG, TIFF, WebP, AVIF, photo PNGs), full resolution.
#: Worst measured: mean 7.6 / p99 41 (libvips-progressive_5.jpg, a small, detailed JPEG).
PHOTO_MEAN, PHOTO_P99 = 9.0, 48.0
#: Lossy q80, lossless-coded graphics (PNG, GIF, BMP): 4:2:0 chroma subsampling smears
#: one-pixel colour edges, so these are compared after a 5x5 box blur (BoxBlur(2)), and
#: pixel-exactly through the lossless encode below. Worst measured: PngSuite g25n3p04.png
#: (mean 15 / p99 65), a 32x32 palette test card.
GRAPHICS_BLUR = 2
GRAPHICS_MEAN, GRAPHICS_P99 = 20.0, 80.0
#: Below this many pixels a side, lossy WebP cannot be judged per pixel at all (a 1x2 BMP
#: shares one chroma sample between its two pixels); such files are checked losslessly.
TINY_SIDE = 10
#: Lossless-coded graphics formats Pillow decodes for us (optimizr.decoders.pillow).
PILLOW_GRAPHICS = ("ico", "cur", "qoi", "pnm", "tga", "pcx", "sgi")
#: Untagged CMYK against Pillow's convert("RGB"). The engines disagree by design: with no
#: profile libvips applies its built-in CMYK ICC profile (what Photoshop and browsers do),
#: while Pillow uses the naive formula R = 255 - C - K with no profile at all. Measured
#: 21 / 54 and 36 / 45; this limit only catches gross errors (inverted or swapped
#: channels give > 100). test_untagged_cmyk_true_colours checks them properly.
CMYK_NAIVE_MEAN, CMYK_NAIVE_P99 = 45.0, 72.0
#: Alpha is lossless by default (alpha_quality=100); 16-bit alpha may round by one level
#: (we scale v / 257, Pillow keeps the high byte).
ALPHA_MAX_ERR = 1
#: EncodeOptions(lossless=True) after colour management on both sides. 16-bit sources are
#: rounded differently by the two engines, and LittleCMS rounds by one level now and then.
LOSSLESS_MEAN, LOSSLESS_P99 = 0.5, 2.0
#: Orientation sets: each converted file against the converted orientation-1 file.
ORIENT_MEAN = {"Landscape": 6.0, "Portrait": 6.0, "libvips-progressive": 16.0}

# ---------------------------------------------------------------- expected outcomes

HUGE = "broken/huge_jpeg_9643x10328.jpg"

#: Files outside broken/ that legitimately do not convert: key -> (status, reason, why).
NOT_CONVERTIBLE: dict[str, tuple[str, str, str]] = {
    "color/12bit-jpeg_monkey12.jpg": (
        "skipped",
        "unsupported",
        "12-bit JPEG: the libjpeg-turbo in pyvips-binary decodes 8-bit samples only",
    ),
    "other/tiff/old-style-jpeg.tif": (
        "skipped",
        "unsupported",
        "old-style JPEG-in-TIFF (compression 6) is not configured in libtiff",
    ),
}

#: Every file in broken/ that must fail, with the reason category it must fail with.
BROKEN_FAILS: dict[str, str] = {
    "broken/zero-byte.gif": "not an image",
    "broken/not-an-image_1-byte.jpg": "not an image",
    "broken/not-an-image_git-lfs-pointer.jpg": "not an image",
    "broken/pngsuite/xs1n0g01.png": "not an image",  # damaged signatures
    "broken/pngsuite/xs2n0g01.png": "not an image",
    "broken/pngsuite/xs4n0g01.png": "not an image",
    "broken/pngsuite/xs7n0g01.png": "not an image",
    "broken/pngsuite/xcrn0g04.png": "not an image",  # ASCII-mode transfer damage
    "broken/pngsuite/xlfn0g04.png": "not an image",
    "broken/truncated_sharp.jpg": "truncated",
    "broken/truncated_libvips.jpg": "truncated",
    "broken/truncated_bluesquare.jpg": "truncated",
    "broken/truncated.png": "truncated",
    "broken/truncated.gif": "truncated",
    "broken/corrupt-header.jpg": "truncated",  # libjpeg: premature end, no image
    "broken/jpeg-crash_159.jpg": "truncated",
    "broken/png_unexpected-eof.png": "truncated",  # no IEND: cut short
    "broken/png_bad-chunk-name.png": "truncated",
    "broken/png_huge-ihdr-dims.png": "truncated",
    "broken/png_width-zero.png": "truncated",
    "broken/bmp_rle4-cut-short.bmp": "truncated",
    "broken/bomb_bmp_4135x4135_30-bytes.bmp": "truncated",
    "broken/png_ihdr-missing.png": "corrupt",
    "broken/png_no-idat_1024x1449.png": "corrupt",
    "broken/apple-cgbi.png": "corrupt",
    "broken/bmp_bad-bitcount.bmp": "corrupt",
    "broken/pngsuite/xhdn0g08.png": "corrupt",  # bad IHDR CRC
    "broken/pngsuite/xcsn0g01.png": "corrupt",  # bad IDAT CRC (Pillow does not notice)
    "broken/pngsuite/xc1n0g08.png": "corrupt",  # invalid colour type / bit depth
    "broken/pngsuite/xc9n2c08.png": "corrupt",
    "broken/pngsuite/xd0n2c08.png": "corrupt",
    "broken/pngsuite/xd3n2c08.png": "corrupt",
    "broken/pngsuite/xd9n2c08.png": "corrupt",
    "broken/pngsuite/xdtn0g01.png": "corrupt",  # no IDAT
    "broken/bomb_png_65536x65536.png": "too large",
    "broken/bomb_png_16384x16384.png": "too large",
    "broken/bomb_jpeg_20000x14000.jpg": "too large",
    "broken/bomb_bmp_reallybig.bmp": "too large",
    "broken/avif_17000x17000.avif": "too large",
}

#: Files in broken/ that are valid images after all: key -> (status, reason, why).
BROKEN_BUT_VALID: dict[str, tuple[str, str | None, str]] = {
    "broken/extension-lie_png-named.jpg": ("converted", None, "a valid PNG named .jpg"),
    "broken/extension-lie_heic-named.jpg": ("converted", None, "a valid HEIC named .jpg"),
    HUGE: ("converted", None, "99.6 Mpixel but under --max-pixels and WebP's 16383 px limit"),
    "broken/png_ancillary-crc-bad_cicp.png": (
        "converted",
        None,
        "bad CRC on ancillary chunks only (cLLI, mDCV): skipped by spec, image intact",
    ),
    "broken/png_iccp-crc-bad.png": ("converted", None, "bad CRC on the iCCP chunk only"),
    "broken/png_two-iccp-second-bogus.png": (
        "converted",
        None,
        "two iCCP chunks: libpng/libspng keep the first (a valid sRGB profile)",
    ),
}

#: Pillow cannot open these (see the corpus README); their size comes from the file header
#: and their pixels from another corpus file with the same picture, or from libvips.
PILLOW_SUBSTITUTE = {
    "other/tiff/bigtiff_big-endian.tiff": "other/tiff/bigtiff_little-endian.tiff",
    "other/bmp/rgba32abf.bmp": "other/bmp/rgba32.bmp",  # same pixels, BI_ALPHABITFIELDS
    "other/bmp/rgb32bf.bmp": "other/bmp/rgb24prof.bmp",  # same pixels, odd bitfield masks
}
#: BMP Suite's RLE24 file is a dithered rendering of the same picture: low-pass only.
PILLOW_SUBSTITUTE_BLURRED = {"other/bmp/rgb24rle24.bmp": "other/bmp/rgb24prof.bmp"}
#: No second decoder available: libvips' own colourspace conversion is the reference
#: (this checks the pipeline around the decoder, not the decoder itself).
LIBVIPS_REFERENCE = {"color/cielab.tiff", "other/tiff/float32-rgb.tiff"}
#: No reference at all (2-bit palette BMP: Pillow cannot read it; our own decoder is
#: tested against hand-built files in tests/test_bmp.py).
NO_PIXEL_REFERENCE = {"other/bmp/pal2.bmp": "2-bit BMP: no independent decoder"}
#: Pillow rejects PNGs with a bad *ancillary* chunk CRC unless LOAD_TRUNCATED_IMAGES is
#: set, which makes it skip those CRCs as libpng does.
PILLOW_SKIP_ANCILLARY_CRC = {"broken/png_ancillary-crc-bad_cicp.png", "broken/png_iccp-crc-bad.png"}
#: Untagged CMYK: compared with Pillow's naive convert("RGB") (CMYK_NAIVE_* limits).
CMYK_UNTAGGED = {"color/cmyk-ycck_no-profile.jpg", "color/cmyk_orientation6.jpg"}
#: Lossy output judged losslessly instead: a pattern of one-pixel grey lines made to show
#: averaging in gamma-encoded space ("gamma trap"); the DCT at q80 removes the lines, and
#: the average grey moves with them by design of the image (measured mean 74 full-res).
LOSSY_EXEMPT = {"color/gamma_dalai_lama_gray.jpg"}

IMAGE_DIRS = ("photos", "orientation", "color", "png", "broken", "other")


def _discover() -> list[str]:
    root = os.environ.get(CORPUS_ENV)
    if not root or not Path(root).is_dir():
        return []
    return sorted(
        path.relative_to(root).as_posix()
        for folder in IMAGE_DIRS
        for path in (Path(root) / folder).rglob("*")
        if path.is_file()
    )


CORPUS_FILES = _discover()
#: Without the corpus every parametrised test gets one placeholder, which then skips.
ALL_FILES = CORPUS_FILES or ["(corpus not set)"]


def expected_outcome(key: str) -> tuple[str, str | None]:
    if key in NOT_CONVERTIBLE:
        return NOT_CONVERTIBLE[key][:2]
    if key in BROKEN_FAILS:
        return "failed", BROKEN_FAILS[key]
    if key in BROKEN_BUT_VALID:
        return BROKEN_BUT_VALID[key][:2]
    assert not key.startswith("broken/"), f"{key}: list it in BROKEN_FAILS or BROKEN_BUT_VALID"
    return "converted", None


CONVERTED = [k for k in CORPUS_FILES if expected_outcome(k)[0] == "converted"] or ALL_FILES
GRAPHICS_SUFFIXES = (".png", ".gif", ".bmp")
LOSSLESS_CHECKED = [
    k
    for k in CONVERTED
    if k.endswith(GRAPHICS_SUFFIXES) or k in LOSSY_EXEMPT or k.startswith("broken/extension-lie")
] or ALL_FILES

# ---------------------------------------------------------------- metric


@dataclass(frozen=True)
class Diff:
    mean: float  # worst channel's mean absolute error (RGB, premultiplied if alpha)
    p99: float  # worst channel's 99th percentile absolute error
    alpha_max: int  # largest alpha difference

    def __str__(self) -> str:
        return f"mean {self.mean:.2f}, p99 {self.p99:.0f}, alpha max {self.alpha_max}"


def _premultiplied(image: Image.Image) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]]:
    rgba = np.asarray(image.convert("RGBA"), dtype=np.int32)
    alpha = rgba[..., 3]
    if image.mode == "RGBA":
        rgb = (rgba[..., :3] * alpha[..., None] + 127) // 255
    else:
        rgb = rgba[..., :3]
    return rgb.astype(np.int16), alpha.astype(np.int16)


def _p99(channel: npt.NDArray[np.int16]) -> float:
    counts = np.cumsum(np.bincount(channel.ravel(), minlength=256))
    return float(np.searchsorted(counts, 0.99 * counts[-1]))


def diff(out: Image.Image, ref: Image.Image, blur: int = 0) -> Diff:
    assert out.size == ref.size, f"size {out.size} != reference {ref.size}"
    (a, alpha_a), (b, alpha_b) = _premultiplied(out), _premultiplied(ref)
    if blur:
        a, b = (
            np.asarray(
                Image.fromarray(x.astype(np.uint8)).filter(ImageFilter.BoxBlur(blur)), np.int16
            )
            for x in (a, b)
        )
    d = np.abs(a - b)
    return Diff(
        mean=float(d.mean(axis=(0, 1)).max()),
        p99=max(_p99(d[..., c]) for c in range(3)),
        alpha_max=int(np.abs(alpha_a - alpha_b).max()),
    )


# ---------------------------------------------------------------- Pillow reference

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
RELATIVE = ImageCms.Intent.RELATIVE_COLORIMETRIC  # what optimizr asks libvips for


@functools.cache
def _corpus_root() -> Path:
    return Path(os.environ[CORPUS_ENV])


def pillow_open(path: Path | bytes) -> Image.Image:
    """Pillow's decode, quietly: its warnings (bomb, palette transparency) are not ours."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode(path)


def _icc(image: Image.Image) -> ImageCms.ImageCmsProfile | None:
    data = image.info.get("icc_profile")
    if not data:
        return None
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(data))
    except (OSError, ImageCms.PyCMSError):
        # broken/png_two-iccp-second-bogus.png: Pillow keeps the second, 18-byte bogus
        # profile; libpng keeps the first, an sRGB profile, so "none" is equivalent.
        return None


def _fix_low_bit_grey_trns(image: Image.Image, source: Path) -> None:
    """Pillow 13 compares a sub-8-bit grey tRNS value (15 in a 4-bit PNG) with pixels
    already scaled to 8 bits, so PngSuite tbbn0g04.png shows no transparency at all."""
    if image.format != "PNG" or image.mode != "L" or "transparency" not in image.info:
        return
    depth = source.read_bytes()[24]
    if depth < 8:
        image.info["transparency"] = image.info["transparency"] * 255 // ((1 << depth) - 1)


def to_srgb(image: Image.Image, *, apply_icc: bool = True) -> Image.Image:
    """An sRGB RGB or RGBA image, via LittleCMS when the image carries a profile."""
    profile = _icc(image) if apply_icc else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if image.mode in ("I;16", "I;16B", "I"):
            raw = np.asarray(image).astype(np.int64)
            grey = Image.fromarray(((raw * 255 + 32767) // 65535).astype(np.uint8), "L")
            if "transparency" in image.info:
                alpha = np.where(raw == image.info["transparency"], 0, 255).astype(np.uint8)
                grey = grey.convert("LA")
                grey.putalpha(Image.fromarray(alpha, "L"))
            image = grey
        if image.mode == "CMYK":
            if profile is None:
                return image.convert("RGB")  # see CMYK_NAIVE_MEAN
            return ImageCms.profileToProfile(
                image, profile, SRGB, renderingIntent=RELATIVE, outputMode="RGB"
            )
        alpha = None
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            alpha = image.convert("RGBA").getchannel("A")
        grey = image.mode in ("1", "L", "LA")
        base = image.convert("L" if grey else "RGB")
        if profile is not None:
            base = ImageCms.profileToProfile(
                base, profile, SRGB, renderingIntent=RELATIVE, outputMode="RGB"
            )
        base = base.convert("RGB")
    if alpha is not None:
        base.putalpha(alpha)
    return base


@functools.lru_cache(maxsize=3)
def reference(key: str, *, apply_icc: bool = True, orient: bool = True) -> Image.Image:
    """Pillow's decode of a corpus file (first frame), EXIF-oriented, in sRGB."""
    path = _corpus_root() / key
    skip_crc = key in PILLOW_SKIP_ANCILLARY_CRC
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = skip_crc or old
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(path)
            if key == HUGE:  # decoded at 1/4 scale by libjpeg (DCT scaling): see its test
                image.draft("RGB", (image.width // 4, image.height // 4))
            image.load()
            if image.info.get("default_image"):  # APNG: the default image is no frame
                image.seek(1)
                image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old
    _fix_low_bit_grey_trns(image, path)
    if orient:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = ImageOps.exif_transpose(image)
    return to_srgb(image, apply_icc=apply_icc)


def libvips_reference(key: str) -> Image.Image:
    image = pyvips.Image.new_from_file(str(_corpus_root() / key)).colourspace("srgb")
    image = image.cast("uchar") if image.format != "uchar" else image
    data = np.ndarray(
        buffer=image.write_to_memory(), dtype=np.uint8, shape=(image.height, image.width, 3)
    )
    return Image.fromarray(data.copy(), "RGB")


@functools.lru_cache(maxsize=2)
def decoded(webp: bytes) -> Image.Image:
    """Pillow's decode of an output; the per-file tests of one file share it."""
    return pillow_open(webp)


def webp_pixels(webp: bytes, *, apply_icc: bool = True) -> Image.Image:
    """Pillow's decode of our output (first frame), in sRGB if it carries a profile."""
    return to_srgb(decoded(webp), apply_icc=apply_icc)


def header_size(path: Path) -> tuple[int, int]:
    """Width and height from a BMP or TIFF header, for the files Pillow cannot open."""
    data = path.read_bytes()
    if data[:2] == b"BM":
        width, height = struct.unpack_from("<ii", data, 18)
        return width, abs(height)
    endian = "<" if data[:2] == b"II" else ">"
    big = struct.unpack_from(endian + "H", data, 2)[0] == 43
    offset = struct.unpack_from(endian + ("Q" if big else "I"), data, 8 if big else 4)[0]
    count_fmt, entry_fmt, entry_size = ("Q", "HHQ", 20) if big else ("H", "HHI", 12)
    count = struct.unpack_from(endian + count_fmt, data, offset)[0]
    first = offset + (8 if big else 2)
    tags: dict[int, int] = {}
    for i in range(count):
        tag, kind, _ = struct.unpack_from(endian + entry_fmt, data, first + i * entry_size)
        value_at = first + i * entry_size + (12 if big else 8)
        tags[tag] = struct.unpack_from(endian + ("H" if kind == 3 else "I"), data, value_at)[0]
    return tags[256], tags[257]


# ---------------------------------------------------------------- conversions, cached


@dataclass
class TreeRun:
    dest: Path
    summary: Any
    results: dict[str, Result] = field(default_factory=dict)
    seconds: float = 0.0


@pytest.fixture(scope="session")
def tree_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> TreeRun:
    """ONE convert_tree run over the whole corpus (SRC is only read), default options,
    writing every output even when larger than its source."""
    import time

    dest = tmp_path_factory.mktemp("corpus-webp")
    listener = CollectResults()
    started = time.perf_counter()
    summary = convert_tree(
        corpus,
        dest,
        # name="append": x.gif and x.png would both claim x.webp (an "output conflict"
        # failure, tested in test_pipeline.py); here every file must get its own output.
        # reencode_webp: WebP sources are decoded and encoded too (without it they
        # are kept as they are, tested in test_outputs.py).
        RunConfig(src=corpus, dest=dest, if_larger="write", name="append", reencode_webp=True),
        listener=listener,
    )
    return TreeRun(dest, summary, listener.results, time.perf_counter() - started)


Converted = Encoded | ImageError


@pytest.fixture(scope="session")
def convert(corpus: Path, request: pytest.FixtureRequest) -> Callable[..., Converted]:
    """encode_webp(corpus file, options), each (file, options) once per session.

    The 99.6 Mpixel JPEG is converted once only, by the convert_tree run."""
    cache: dict[tuple[str, EncodeOptions], Converted] = {}

    def run(key: str, options: EncodeOptions = DEFAULT) -> Converted:
        if (key, options) not in cache:
            if key == HUGE and options == DEFAULT:
                tree: TreeRun = request.getfixturevalue("tree_run")
                result = tree.results[key]
                assert result.status == "converted" and result.facts is not None, result
                assert result.output is not None
                cache[key, options] = Encoded(
                    (tree.dest / result.output).read_bytes(), result.facts
                )
            else:
                try:
                    cache[key, options] = encode_webp(str(corpus / key), options)
                except ImageError as exc:
                    cache[key, options] = exc
        return cache[key, options]

    return run


def encoded(
    convert: Callable[..., Converted], key: str, options: EncodeOptions = DEFAULT
) -> Encoded:
    result = convert(key, options)
    assert isinstance(result, Encoded), f"{key} did not convert: {result}"
    return result


#: Worst figures per category, filled by the colour tests, printed by the summary test.
MEASURED: dict[str, tuple[float, str, float, str]] = {}


def record(category: str, key: str, d: Diff) -> None:
    mean, mean_key, p99, p99_key = MEASURED.get(category, (0.0, "", 0.0, ""))
    if d.mean >= mean:
        mean, mean_key = d.mean, key
    if d.p99 >= p99:
        p99, p99_key = d.p99, key
    MEASURED[category] = (mean, mean_key, p99, p99_key)


# ---------------------------------------------------------------- the expectation lists


def test_expectation_lists_match_the_corpus(corpus: Path) -> None:
    listed = {*NOT_CONVERTIBLE, *BROKEN_FAILS, *BROKEN_BUT_VALID}
    listed |= {*PILLOW_SUBSTITUTE, *PILLOW_SUBSTITUTE_BLURRED, *LIBVIPS_REFERENCE}
    listed |= {*NO_PIXEL_REFERENCE, *PILLOW_SKIP_ANCILLARY_CRC, *CMYK_UNTAGGED, *LOSSY_EXEMPT}
    missing = sorted(key for key in listed if not (corpus / key).is_file())
    assert not missing, f"listed but not in the corpus: {missing}"
    broken = {k for k in CORPUS_FILES if k.startswith("broken/")}
    assert broken == set(BROKEN_FAILS) | set(BROKEN_BUT_VALID)
    assert not set(BROKEN_FAILS) & set(BROKEN_BUT_VALID)
    assert len(CORPUS_FILES) == 259  # the README's folder summary


# ---------------------------------------------------------------- 1, 2, 5: outcome and size


@pytest.fixture(scope="module")
def file_key(request: pytest.FixtureRequest, corpus: Path) -> str:
    """A corpus file. Parametrised indirectly with module scope, so that pytest runs all
    the per-file tests of one file together (its decoded output and reference are cached
    for the next test) before moving to the next file."""
    return str(request.param)


def per_file(keys: list[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("file_key", keys, indirect=True, scope="module")


@per_file(ALL_FILES)
def test_outcome(file_key: str, convert: Callable[..., Converted]) -> None:
    key = file_key
    status, reason = expected_outcome(key)
    result = convert(key)
    if status == "converted":
        assert isinstance(result, Encoded), f"{key} should convert: {result}"
        return
    assert isinstance(result, ImageError), f"{key} should be {status} ({reason}), it converted"
    assert result.reason == reason, f"{key}: {result}"
    assert result.message, f"{key}: the failure must say why"


@per_file(CONVERTED)
def test_output_decodes_at_oriented_size(file_key: str, convert: Callable[..., Converted]) -> None:
    key = file_key
    out = encoded(convert, key)
    webp = decoded(out.webp)
    assert webp.format == "WEBP"
    path = _corpus_root() / key
    if key in PILLOW_SUBSTITUTE or key in PILLOW_SUBSTITUTE_BLURRED or key in LIBVIPS_REFERENCE:
        expected = header_size(path)
        if key in PILLOW_SUBSTITUTE:
            assert expected == pillow_open(_corpus_root() / PILLOW_SUBSTITUTE[key]).size
    elif key in NO_PIXEL_REFERENCE:
        expected = header_size(path)
    else:
        expected, orientation = _pillow_header(key)
        if orientation in (5, 6, 7, 8):  # transposed, as exif_transpose does
            expected = expected[::-1]
    assert webp.size == expected
    assert (out.facts.width_out, out.facts.height_out) == expected
    assert getattr(webp, "n_frames", 1) >= 1
    if key.endswith(".jpg") and not key.startswith("broken/extension-lie"):
        assert out.facts.format == "jpeg"


def _pillow_header(key: str) -> tuple[tuple[int, int], int | None]:
    """(stored size, EXIF orientation) from Pillow, reading the header only."""
    path = _corpus_root() / key
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = key in PILLOW_SKIP_ANCILLARY_CRC or old
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.size, image.getexif().get(0x0112)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def test_extension_lie_converts_as_png(convert: Callable[..., Converted]) -> None:
    out = encoded(convert, "broken/extension-lie_png-named.jpg")
    assert out.facts.format == "png"
    assert pillow_open(out.webp).mode == "RGBA"


# ---------------------------------------------------------------- 3: colours


def _reference_for(key: str) -> tuple[Image.Image, int]:
    """(reference image, blur radius to compare at)."""
    if key in PILLOW_SUBSTITUTE:
        return reference(PILLOW_SUBSTITUTE[key]), 0
    if key in PILLOW_SUBSTITUTE_BLURRED:
        return reference(PILLOW_SUBSTITUTE_BLURRED[key]), GRAPHICS_BLUR
    if key in LIBVIPS_REFERENCE:
        return libvips_reference(key), 0
    return reference(key), 0


def _category(key: str, out: Encoded) -> str:
    if key in CMYK_UNTAGGED:
        return "cmyk-untagged"
    if (
        out.facts.format in ("png", "apng", "gif", "bmp", *PILLOW_GRAPHICS)
        or max(out.facts.width_out, out.facts.height_out) <= 64
    ):
        return "graphics"  # lossless-coded, or so small that chroma subsampling dominates
    return "photo"


@per_file(CONVERTED)
def test_colours_match_reference(file_key: str, convert: Callable[..., Converted]) -> None:
    key = file_key
    if key in NO_PIXEL_REFERENCE:
        pytest.skip(NO_PIXEL_REFERENCE[key])
    if key in LOSSY_EXEMPT:
        pytest.skip("checked losslessly: see LOSSY_EXEMPT")
    out = encoded(convert, key)
    if key == HUGE:
        # 99.6 Mpixel: compared at 1/4 scale (libjpeg's DCT scaling for the reference, a
        # box filter for ours) to spare time and ~2 GB of comparison arrays.
        ref = reference(key)
        got = webp_pixels(out.webp).resize(ref.size, Image.Resampling.BOX)
    else:
        ref, _ = _reference_for(key)
        got = webp_pixels(out.webp)
    if min(ref.size) < TINY_SIDE and out.facts.format in ("png", "gif", "bmp", *PILLOW_GRAPHICS):
        pytest.skip(f"{ref.size}: too small to judge lossy output; checked losslessly")
    category = _category(key, out)
    blur = GRAPHICS_BLUR if category == "graphics" or key in PILLOW_SUBSTITUTE_BLURRED else 0
    d = diff(got, ref, blur)
    record(category, key, d)
    limits = {
        "photo": (PHOTO_MEAN, PHOTO_P99),
        "graphics": (GRAPHICS_MEAN, GRAPHICS_P99),
        "cmyk-untagged": (CMYK_NAIVE_MEAN, CMYK_NAIVE_P99),
    }[category]
    assert d.mean <= limits[0] and d.p99 <= limits[1], f"{key} ({category}): {d}"
    assert d.alpha_max <= ALPHA_MAX_ERR, f"{key}: alpha differs: {d}"


@pytest.mark.parametrize("key", LOSSLESS_CHECKED)
def test_lossless_matches_reference(
    key: str, corpus: Path, convert: Callable[..., Converted]
) -> None:
    """Lossless-coded sources, converted with lossless=True, must match Pillow nearly exactly:
    decoding, palette/bit-depth expansion, tRNS, ICC handling, orientation all included."""
    if key in NO_PIXEL_REFERENCE:
        pytest.skip(NO_PIXEL_REFERENCE[key])
    ref, blur = _reference_for(key)
    got = webp_pixels(encoded(convert, key, LOSSLESS).webp)
    d = diff(got, ref, blur)
    record("lossless" if not blur else "lossless (dithered substitute, blurred)", key, d)
    limit = (GRAPHICS_MEAN / 2, GRAPHICS_P99 / 2) if blur else (LOSSLESS_MEAN, LOSSLESS_P99)
    assert d.mean <= limit[0] and d.p99 <= limit[1], f"{key}: {d}"
    assert d.alpha_max <= ALPHA_MAX_ERR, f"{key}: {d}"


@per_file(CONVERTED)
def test_alpha_kept_only_where_needed(file_key: str, convert: Callable[..., Converted]) -> None:
    """Output has alpha iff the source has a pixel that is not fully opaque."""
    key = file_key
    if key in NO_PIXEL_REFERENCE:
        pytest.skip(NO_PIXEL_REFERENCE[key])
    out = encoded(convert, key)
    webp = decoded(out.webp)
    if getattr(webp, "n_frames", 1) > 1:
        pytest.skip("animations: see test_animation")
    if key == HUGE:
        assert webp.mode == "RGB"
        return
    ref, _ = _reference_for(key)
    translucent = ref.mode == "RGBA" and ref.getchannel("A").getextrema()[0] < 255
    assert webp.mode == ("RGBA" if translucent else "RGB"), f"{key}: source {ref.mode}"
    assert out.facts.has_alpha == translucent


# ---------------------------------------------------------------- negative controls


def test_metric_catches_a_dropped_icc_profile(convert: Callable[..., Converted]) -> None:
    key = "color/rgb-to-gbr-test.jpg"
    out = webp_pixels(encoded(convert, key).webp)
    good = diff(out, reference(key))
    unmanaged = diff(out, reference(key, apply_icc=False))
    assert good.mean <= PHOTO_MEAN
    assert unmanaged.mean > 10 * PHOTO_MEAN and unmanaged.p99 > 3 * PHOTO_P99, unmanaged


@pytest.mark.parametrize(
    "key",
    ["orientation/Landscape_6.jpg", "orientation/Portrait_8.jpg", "orientation/Landscape_3.jpg"],
)
def test_metric_catches_unapplied_orientation(key: str, convert: Callable[..., Converted]) -> None:
    out = webp_pixels(encoded(convert, key).webp)
    stored = reference(key, orient=False)
    if stored.size != out.size:  # 5-8: compare the unrotated picture squeezed to size
        stored = stored.resize(out.size)
    wrong = diff(out, stored)
    assert wrong.mean > 4 * PHOTO_MEAN, wrong
    assert diff(out, reference(key)).mean <= PHOTO_MEAN


# ---------------------------------------------------------------- 4: orientation sets


def _oriented_pixels(convert: Callable[..., Converted], key: str) -> Image.Image:
    return webp_pixels(encoded(convert, key).webp).convert("RGB")


def _aligned_diff(a: Image.Image, b: Image.Image, shift: int) -> float:
    """Mean error, the best over shifts of up to `shift` pixels (libvips' set 3 and 4 are
    stored one row off), with a margin cropped so every shift compares the same area."""
    x = np.asarray(a, np.int16)
    y = np.asarray(b, np.int16)
    m = shift
    core = y[m : y.shape[0] - m or None, m : y.shape[1] - m or None]
    best = float("inf")
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            window = x[m + dy : x.shape[0] - m + dy, m + dx : x.shape[1] - m + dx]
            best = min(best, float(np.abs(window - core).mean()))
    return best


@pytest.mark.parametrize("name", ["Landscape", "Portrait", "libvips-progressive"])
def test_orientation_set_matches_orientation_1(
    name: str, convert: Callable[..., Converted]
) -> None:
    """Each file of the set displays the same picture (libvips' set draws its own number on
    it, and stores 5-8 at 3/4 size); after conversion all match the orientation-1 file."""
    one = _oriented_pixels(convert, f"orientation/{name}_1.jpg")
    values = [0, 2, 3, 4, 5, 6, 7, 8] if name != "libvips-progressive" else [2, 3, 4, 5, 6, 7, 8]
    shift = 1 if name == "libvips-progressive" else 0
    for value in values:
        out = _oriented_pixels(convert, f"orientation/{name}_{value}.jpg")
        ref = one if out.size == one.size else one.resize(out.size, Image.Resampling.LANCZOS)
        if name != "libvips-progressive":
            assert out.size == one.size, f"{name}_{value}: {out.size}"
        error = _aligned_diff(out, ref, shift)
        mirrored = _aligned_diff(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ref, shift)
        record(f"orientation set {name}", f"{name}_{value}", Diff(error, 0.0, 0))
        assert error <= ORIENT_MEAN[name], f"{name}_{value}: mean {error:.2f}"
        assert error < mirrored / 2.5, f"{name}_{value}: {error:.2f} vs mirrored {mirrored:.2f}"


# EXIF 2.32, tag 0x0112: the operation that displays the stored pixels correctly.
EXIF_OPERATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("value", sorted(EXIF_OPERATION))
def test_exif_orientation_f_set(
    value: int, corpus: Path, convert: Callable[..., Converted]
) -> None:
    """node-canvas' F files store the same pixels with different tags, so each output is the
    f1 output under that tag's operation (not the same picture as f1)."""
    key = f"orientation/exif-orientation-f{value}.jpg"
    stored = pillow_open(corpus / key)
    assert np.array_equal(
        np.asarray(stored), np.asarray(pillow_open(corpus / (key[:-5] + "1.jpg")))
    )
    one = _oriented_pixels(convert, "orientation/exif-orientation-f1.jpg")
    out = _oriented_pixels(convert, key)
    d = diff(out, one.transpose(EXIF_OPERATION[value]))
    record("orientation set exif-orientation-f", key, d)
    assert d.mean <= 2.0 and d.p99 <= 16, f"{key}: {d}"


@pytest.mark.parametrize(
    "key",
    [
        "orientation/Landscape_0.jpg",
        "orientation/Portrait_0.jpg",
        "orientation/exif-orientation-fi.jpg",  # 9: out of range
        "orientation/exif-orientation-fm.jpg",  # two tags, 1 and 2: the first wins
        "orientation/exif-orientation-fn.jpg",  # none
        "orientation/orientation0_samsung_1x1.jpg",
    ],
)
def test_invalid_orientation_is_treated_as_1(
    key: str, corpus: Path, convert: Callable[..., Converted]
) -> None:
    stored = reference(key, orient=False)
    out = _oriented_pixels(convert, key)
    assert out.size == stored.size
    d = diff(out, stored.convert("RGB"))
    assert d.mean <= PHOTO_MEAN and d.p99 <= PHOTO_P99, f"{key}: {d}"


def test_png_exif_orientation_is_applied(corpus: Path, convert: Callable[..., Converted]) -> None:
    key = "orientation/png-exif-orientation6.png"
    stored = reference(key, orient=False)
    out = webp_pixels(encoded(convert, key, LOSSLESS).webp)
    assert out.size == stored.size == (400, 400)  # square: only the content shows it
    rotated = stored.transpose(Image.Transpose.ROTATE_270)  # 90 degrees clockwise
    assert diff(out, rotated).mean <= LOSSLESS_MEAN
    assert diff(out, stored).mean > 10 * LOSSLESS_MEAN


@pytest.mark.parametrize(
    "key", ["orientation/Landscape_6.jpg", "orientation/png-exif-orientation6.png"]
)
@pytest.mark.parametrize("max_width", [None, 300])
def test_kept_exif_says_upright(key: str, max_width: int | None, corpus: Path) -> None:
    """With metadata="all" the EXIF block is kept, so its Orientation must say 1 once the
    pixels are rotated, or viewers would rotate them a second time."""
    out = encode_webp(str(corpus / key), EncodeOptions(metadata="all", max_width=max_width))
    with Image.open(io.BytesIO(out.webp)) as webp:
        assert webp.info.get("exif")
        assert webp.getexif().get(0x0112) in (None, 1)
        if key.endswith("Landscape_6.jpg"):  # stored 1200x1800, displayed landscape
            assert webp.width > webp.height


# ---------------------------------------------------------------- 6: animations

ANIMATED = [
    "other/gif/rotating-squares_animated.gif",
    "other/gif/animated-loop-3.gif",
    "other/gif/rotating-earth_44-frames.gif",
    "other/gif/cogs_animated-transparent.gif",
    "other/gif/dispose-background.gif",
    "other/gif/dispose-previous.gif",
    "other/webp/anim.webp",
    "other/webp/anim_rgba-header-rgb-frames.webp",
    "other/webp/rotating-squares_animated.webp",
    "other/webp/animated-loop-3.webp",
    "other/apng/apng_ball_20-frames.png",
    "other/apng/apng_rgba16_3-frames.png",
    "other/apng/apng_dispose-previous.png",
]

#: Pillow's loop value -> the WebP loop count (number of plays, 0 = forever).
#: GIF: Netscape N means N + 1 plays, absent means play once. 65535 would be 65536 plays,
#: which WebP's 16-bit field cannot hold: clamped to 65535 (libvips alone would write
#: 65536 mod 2**16 = 0, "forever").
EXPECTED_LOOP = {
    "other/gif/rotating-squares_animated.gif": (0, 0),
    "other/gif/animated-loop-3.gif": (2, 3),
    "other/gif/rotating-earth_44-frames.gif": (65535, 65535),
    "other/gif/cogs_animated-transparent.gif": (32760, 32761),
    "other/gif/dispose-background.gif": (10, 11),
    "other/gif/dispose-previous.gif": (None, 1),
    "other/webp/anim.webp": (0, 0),
    "other/webp/anim_rgba-header-rgb-frames.webp": (0, 0),
    "other/webp/rotating-squares_animated.webp": (0, 0),
    "other/webp/animated-loop-3.webp": (3, 3),
    "other/apng/apng_ball_20-frames.png": (0, 0),  # APNG num_plays maps straight
    "other/apng/apng_rgba16_3-frames.png": (0, 0),
    "other/apng/apng_dispose-previous.png": (1, 1),
}


def pillow_frames(data: Path | bytes) -> tuple[list[Image.Image], list[int], Any]:
    """Composited frames (sRGB RGBA) and durations in ms; APNG's default image is skipped
    when it is not part of the animation."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            first = 1 if image.info.get("default_image") else 0
            frames, durations = [], []
            for index in range(first, getattr(image, "n_frames", 1)):
                image.seek(index)
                image.load()
                frames.append(image.convert("RGBA"))
                durations.append(int(image.info.get("duration", 0) + 0.5))
            image.seek(0)
            return frames, durations, image.info.get("loop")


def merge_identical(frames: list[Image.Image], durations: list[int]) -> tuple[list[int], list[int]]:
    """libwebp's animation encoder merges a frame identical to the one before it into that
    frame (summing durations): the same animation, fewer frames. Returns (first index of
    each run, durations)."""
    starts, merged = [0], [durations[0]]
    for index in range(1, len(frames)):
        if np.array_equal(np.asarray(frames[index]), np.asarray(frames[index - 1])):
            merged[-1] += durations[index]
        else:
            starts.append(index)
            merged.append(durations[index])
    return starts, merged


@pytest.mark.parametrize("key", ANIMATED)
def test_animation(key: str, corpus: Path, convert: Callable[..., Converted]) -> None:
    source_frames, source_durations, source_loop = pillow_frames(corpus / key)
    assert len(source_frames) > 1
    if key.endswith(".gif"):
        # libvips (like browsers) plays a GIF delay of 0 as 100 ms.
        source_durations = [d or 100 for d in source_durations]
    out = encoded(convert, key)
    frames, durations, loop = pillow_frames(out.webp)
    if key == "other/apng/apng_dispose-previous.png":
        # Pillow's wrong dispose-previous (see below) makes two of its frames equal.
        starts, expected_durations = list(range(len(source_frames))), source_durations
    else:
        starts, expected_durations = merge_identical(source_frames, source_durations)
    assert out.facts.frames == len(source_frames)
    assert len(frames) == len(starts), f"{key}: {len(frames)} frames, expected {len(starts)}"
    assert durations == expected_durations
    assert (source_loop, loop) == EXPECTED_LOOP[key]
    pairs = [(0, 0), (-1, -1)]
    if key == "other/apng/apng_dispose-previous.png":
        # Pillow's dispose-previous after an OVER blend restores the frame's own pixels
        # (see tests/test_apng.py), so its last frame is wrong. The WPT pass condition
        # for this file is a solid green last frame: check that instead.
        pairs = [(0, 0)]
        last = np.asarray(frames[-1].convert("RGBA"), np.int16)
        assert np.abs(last - np.array([0, 255, 0, 255])).max() <= 2
    for mine, theirs in pairs:
        graphics = not key.endswith(".webp")
        d = diff(
            to_srgb(frames[mine]),
            to_srgb(source_frames[starts[theirs]]),
            GRAPHICS_BLUR if graphics else 0,
        )
        limit = (GRAPHICS_MEAN, GRAPHICS_P99) if graphics else (PHOTO_MEAN, PHOTO_P99)
        record("animation frames " + ("(graphics, blurred)" if graphics else "(webp)"), key, d)
        assert d.mean <= limit[0] and d.p99 <= limit[1], f"{key} frame {mine}: {d}"
        assert d.alpha_max <= ALPHA_MAX_ERR, f"{key} frame {mine}: {d}"


# ---------------------------------------------------------------- 7: colour specifics

WIDE_GAMUT = [
    "color/adobergb_fujifilm-xt2.tiff",
    "color/adobergb-a98.jpg",
    "color/displayp3.png",
    "color/dci-p3-d65_color-ring.jpg",
    "color/rec2020_color-bars.jpg",
    "color/prophoto_1x1.png",
    "color/rgb-to-gbr-test.jpg",
    "color/rgb-to-gbr-test.png",
    "color/xyb-jpegli.jpg",
    "other/avif/iphone-xs_displayp3.avif",
    "other/webp/extended_apple-rgb-icc.webp",
]


def _source_profile(key: str) -> bytes:
    if key.endswith(".avif"):  # Pillow's AVIF plugin exposes it too, but be explicit
        return bytes(pyvips.Image.new_from_file(str(_corpus_root() / key)).get("icc-profile-data"))
    profile = pillow_open(_corpus_root() / key).info.get("icc_profile")
    assert profile, key
    return bytes(profile)


@pytest.mark.parametrize("key", WIDE_GAMUT)
def test_wide_gamut(key: str, convert: Callable[..., Converted]) -> None:
    """By default the profile is kept byte for byte; with srgb=True the pixels are
    converted and the profile dropped. Either way the colours match the reference."""
    ref = reference(key)
    out = encoded(convert, key)
    assert out.facts.icc_kept and not out.facts.converted_to_srgb
    assert decoded(out.webp).info.get("icc_profile") == _source_profile(key)
    managed = diff(webp_pixels(out.webp), ref)
    unmanaged = diff(webp_pixels(out.webp, apply_icc=False), ref)
    record("wide gamut, profile kept", key, managed)
    assert managed.mean <= PHOTO_MEAN and managed.p99 <= PHOTO_P99, f"{key}: {managed}"
    # The profile matters: read without it, the same output is further off.
    assert managed.mean < unmanaged.mean, f"{key}: {managed} vs unmanaged {unmanaged}"

    srgb = encoded(convert, key, TO_SRGB)
    assert not srgb.facts.icc_kept and srgb.facts.converted_to_srgb
    assert "icc_profile" not in pillow_open(srgb.webp).info
    converted = diff(webp_pixels(srgb.webp), ref)
    record("wide gamut, srgb=True", key, converted)
    assert converted.mean <= PHOTO_MEAN and converted.p99 <= PHOTO_P99, f"{key}: {converted}"
    # The pixels were converted, not merely untagged (that would equal `unmanaged`).
    assert converted.mean < unmanaged.mean, f"{key}: {converted} vs untagged {unmanaged}"


@pytest.mark.parametrize(
    "key",
    [
        "color/cmyk-ycck_swop-icc.jpg",
        "color/cmyk-adobe0_swop-icc.jpg",
        "color/cmyk_fogra39.tif",
        *sorted(CMYK_UNTAGGED),
    ],
)
def test_cmyk_comes_out_rgb(key: str, convert: Callable[..., Converted]) -> None:
    out = encoded(convert, key)
    webp = pillow_open(out.webp)
    assert webp.mode == "RGB" and "icc_profile" not in webp.info
    assert out.facts.converted_to_srgb and not out.facts.icc_kept
    if key not in CMYK_UNTAGGED:
        d = diff(webp_pixels(out.webp), reference(key))
        record("cmyk with profile", key, d)
        assert d.mean <= PHOTO_MEAN and d.p99 <= PHOTO_P99, f"{key}: {d}"


def test_untagged_cmyk_true_colours(convert: Callable[..., Converted]) -> None:
    """cmyk-ycck_no-profile.jpg is cmyk-ycck_swop-icc.jpg with its SWOP profile stripped,
    so its true colours are known. libvips' default CMYK profile is not SWOP, so some
    difference remains (measured mean 11 / p99 26); Pillow's naive formula is 2x off."""
    key = "color/cmyk-ycck_no-profile.jpg"
    out = webp_pixels(encoded(convert, key).webp)
    truth = reference("color/cmyk-ycck_swop-icc.jpg")
    d = diff(out, truth)
    record("cmyk untagged vs true colours", key, d)
    assert d.mean <= 16 and d.p99 <= 40, f"{key}: {d}"
    naive = diff(reference(key), truth)
    assert d.mean < naive.mean, f"{key}: {d} not better than the naive formula {naive}"


def _correlation(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("L"), np.float64).ravel()
    y = np.asarray(b.convert("L"), np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])


def test_untagged_cmyk_with_orientation(convert: Callable[..., Converted]) -> None:
    """thumbor made cmyk_orientation6.jpg from photos/canon-5d3_giunchedi.jpg with the naive
    formula (C = 255 - R ..., K = 0; Pillow's convert("RGB") gives the photo's mean colour
    back exactly) and added an Orientation 6 tag to unrotated pixels. libvips' default
    CMYK profile renders such a file brighter (measured mean error 36), so only the picture
    and its orientation are compared here: by correlation of the grey levels."""
    out = webp_pixels(encoded(convert, "color/cmyk_orientation6.jpg").webp)
    photo = reference("photos/canon-5d3_giunchedi.jpg")
    right = _correlation(out, photo.transpose(EXIF_OPERATION[6]))
    wrong = max(_correlation(out, photo.transpose(EXIF_OPERATION[v])) for v in (5, 7, 8))
    assert right > 0.98 and wrong < 0.9, (right, wrong)


SIXTEEN_BIT = [
    "color/16bit-rgb_netherlands-flag.png",
    "color/16bit-rgb_srgb2014-icc.png",
    "color/16bit-rgba_watermark.png",
    "color/16bit-tiff_little-endian.tif",
    "color/16bit-tiff_big-endian.tif",
    "png/pngsuite/basn0g16.png",
    "png/pngsuite/basn2c16.png",
    "png/pngsuite/basn4a16.png",
    "png/pngsuite/basn6a16.png",
    "png/pngsuite/tbwn0g16.png",
]


@pytest.mark.parametrize("key", SIXTEEN_BIT)
def test_16_bit_scaled_to_8(key: str, corpus: Path, convert: Callable[..., Converted]) -> None:
    """16-bit samples become round(v / 257) (65535 -> 255), not v & 255 nor clipped. Pillow
    reads most 16-bit files at 8 bits, so the 16-bit values are read with libvips' loader
    (libpng / libtiff) and scaled here with numpy."""
    source = pyvips.Image.new_from_file(str(corpus / key))
    assert source.format == "ushort"
    raw = np.ndarray(
        buffer=source.write_to_memory(),
        dtype=np.uint16,
        shape=(source.height, source.width, source.bands),
    )
    expected = ((raw.astype(np.int64) * 255 + 32767) // 65535).astype(np.int16)
    out = pillow_open(encoded(convert, key, LOSSLESS).webp)
    got = np.asarray(out.convert("RGBA" if source.hasalpha() else "RGB"), np.int16)
    colour = source.bands - (1 if source.hasalpha() else 0)
    if colour == 1:  # grey -> R == G == B
        expected = np.concatenate([expected[..., :1]] * 3 + [expected[..., 1:]], axis=-1)
    if source.get_typeof("icc-profile-data"):
        assert out.info.get("icc_profile")  # kept: values untouched
    visible = got[..., 3] > 0 if source.hasalpha() else np.ones(got.shape[:2], bool)
    error = np.abs(got - expected)[visible]
    assert error.max() <= 1, f"{key}: max error {error.max()}"


GREY = [
    "color/grayscale_gray-gamma22-icc.jpg",
    "color/grayscale_dotgain20-icc.jpg",
    "color/grayscale_no-icc.jpg",
    "png/grey-8bit-alpha.png",
    "png/pngsuite/basn0g01.png",
    "png/pngsuite/basn0g04.png",
    "png/pngsuite/basn0g16.png",
    "png/pngsuite/basn4a08.png",
    "png/pngsuite/tbbn0g04.png",
    "other/tiff/ccitt-g4_fax.tiff",
]


@pytest.mark.parametrize("key", GREY)
def test_grey_stays_neutral(key: str, convert: Callable[..., Converted]) -> None:
    out = encoded(convert, key)
    webp = pillow_open(out.webp)
    assert "icc_profile" not in webp.info  # grey profiles are applied, not kept
    rgb = np.asarray(webp.convert("RGB"), np.int16)
    spread = int((rgb.max(axis=-1) - rgb.min(axis=-1)).max())
    assert spread <= 1, f"{key}: R, G, B differ by up to {spread}"


TRANSPARENT = [
    "png/pngsuite/tbbn3p08.png",
    "png/pngsuite/tp1n3p08.png",
    "png/pngsuite/tm3n3p02.png",
    "png/pngsuite/tbrn2c08.png",
    "png/pngsuite/tbgn2c16.png",
    "png/pngsuite/tbbn0g04.png",
    "png/pngsuite/tbwn0g16.png",
    "png/pngsuite/basn4a08.png",
    "png/pngsuite/basn6a08.png",
    "png/pngsuite/basn6a16.png",
    "png/blackbug_rgba_2048x1536.png",
    "png/embedgravitybird_rgba.png",
    "png/image-in-alpha.png",
    "png/full-transparent.png",
    "png/grey-8bit-alpha.png",
    "png/palette-trns-partial_flag.png",
    "png/paletted-transparent.png",
    "png/transparency_wikimedia.png",
    "png/tango-icon_128.png",
    "png/screenshot_lorem-ipsum_rgba.png",  # RGBA but fully opaque
    "png/pngsuite/tp0n3p08.png",  # palette without tRNS
]


@pytest.mark.parametrize("key", TRANSPARENT)
def test_transparency(key: str, convert: Callable[..., Converted]) -> None:
    """Alpha survives the default (lossy) encode exactly where the source has any
    non-opaque pixel; a fully opaque alpha channel is dropped."""
    ref = reference(key)
    source_alpha = np.asarray(ref.convert("RGBA"))[..., 3]
    webp = pillow_open(encoded(convert, key).webp)
    if source_alpha.min() == 255:
        assert webp.mode == "RGB", key
        return
    assert webp.mode == "RGBA", key
    error = np.abs(np.asarray(webp)[..., 3].astype(np.int16) - source_alpha)
    assert error.max() <= ALPHA_MAX_ERR, f"{key}: alpha off by {error.max()}"


# ---------------------------------------------------------------- 1, 5: the tree run


def _all_files(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


def test_tree_run(tree_run: TreeRun, corpus: Path) -> None:
    summary, results, dest = tree_run.summary, tree_run.results, tree_run.dest
    assert summary.found == summary.converted + summary.skipped + summary.failed
    assert summary.found == sum(1 for _ in _all_files(corpus))  # README + LICENSES too
    assert set(results) == {p.relative_to(corpus).as_posix() for p in _all_files(corpus)}
    assert sum(summary.failed_by_reason.values()) == summary.failed
    assert sum(summary.skipped_by_reason.values()) == summary.skipped
    for key in CORPUS_FILES:
        result = results[key]
        status, reason = expected_outcome(key)
        assert (result.status, result.reason) == (status, reason), f"{key}: {result.line()}"
        if status == "converted":
            assert result.output is not None and (dest / result.output).is_file(), key
            if key != HUGE:  # its decode is test_output_decodes_at_oriented_size's (same bytes)
                assert pillow_open(dest / result.output).format == "WEBP", key
        else:
            assert result.output is None and result.message, key
            assert not (dest / (key + ".webp")).exists(), key
            assert result in summary.not_converted
    # Not images at all, named as such: skipped, not failed.
    for path in _all_files(corpus):
        key = path.relative_to(corpus).as_posix()
        if key not in CORPUS_FILES:
            assert (results[key].status, results[key].reason) == ("skipped", "not an image")
    assert not [p for p in _all_files(dest) if p.name.endswith(".optimizr-tmp")]
    written = {p.relative_to(dest).as_posix() for p in _all_files(dest)}
    state = {p for p in written if p.startswith(".optimizr/")}
    assert {"manifest.sqlite", "failed.jsonl", "lock"} <= {p.split("/", 1)[1] for p in state}
    assert written - state == {r.output for r in results.values() if r.output} | {
        "optimizr-summary.json"
    }
    assert summary.bytes_in == sum(r.bytes_in for r in results.values() if r.output)
    assert summary.bytes_out == sum(
        (dest / r.output).stat().st_size for r in results.values() if r.output
    )
    import json

    files = json.loads((dest / "optimizr-summary.json").read_text())["files"]
    assert files["found"] == summary.found and files["failed"] == summary.failed


def test_tree_outputs_match_encode_webp(
    tree_run: TreeRun, convert: Callable[..., Converted]
) -> None:
    """The worker processes produce exactly what encode_webp produces in-process."""
    for key in ["photos/nikon-p6000_gps.jpg", "other/gif/cogs_animated-transparent.gif"]:
        output = tree_run.results[key].output
        assert output is not None
        assert (tree_run.dest / output).read_bytes() == encoded(convert, key).webp


def test_tree_summary_table(tree_run: TreeRun, corpus: Path) -> None:
    """Prints the corpus outcome table (run with -s) and the worst measured errors."""
    summary, results = tree_run.summary, tree_run.results
    rows = []
    folders = sorted({k.split("/")[0] for k in CORPUS_FILES})
    for folder in [*folders, "(README, LICENSES)"]:
        mine = [
            r
            for k, r in results.items()
            if (k.split("/")[0] == folder) or (folder.startswith("(") and k not in CORPUS_FILES)
        ]
        status = Counter(r.status for r in mine)
        skipped = Counter(r.reason for r in mine if r.status == "skipped")
        failed = Counter(r.reason for r in mine if r.status == "failed")
        rows.append(
            f"| {folder} | {len(mine)} | {status['converted']} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or '-'} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(failed.items())) or '-'} | "
            f"{sum(r.bytes_in for r in mine):,} | {sum(r.bytes_out for r in mine):,} |"
        )
    print("\n| folder | files | converted | skipped | failed | bytes in | bytes out |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        f"| **total** | {summary.found} | {summary.converted} | "
        f"{dict(sorted(summary.skipped_by_reason.items()))} | "
        f"{dict(sorted(summary.failed_by_reason.items()))} | "
        f"{summary.bytes_in:,} | {summary.bytes_out:,} |"
    )
    print(f"convert_tree: {tree_run.seconds:.1f} s, {summary.workers} workers")
    for category, (mean, mean_key, p99, p99_key) in sorted(MEASURED.items()):
        print(f"worst {category}: mean {mean:.2f} ({mean_key}); p99 {p99:.0f} ({p99_key})")
    assert summary.converted == len(CONVERTED)
