"""--target-score (issue 14): the per-image search over quality, lossless when it wins,
the guards, and the options that drive it.

The search logic is tested with a scorer computed here (PSNR, monotonic in quality
like the real metric, on another scale) and with synthetic score curves; the
end-to-end tests score with the project's SSIMULACRA 2 (optimizr.ssimulacra2).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pyvips
from PIL import Image

from conftest import photo_array, save_jpeg, save_png
from optimizr.config import EncodeOptions
from optimizr.encode import encode_webp
from optimizr.errors import UsageError
from optimizr.libwebp import load as load_libwebp
from optimizr.quality_search import (
    PROBE_BUDGET,
    TINY_PIXELS,
    TOLERANCE,
    Probe,
    looks_drawn,
    search_image,
    search_lossy,
    start_quality,
)


def psnr_scorer(reference: np.ndarray) -> Callable[[np.ndarray], float]:
    """PSNR of the composited RGB, stretched so that the target range of these
    tests (about 60-90) falls within lossy WebP's reach."""
    ref = reference.astype(np.float64)

    def score(distorted: np.ndarray) -> float:
        assert distorted.shape == reference.shape
        mse = float(np.mean((ref - distorted.astype(np.float64)) ** 2))
        return 100.0 if mse == 0 else 2.0 * 10 * math.log10(255**2 / mse)

    return score


def curve_probe(curve: Callable[[int], float]) -> tuple[Callable[[int], Probe], list[int]]:
    """A probe whose score is ``curve(q)`` and whose size grows with q."""
    asked: list[int] = []

    def probe(q: int) -> Probe:
        asked.append(q)
        return Probe("lossy", q, b"x" * (100 + 10 * q), curve(q))

    return probe, asked


def vips_image(array: np.ndarray) -> pyvips.Image:
    h, w, bands = array.shape
    return pyvips.Image.new_from_memory(np.ascontiguousarray(array).tobytes(), w, h, bands, "uchar")


def decoded(webp: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(webp)) as im:
        return np.asarray(im.convert("RGBA" if im.mode == "RGBA" else "RGB"))


def smooth_photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A photo without sensor noise: its PSNR then spans lossy WebP's range."""
    from PIL import ImageFilter

    blurred = Image.fromarray(photo_array(width, height, seed)).filter(ImageFilter.BoxBlur(2))
    return np.asarray(blurred)


def screenshot_array(width: int = 480, height: int = 320) -> np.ndarray:
    """Flat panels, a few colours, and text-like strokes: a UI screenshot."""
    img = np.full((height, width, 3), 246, dtype=np.uint8)
    img[:40] = (40, 44, 52)
    img[40:, :120] = (230, 232, 236)
    rng = np.random.default_rng(3)
    for row in range(60, height - 20, 18):
        for col in range(140, width - 40, 9):
            if rng.random() < 0.7:
                img[row : row + 10, col : col + 6] = (20, 20, 20)
    img[100:180, 200:400] = (66, 133, 244)
    return img


LIB = load_libwebp()
needs_libwebp = pytest.mark.skipif(LIB is None, reason="libwebp's binding does not load here")


# -- the search over quality, on score curves --------------------------------------------


def test_monotonic_curve_lands_in_the_band_within_the_budget() -> None:
    probe, asked = curve_probe(lambda q: 20 + 0.7 * q)  # 80 at q = 85.7
    probes, stop = search_lossy(probe, 80.0, 50, 95)
    passing = [p for p in probes if p.score >= 80]
    assert passing and len(asked) <= PROBE_BUDGET
    best = min(passing, key=lambda p: len(p.webp))
    # The smallest passing quality is 86; the band allows a little above it.
    assert best.quality is not None and 86 <= best.quality <= 86 + math.ceil(TOLERANCE / 0.7)
    assert stop in ("band", "bracket")


