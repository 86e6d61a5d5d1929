"""What a run tells the outside while it goes, and how it is asked to stop.

Listeners (the progress display, logs, the Prometheus exporter) are told about
each file as it finishes and may poll a :class:`RunSnapshot` at any time;
:class:`StopToken` carries Ctrl-C and SIGTERM into the pipeline and executor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from optimizr.executors.base import Executor
from optimizr.results import Result


@dataclass(frozen=True)
class RunSnapshot:
    """The state of a run at one instant, for exporters that poll (Prometheus,
    health checks, the progress display). Built from each component's own
    statistics; safe to ask for from another thread."""

    found: int
    walk_done: bool
    finished: int
    converted: int
    skipped: int
    failed: int
    bytes_in: int
    bytes_out: int
    #: Images a worker is converting right now.
    running: int
    #: Images planned and waiting for a worker or for memory (the lookahead window).
    queued: int
    workers: int
    #: Worker processes alive: the run is ready once this is non-zero.
    workers_alive: int
    worker_restarts: int
    budget_total: int
    budget_in_use: int
    #: A graceful stop was asked for (in-flight images finishing), or an abort.
    draining: bool
    #: time.monotonic() of the last image finished (or of the start).
    last_progress: float
    #: Source bytes of the files the pipeline's walk listed, and of those finished
    #: (any outcome): what an ETA in bytes is measured against.
    found_bytes: int = 0
    finished_bytes: int = 0
    #: The count pass (optimizr.count), which runs ahead of the throttled walk.
    counted: int = 0
    counted_bytes: int = 0
    count_done: bool = False
    #: --cluster: the Dask workers connected to the scheduler now (None: a local pool).
    workers_connected: int | None = None

    @property
    def total(self) -> int | None:
        """How many files the run will have seen, once anyone knows (see known_total)."""
        return known_total(self.found, self.walk_done, self.counted, self.count_done)

    @property
    def total_bytes(self) -> int | None:
        return known_total(self.found_bytes, self.walk_done, self.counted_bytes, self.count_done)


def known_total(walked: int, walk_done: bool, counted: int, count_done: bool) -> int | None:
    """The pipeline's walk when it has finished (it is the authority: files may
    come and go during a run), else the count pass's figure (never less than the
    walk has already seen), else None: not known yet."""
    if walk_done:
        return walked
    if count_done:
        return max(counted, walked)
    return None


class ProgressListener(Protocol):
    """What a progress display or exporter is told. All calls come from the
    pipeline's thread, except that ``snapshot`` (given to ``started``) may be
    called from any thread."""

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None: ...
    def found(self, count: int) -> None: ...
    def finished(self, result: Result) -> None: ...
    def walk_done(self, total: int) -> None: ...
    def stopping(self, hard: bool) -> None: ...


class Listeners:
    """Tells several listeners the same things, in order."""

    def __init__(self, *listeners: ProgressListener) -> None:
        self.listeners = listeners

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        for listener in self.listeners:
            listener.started(snapshot)

    def found(self, count: int) -> None:
        for listener in self.listeners:
            listener.found(count)

    def finished(self, result: Result) -> None:
        for listener in self.listeners:
            listener.finished(result)

    def walk_done(self, total: int) -> None:
        for listener in self.listeners:
            listener.walk_done(total)

    def stopping(self, hard: bool) -> None:
        for listener in self.listeners:
            listener.stopping(hard)


@dataclass
class StopToken:
    """Asked once: finish what is in flight. Asked twice: abort now.

    ``signum`` is the signal that first asked (None when asked by a caller),
    so the run's exit code can say which one stopped it (130 SIGINT, 143 SIGTERM).
    """

    graceful: bool = False
    hard: bool = False
    signum: int | None = None
    _listeners: list[Executor] = field(default_factory=list)

    def request(self, signum: int | None = None) -> None:
        if self.signum is None:
            self.signum = signum
        if self.graceful:
            self.hard = True
            for executor in self._listeners:
                executor.abort()
        else:
            self.graceful = True
            for executor in self._listeners:
                executor.stop_accepting()

    def attach(self, executor: Executor) -> None:
        self._listeners.append(executor)
        if self.hard:
            executor.abort()
        elif self.graceful:
            executor.stop_accepting()
