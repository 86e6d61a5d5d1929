"""HEIC/HEIF through pillow-heif (optimizr.decoders.heif).

The images are made here with pillow-heif's HEVC encoder (x265), and each output
WebP is compared with the pixels that were encoded, not with a decode by the
decoder under test: HEVC and WebP are both lossy, so within a mean-error bound.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pillow_heif
import pytest
import pyvips
from click.testing import CliRunner
from PIL import Image, ImageCms

from conftest import photo_array
from optimizr import EncodeOptions, encode_webp
from optimizr.budget import Header
from optimizr.cli import main
from optimizr.decoders import TABLE, heif, support
from optimizr.decoders.nclx_icc import icc_from_nclx
from optimizr.errors import CorruptImage, TooLarge, TruncatedImage, UnsupportedImage
from optimizr.probe import probe

W, H = 96, 64
#: Mean absolute error per channel of HEVC (quality 90) then WebP (q80) on photo_array:
#: measured 1.5-2.5; a wrong orientation, a channel swap or a lost profile gives > 20.
LOSSY_MEAN = 5.0


def heic(pixels: npt.NDArray[np.generic], mode: str, **kwargs: object) -> bytes:
    height, width = pixels.shape[:2]
    out = io.BytesIO()
    pillow_heif.encode(mode, (width, height), pixels.tobytes(), out, quality=90, **kwargs)
    return out.getvalue()


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def webp_array(webp: bytes) -> npt.NDArray[np.int16]:
    with Image.open(io.BytesIO(webp)) as image:
        image.load()
        return np.asarray(image).astype(np.int16)


def mean_error(got: npt.NDArray[np.int16], want: npt.NDArray[np.generic]) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want.astype(np.int16)).mean())


def test_table_row_names_pillow_heif() -> None:
    row = TABLE["heic"]
    assert (row.library, row.module, row.requires) == (
        "pillow-heif",
        "optimizr.decoders.heif",
        "pillow-heif",
    )
    assert row.held_per_band_pixel > 0
    assert support()["heic"]["available"]


def test_8_bit_converts_to_the_encoded_pixels() -> None:
    rgb = photo_array(W, H)
    out = encode_webp(heic(rgb, "RGB"), EncodeOptions())
    assert out.facts.format == "heic" and (out.facts.width_out, out.facts.height_out) == (W, H)
    assert mean_error(webp_array(out.webp), rgb) < LOSSY_MEAN


@pytest.mark.parametrize("bits", [10, 12])
def test_10_and_12_bit_are_scaled_to_8_bit_rounded(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pillow_heif.options, "SAVE_HDR_TO_12_BIT", bits == 12)
    rgb = photo_array(W, H)
    top = (1 << bits) - 1
    deep = np.round(rgb.astype(np.float64) * top / 255).astype(np.uint16)
    # pillow-heif takes 16-bit input with the samples at the top of the word.
    data = heic((deep << (16 - bits)).astype("<u2"), "RGB;16")
    assert pillow_heif.open_heif(data).info["bit_depth"] == bits
    out = encode_webp(data, EncodeOptions(lossless=True))
    # Lossless WebP: what remains is HEVC's loss (a 10-bit value read as 8-bit
    # or a wrong shift is off by far more).
    assert mean_error(webp_array(out.webp), rgb) < LOSSY_MEAN


def test_deep_samples_scale_with_rounding_not_truncation() -> None:
    # The decoder's own scaling, on every 10-bit value: v * 255 / 1023 to nearest.
    values = np.arange(1024, dtype=np.uint16)
    stored = np.repeat(values << 6, 3).astype("<u2")
    image = heif._to_vips(stored.tobytes(), 1024, 1, 3, 10, deep=False)
    got = np.frombuffer(image.write_to_memory(), dtype=np.uint8)[::3]
    assert (got == (values.astype(np.int64) * 255 + 511) // 1023).all()
    wide = heif._to_vips(stored.tobytes(), 1024, 1, 3, 10, deep=True)
    got16 = np.frombuffer(wide.write_to_memory(), dtype=np.uint16)[::3]
    assert got16[0] == 0 and got16[-1] == 65535
    assert (got16 == np.round(values.astype(np.int64) * 65535 / 1023)).all()


def test_alpha_is_kept() -> None:
    rgb = photo_array(W, H)
    alpha = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    rgba = np.dstack([rgb, alpha])
    out = encode_webp(heic(rgba, "RGBA"), EncodeOptions())
    got = webp_array(out.webp)
    assert out.facts.has_alpha and got.shape == (H, W, 4)
    # Alpha is coded losslessly by HEVC's alpha plane at this quality only nearly.
    assert mean_error(got[..., 3], alpha) < 2.0
    opaque = alpha > 128
    assert mean_error(got[..., :3][opaque], rgb[opaque]) < LOSSY_MEAN


@pytest.mark.parametrize("orientation", [3, 6, 8, 2])
def test_irot_imir_applied_once_and_exif_orientation_not_again(orientation: int) -> None:
    rgb = photo_array(W, H)
    # pillow-heif writes the EXIF orientation as irot/imir and keeps the EXIF tag
    # too (as iPhones do): the file says the rotation twice.
    data = heic(rgb, "RGB", exif=exif_orientation(orientation))
    shown = np.asarray(
        Image.fromarray(rgb).transpose(
            {
                2: Image.Transpose.FLIP_LEFT_RIGHT,
                3: Image.Transpose.ROTATE_180,
                6: Image.Transpose.ROTATE_270,
                8: Image.Transpose.ROTATE_90,
            }[orientation]
        )
    )
    header = heif.header(data)
    assert (header.width, header.height) == (shown.shape[1], shown.shape[0])
    assert header.orientation == 1
    out = encode_webp(data, EncodeOptions(metadata="all"))
    assert mean_error(webp_array(out.webp), shown) < LOSSY_MEAN
    with Image.open(io.BytesIO(out.webp)) as image:
        assert image.getexif().get(0x0112, 1) == 1  # a viewer must not rotate it again


def test_icc_profile_is_kept() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    rgb_profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    assert profile != rgb_profile
    rgb = photo_array(W, H)
    out = encode_webp(heic(rgb, "RGB", icc_profile=rgb_profile), EncodeOptions())
    assert out.facts.icc_kept
    with Image.open(io.BytesIO(out.webp)) as image:
        assert image.info["icc_profile"] == rgb_profile


NCLX_P3 = {
    "color_primaries": 12,
    "transfer_characteristics": 13,
    "matrix_coefficients": 6,
    "full_range_flag": 1,
}


def test_nclx_bt709_needs_no_profile() -> None:
    rgb = photo_array(W, H)
    data = heic(rgb, "RGB", **{**NCLX_P3, "color_primaries": 1})
    out = encode_webp(data, EncodeOptions())
    assert not out.facts.icc_kept
    assert mean_error(webp_array(out.webp), rgb) < LOSSY_MEAN


def test_nclx_display_p3_gets_a_matching_profile() -> None:
    rgb = photo_array(W, H)
    out = encode_webp(heic(rgb, "RGB", **NCLX_P3), EncodeOptions())
    assert out.facts.icc_kept
    with Image.open(io.BytesIO(out.webp)) as image:
        profile = image.info["icc_profile"]
    # The profile means what libvips' own Display P3 profile means: the same
    # pixels brought to sRGB through each agree.
    tagged = pyvips.Image.new_from_memory(rgb.tobytes(), W, H, 3, "uchar").copy(
        interpretation="srgb"
    )
    ours = tagged.copy()
    ours.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    a = np.frombuffer(ours.icc_transform("srgb", embedded=True).write_to_memory(), np.uint8)
    b = np.frombuffer(tagged.icc_transform("srgb", input_profile="p3").write_to_memory(), np.uint8)
    assert np.abs(a.astype(int) - b).mean() < 0.5
    # and --srgb converts it: saturated P3 colours leave sRGB's gamut, so differ.
    srgb = encode_webp(heic(rgb, "RGB", **NCLX_P3), EncodeOptions(srgb=True))
    assert srgb.facts.converted_to_srgb and not srgb.facts.icc_kept
    kept = pyvips.Image.new_from_buffer(out.webp, "").icc_transform("srgb", embedded=True)
    converted = np.frombuffer(kept.write_to_memory(), np.uint8).reshape(H, W, 3)
    assert mean_error(webp_array(srgb.webp), converted) < LOSSY_MEAN
    assert mean_error(webp_array(srgb.webp), webp_array(out.webp)) > 1.0  # it did convert


def test_nclx_profile_of_bt709_primaries_is_the_identity() -> None:
    nclx = pillow_heif.open_heif(heic(photo_array(8, 8), "RGB")).info["nclx_profile"]
    assert nclx["color_primaries"] == 1
    rgb = photo_array(32, 32)
    image = pyvips.Image.new_from_memory(rgb.tobytes(), 32, 32, 3, "uchar")
    image = image.copy(interpretation="srgb")
    image.set_type(pyvips.GValue.blob_type, "icc-profile-data", icc_from_nclx(nclx))
    out = np.frombuffer(image.icc_transform("srgb", embedded=True).write_to_memory(), np.uint8)
    assert np.abs(out.astype(int) - rgb.reshape(-1)).max() <= 1


def test_the_primary_image_of_a_collection_is_converted() -> None:
    first, primary = photo_array(W, H, seed=1), photo_array(H, W, seed=2)
    container = pillow_heif.HeifFile()
    container.add_frombytes("RGB", (W, H), first.tobytes())
    container.add_frombytes("RGB", (H, W), primary.tobytes())
    out = io.BytesIO()
    container.save(out, primary_index=1, quality=90)
    data = out.getvalue()
    assert pillow_heif.open_heif(data).primary_index == 1
    assert heif.header(data) == Header("heic", H, W, 3)
    converted = encode_webp(data, EncodeOptions())
    assert mean_error(webp_array(converted.webp), primary) < LOSSY_MEAN


def test_max_pixels_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch) -> None:
    data = heic(photo_array(W, H), "RGB")

    def must_not_decode(_self: object) -> None:
        raise AssertionError("decoded pixels of an image over --max-pixels")

    monkeypatch.setattr(pillow_heif.HeifImage, "data", property(must_not_decode))
    with pytest.raises(TooLarge, match="96x64 = 6,144 px exceeds --max-pixels 6,000"):
        encode_webp(data, EncodeOptions(max_pixels=6000))
    assert probe(data) == Header("heic", W, H, 3)  # the header reader decodes nothing either


def test_truncated_and_corrupt_files_are_one_line_errors() -> None:
    data = heic(photo_array(W, H), "RGB")
    with pytest.raises(TruncatedImage) as cut:
        encode_webp(data[: len(data) - 100], EncodeOptions())
    assert "\n" not in str(cut.value) and cut.value.message.startswith("heic: ")
    broken = data[:24] + b"\xff" * 200 + data[224:]  # the meta box overwritten
    with pytest.raises((CorruptImage, TruncatedImage, UnsupportedImage)) as bad:
        encode_webp(broken, EncodeOptions())
    assert "\n" not in str(bad.value)


def _tree(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    (src / "good.heic").write_bytes(heic(photo_array(320, 240), "RGB"))
    data = heic(photo_array(320, 240, seed=3), "RGB")
    (src / "cut.heic").write_bytes(data[: len(data) // 2])
    return src


def test_a_bad_heic_fails_alone_and_the_run_goes_on(tmp_path: Path) -> None:
    src = _tree(tmp_path)
    result = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code != 0
    assert (tmp_path / "out" / "good.webp").is_file()
    doc = json.loads((tmp_path / "out" / "optimizr-summary.json").read_text())
    assert doc["files"]["converted"] == 1
    assert doc["files"]["failed_by_reason"] == {"truncated": 1}


#: Hides pillow_heif from every process that starts with it on PYTHONPATH (the
#: workers too): the machine without the optional decoder.
_BLOCKER = """
import sys