def test_bracket_is_closed_by_regula_falsi() -> None:
    # Steep then flat: the calibrated start misses, the secant overshoots, the
    # bracket must close on the exact smallest passing quality.
    probe, asked = curve_probe(lambda q: 40 + 45 * (1 - math.exp(-(q - 40) / 12)))
    target = 80.0
    probes, _ = search_lossy(probe, target, 50, 95)
    need = min(q for q in range(50, 96) if 40 + 45 * (1 - math.exp(-(q - 40) / 12)) >= target)
    best = min((p for p in probes if p.score >= target), key=lambda p: len(p.webp))
    assert best.quality is not None and need <= best.quality <= need + 3
    assert len(asked) <= PROBE_BUDGET
    assert len(set(asked)) == len(asked)  # no quality encoded twice


def test_budget_is_never_exceeded_on_a_noisy_non_monotonic_curve() -> None:
    rng = np.random.default_rng(7)
    bumps = {q: float(rng.normal(0, 2.5)) for q in range(101)}
    probe, asked = curve_probe(lambda q: 30 + 0.6 * q + bumps[q])
    probes, _ = search_lossy(probe, 80.0, 50, 95)
    assert len(asked) <= PROBE_BUDGET
    # Whatever the curve did, only probes really scored are candidates.
    for p in probes:
        assert p.score == 30 + 0.6 * p.quality + bumps[p.quality]  # type: ignore[operator]


def test_unreachable_target_stops_at_max_quality() -> None:
    probe, asked = curve_probe(lambda q: 0.8 * q)  # tops out at 76 at q95
    probes, stop = search_lossy(probe, 85.0, 50, 95)
    assert stop == "max-quality" and 95 in asked
    assert all(p.score < 85 for p in probes)


def test_easy_target_stops_at_min_quality() -> None:
    probe, asked = curve_probe(lambda q: 90 + 0.05 * q)
    probes, stop = search_lossy(probe, 70.0, 50, 95)
    assert stop == "min-quality" and asked[-1] == 50


def test_a_failing_probe_larger_than_lossless_ends_the_search() -> None:
    probe, asked = curve_probe(lambda q: 0.8 * q)
    probes, stop = search_lossy(probe, 85.0, 50, 95, larger_than=500)
    assert stop == "lossless-smaller" and len(asked) == 1


def test_start_is_calibrated_and_rises_with_the_target() -> None:
    starts = [start_quality(s) for s in (70, 75, 80, 85)]
    assert starts == sorted(starts) and 50 <= starts[0] and starts[-1] <= 100


# -- the search on images (a scorer computed here) ----------------------------------------


@needs_libwebp
@pytest.mark.parametrize("target", [76.0, 80.0, 85.0])
def test_photo_meets_the_target_and_output_is_verified(target: float) -> None:
    assert LIB is not None
    pixels = smooth_photo(256, 192, seed=2)
    options = EncodeOptions(target_score=target)
    outcome = search_image(LIB, vips_image(pixels), options, scorer=psnr_scorer)
    assert outcome.chosen.mode == "lossy" and outcome.probes <= PROBE_BUDGET
    # The output's score is what a fresh decode of its bytes scores.
    assert psnr_scorer(pixels)(decoded(outcome.chosen.webp)) == pytest.approx(outcome.chosen.score)
    assert outcome.chosen.score >= target


@needs_libwebp
def test_screenshot_is_written_lossless_and_a_photo_is_not() -> None:
    assert LIB is not None
    options = EncodeOptions(target_score=80.0)
    shot = search_image(LIB, vips_image(screenshot_array()), options, scorer=psnr_scorer)
    assert shot.drawn and shot.chosen.mode in ("lossless", "near-lossless")
    photo = search_image(LIB, vips_image(smooth_photo(256, 192)), options, scorer=psnr_scorer)
    assert not photo.drawn and photo.chosen.mode == "lossy"


