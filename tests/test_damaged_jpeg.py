"""Damaged JPEGs (issue 13): converted past libvips' 100-warning limit, the damage
recorded and counted; --strict-decode fails them; truncated files stay truncated.

The damaged files are made here: a JPEG with a restart marker after every MCU,
whose markers are renumbered out of sequence. libjpeg warns once per renumbered
marker ("Corrupt JPEG data: found marker 0xd3 instead of RST0"), resyncs and
decodes every block, so the undamaged file is an independent reference for
the output.
"""

from __future__ import annotations

import io
import json
import re
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import pyvips
from click.testing import CliRunner, Result
from PIL import Image, ImageCms

from conftest import decode, options_written_before, photo_array
from optimizr.cli import main
from optimizr.config import EncodeOptions, RunConfig
from optimizr.decoders import damaged_jpeg
from optimizr.encode import encode_webp
from optimizr.errors import CorruptImage, TruncatedImage
from optimizr.manifest import options_fingerprint

SCHEMA = json.loads(
    resources.files("optimizr").joinpath("schemas/summary-2.schema.json").read_text()
)
STRICT = EncodeOptions(strict_decode=True)
#: Lossy q80 against the undamaged source (as tests/test_corpus.py's photos).
PHOTO_MEAN, PHOTO_P99 = 9.0, 48.0


def restart_jpeg(width: int = 256, height: int = 256, **kwargs: object) -> bytes:
    """A JPEG with a restart marker after every MCU: 255 markers at 256x256."""
    out = io.BytesIO()
    Image.fromarray(photo_array(width, height, seed=3)).save(
        out, "JPEG", quality=90, restart_marker_blocks=1, **kwargs
    )
    return out.getvalue()


def restart_markers(data: bytes) -> list[int]:
    scan = data.index(b"\xff\xda")
    return [
        i for i in range(scan, len(data) - 1) if data[i] == 0xFF and 0xD0 <= data[i + 1] <= 0xD7
    ]


def damaged(data: bytes, markers: int) -> bytes:
    """``data`` with its first ``markers`` restart markers renumbered out of sequence."""
    out = bytearray(data)
    for i in restart_markers(data)[:markers]:
        out[i + 1] = 0xD0 + (out[i + 1] - 0xD0 + 3) % 8
    return bytes(out)


def differences(webp: bytes, reference: np.ndarray) -> tuple[float, float]:
    error = np.abs(np.asarray(decode(webp).convert("RGB"), dtype=np.int16) - reference)
    return float(error.mean()), float(np.percentile(error, 99))


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def test_over_the_warning_limit_converts_with_the_damage_counted() -> None:
    original = restart_jpeg()
    markers = len(restart_markers(original))
    source = damaged(original, markers)
    with pytest.raises(pyvips.Error, match="Corrupt JPEG data"):  # what libvips does alone
        pyvips.Image.new_from_buffer(source, "", fail_on="truncated").avg()
    encoded = encode_webp(source, EncodeOptions())
    [warning] = encoded.facts.warnings
    assert warning.startswith(
        f"converted with damage: {markers} corrupt-data warnings (found marker"
    )
    mean, p99 = differences(encoded.webp, np.asarray(decode(original).convert("RGB")))
    assert mean < PHOTO_MEAN and p99 < PHOTO_P99, (mean, p99)
    # A path is read the same way (streamed from a descriptor) as bytes are.
    assert (encoded.facts.width_out, encoded.facts.height_out) == (256, 256)


def test_the_fallback_keeps_shrink_on_load(tmp_path: Path) -> None:
    path = tmp_path / "damaged.jpg"
    path.write_bytes(damaged(restart_jpeg(), 255))
    encoded = encode_webp(str(path), EncodeOptions(max_width=100))
    assert (encoded.facts.width_out, encoded.facts.height_out) == (100, 100)
    assert encoded.facts.resized
    assert encoded.facts.warnings[0].startswith("converted with damage: 255 ")


def test_the_fallback_applies_orientation_and_keeps_the_profile() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    original = restart_jpeg(256, 128, exif=exif.tobytes(), icc_profile=profile)
    encoded = encode_webp(damaged(original, 127), EncodeOptions())
    assert encoded.facts.warnings[0].startswith("converted with damage: 127 ")
    assert (encoded.facts.width_out, encoded.facts.height_out) == (128, 256)
    assert encoded.facts.icc_kept
    upright = np.asarray(decode(original).convert("RGB").transpose(Image.Transpose.ROTATE_270))
    mean, p99 = differences(encoded.webp, upright.astype(np.int16))
    assert mean < PHOTO_MEAN and p99 < PHOTO_P99, (mean, p99)


def test_a_few_warnings_are_decoded_by_libvips_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fallback was used")

    monkeypatch.setattr(damaged_jpeg, "count_warnings", no_fallback)
    original = restart_jpeg()
    encoded = encode_webp(damaged(original, 3), EncodeOptions())
    assert encoded.facts.warnings == ()
    mean, p99 = differences(encoded.webp, np.asarray(decode(original).convert("RGB")))
    assert mean < PHOTO_MEAN and p99 < PHOTO_P99, (mean, p99)


@pytest.mark.parametrize("markers", [3, 255])
def test_strict_decode_fails_damage_naming_it(markers: int) -> None:
    with pytest.raises(CorruptImage) as caught:
        encode_webp(damaged(restart_jpeg(), markers), STRICT)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"corrupt: jpeg: damaged compressed data, {markers} corrupt-data")
    assert "--strict-decode" in message


def test_strict_decode_leaves_an_undamaged_jpeg_alone() -> None:
    assert encode_webp(restart_jpeg(), STRICT).facts.warnings == ()