class _NoPillowHeif:
    def find_spec(self, name, path=None, target=None):
        if name == "pillow_heif" or name.startswith("pillow_heif.") or name == "_pillow_heif":
            raise ImportError(f"No module named {name!r} (hidden by the test)")
        return None

sys.meta_path.insert(0, _NoPillowHeif())
"""


def test_missing_pillow_heif_is_one_line_at_start_and_unsupported_per_file(
    tmp_path: Path,
) -> None:
    src = _tree(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), *sys.path])}
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "optimizr", "convert", str(src), str(out), "--no-progress"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    said = run.stdout + run.stderr
    assert "Traceback" not in said, said
    lines = [line for line in said.splitlines() if "pillow-heif is not installed" in line]
    assert lines == [
        "optimizr: warning: heic: pillow-heif is not installed: heic files are skipped as "
        "unsupported"
    ], said
    doc = json.loads((out / "optimizr-summary.json").read_text())
    assert doc["files"]["converted"] == 0 and doc["files"]["failed"] == 0
    assert doc["files"]["skipped"] == 2
    version = subprocess.run(
        [sys.executable, "-m", "optimizr", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [heic] = [
        line.split(None, 1) for line in version.stdout.splitlines() if line.startswith("  heic ")
    ]
    assert heic[1].startswith("pillow-heif is not installed"), version.stdout


def test_each_skip_says_pillow_heif_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "optimizr.decoders.heif")
    with pytest.raises(
        UnsupportedImage, match=r"^unsupported: heic: pillow-heif is not installed$"
    ):
        encode_webp(heic(photo_array(W, H), "RGB"), EncodeOptions())


def test_corpus_heic_converts_to_the_plugin_decode(corpus: Path) -> None:
    path = corpus / "other" / "heic" / "image.heic"
    out = encode_webp(str(path), EncodeOptions())
    # No independent HEVC decoder exists here: pillow-heif's Pillow plugin (the same
    # libheif) checks the pipeline around the decoder; the decoder itself is checked
    # against encoded pixels above.
    pillow_heif.register_heif_opener()
    with Image.open(path) as image:
        reference = np.asarray(image.convert("RGB"))
    assert (out.facts.width_out, out.facts.height_out) == (256, 256) == reference.shape[1::-1]
    assert mean_error(webp_array(out.webp), reference) < LOSSY_MEAN