@needs_libwebp
def test_unreachable_target_falls_back_to_lossless_when_smaller_than_the_source() -> None:
    assert LIB is not None
    pixels = photo_array(160, 120, seed=4)
    options = EncodeOptions(target_score=99.0, max_quality=60)
    outcome = search_image(LIB, vips_image(pixels), options, bytes_in=10**9, scorer=psnr_scorer)
    assert outcome.chosen.mode == "lossless" and not outcome.unreachable
    assert np.array_equal(decoded(outcome.chosen.webp), pixels)


@needs_libwebp
def test_unreachable_target_keeps_the_best_lossy_probe_and_says_so() -> None:
    assert LIB is not None
    pixels = photo_array(160, 120, seed=4)
    options = EncodeOptions(target_score=99.0, max_quality=60)
    outcome = search_image(LIB, vips_image(pixels), options, bytes_in=1000, scorer=psnr_scorer)
    assert outcome.unreachable and outcome.chosen.mode == "lossy"
    assert outcome.chosen.quality == 60
    assert outcome.warning is not None and "below the target" in outcome.warning


@needs_libwebp
def test_tiny_image_is_not_searched() -> None:
    assert LIB is not None
    side = int(math.sqrt(TINY_PIXELS)) - 2
    called: list[int] = []

    def counting(reference: np.ndarray) -> Callable[[np.ndarray], float]:
        called.append(1)
        return psnr_scorer(reference)

    options = EncodeOptions(target_score=80.0)
    outcome = search_image(LIB, vips_image(photo_array(side, side)), options, scorer=counting)
    assert outcome.stop == "tiny" and outcome.probes == 2 and not called


@needs_libwebp
@pytest.mark.parametrize("size", [(5000, 3), (4, 2000)])
def test_a_strip_too_narrow_for_the_metric_is_tiny(size: tuple[int, int]) -> None:
    from optimizr import ssimulacra2
    from optimizr.quality_search import MIN_SIDE

    assert MIN_SIDE == ssimulacra2.MIN_SIDE
    assert LIB is not None
    width, height = size
    out = search_image(LIB, vips_image(photo_array(width, height)), EncodeOptions(target_score=80))
    assert out.stop == "tiny"


@needs_libwebp
def test_flat_image_is_one_lossless_encode() -> None:
    assert LIB is not None
    flat = np.full((300, 400, 3), (12, 200, 99), dtype=np.uint8)
    outcome = search_image(
        LIB, vips_image(flat), EncodeOptions(target_score=85.0), scorer=psnr_scorer
    )
    assert outcome.stop == "flat" and outcome.probes == 1 and outcome.chosen.mode == "lossless"
    assert len(outcome.chosen.webp) < 200


@needs_libwebp
def test_alpha_graphic_is_scored_with_its_alpha() -> None:
    assert LIB is not None
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)
    rgba[..., :3] = photo_array(200, 200, seed=5)
    yy, xx = np.mgrid[0:200, 0:200]
    rgba[..., 3] = np.where((yy - 100) ** 2 + (xx - 100) ** 2 < 80**2, 255, 0)
    seen: list[tuple[int, ...]] = []

    def shape_checking(reference: np.ndarray) -> Callable[[np.ndarray], float]:
        seen.append(reference.shape)
        return psnr_scorer(reference)

    outcome = search_image(
        LIB, vips_image(rgba), EncodeOptions(target_score=70.0), scorer=shape_checking
    )
    assert seen == [(200, 200, 4)]
    assert outcome.drawn  # mostly transparent: lossless candidates were tried
    assert outcome.chosen.score >= 70.0