@pytest.mark.parametrize("options", [EncodeOptions(), STRICT], ids=["default", "strict"])
@pytest.mark.parametrize("damage", [0, 255], ids=["intact", "damaged"])
def test_a_truncated_jpeg_is_still_truncated(options: EncodeOptions, damage: int) -> None:
    data = damaged(restart_jpeg(), damage)
    with pytest.raises(TruncatedImage, match="premature end of JPEG"):
        encode_webp(data[: len(data) * 3 // 4], options)


def test_the_count_comes_from_libvips() -> None:
    data = damaged(restart_jpeg(), 120)

    def open_jpeg(**kwargs: object) -> object:
        return pyvips.Image.new_from_buffer(data, "", fail_on="truncated", **kwargs)

    assert damaged_jpeg.count_warnings(open_jpeg) == 120


def test_without_a_count_the_limit_is_said() -> None:
    assert damaged_jpeg.describe(None, ["Corrupt JPEG data: x"]) == (
        "at least 100 corrupt-data warnings (libvips stops counting there) (x)"
    )


def test_only_corrupt_data_warnings_are_retried() -> None:
    limit = "VipsJpeg: Corrupt JPEG data: premature end of data segment\njpegload: load error\n"
    assert damaged_jpeg.corrupt_data_warnings(limit) == [
        "Corrupt JPEG data: premature end of data segment"
    ]
    cut = "VipsJpeg: Corrupt JPEG data: bad marker\nVipsJpeg: premature end of JPEG image\n"
    assert damaged_jpeg.corrupt_data_warnings(cut) is None
    assert damaged_jpeg.corrupt_data_warnings("VipsJpeg: Bogus Huffman table definition") is None


def test_strict_decode_is_in_the_fingerprint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = RunConfig(tmp_path, tmp_path / "out")
    strict = RunConfig(tmp_path, tmp_path / "out", encode=STRICT)
    fingerprint = options_fingerprint(plain)
    assert fingerprint != options_fingerprint(strict)
    # Unset, it leaves the fingerprints of existing manifests (written before the
    # option existed, so without the field) as they were.
    options_written_before(monkeypatch, "strict_decode")
    assert options_fingerprint(plain) == fingerprint


def test_the_run_records_and_counts_the_damage(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "damaged.jpg").write_bytes(damaged(restart_jpeg(), 255))
    (src / "fine.jpg").write_bytes(restart_jpeg())
    result = run("convert", src, dest, "--no-progress")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert [line for line in warned if "damaged.jpg" in line][0].startswith(
        "WARNING damaged.jpg: converted with damage: 255 corrupt-data warnings (found marker"
    )
    # The counting pass's own libvips messages are not repeated (the conversion's are).
    assert len([line for line in warned if "read gave 255" in line]) == 1
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["files"]["converted"] == 2
    assert doc["files"]["converted_with_damage"] == 1
    assert doc["files"]["warned_by_kind"]["converted with damage"] == 1
    assert (dest / "damaged.webp").exists()


def test_strict_decode_from_the_environment_fails_it(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "damaged.jpg").write_bytes(damaged(restart_jpeg(), 255))
    result = run("convert", src, dest, "--no-progress", env={"OPTIMIZR_STRICT_DECODE": "1"})
    assert result.exit_code == 1
    [failed] = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert failed.startswith("FAILED damaged.jpg: corrupt (jpeg: damaged compressed data, 255 ")
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    jsonschema.Draft202012Validator(SCHEMA).validate(doc)
    assert doc["files"]["converted_with_damage"] == 0
    assert doc["files"]["failed_by_reason"] == {"corrupt": 1}
    assert not (dest / "damaged.webp").exists()


OLYMPUS = "photos/olympus-u1020_3648x2736.jpg"


@pytest.mark.corpus
def test_olympus_u1020_converts_with_its_damage_counted(corpus: Path) -> None:
    path = corpus / OLYMPUS
    encoded = encode_webp(str(path), EncodeOptions())
    [warning] = encoded.facts.warnings
    found = re.fullmatch(
        r"converted with damage: (\d+) corrupt-data warnings \(premature end of data segment; "
        r"found marker 0xd1 instead of RST5\)",
        warning,
    )
    assert found is not None, warning
    assert int(found.group(1)) > damaged_jpeg.VIPS_WARNING_LIMIT  # libvips refused it alone
    out = np.asarray(decode(encoded.webp).convert("RGB"), dtype=np.int16)
    assert out.shape == (2736, 3648, 3)
    # Independent of the fallback: the rows libvips' own decode gives before it
    # stops at its 100th warning (at row 320: "error in tile 0 x 320").
    rows = 256
    head = pyvips.Image.new_from_file(str(path), fail_on="truncated", access="sequential")
    before_limit = head.crop(0, 0, head.width, rows).numpy().astype(np.int16)
    error = np.abs(out[:rows] - before_limit)
    assert error.mean() < PHOTO_MEAN and np.percentile(error, 99) < PHOTO_P99
    # And the whole image against Pillow (the same libjpeg-turbo underneath, but
    # not libvips: its own resync of the damaged segments).
    reference = np.asarray(decode(path).convert("RGB"), dtype=np.int16)
    error = np.abs(out - reference)
    assert error.mean() < PHOTO_MEAN and np.percentile(error, 99) < PHOTO_P99


@pytest.mark.corpus
def test_olympus_u1020_fails_with_strict_decode(corpus: Path) -> None:
    with pytest.raises(CorruptImage) as caught:
        encode_webp(str(corpus / OLYMPUS), STRICT)
    assert re.fullmatch(
        r"jpeg: damaged compressed data, \d+ corrupt-data warnings "
        r"\(premature end of data segment\); --strict-decode refuses it",
        caught.value.message,
    ), caught.value.message
