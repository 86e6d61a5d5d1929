"""SSIMULACRA 2.1 (src/optimizr/ssimulacra2.py) against the reference tool's own scores.

The 120 pairs of ../shared/quality (scores.csv: cloudinary/ssimulacra2 at 81feacf)
are found through $OPTIMIZR_METRIC_PAIRS (.ci/run sets it) or beside the checkout;
without them those tests skip, saying why. The property tests need nothing.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import photo_array
from optimizr import ssimulacra2

QUALITY_ENV = "OPTIMIZR_METRIC_PAIRS"
TOLERANCE = 0.5


def _quality_dir() -> Path | None:
    root = os.environ.get(QUALITY_ENV)
    path = Path(root) if root else Path(__file__).resolve().parents[1] / ".." / "shared" / "quality"
    return path if (path / "scores.csv").is_file() else None


def _pairs() -> dict[str, list[tuple[str, float]]]:
    root = _quality_dir()
    if root is None:
        return {}
    by_reference: dict[str, list[tuple[str, float]]] = defaultdict(list)
    with (root / "scores.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            by_reference[row["reference"]].append((row["distorted"], float(row["ssimulacra2"])))
    return dict(by_reference)


PAIRS = _pairs()


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        image.load()
        if image.mode not in ("RGB", "RGBA"):
            has_alpha = "A" in image.mode or "transparency" in image.info
            image = image.convert("RGBA" if has_alpha else "RGB")
        return np.asarray(image)


def test_reference_pairs_are_there() -> None:
    if not PAIRS:
        pytest.skip(f"{QUALITY_ENV} not set and no ../shared/quality: the agreement tests need it")
    assert sum(len(v) for v in PAIRS.values()) == 120


@pytest.mark.parametrize("reference", sorted(PAIRS) or ["(no pairs)"])
def test_agrees_with_the_reference_tool(reference: str) -> None:
    """Every distortion of this original scores within 0.5 of the tool's score."""
    if not PAIRS:
        pytest.skip(f"{QUALITY_ENV} not set and no ../shared/quality: the agreement tests need it")
    root = _quality_dir()
    assert root is not None
    original = ssimulacra2.Reference(_load(root / reference))
    diffs = {
        distorted: original.score(_load(root / distorted)) - expected
        for distorted, expected in PAIRS[reference]
    }
    worst = max(diffs, key=lambda d: abs(diffs[d]))
    assert abs(diffs[worst]) <= TOLERANCE, f"{worst}: {diffs[worst]:+.4f} from the tool's score"


def _blurred(pixels: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))


def test_identical_images_score_100() -> None:
    photo = photo_array(96, 64, seed=3)
    assert ssimulacra2.score(photo, photo.copy()) == 100.0


def test_a_stronger_blur_scores_lower() -> None:
    photo = photo_array(128, 96, seed=1)
    original = ssimulacra2.Reference(photo)
    scores = [original.score(_blurred(photo, radius)) for radius in (0.6, 1.2, 2.5)]
    assert scores[0] < 100.0
    assert scores[0] > scores[1] > scores[2], scores


def test_reference_reuse_gives_the_one_shot_score() -> None:
    photo = photo_array(80, 72, seed=2)
    original = ssimulacra2.Reference(photo)
    distortions = [_blurred(photo, 1.0), np.clip(photo.astype(int) + 9, 0, 255).astype(np.uint8)]
    for distorted in distortions:
        first = original.score(distorted)
        assert original.score(distorted) == first
        assert ssimulacra2.score(photo, distorted) == first


def test_transparency_keeps_the_worse_background() -> None:
    """An error hidden under transparent pixels costs nothing; a visible one does."""
    rgb = photo_array(64, 64, seed=4)
    alpha = np.full((64, 64, 1), 255, dtype=np.uint8)
    alpha[:, :32] = 0
    original = np.concatenate([rgb, alpha], axis=2)
    hidden = original.copy()
    hidden[:, :32, :3] = 255 - hidden[:, :32, :3]
    assert ssimulacra2.score(original, hidden) == 100.0
    # Half-transparent pixels darkened: scored over both backgrounds, the worse kept.
    original[:, :32, 3] = 128
    darker = original.copy()
    darker[:, :32, :3] //= 2
    score = ssimulacra2.score(original, darker)
    assert score < 90.0