@needs_libwebp
def test_animation_is_scored_on_its_worst_frame() -> None:
    assert LIB is not None
    frames = [photo_array(96, 64, seed=s) for s in range(3)]
    frames[1] = np.random.default_rng(1).integers(0, 256, frames[1].shape, dtype=np.uint8)
    strip = np.concatenate(frames, axis=0)
    image = vips_image(strip).copy()
    image.set_type(pyvips.GValue.gint_type, "page-height", 64)
    per_frame: list[list[float]] = []

    def recording(reference: np.ndarray) -> Callable[[np.ndarray], float]:
        score = psnr_scorer(reference)
        mine: list[float] = []
        per_frame.append(mine)

        def scored(distorted: np.ndarray) -> float:
            mine.append(score(distorted))
            return mine[-1]

        return scored

    outcome = search_image(
        LIB, image, EncodeOptions(target_score=60.0), page_height=64, scorer=recording
    )
    assert len(per_frame) == 3
    # The noise frame scores worst at every probe; the chosen score is its score.
    assert all(n <= a for n, a in zip(per_frame[1], per_frame[0], strict=True))
    if outcome.chosen.mode != "lossless":
        assert min(per_frame[1]) <= outcome.chosen.score <= max(per_frame[1])
        assert outcome.chosen.score in per_frame[1]


def test_photo_does_not_look_drawn_and_a_screenshot_does() -> None:
    assert not looks_drawn(photo_array(512, 384)).drawn
    assert looks_drawn(screenshot_array()).drawn


# -- options -------------------------------------------------------------------------------


def test_quality_levels_are_target_scores(cli: Callable[..., object], tmp_path: Path) -> None:
    from optimizr.cli_options import build_configs, load_config_file

    base = {
        opt.field: opt.default for opt in __import__("optimizr.cli_options").cli_options.OPTIONS
    }
    run, _ = build_configs(tmp_path, tmp_path / "out", {**base, "quality": "high"})
    assert run.encode.target_score == 80.0
    run, _ = build_configs(tmp_path, tmp_path / "out", {**base, "quality": "visually-lossless"})
    assert run.encode.target_score == 85.0
    with pytest.raises(UsageError):
        build_configs(tmp_path, tmp_path / "out", {**base, "quality": "auto", "target_score": 80.0})
    toml = tmp_path / "optimizr.toml"
    toml.write_text("target-score = 82.5\nmin-quality = 40\n")
    assert load_config_file(toml) == {"target_score": 82.5, "min_quality": 40}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_score": 80.0, "lossless": True},
        {"target_score": 80.0, "encoder": "libvips"},
        {"target_score": 0.0},
        {"min_quality": 90, "max_quality": 80},
        {"target_score": 80.0, "target_size": 200 << 10},  # each would choose the quality
    ],
)
def test_contradictory_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        EncodeOptions(**kwargs)  # type: ignore[arg-type]


def test_target_score_changes_the_fingerprint_and_defaults_do_not() -> None:
    from optimizr.config import RunConfig
    from optimizr.manifest import options_fingerprint

    plain = RunConfig(src=Path("a"), dest=Path("b"))
    searched = RunConfig(src=Path("a"), dest=Path("b"), encode=EncodeOptions(target_score=80.0))
    assert options_fingerprint(plain) != options_fingerprint(searched)
    # The search's range shapes nothing without a target: no file is redone for it.
    ranged = EncodeOptions(min_quality=30, max_quality=90)
    assert options_fingerprint(plain) == options_fingerprint(
        RunConfig(src=Path("a"), dest=Path("b"), encode=ranged)
    )
    narrower = EncodeOptions(target_score=80.0, max_quality=90)
    assert options_fingerprint(searched) != options_fingerprint(
        RunConfig(src=Path("a"), dest=Path("b"), encode=narrower)
    )


# -- end to end, with the project's SSIMULACRA 2 -------------------------------------------


def metric_score(reference: np.ndarray, distorted: np.ndarray) -> float:
    from optimizr import ssimulacra2

    return float(ssimulacra2.score(reference, distorted))


