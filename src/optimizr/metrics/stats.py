"""Small, bounded aggregations for the run summary.

Each holds a fixed amount of memory however many files a run sees: a run over
ten million images must not keep ten million latencies to report a p99.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any


class LogHistogram:
    """Counts in log-spaced buckets, from ``low`` to ``high``, ``per_decade`` a decade.

    Percentiles come back as the upper bound of the bucket they fall in, so they
    are never under-reported and are exact to within one bucket (12% with the
    default 20 buckets a decade). The count, sum and maximum are exact.
    """

    def __init__(self, low: float, high: float, per_decade: int = 20) -> None:
        self.low = low
        self.per_decade = per_decade
        decades = math.log10(high / low)
        self.bounds = [low * 10 ** (i / per_decade) for i in range(int(decades * per_decade) + 1)]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above ``high``
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.max = max(self.max, value)
        if value <= self.low:
            index = 0
        else:
            index = math.ceil(math.log10(value / self.low) * self.per_decade - 1e-9)
            index = min(max(index, 0), len(self.bounds))
        self.counts[index] += 1

    def percentile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return self.max if index >= len(self.bounds) else min(self.bounds[index], self.max)
        return self.max

    def summary(self, digits: int = 4) -> dict[str, float | int]:
        return {
            "count": self.count,
            "mean": round(self.total / self.count, digits) if self.count else 0.0,
            "p50": round(self.percentile(50), digits),
            "p95": round(self.percentile(95), digits),
            "p99": round(self.percentile(99), digits),
            "max": round(self.max, digits),
        }

    def buckets(self) -> list[list[float]]:
        """Non-empty buckets as [upper bound, count] (counts not cumulative)."""
        rows: list[list[float]] = []
        for index, n in enumerate(self.counts):
            if n:
                bound = self.bounds[index] if index < len(self.bounds) else self.max
                rows.append([float(f"{bound:.6g}"), n])
        return rows


@dataclass(order=True)
class _Ranked:
    score: int
    order: int
    item: dict[str, Any] = field(compare=False)


class TopN:
    """The ``n`` items with the highest score seen so far."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self._heap: list[_Ranked] = []
        self._order = 0

    def offer(self, score: int, item: dict[str, Any]) -> None:
        self._order += 1
        # Ties go to the earlier item: deterministic output for a given walk order.
        ranked = _Ranked(score, -self._order, item)
        if len(self._heap) < self.n:
            heapq.heappush(self._heap, ranked)
        elif ranked > self._heap[0]:
            heapq.heapreplace(self._heap, ranked)

    def items(self) -> list[dict[str, Any]]:
        return [r.item for r in sorted(self._heap, reverse=True)]


class Timeline:
    """Cumulative progress sampled at most every ``interval`` seconds.

    When it reaches ``max_points`` it keeps every other point and doubles the
    interval, so a week-long run has as many points as a minute-long one.
    """

    def __init__(self, interval: float = 0.1, max_points: int = 720) -> None:
        self.interval = interval
        self.max_points = max_points
        self.start = time.monotonic()
        self.points: list[list[float]] = []
        self._last = -math.inf

    def sample(self, *values: float, force: bool = False) -> None:
        now = time.monotonic() - self.start
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.points.append([round(now, 3), *values])
        if len(self.points) > self.max_points:
            self.points = self.points[::2]
            self.interval *= 2
