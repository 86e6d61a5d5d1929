"""Per image, the smallest WebP that still scores ``--target-score`` (issue 14).

The prepared image (colours and size as they will be encoded) is rendered once;
the metric's reference side (the image as displayed: orientation applied,
converted to sRGB, alpha as SSIMULACRA 2's tool composites it) is built once;
then each probe encodes those same pixels through libwebp's binding at the
final ``--effort`` (the score moves up to 2.5 points between efforts), decodes
the WebP and scores it. Only a probe that was scored is ever returned.

The lossy search over quality:

* starts where the target is reached on average (:data:`START_QUALITY`,
  measured on the corpus photos by ``bench/quality.py --calibrate``);
* from one side, steps by the local slope (the last two probes, else the
  calibrated one) towards the middle of the band ``[S, S + TOLERANCE]``;
* once bracketed, regula falsi between the highest failing and the lowest
  passing quality, rounded up (the output must pass);
* stops in the band, when the bracket is one step wide, at ``--min-quality``
  passing, at ``--max-quality`` failing, or after :data:`PROBE_BUDGET` probes.

A score curve need not be monotonic in quality: the bracket is taken from the
probes as they are and the output is the smallest probe that passed, so a bump
costs a probe or two, never a miss.

Lossless when it wins: an image that looks drawn (few colours, large flat
areas, much transparency; :func:`looks_drawn`) is first encoded lossless (it is
exact, so it meets the target unscored), and its size bounds the lossy search:
no lossy probe is scored when even ``--min-quality`` is larger, and the search
stops as soon as a failing probe is larger. Near-lossless comes last, and only
when it could win: not when a passing candidate is already under
:data:`NEAR_LOSSLESS_FLOOR` of the lossless size (it never shrinks a drawn image
that much), and it is scored only if it is smaller than every passing candidate.
The smallest candidate that meets the target is kept. The metric's reference
side is built at the first score, so an image decided on sizes alone costs none.

Guards: a tiny image (fewer than :data:`TINY_PIXELS`, or a side under
:data:`MIN_SIDE`) is not searched: the
metric's scores are erratic there and the bytes are a container's; it is
written at ``--max-quality`` or lossless, whichever is smaller. A flat image
(one colour) is written lossless. A target no quality reaches is met lossless
when that is smaller than the source, else the image is written at
``--max-quality`` and a warning says so. An animation is searched as a whole:
each probe encodes every frame, and its score is the worst of up to
:data:`ANIMATION_FRAMES_SCORED` frames evenly spread over it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyvips

from optimizr.config import EncodeOptions
from optimizr.libwebp import LibWebP
from optimizr.webp_writer import Phases, encode

if TYPE_CHECKING:
    import numpy as np

#: Scores a distorted image (HxWxC uint8 sRGB) against one reference.
ScoreFn = Callable[["np.ndarray"], float]
#: Builds the reference side of the metric once per image (ssimulacra2.Reference).
Scorer = Callable[["np.ndarray"], ScoreFn]

#: Probes of the lossy search, at most.
PROBE_BUDGET = 6
#: A score in [S, S + TOLERANCE] ends the search: closer costs more probes than it saves.
TOLERANCE = 1.0
#: Smaller images are not searched (see the module docstring). Measured on a corpus
#: photo cut to 16-96 px squares: under 64 px a side the score jumps about between
#: qualities (at 32 and 48 px: 16, 26, 45, 48 for q50, q75, q90, q95; the coarsest of
#: the metric's six scales are a pixel or two) and q95 costs 0.1-0.9 KB more than q50;
#: from 64 px on it rises with quality as on large photos.
TINY_PIXELS = 64 * 64
#: The metric needs this many pixels on either side (its tool refuses fewer): a
#: narrower image is treated as tiny. ssimulacra2.MIN_SIDE, not imported from it:
#: that would load numpy into every process that reads results.
MIN_SIDE = 8
#: Frames of an animation scored per probe (the worst of them is its score).
ANIMATION_FRAMES_SCORED = 8
#: The near-lossless level tried for drawn images (libwebp: 100 off, 0 most).
NEAR_LOSSLESS_LEVEL = 60
#: Near-lossless is not tried when a passing candidate is already smaller than this
#: fraction of the lossless file: measured at level 60, effort 4, on the 42 drawn
#: images of the shared corpus and ../shared/quality (1024 px at most), near-lossless
#: was 0.71-1.03x the lossless bytes (0.66x on the camera photos, which are not drawn).
NEAR_LOSSLESS_FLOOR = 0.6

#: (SSIMULACRA 2 score, the mean lowest quality that reaches it) on corpus photos shrunk
#: to 1024 px, effort 4, measured by ``bench/quality.py --calibrate`` (6 photos; 90 is
#: reached by 3 of them, at q96.7 on average); interpolated between, extrapolated out.
START_QUALITY: tuple[tuple[float, float], ...] = (
    (60.0, 52.5),
    (65.0, 57.8),
    (70.0, 71.0),
    (75.0, 80.2),
    (80.0, 85.8),
    (85.0, 92.2),
    (90.0, 96.7),
)


@dataclass(frozen=True)
class Probe:
    """One scored candidate."""

    mode: str  # "lossy", "lossless" or "near-lossless"
    quality: int | None  # lossy quality; near-lossless level; None for lossless
    webp: bytes
    score: float

    @property
    def label(self) -> str:
        if self.mode == "lossy":
            return f"q{self.quality}"
        if self.mode == "near-lossless":
            return f"near-lossless {self.quality}"
        return "lossless"


@dataclass(frozen=True)
class SearchOutcome:
    """What the search chose for one image, and why."""

    chosen: Probe
    #: Encodes made (lossy probes and lossless candidates).
    probes: int
    #: Why no search ran, or why it ended: "band", "bracket", "min-quality",
    #: "max-quality", "budget", "lossless-smaller", "tiny", "flat".
    stop: str
    #: The target was not reached by any candidate (the output is the best lossy one).
    unreachable: bool = False
    #: The image was judged drawn (lossless candidates were tried).
    drawn: bool = False

    @property
    def warning(self) -> str | None:
        if not self.unreachable:
            return None
        return (
            f"{UNREACHABLE_WARNING}: {self.chosen.score:.1f} at {self.chosen.label} is below "
            "the target (the highest lossy quality; lossless would be larger than the source)"
        )


def start_quality(target: float) -> float:
    """The calibrated quality that reaches ``target`` on an average photo."""
    points = START_QUALITY
    if target <= points[0][0]:
        (s0, q0), (s1, q1) = points[0], points[1]
    elif target >= points[-1][0]:
        (s0, q0), (s1, q1) = points[-2], points[-1]
    else:
        index = next(i for i, (s, _) in enumerate(points) if s >= target)
        (s0, q0), (s1, q1) = points[index - 1], points[index]
    return q0 + (target - s0) * (q1 - q0) / (s1 - s0)


def calibrated_slope(quality: float) -> float:
    """Score points per quality step near ``quality``, from the calibration."""
    points = START_QUALITY
    for (s0, q0), (s1, q1) in zip(points, points[1:], strict=False):
        if quality <= q1:
            return (s1 - s0) / (q1 - q0)
    (s0, q0), (s1, q1) = points[-2], points[-1]
    return (s1 - s0) / (q1 - q0)


def search_lossy(
    probe: Callable[[int], Probe],
    target: float,
    low: int,
    high: int,
    *,
    budget: int = PROBE_BUDGET,
    larger_than: int | None = None,
) -> tuple[list[Probe], str]:
    """The lossy probes made for ``target`` within [low, high], and why it stopped.

    ``probe(q)`` encodes and scores at quality q. ``larger_than``: the bytes of a
    candidate already known to pass (lossless): a failing probe at least that
    large ends the search, since higher qualities are larger still."""
    probes: dict[int, Probe] = {}
    q = min(high, max(low, math.ceil(start_quality(target + TOLERANCE / 2))))
    while True:
        made = probe(q)
        probes[q] = made
        if target <= made.score <= target + TOLERANCE:
            return list(probes.values()), "band"
        if larger_than is not None and made.score < target and len(made.webp) >= larger_than:
            return list(probes.values()), "lossless-smaller"
        if len(probes) >= budget:
            return list(probes.values()), "budget"
        passing = sorted(p for p, m in probes.items() if m.score >= target)
        best = passing[0] if passing else None
        failing = sorted(
            p for p, m in probes.items() if m.score < target and (best is None or p < best)
        )
        worst = failing[-1] if failing else None
        if best is not None and worst is not None:
            if best - worst <= 1:
                return list(probes.values()), "bracket"
            q = _regula_falsi(worst, probes[worst].score, best, probes[best].score, target)
        elif best is not None:
            if best <= low:
                return list(probes.values()), "min-quality"
            q = max(low, best - _steps(probes, best, probes[best].score - target - TOLERANCE / 2))
        else:
            assert worst is not None
            if worst >= high:
                return list(probes.values()), "max-quality"
            q = min(
                high, worst + _steps(probes, worst, target + TOLERANCE / 2 - probes[worst].score)
            )
        if q in probes:  # cannot happen with a bracket kept open; a guard all the same
            return list(probes.values()), "bracket"


def _regula_falsi(q_lo: int, s_lo: float, q_hi: int, s_hi: float, target: float) -> int:
    if s_hi > s_lo:
        q = q_lo + math.ceil((target - s_lo) * (q_hi - q_lo) / (s_hi - s_lo))
    else:  # non-monotonic between them: bisect
        q = (q_lo + q_hi + 1) // 2
    return min(q_hi - 1, max(q_lo + 1, q))


def _steps(probes: dict[int, Probe], q: int, gap: float) -> int:
    """Quality steps to cover ``gap`` score points from q: by the secant of the last
    two probes when it is a usable slope, else by the calibrated one."""
    slope = calibrated_slope(q)
    if len(probes) >= 2:
        (q1, p1), (q2, p2) = list(probes.items())[-2:]
        secant = (p2.score - p1.score) / (q2 - q1) if q2 != q1 else 0.0
        if slope / 4 <= secant <= slope * 4:
            slope = secant
    return max(1, min(25, math.ceil(abs(gap) / slope)))


# -- the image side -----------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """What a cheap look at a downsample says about an image."""

    colours: int
    flat_fraction: float  # of 8x8 blocks of one colour (within 2 levels)
    transparent_fraction: float  # of pixels not fully opaque

    @property
    def drawn(self) -> bool:
        # Measured on the shared corpus and ../shared/quality (1024 px thumbnails):
        # the photos have 8,000-49,000 colours in the sample and at most 8% flat
        # blocks (one, a flat grey frame, is one colour: the flat guard takes it);
        # the screenshots, diagrams, icons and logos have 5-1,352 colours, or 57-94%
        # flat blocks, or 31-100% transparent pixels.
        return (
            self.colours <= 2048 or self.flat_fraction >= 0.5 or self.transparent_fraction >= 0.25
        )


def looks_drawn(pixels: np.ndarray) -> Content:
    """Colour count and flatness of ``pixels`` (HxWxC uint8), on a point sample of
    at most 256 px a side: nearest sampling keeps the colours as they are."""
    import numpy as np

    h, w = pixels.shape[:2]
    step = max(1, math.ceil(max(h, w) / 256))
    sample = np.ascontiguousarray(pixels[::step, ::step])
    bands = sample.shape[2]
    packed = np.zeros(sample.shape[:2], dtype=np.uint32)
    for band in range(bands):
        packed = (packed << 8) | sample[:, :, band]
    colours = int(np.unique(packed).size)
    sh, sw = (sample.shape[0] // 8) * 8, (sample.shape[1] // 8) * 8
    if sh and sw:
        blocks = sample[:sh, :sw].reshape(sh // 8, 8, sw // 8, 8, bands).astype(np.int16)
        spread = blocks.max(axis=(1, 3)) - blocks.min(axis=(1, 3))
        flat = float(np.mean(spread.max(axis=-1) <= 2))
    else:
        flat = 1.0 if colours == 1 else 0.0
    transparent = float(np.mean(sample[:, :, 3] < 255)) if bands == 4 else 0.0
    return Content(colours, flat, transparent)


def _to_numpy(image: Any) -> np.ndarray:
    import numpy as np

    data = image.write_to_memory()  # read-only, as the metric only reads
    return np.frombuffer(data, dtype=np.uint8).reshape(image.height, image.width, image.bands)


def _displayed(image: Any, profile: bytes | None) -> Any:
    """An 8-bit sRGB image as it is shown: a kept wide-gamut profile converted out."""
    if profile is not None:
        image = image.copy()
        image.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
        image = image.icc_transform("srgb", embedded=True, intent="relative")
        if image.format != "uchar":
            image = image.cast("uchar")
    if image.bands == 2:
        image = image.colourspace("srgb")
    elif image.bands == 1:
        image = image.colourspace("srgb")
    return image


def _frames(pixels: np.ndarray, page_height: int) -> list[np.ndarray]:
    count = pixels.shape[0] // page_height
    if count <= 1:
        return [pixels]
    wanted = min(count, ANIMATION_FRAMES_SCORED)
    picks = sorted({round(i * (count - 1) / max(1, wanted - 1)) for i in range(wanted)})
    return [pixels[i * page_height : (i + 1) * page_height] for i in picks]


def _matched(reference: np.ndarray, distorted: np.ndarray) -> np.ndarray:
    """``distorted`` with the reference's bands: libwebp drops an all-opaque alpha."""
    import numpy as np

    if distorted.shape[2] == reference.shape[2]:
        return distorted
    if distorted.shape[2] == 3 and reference.shape[2] == 4:
        opaque = np.full(distorted.shape[:2] + (1,), 255, dtype=np.uint8)
        return np.concatenate([distorted, opaque], axis=2)
    return np.ascontiguousarray(distorted[:, :, : reference.shape[2]])


