"""A Dask worker's conversion children, kept within what its ``--memory-limit`` leaves.

Dask's nanny enforces ``--memory-limit`` on the worker process alone: it reads
that one process's resident size (``psutil.Process(pid).memory_info().rss`` in
``NannyMemoryManager.memory_monitor``, distributed/worker_memory.py) and restarts
the worker once it passes ``distributed.worker.memory.terminate`` (95 %) of the
limit. The images are converted in child processes of the worker (dask.py),
which it never counts: a decode that balloons there would go on to take the
machine's memory (the kernel's OOM killer, or a container's, then picks a
victim), not merely the worker's (issue 15).

So each Dask worker watches its own children, with the nanny's threshold: the
children together may use the limit's terminate fraction less what the worker
itself used as it started. The worker's own growth past that stays the nanny's
to judge: an image is never blamed for a leak of the worker, nor a worker
restarted for an image's decode. Past the ceiling the busy child using the most
is killed (a SIGKILL, as a hung one is), and its image fails with
:class:`~optimizr.errors.OverWorkerMemory`, which the coordinator treats as a
nanny restart: run again on another worker, then alone, then failed.

The children are sampled from /proc by a thread of the worker, as the local pool
samples its workers (budget.py): every 5 ms near the ceiling, less often (at
most every 100 ms, the nanny's own interval) far below it, reckoning with a
decode growing by up to 4 GiB a second.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from optimizr.budget import GROWTH_RATE, SAMPLE_INTERVAL
from optimizr.errors import OverWorkerMemory
from optimizr.metrics.memory import rss_of

if TYPE_CHECKING:
    from optimizr.executors.local import ProcessExecutor

logger = logging.getLogger(__name__)

#: The longest pause between two samples: the nanny's own monitor interval.
SAMPLE_INTERVAL_MAX = 0.1
_MIB = 1 << 20


class ConversionMemoryWatch:
    """Kills the conversion child that takes the children of ``pools`` (this worker's
    pools of one child each) past ``limit`` x ``fraction`` less the worker's own size."""

    def __init__(
        self,
        limit: int,
        fraction: float,
        pools: Sequence[ProcessExecutor],
        *,
        worker_size: int | None = None,
    ) -> None:
        self.limit = limit
        self.fraction = fraction
        #: The worker process as it starts: what it keeps of the limit for itself.
        self.worker_size = rss_of(os.getpid()) if worker_size is None else worker_size
        #: What the children may use together.
        self.ceiling = int(limit * fraction) - self.worker_size
        self.stopped = 0
        self._pools = tuple(pools)
        #: Pools converting an image now: pool -> (its key, its job id).
        self._running: dict[ProcessExecutor, tuple[str, int]] = {}
        self._verdicts: dict[int, OverWorkerMemory] = {}
        self._lock = threading.Lock()
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="optimizr-memory", daemon=True)
        if self.ceiling < 64 * _MIB:
            logger.warning(
                "--memory-limit %d MiB leaves the conversions %d MiB beside this worker's "
                "own %d MiB: most images will be stopped as out of memory",
                limit // _MIB,
                self.ceiling // _MIB,
                self.worker_size // _MIB,
            )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._quit.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @contextmanager
    def running(self, pool: ProcessExecutor, key: str, job_id: int) -> Iterator[None]:
        """While ``pool`` converts ``key``: its child may be stopped."""
        with self._lock:
            self._running[pool] = (key, job_id)
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(pool, None)

    def verdict(self, job_id: int) -> OverWorkerMemory | None:
        """Why job ``job_id``'s child was killed, if this watch killed it (asked once)."""
        with self._lock:
            return self._verdicts.pop(job_id, None)

    def _loop(self) -> None:
        interval = SAMPLE_INTERVAL
        while not self._quit.wait(interval):
            headroom = self.sample()
            interval = min(SAMPLE_INTERVAL_MAX, max(SAMPLE_INTERVAL, headroom / GROWTH_RATE))

    def sample(self) -> int:
        """Measure the children, kill the biggest busy one if they are over the
        ceiling; the headroom left (negative: over)."""
        # Read from this thread while the pools run in the task threads: their
        # statistics() is safe to ask from another thread (the local metrics do).
        pids = {pool: pool.statistics().pids for pool in self._pools}
        sizes = {pid: rss_of(pid) for each in pids.values() for pid in each}
        total = sum(sizes.values())
        if total <= self.ceiling:
            return self.ceiling - total
        with self._lock:
            busy = [
                (sizes[pid], pid, key, job_id)
                for pool, (key, job_id) in self._running.items()
                for pid in pids.get(pool, ())
                if job_id not in self._verdicts
            ]
            if not busy:
                return self.ceiling - total  # idle children only: they are what they are
            size, pid, key, job_id = max(busy)
            self._verdicts[job_id] = OverWorkerMemory(
                f"out of memory: its conversion grew to {size // _MIB:,} MiB, past the "
                f"{self.ceiling // _MIB:,} MiB the Dask worker's --memory-limit "
                f"{self.limit // _MIB:,} MiB leaves its conversions ({self.fraction:.0%} of "
                f"it, less the worker's own {self.worker_size // _MIB:,} MiB)"
            )
            self.stopped += 1
        logger.warning(
            "%s: its conversion process %d at %d MiB took the conversions past %d MiB "
            "(--memory-limit %d MiB); killed",
            key,
            pid,
            size // _MIB,
            self.ceiling // _MIB,
            self.limit // _MIB,
        )
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended meanwhile: its pool reports what became of the image
        return self.ceiling - total