@needs_libwebp
def test_convert_with_a_quality_level_meets_it_and_reports_it(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    from importlib import resources

    import jsonschema

    src = tmp_path / "src"
    photo = smooth_photo(320, 240, seed=8)
    save_png(src / "photo.png", photo)
    save_png(src / "shot.png", screenshot_array())
    dest = tmp_path / "dest"
    result = cli("convert", src, dest, "--quality", "high", "--log-format", "json", "-Q")
    assert result.exit_code == 0, result.output
    out = decoded((dest / "photo.webp").read_bytes())
    assert metric_score(photo, out) >= 80.0
    assert np.array_equal(decoded((dest / "shot.webp").read_bytes()), screenshot_array())
    summary = json.loads((dest / "optimizr-summary.json").read_text())
    schema = json.loads(
        resources.files("optimizr").joinpath("schemas/summary-2.schema.json").read_text()
    )
    jsonschema.Draft202012Validator(schema).validate(summary)
    search = summary["quality_search"]
    assert search["images"] == 2 and search["lossless"] + search["near_lossless"] >= 1
    assert search["score"]["percentiles"]["min"] >= 80.0
    assert 1 <= search["probes"]["percentiles"]["max"] <= PROBE_BUDGET + 2
    report = tmp_path / "report.html"
    assert cli("report", dest, "-o", report).exit_code == 0
    assert "Quality search" in report.read_text()


@needs_libwebp
def test_target_score_from_the_environment(
    cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    photo = smooth_photo(256, 192, seed=9)
    save_png(src / "photo.png", photo)
    monkeypatch.setenv("OPTIMIZR_TARGET_SCORE", "72")
    result = cli("convert", src, tmp_path / "dest", "-Q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "dest" / "optimizr-summary.json").read_text())
    assert summary["options"]["target_score"] == 72.0
    assert summary["quality_search"]["images"] == 1
    assert metric_score(photo, decoded((tmp_path / "dest" / "photo.webp").read_bytes())) >= 72.0


@needs_libwebp
@pytest.mark.parametrize("target", [75.0, 85.0])
def test_corpus_photos_meet_the_target(corpus: Path, target: float) -> None:
    photos = sorted((corpus / "photos").glob("*.jpg"))[:3]
    assert photos
    for path in photos:
        options = EncodeOptions(target_score=target, max_width=480, max_height=480)
        out = encode_webp(str(path), options)
        # The reference: the same source, shrunk alike, written exactly.
        exact = encode_webp(str(path), EncodeOptions(lossless=True, max_width=480, max_height=480))
        reference = decoded(exact.webp)
        facts = out.facts
        assert facts.probes <= PROBE_BUDGET and facts.chosen is not None
        if facts.warnings:  # unreachable: flagged, and at --max-quality
            assert facts.chosen == "q95"
            continue
        assert metric_score(reference, decoded(out.webp)) >= target
        assert facts.score is not None and facts.score >= target


@needs_libwebp
def test_corpus_screenshot_is_lossless_and_photo_lossy(corpus: Path) -> None:
    # At its own size: a screenshot shrunk is resampled into a photo of text.
    options = EncodeOptions(target_score=80.0)
    shot = encode_webp(str(corpus / "png" / "screenshot_lorem-ipsum_rgba.png"), options)
    assert shot.facts.chosen in ("lossless", "near-lossless 60")
    photo = encode_webp(str(corpus / "png" / "kodim23_photo.png"), options)
    assert photo.facts.chosen is not None and photo.facts.chosen.startswith("q")


@needs_libwebp
def test_animated_gif_meets_the_target_on_every_frame(tmp_path: Path) -> None:
    frames = [Image.fromarray(smooth_photo(128, 96, seed=s)) for s in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    out = encode_webp(str(path), EncodeOptions(target_score=70.0))
    assert out.facts.frames == 3 and out.facts.chosen is not None
    assert out.facts.probes <= PROBE_BUDGET + 2
    source = pyvips.Image.new_from_file(str(path), n=-1).colourspace("srgb")
    output = pyvips.Image.webpload_buffer(out.webp, n=-1)
    assert output.height == source.height
    src_px = np.ndarray(
        buffer=source.write_to_memory(), dtype=np.uint8, shape=(source.height, 128, source.bands)
    )
    out_px = np.ndarray(
        buffer=output.write_to_memory(), dtype=np.uint8, shape=(output.height, 128, output.bands)
    )
    for i in range(3):
        ref = np.ascontiguousarray(src_px[i * 96 : (i + 1) * 96, :, :3])
        dist = np.ascontiguousarray(out_px[i * 96 : (i + 1) * 96, :, :3])
        assert metric_score(ref, dist) >= 70.0


@needs_libwebp
@pytest.mark.parametrize("orientation", [3, 6])
def test_search_scores_the_image_as_displayed(tmp_path: Path, orientation: int) -> None:
    from PIL import ImageOps

    stored = Image.fromarray(smooth_photo(320, 240, seed=11))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    out = encode_webp(str(path), EncodeOptions(target_score=78.0))
    pixels = decoded(out.webp)
    assert pixels.shape == shown.shape
    assert out.facts.score is not None
    assert metric_score(shown, pixels) == pytest.approx(out.facts.score, abs=0.01)
    assert out.facts.score >= 78.0


@needs_libwebp
@pytest.mark.parametrize(
    "name",
    [
        "adobergb-a98.jpg",
        "displayp3.png",
        "grayscale_gray-gamma22-icc.jpg",
        "16bit-rgba_watermark.png",
        "cmyk_orientation6.jpg",
    ],
)
def test_corpus_colour_cases_meet_the_target_or_say_so(corpus: Path, name: str) -> None:
    path = corpus / "color" / name
    out = encode_webp(str(path), EncodeOptions(target_score=80.0, max_width=400, max_height=400))
    facts = out.facts
    assert facts.chosen is not None and facts.probes <= PROBE_BUDGET + 2
    if facts.score is not None:
        assert facts.score >= 80.0 or any(w.startswith("target score:") for w in facts.warnings)


@needs_libwebp
def test_a_kept_wide_gamut_profile_is_scored_in_srgb(corpus: Path) -> None:
    from PIL import ImageCms

    path = corpus / "color" / "displayp3.png"
    options = EncodeOptions(target_score=80.0, max_width=400, max_height=400)
    out = encode_webp(str(path), options)
    assert out.facts.icc_kept  # the output keeps Display P3: the scoring converts
    exact = encode_webp(str(path), EncodeOptions(lossless=True, max_width=400, max_height=400))
    srgb = ImageCms.createProfile("sRGB")

    def to_srgb(webp: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(webp)) as im:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
            rgb = im.convert("RGB")
            return np.asarray(ImageCms.profileToProfile(rgb, profile, srgb, renderingIntent=1))

    score = metric_score(to_srgb(exact.webp), to_srgb(out.webp))
    assert out.facts.score is not None
    assert score == pytest.approx(out.facts.score, abs=1.0)
    assert score >= 79.5


@needs_libwebp
def test_unreachable_target_end_to_end_is_flagged_in_the_summary(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    src = tmp_path / "src"
    # A small JPEG: lossless would be larger than it, so the fallback is --max-quality.
    save_jpeg(src / "p.jpg", photo_array(256, 192, seed=12), quality=70)
    dest = tmp_path / "dest"
    result = cli("convert", src, dest, "--target-score", "99", "--if-larger", "write", "-Q")
    assert result.exit_code == 0, result.output
    summary = json.loads((dest / "optimizr-summary.json").read_text())
    assert summary["quality_search"]["unreachable"] == 1
    assert summary["quality_search"]["chosen_quality"]["counts"] == [[95, 1]]
    assert summary["files"]["warned_by_kind"] == {"target score": 1}


def test_an_unknown_quality_level_is_a_usage_error(cli: Callable[..., Any], tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    result = cli("convert", tmp_path / "src", tmp_path / "dest", "--quality", "best")
    assert result.exit_code == 2
    assert "'best' is not a valid integer" in result.output
    assert "(or a level: auto, high, visually-lossless)" in result.output


@needs_libwebp
def test_a_screenshot_smaller_lossless_than_any_lossy_costs_at_most_one_score() -> None:
    assert LIB is not None
    calls: list[int] = []

    def counting(reference: np.ndarray) -> Callable[[np.ndarray], float]:
        score = psnr_scorer(reference)

        def scored(distorted: np.ndarray) -> float:
            calls.append(1)
            return score(distorted)

        return scored

    options = EncodeOptions(target_score=80.0)
    outcome = search_image(LIB, vips_image(screenshot_array()), options, scorer=counting)
    assert outcome.chosen.mode == "lossless" and outcome.stop == "lossless-smaller"
    # Lossless, near-lossless (scored only if smaller) and one unscored lossy encode at
    # --min-quality, which shows that no lossy probe can be smaller.
    assert len(calls) <= 1 and outcome.probes == 3


def half_flat_photo(width: int, height: int) -> np.ndarray:
    """A photo on a flat page: drawn by its flat blocks, yet far smaller lossy."""
    pixels = np.full((height, width, 3), 236, dtype=np.uint8)
    pixels[:, width // 2 :] = smooth_photo(width - width // 2, height, seed=4)
    return pixels


@needs_libwebp
def test_near_lossless_is_not_encoded_when_a_lossy_probe_is_far_below_lossless(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert LIB is not None
    import optimizr.quality_search as quality_search

    encoded: list[EncodeOptions] = []
    real_encode = quality_search.encode

    def recording(lib: Any, image: Any, options: EncodeOptions, **kwargs: Any) -> bytes:
        encoded.append(options)
        return real_encode(lib, image, options, **kwargs)

    monkeypatch.setattr(quality_search, "encode", recording)
    pixels = half_flat_photo(512, 384)
    outcome = search_image(
        LIB, vips_image(pixels), EncodeOptions(target_score=80.0), scorer=psnr_scorer
    )
    assert outcome.drawn and outcome.chosen.mode == "lossy"
    lossless = next(o for o in encoded if o.lossless)
    exact = real_encode(LIB, vips_image(pixels), lossless)
    # Near-lossless never shrinks a drawn image below NEAR_LOSSLESS_FLOOR of lossless
    # (measured), so with a passing lossy probe under that it cannot win: not encoded.
    assert len(outcome.chosen.webp) < quality_search.NEAR_LOSSLESS_FLOOR * len(exact)
    assert not [o for o in encoded if o.near_lossless is not None]
    assert outcome.probes == len(encoded)


@needs_libwebp
def test_near_lossless_is_still_tried_when_no_lossy_probe_passes_below_lossless(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert LIB is not None
    import optimizr.quality_search as quality_search

    levels: list[int | None] = []
    real_encode = quality_search.encode

    def recording(lib: Any, image: Any, options: EncodeOptions, **kwargs: Any) -> bytes:
        levels.append(options.near_lossless)
        return real_encode(lib, image, options, **kwargs)

    monkeypatch.setattr(quality_search, "encode", recording)
    # A target lossy WebP cannot reach under --max-quality 60: lossless is the only
    # passing candidate, so near-lossless could still win and is tried.
    outcome = search_image(
        LIB,
        vips_image(half_flat_photo(256, 192)),
        EncodeOptions(target_score=99.0, max_quality=60),
        scorer=psnr_scorer,
    )
    assert outcome.drawn and outcome.chosen.mode in ("lossless", "near-lossless")
    assert outcome.chosen.score >= 99.0
    assert quality_search.NEAR_LOSSLESS_LEVEL in levels


@needs_libwebp
def test_an_image_decided_on_sizes_alone_never_builds_the_metrics_reference() -> None:
    assert LIB is not None
    built: list[int] = []

    def counting(reference: np.ndarray) -> Callable[[np.ndarray], float]:
        built.append(1)
        return psnr_scorer(reference)

    shot = search_image(
        LIB, vips_image(screenshot_array()), EncodeOptions(target_score=80.0), scorer=counting
    )
    assert shot.stop == "lossless-smaller" and built == []
    photo = search_image(
        LIB, vips_image(smooth_photo(256, 192)), EncodeOptions(target_score=80.0), scorer=counting
    )
    assert photo.chosen.mode == "lossy" and built == [1]  # built once, for every probe