def test_too_small_or_mismatched_images_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 8x8"):
        ssimulacra2.Reference(np.zeros((7, 40, 3), dtype=np.uint8))
    original = ssimulacra2.Reference(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="9x8"):
        original.score(np.zeros((8, 9, 3), dtype=np.uint8))


# The C loops (src/optimizr/_ssimulacra2.c) against their numpy twins: the same
# float32 operations in the same order, so the same bits; the scores may differ
# only by the order of the final double sums.


def test_the_c_loops_are_built() -> None:
    """`make` builds them (setup.py); a silent fallback would cost 2-4x the CPU."""
    assert ssimulacra2._C_PASSES is not None, "optimizr._ssimulacra2 was not built"


@pytest.mark.parametrize(("height", "width"), [(9, 8), (13, 31), (64, 97), (301, 200)])
def test_c_blurs_are_the_numpy_blurs_bit_for_bit(height: int, width: int) -> None:
    if ssimulacra2._C_PASSES is None:
        pytest.skip("optimizr._ssimulacra2 is not built")
    rng = np.random.default_rng(height * width)
    planes = rng.random((height, width, 5), dtype=np.float32)
    gaussian = ssimulacra2._GAUSSIAN
    for name in ("horizontal", "vertical"):
        rows = planes.reshape(height, width * 5)
        assert np.array_equal(gaussian._c_pass(name, rows), getattr(gaussian, name)(rows)), name


def _numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssimulacra2, "_C_PASSES", None)


def test_c_xyb_is_the_numpy_xyb_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    if ssimulacra2._C_PASSES is None:
        pytest.skip("optimizr._ssimulacra2 is not built")
    rng = np.random.default_rng(7)
    linear = rng.random((37, 53, 3), dtype=np.float32)
    linear[0, :3] = 0.0  # black: the cube root's zero guess
    with_c = ssimulacra2._to_xyb(linear)
    _numpy_only(monkeypatch)
    assert np.array_equal(with_c, ssimulacra2._to_xyb(linear))


@pytest.mark.parametrize("alpha", [False, True])
def test_c_scores_are_the_numpy_scores(monkeypatch: pytest.MonkeyPatch, alpha: bool) -> None:
    if ssimulacra2._C_PASSES is None:
        pytest.skip("optimizr._ssimulacra2 is not built")
    photo = photo_array(203, 141, seed=5)
    if alpha:
        ramp = np.linspace(0, 255, 203 * 141).reshape(141, 203, 1).astype(np.uint8)
        photo = np.concatenate([photo, ramp], axis=2)
    distortions = [_blurred(photo, 0.8), np.clip(photo.astype(int) - 7, 0, 255).astype(np.uint8)]
    with_c = [ssimulacra2.score(photo, d) for d in distortions]
    _numpy_only(monkeypatch)
    with_numpy = [ssimulacra2.score(photo, d) for d in distortions]
    assert with_c == pytest.approx(with_numpy, abs=1e-9)
    assert with_c[0] < 100.0


def test_the_baseline_kernels_score_as_the_vector_ones() -> None:
    """Other CPUs (no AVX2/FMA) run the baseline build of the same loops."""
    loops = ssimulacra2._C_PASSES
    if loops is None or loops.KERNELS == "baseline":
        pytest.skip("only the baseline kernels exist here")
    photo = photo_array(150, 97, seed=6)
    distorted = _blurred(photo, 0.7)
    fast = ssimulacra2.score(photo, distorted)
    previous = loops.use_kernels("baseline")
    try:
        baseline = ssimulacra2.score(photo, distorted)
    finally:
        loops.use_kernels(previous)
    assert baseline == fast
    assert fast < 100.0
