"""``--target-size``: the best quality whose whole file fits a size, never over it.

libwebp's rate control (``WebPConfig.target_size`` with several ``pass``-es) gets
close in one encode, but it aims at the VP8 bitstream alone: the container, the
metadata chunks and an alpha plane come on top, and its secant search stops
within a few percent either side. Measured on corpus photos at 1024 px (targets
30-90% of the q80 size): 2-7% under, or 1-2% over once the ICC profile is
subtracted (8-21% over without). So the real file is checked, and when it is over,
integer qualities are searched on real sizes (bracketed, interpolated on log
size, bisection as the fallback) for the highest one that fits. When even
quality 0 is over, the target is unreachable and the smallest file found is
kept, with a warning; the run's ``larger than source`` rule still applies to it.

Every probe encodes the same pixels: the caller renders the image once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: libwebp's entropy-analysis passes for its rate control (cwebp -pass). Measured:
#: 6 and 10 give the same sizes (its search has converged), fewer overshoot more.
RATE_CONTROL_PASSES = 6
#: Most encodes at a fixed quality after the rate-controlled one: a bisection of
#: 0..100 needs 7; interpolation usually 2-4.
MAX_PROBES = 10
#: libwebp's rate control is kept when it lands this close under (a fraction of
#: the target); further under, quality 100 and the search are tried too.
SLACK = 0.10
#: Close enough: a fitting probe this near the target (a fraction of it) ends the
#: search, though a quality one higher might fit too.
TOLERANCE = 0.03
#: Where the search starts without a bracket: log2 of the size per quality point,
#: about what libwebp does on photos between q50 and q90 (size doubles per ~25).
_LOG2_SIZE_PER_QUALITY = 1 / 25


@dataclass(frozen=True)
class SizeSearch:
    """How an image's size target was met (or not), for ImageFacts."""

    target: int
    #: The quality of the file kept, or None when libwebp's rate control chose it.
    quality: int | None
    #: Encodes of the whole image, the rate-controlled one included.
    encodes: int
    met: bool

    def warning(self, smallest: int) -> str | None:
        if self.met:
            return None
        return (
            f"target size {_kib(self.target, smallest)} unreachable: smallest "
            f"{_kib(smallest, self.target)} at q{self.quality}"
        )


def _kib(size: int, other: int) -> str:
    """``200 KiB``; in bytes when the two figures would read the same."""
    text = f"{size / 1024:.1f}" if size < 10 << 10 else f"{round(size / 1024)}"
    other_text = f"{other / 1024:.1f}" if other < 10 << 10 else f"{round(other / 1024)}"
    return f"{size:,} bytes" if text == other_text else f"{text} KiB"


def fit_to_size(
    target: int,
    at_quality: Callable[[int], bytes],
    rate_controlled: Callable[[], bytes] | None,
    start: int,
) -> tuple[bytes, SizeSearch]:
    """The file to keep for ``target`` bytes and how it was found.

    ``rate_controlled`` encodes with libwebp's own rate control (None where there
    is none: animations, libvips' webpsave); ``at_quality`` encodes at a fixed
    quality; ``start`` is the first quality tried without a bracket."""
    encodes = 0
    controlled: bytes | None = None
    if rate_controlled is not None:
        data = rate_controlled()
        encodes += 1
        if len(data) >= target * (1 - SLACK) and len(data) <= target:
            return data, SizeSearch(target, None, encodes, True)
        if len(data) <= target:
            # Far under: libwebp's search stops at quality 100 (a small image), or
            # misjudged. Quality 100 is tried, then the search goes on from there.
            controlled, start = data, 100
    probes: list[tuple[int, int]] = []  # (quality, size) of every probe
    fits: tuple[int, bytes] | None = None  # the highest quality known to fit
    smallest: tuple[int, bytes] | None = None
    while _bracket(target, probes)[1] - _bracket(target, probes)[0] > 1:
        if encodes >= MAX_PROBES + 1 or (fits and len(fits[1]) >= target * (1 - TOLERANCE)):
            break
        quality = _next_quality(target, probes, start)
        data = at_quality(quality)
        encodes += 1
        probes.append((quality, len(data)))
        if len(data) <= target:
            if fits is None or quality > fits[0]:
                fits = (quality, data)
        elif smallest is None or len(data) < len(smallest[1]):
            smallest = (quality, data)
    if controlled is not None and (fits is None or len(fits[1]) < len(controlled)):
        return controlled, SizeSearch(target, None, encodes, True)
    if fits is not None:
        return fits[1], SizeSearch(target, fits[0], encodes, True)
    assert smallest is not None
    return smallest[1], SizeSearch(target, smallest[0], encodes, False)


def _bracket(target: int, probes: list[tuple[int, int]]) -> tuple[int, int]:
    """The highest quality known to fit and the lowest known to be over (-1 and
    101: none yet). A curve that is not monotonic keeps the best that fits."""
    low = max((q for q, size in probes if size <= target), default=-1)
    high = min((q for q, size in probes if size > target and q > low), default=101)
    return low, high


def _next_quality(target: int, probes: list[tuple[int, int]], start: int) -> int:
    low, high = _bracket(target, probes)
    sizes = dict(probes)
    below = sorted(q for q in sizes if q <= low and sizes[q] <= target)[-2:]
    above = sorted(q for q in sizes if q >= high and sizes[q] > target)[:2]
    if not probes:
        guess = float(start)
    elif below and above and _same_side_twice(target, probes):
        # Interpolation can creep in from one side (regula falsi): halve instead.
        guess = (low + high) / 2
    else:
        # Log size is near linear in quality: interpolate between the bracket's
        # ends, or extrapolate from the two probes nearest on the one side known.
        pair = [low, high] if below and above else (below if below else above)
        guess = _secant(target, pair, sizes)
    return max(low + 1, min(high - 1, math.floor(guess)))


def _same_side_twice(target: int, probes: list[tuple[int, int]]) -> bool:
    sides = [size <= target for _, size in probes[-2:]]
    return len(sides) == 2 and sides[0] == sides[1]


def _secant(target: int, pair: list[int], sizes: dict[int, int]) -> float:
    if len(pair) == 1:
        # One probe: the typical slope of photos between q40 and q90.
        q = pair[0]
        return q + math.log2(target / sizes[q]) / _LOG2_SIZE_PER_QUALITY
    q0, q1 = pair
    log0, log1 = math.log(sizes[q0]), math.log(sizes[q1])
    if log1 == log0:
        return (q0 + q1) / 2
    return q0 + (math.log(target) - log0) * (q1 - q0) / (log1 - log0)


__all__ = ["MAX_PROBES", "RATE_CONTROL_PASSES", "TOLERANCE", "SizeSearch", "fit_to_size"]