def default_scorer() -> Scorer:
    """SSIMULACRA 2.1 of :mod:`optimizr.ssimulacra2`: its reference side built once."""
    from optimizr import ssimulacra2

    def build(pixels: np.ndarray) -> ScoreFn:
        return ssimulacra2.Reference(pixels).score

    return build


def search_image(
    lib: LibWebP,
    image: Any,
    options: EncodeOptions,
    *,
    orientation: int = 1,
    page_height: int | None = None,
    bytes_in: int | None = None,
    phases: Phases | None = None,
    scorer: Scorer | None = None,
) -> SearchOutcome:
    """The smallest candidate for ``image`` (the prepared libvips image, as
    encode.py hands it to the writer) that meets ``options.target_score``."""
    import numpy as np

    target = options.target_score
    assert target is not None, "search_image needs a target score"
    phases = phases if phases is not None else Phases()
    started = time.perf_counter()
    rendered = image.copy_memory()  # decoded once; every probe encodes these pixels
    phases.decode += time.perf_counter() - started
    frame_height = page_height if page_height is not None else rendered.height
    animated = frame_height != rendered.height
    profile = _foreign_profile(rendered)
    shown = rendered
    if orientation != 1:
        shown = rendered.copy()
        shown.set_type(pyvips.GValue.gint_type, "orientation", orientation)
        shown = shown.autorot()
    reference_pixels = _to_numpy(_displayed(shown, profile))
    if reference_pixels.shape[2] == 4 and bool(np.all(reference_pixels[:, :, 3] == 255)):
        reference_pixels = np.ascontiguousarray(reference_pixels[:, :, :3])
    content = looks_drawn(reference_pixels)
    fixed = dataclasses.replace(options, target_score=None)  # each candidate's own options
    made = 0

    def encoded(opts: EncodeOptions) -> bytes:
        nonlocal made
        made += 1
        return encode(
            lib, rendered, opts, orientation=orientation, page_height=page_height, phases=phases
        )

    def lossless() -> Probe:
        return Probe("lossless", None, encoded(dataclasses.replace(fixed, lossless=True)), 100.0)

    frame_h, frame_w = reference_pixels.shape[0], reference_pixels.shape[1]
    shown_h = frame_height if animated else frame_h
    if frame_w * shown_h < TINY_PIXELS or min(frame_w, shown_h) < MIN_SIDE:
        lossy = Probe(
            "lossy", options.max_quality, _at(encoded, fixed, options.max_quality), math.nan
        )
        whole = lossless()
        return SearchOutcome(min(lossy, whole, key=_size), made, "tiny", drawn=content.drawn)
    if content.colours == 1:
        return SearchOutcome(lossless(), made, "flat", drawn=True)

    build = scorer if scorer is not None else default_scorer()
    # The reference side costs about one score (its blurs); a screenshot that ends
    # lossless on sizes alone is never scored, so it is built at the first score.
    references: list[tuple[np.ndarray, ScoreFn]] = []

    def scored(mode: str, quality: int | None, webp: bytes) -> Probe:
        if not references:
            references.extend(
                (frame, build(frame)) for frame in _frames(reference_pixels, frame_height)
            )
        decoded = (
            pyvips.Image.webpload_buffer(webp, n=-1)
            if animated
            else pyvips.Image.webpload_buffer(webp)
        )
        pixels = _to_numpy(_displayed(decoded, profile))
        frames = _frames(pixels, frame_height)
        score = min(
            fn(_matched(ref, dist)) for (ref, fn), dist in zip(references, frames, strict=True)
        )
        return Probe(mode, quality, webp, float(score))

    def lossy_probe(quality: int) -> Probe:
        return scored("lossy", quality, _at(encoded, fixed, quality))

    if not content.drawn:
        probes, stop = search_lossy(lossy_probe, target, options.min_quality, options.max_quality)
        meeting = [p for p in probes if p.score >= target]
        if meeting:
            return SearchOutcome(min(meeting, key=_size), made, stop)
        # Unreachable: lossless if it beats the source, else the best lossy probe, flagged.
        exact = lossless()
        if bytes_in is None or len(exact.webp) < bytes_in:
            return SearchOutcome(exact, made, stop)
        best = max(probes, key=lambda p: (p.score, -len(p.webp)))
        return SearchOutcome(best, made, stop, unreachable=True)

    # A drawn image: lossless (exact, so it passes unscored) bounds the lossy search.
    exact = lossless()
    candidates: list[Probe] = [exact]
    if len(_at(encoded, fixed, options.min_quality)) >= len(exact.webp):
        # Even the lowest quality is larger: no lossy probe can win (sizes grow with
        # quality), and an encode costs a fraction of a score. Screenshots end here.
        probes, stop = [], "lossless-smaller"
    else:
        probes, stop = search_lossy(
            lossy_probe,
            target,
            options.min_quality,
            options.max_quality,
            larger_than=len(exact.webp),
        )
        candidates.extend(probes)
    # Near-lossless costs up to two lossless encodes and a score: it is tried only
    # when it could be the smallest passing candidate.
    smallest = min(len(p.webp) for p in candidates if p.score >= target)
    if smallest >= NEAR_LOSSLESS_FLOOR * len(exact.webp):
        near = encoded(dataclasses.replace(fixed, near_lossless=NEAR_LOSSLESS_LEVEL))
        if len(near) < smallest:  # else it cannot win: not worth a score
            candidates.append(scored("near-lossless", NEAR_LOSSLESS_LEVEL, near))
    chosen = min((p for p in candidates if p.score >= target), key=_size)
    return SearchOutcome(chosen, made, stop, drawn=True)


