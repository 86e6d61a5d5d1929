"""The executor seam: run per-image jobs somewhere, hand back outcomes.

The local process pool is the first implementation, an in-process one serves
library callers and tests, and a Dask one comes later. All of them pull jobs
lazily from an iterator (so the walk never runs far ahead) and yield outcomes
in completion order.

An executor given a :class:`~optimizr.budget.MemoryBudget` leaves the memory
policy to it and supplies only the mechanism: it starts the job that
``budget.admit(window)`` hands it and calls ``budget.release(job)`` when that job
is over; while jobs run it measures, every ``budget.sample_interval()``, each
busy worker's resident size above its size when it took the job, and the whole
tree's, and passes them to ``budget.observe``; a :class:`~optimizr.budget.Stop`
it answers is carried out by stopping that job (its worker is killed and
replaced) and either putting ``stop.retry`` back among the jobs to start or
yielding the job's outcome with ``stop.error``. A stopped job has no result, so
nothing of it is ever written.

It also tells the budget what its workers cost: ``budget.worker_measured(name,
bytes, fresh=True)`` with a worker's resident size once it is ready to take work
(and, if it can, ``fresh=False`` whenever it takes a job), and
``budget.worker_gone(name)`` once it has exited. A job the budget hands out with
``alone`` set must run with its worker the only one alive, and a fresh one,
because the budget counted only a fresh worker's baseline for it: the executor
stops every other worker (and tells the budget each is gone) before it sends
the job, replaces its own worker first when ``budget.worker_outgrown`` says it
grew (numpy, the heap of earlier images), and, when the job is over, starts them again through
its normal start-up path (a worker gets work only once it is ready). The budget
admits such a job only when nothing else runs, and nothing beside it until it
is released. A Dask executor does the same by retiring the other workers of
its cluster (or running the job on a worker of its own) and scaling back after.
"""

from __future__ import annotations

import contextlib
import select
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optimizr.config import EncodeOptions
from optimizr.encode import Encoded
from optimizr.errors import ImageError

if TYPE_CHECKING:
    from optimizr.executors.worker_io import Stored, WorkerIO


@dataclass(frozen=True)
class Job:
    """One image to convert: plain, picklable data only (never a live image)."""

    id: int
    key: str
    source: str | bytes  # a path the worker may read, or the bytes themselves
    options: EncodeOptions
    #: Estimated peak memory (bytes) the conversion adds to its worker.
    cost: int = 0
    #: Decode the WebP before handing it back (--verify).
    verify: bool = False
    #: Run with no other job, and no other worker, beside it: it was stopped once
    #: for outgrowing its estimate among others (MemoryBudget.observe), or it fits
    #: only in what the other workers' baselines leave free (MemoryBudget.admit).
    alone: bool = False
    #: The image span's W3C trace context and the traces URL, as (key, value) pairs
    #: (tracing.py): the worker makes its phase spans under it. Empty: not traced.
    trace: tuple[tuple[str, str], ...] = ()
    #: For an executor whose workers read and write the stores themselves (a Dask
    #: cluster): where the source is and where its outputs go; ``source`` is then
    #: empty until the worker has read it.
    io: WorkerIO | None = None


class Wakeup:
    """What a job stream yields in place of a job when none is ready yet.

    The executor goes on (dispatches what it has, collects answers) and asks for
    the next job again when ``fileno()`` turns readable or its own poll wakes;
    an executor with nothing else to do calls ``wait``."""

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def ring(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._writer.send(b"\0")  # a full buffer is already a wake-up

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._reader.recv(4096):
                pass

    def wait(self, timeout: float | None = None) -> None:
        select.select([self._reader], [], [], timeout)

    def close(self) -> None:
        self._reader.close()
        self._writer.close()


def first_job(jobs: Iterator[Job | Wakeup]) -> Job | None:
    """The stream's first job (None: it has none), waiting out its wake-ups: no
    worker is started before there is work for it."""
    for item in jobs:
        if not isinstance(item, Wakeup):
            return item
        item.wait(0.25)
    return None


@dataclass(frozen=True)
class Outcome:
    job: Job
    encoded: Encoded | None
    error: ImageError | None
    worker: str = ""
    #: What libvips (or another codec library) said about this image while
    #: converting it, one message per entry: per-image warnings, not log lines.
    warnings: tuple[str, ...] = ()
    #: What the worker wrote itself (a job with ``io``): ``encoded`` then has its
    #: facts but no bytes.
    stored: Stored | None = None


@dataclass(frozen=True)
class WorkerFigures:
    """One worker of a cluster: what it converted and what it cost."""

    name: str
    host: str
    images: int
    busy_seconds: float
    peak_rss_bytes: int


@dataclass(frozen=True)
class ExecutorStatistics:
    workers: int
    started: int
    completed: int
    crashed: int
    timed_out: int
    restarts: int
    #: Seconds from the last job handed to a worker to the last one finishing:
    #: the tail during which fewer than all workers can be busy.
    tail_seconds: float = 0.0
    #: Seconds workers spent holding a job, summed over workers.
    busy_seconds: float = 0.0
    pids: tuple[int, ...] = ()
    #: Jobs being converted right now.
    running: int = 0
    #: Worker processes alive and ready for work (in-process executors count as one).
    alive: int = 0
    #: Jobs stopped because the memory budget said so (run again alone, or failed).
    stopped: int = 0
    #: Jobs run ``alone``: with every other worker retired while they ran.
    alone_runs: int = 0
    #: Workers retired for those jobs, and started again after them.
    workers_retired: int = 0
    workers_restored: int = 0
    #: Workers replaced by a fresh one before such a job, having grown since they started.
    workers_refreshed: int = 0
    #: Per worker of a cluster (empty for a local pool).
    per_worker: tuple[WorkerFigures, ...] = ()
    #: Workers connected to a cluster's scheduler now (None: not a cluster).
    connected: int | None = None
    #: --cluster: conversions killed over their Dask worker's --memory-limit (each
    #: attempt), and Dask workers their nanny restarted over it.
    conversions_over_memory: int = 0
    memory_restarts: int = 0


class Executor(ABC):
    workers: int = 1
    #: Its workers read sources and write outputs themselves (jobs carry ``io``).
    does_io: bool = False
    #: Set when the executor lost its workers for good mid-run (a cluster's
    #: scheduler): the run ends there, with what was committed counted exactly.
    lost: str | None = None

    def memory_capacity(self) -> int | None:
        """The most memory one job may take on any worker, where the workers declare
        it (a Dask worker's MEMORY resource); None: the memory budget decides."""
        return None

    @abstractmethod
    def imap_unordered(self, jobs: Iterable[Job | Wakeup]) -> Iterator[Outcome]:
        """Run jobs, at most ``workers`` at a time, yielding each outcome as it completes.

        The stream may yield a :class:`Wakeup` instead of a job: none is ready yet
        (its source is still being fetched); go on and ask again when it rings."""

    def stop_accepting(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Graceful stop: take no new jobs; let those in flight finish."""

    def abort(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Hard stop: abandon in-flight jobs now."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release workers."""

    @abstractmethod
    def statistics(self) -> ExecutorStatistics: ...

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
