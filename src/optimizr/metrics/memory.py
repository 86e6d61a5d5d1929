"""Resident memory of the whole process tree (this process and its workers),
sampled in the background: the figure the memory budget is a ceiling on."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_of(pid: int) -> int:
    """Resident bytes of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
        return int(fields[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def private_rss_of(pid: int) -> int:
    """Resident bytes of one process less those of the files it maps (its libraries, a
    snapshot it sends): the memory it owns, glibc's free lists included (0 if gone)."""
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (children, grandchildren, ...), from /proc."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                text = Path(f"/proc/{parent}/task/{tid}/children").read_text()
            except OSError:
                continue
            for child in text.split():
                found.append(int(child))
                stack.append(int(child))
    return found


def tree_rss(pid: int | None = None) -> int:
    root = os.getpid() if pid is None else pid
    return sum(rss_of(p) for p in (root, *descendants(root)))


@dataclass(frozen=True)
class MemoryStatistics:
    peak_bytes: int
    samples: int
    timeline: tuple[tuple[float, int], ...] = field(default_factory=tuple)


class TreeMemorySampler:
    """Samples :func:`tree_rss` every ``interval`` seconds on a daemon thread."""

    def __init__(
        self,
        interval: float = 0.05,
        *,
        pid: int | None = None,
        keep_timeline: int = 600,
        measure: Callable[[], int] | None = None,
    ) -> None:
        self.interval = interval
        self.pid = pid
        self.keep_timeline = keep_timeline
        self._measure = measure or (lambda: tree_rss(self.pid))
        self._peak = 0
        self._samples = 0
        self._timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> TreeMemorySampler:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemoryStatistics:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.statistics()

    def sample(self) -> int:
        value = self._measure()
        self._samples += 1
        self._peak = max(self._peak, value)
        elapsed = time.monotonic() - self._started
        if len(self._timeline) >= self.keep_timeline:
            # Halve the resolution rather than grow: memory stays flat on long runs.
            self._timeline = self._timeline[::2]
        self._timeline.append((round(elapsed, 3), value))
        return value

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def statistics(self) -> MemoryStatistics:
        return MemoryStatistics(self._peak, self._samples, tuple(self._timeline))
