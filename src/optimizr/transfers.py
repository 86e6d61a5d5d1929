"""Network I/O of a run on its own bounded pool of threads.

An image on an object store costs one GET before it can be converted and one
PUT (and a HEAD of its source) after: 50-100 ms each on a real network, while a
small photo takes 20-100 ms of CPU. Done on the pipeline's thread, those waits
would leave the CPU workers idle most of the time; so they run here, up to
``concurrency`` at once, while the workers convert what is already fetched
(Little's law: to keep W workers busy when an image spends L seconds in
requests and C seconds in the codec, about W * (1 + L / C) requests must be in
flight; see ``default_io_concurrency``).

The pipeline's thread submits work and collects what finished; nothing here
touches the manifest or the summary (one writer, that thread). A completion
writes a byte to a socket the executor's poll also watches, so an idle worker
is handed a fetched image at once rather than at its next quarter-second wake.

The bytes held for transfers (a fetched source until its image is committed,
an output until it is uploaded) are held in the run's MemoryBudget.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizr.budget import MemoryBudget
from optimizr.executors.base import Wakeup


def default_io_concurrency(workers: int) -> int:
    """Requests in flight when --io-concurrency is not given.

    With 50-100 ms per request and 2-3 requests per image, an image spends about
    0.3 s waiting on the network; a small photo converts in 30-100 ms of CPU.
    W * (1 + 0.3 / 0.05) is about 7 W: 8 per worker keeps every worker busy on
    those, and costs only idle threads where the store is near (the bytes in
    flight are bounded by --max-memory either way)."""
    return max(8, 8 * workers)


@dataclass
class TransferStatistics:
    fetches: int = 0
    fetch_bytes: int = 0
    fetch_seconds: float = 0.0
    uploads: int = 0
    upload_bytes: int = 0
    upload_seconds: float = 0.0
    #: Most transfers in flight at once.
    peak_in_flight: int = 0
    #: Times the pipeline had a file to fetch but every slot (or the budget) was taken.
    waited: int = 0
    #: Sources fetched into a spool file rather than memory (--spool-above).
    spooled: int = 0

    def to_dict(self, concurrency: int) -> dict[str, Any]:
        return {
            "concurrency": concurrency,
            "fetches": self.fetches,
            "fetch_bytes": self.fetch_bytes,
            "fetch_seconds": round(self.fetch_seconds, 3),
            "uploads": self.uploads,
            "upload_bytes": self.upload_bytes,
            "upload_seconds": round(self.upload_seconds, 3),
            "peak_in_flight": self.peak_in_flight,
            "waited": self.waited,
            "spooled": self.spooled,
        }


class Transfers:
    """A bounded pool of I/O threads whose results the submitting thread collects."""

    def __init__(self, concurrency: int, budget: MemoryBudget | None = None) -> None:
        self.concurrency = max(1, concurrency)
        self.budget = budget
        self.wakeup = Wakeup()
        self.stats = TransferStatistics()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="optimizr-io")
        self._done: queue.SimpleQueue[tuple[object, Future[Any]]] = queue.SimpleQueue()
        self._in_flight = 0
        self._held = 0
        self._lock = threading.Lock()
        self._spool_dir: Path | None = None
        self._spooled = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def has_room(self, size: int) -> bool:
        """May another transfer of ``size`` bytes start now? A free thread and, with a
        budget, the bytes free in it; with nothing in flight it may always start
        (an object bigger than the budget is still fetched, alone)."""
        if self._in_flight >= self.concurrency:
            return False
        if self.budget is None or self._held == 0:
            return True
        return self.budget.in_use + size <= self.budget.capacity

    def hold(self, size: int) -> None:
        """Count ``size`` bytes of transfer buffers against the budget."""
        self._held += size
        if self.budget is not None:
            self.budget.hold(size)

    def free(self, size: int) -> None:
        self._held -= size
        if self.budget is not None:
            self.budget.free(size)

    def spool_path(self) -> Path:
        """A new file name in the run's spool folder (made on first use, removed by
        ``close`` with whatever is left in it)."""
        if self._spool_dir is None:
            self._spool_dir = Path(tempfile.mkdtemp(prefix="optimizr-spool-"))
        self._spooled += 1
        self.stats.spooled += 1
        return self._spool_dir / f"source-{self._spooled}"

    def submit(self, tag: object, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on an I/O thread; ``collect`` hands back (tag, future) once done."""
        with self._lock:
            self._in_flight += 1
            self.stats.peak_in_flight = max(self.stats.peak_in_flight, self._in_flight)
        future = self._pool.submit(fn)
        future.add_done_callback(lambda f: self._finished(tag, f))

    def _finished(self, tag: object, future: Future[Any]) -> None:
        self._done.put((tag, future))
        self.wakeup.ring()

    def collect(self, *, block: bool = False) -> list[tuple[object, Future[Any]]]:
        """The transfers finished since the last call; with ``block``, wait for one
        (if any is in flight)."""
        self.wakeup.clear()
        done: list[tuple[object, Future[Any]]] = []
        if block and self._in_flight:
            done.append(self._done.get())
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._in_flight -= len(done)
        return done

    def timed(self, kind: str, size: int, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn`` that adds its time and ``size`` to this pool's ``kind`` figures."""

        def run() -> Any:
            start = time.perf_counter()
            try:
                return fn()
            finally:
                elapsed = time.perf_counter() - start
                with self._lock:
                    if kind == "fetch":
                        self.stats.fetches += 1
                        self.stats.fetch_bytes += size
                        self.stats.fetch_seconds += elapsed
                    else:
                        self.stats.uploads += 1
                        self.stats.upload_bytes += size
                        self.stats.upload_seconds += elapsed

        return run

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.wakeup.close()
        if self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)