def _at(encoded: Callable[[EncodeOptions], bytes], options: EncodeOptions, quality: int) -> bytes:
    return encoded(dataclasses.replace(options, quality=quality))


def _size(probe: Probe) -> int:
    return len(probe.webp)


def _foreign_profile(image: Any) -> bytes | None:
    """The image's ICC profile when it is not sRGB (kept wide gamut), else None."""
    from optimizr.encode import _is_srgb_profile

    if image.get_typeof("icc-profile-data") == 0:
        return None
    profile = bytes(image.get("icc-profile-data"))
    return None if _is_srgb_profile(profile) else profile


#: The warning an image gets when no candidate reached the target.
UNREACHABLE_WARNING = "target score"


@dataclass
class SearchTally:
    """The distributions of a run's searches, for summary.json and the report:
    counters of rounded values, so that a run of millions of images stays small."""

    images: int = 0
    lossless: int = 0
    near_lossless: int = 0
    unreachable: int = 0
    qualities: Counter[int] = dataclasses.field(default_factory=Counter)
    #: Scores to a tenth of a point (tiny images are not scored).
    scores: Counter[float] = dataclasses.field(default_factory=Counter)
    probes: Counter[int] = dataclasses.field(default_factory=Counter)

    def add(
        self,
        chosen: str | None,
        quality: int | None,
        score: float | None,
        probes: int,
        warnings: Sequence[str],
    ) -> None:
        if chosen is None:
            return
        self.images += 1
        if chosen == "lossless":
            self.lossless += 1
        elif chosen.startswith("near-lossless"):
            self.near_lossless += 1
        if quality is not None:
            self.qualities[quality] += 1
        if score is not None:
            self.scores[round(score, 1)] += 1
        self.probes[probes] += 1
        if any(w.startswith(UNREACHABLE_WARNING + ":") for w in warnings):
            self.unreachable += 1

    def to_dict(self) -> dict[str, Any]:
        probes = sum(p * n for p, n in self.probes.items())
        return {
            "images": self.images,
            "lossless": self.lossless,
            "near_lossless": self.near_lossless,
            "unreachable": self.unreachable,
            "chosen_quality": {
                "counts": [[q, n] for q, n in sorted(self.qualities.items())],
                "percentiles": percentiles(self.qualities),
            },
            "score": {
                "counts": [[s, n] for s, n in sorted(self.scores.items())],
                "percentiles": percentiles(self.scores),
            },
            "probes": {
                "counts": [[p, n] for p, n in sorted(self.probes.items())],
                "mean": round(probes / self.images, 3) if self.images else 0,
                "percentiles": percentiles(self.probes),
            },
        }


def percentiles(counts: Mapping[Any, int]) -> dict[str, float]:
    """min, p10, p50, p90 and max of a distribution given as {value: count}."""
    total = sum(counts.values())
    if not total:
        return {}
    ordered = sorted(counts.items())

    def at(fraction: float) -> float:
        rank, seen = min(total - 1, int(fraction * total)), 0
        for value, count in ordered:
            seen += count
            if seen > rank:
                return float(value)
        return float(ordered[-1][0])

    return {
        "min": float(ordered[0][0]),
        "p10": at(0.1),
        "p50": at(0.5),
        "p90": at(0.9),
        "max": float(ordered[-1][0]),
    }


__all__ = [
    "PROBE_BUDGET",
    "Probe",
    "SearchOutcome",
    "SearchTally",
    "looks_drawn",
    "search_image",
    "search_lossy",
    "start_quality",
]
