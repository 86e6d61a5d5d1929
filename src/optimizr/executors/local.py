"""A pool of worker processes that a crashing or hanging codec cannot take down.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers
dies, the whole pool breaks and every job in flight fails with it, with no
way to tell which image was to blame. Here each worker runs one job at a time
over its own pipe, so the parent always knows which image a dead or stuck
worker was holding: that image fails with the cause (``worker crashed:
SIGSEGV``, ``timed out after 300 s``), the worker is replaced, and the run goes on.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from optimizr.budget import MemoryBudget
from optimizr.errors import ImageError, WorkerCrashed
from optimizr.executors.base import Executor, ExecutorStatistics, Job, Outcome
from optimizr.executors.worker import worker_main

# spawn, not fork: the parent may run threads (the progress display), and a
# forked child inherits their locks mid-air.
_CTX = multiprocessing.get_context("spawn")


@dataclass
class _Worker:
    process: BaseProcess
    conn: Connection
    name: str
    job: Job | None = None
    started: float = 0.0
    tasks_done: int = 0


class ProcessExecutor(Executor):
    """Worker processes, one job each at a time.

    Jobs are pulled lazily into a small lookahead window; from it the largest
    job that the memory budget admits goes first, so the run does not end with
    one core busy on the biggest photo while the others idle. A job the budget
    cannot admit yet holds back smaller ones that would delay it further.
    """

    def __init__(
        self,
        workers: int,
        *,
        threads_per_worker: int = 1,
        timeout: float = 300.0,
        max_tasks_per_worker: int | None = None,
        budget: MemoryBudget | None = None,
        lookahead: int | None = None,
        grace: float | None = None,
    ) -> None:
        self.workers = max(1, workers)
        self.threads_per_worker = max(1, threads_per_worker)
        self.timeout = timeout
        self.max_tasks_per_worker = max_tasks_per_worker
        self.budget = budget
        self.lookahead = max(1, lookahead if lookahead is not None else 4 * self.workers)
        self.grace = grace
        self._pool: list[_Worker] = []
        self._stopping = False
        self._aborted = False
        self._stop_deadline: float | None = None
        self._serial = 0
        self._started = self._completed = self._crashed = self._timed_out = self._restarts = 0
        self._last_dispatch = self._last_done = 0.0
        self._busy_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = _CTX.Pipe(duplex=True)
        self._serial += 1
        name = f"worker-{self._serial}"
        process = _CTX.Process(
            target=worker_main, args=(child_conn, self.threads_per_worker), name=name, daemon=True
        )
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn, name)

    def _retire(self, worker: _Worker, *, kill: bool) -> None:
        if kill and worker.process.is_alive():
            worker.process.kill()
        else:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        worker.process.join(timeout=5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(timeout=5)
        worker.conn.close()

    def close(self) -> None:
        for worker in self._pool:
            self._retire(worker, kill=worker.job is not None)
        self._pool.clear()

    def stop_accepting(self) -> None:
        self._stopping = True
        if self.grace is not None and self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.grace

    def abort(self) -> None:
        self._stopping = True
        self._aborted = True
        for worker in self._pool:
            if worker.job is not None:
                worker.process.kill()

    def statistics(self) -> ExecutorStatistics:
        tail = max(0.0, self._last_done - self._last_dispatch) if self._last_done else 0.0
        return ExecutorStatistics(
            self.workers,
            self._started,
            self._completed,
            self._crashed,
            self._timed_out,
            self._restarts,
            tail,
            self._busy_seconds,
            tuple(w.process.pid for w in self._pool if w.process.pid is not None),
            running=sum(1 for w in list(self._pool) if w.job is not None),
            alive=sum(1 for w in list(self._pool) if w.process.is_alive()),
        )

    # -- the loop ----------------------------------------------------------------

    def imap_unordered(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        pending = iter(jobs)
        window: list[Job] = []
        exhausted = False
        while True:
            if self._stopping:
                window.clear()
            else:
                while not exhausted and len(window) < self.lookahead:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                    else:
                        window.append(job)
                self._dispatch(window)
            busy = [w for w in self._pool if w.job is not None]
            if not busy:
                if window and not self._stopping:
                    continue  # nothing running: _dispatch admits the next job
                return
            now = time.monotonic()
            if self._stop_deadline is not None and now > self._stop_deadline:
                self.abort()
            nearest = min(w.started + self.timeout for w in busy)
            # Wake at least every quarter second so a stop request is seen promptly.
            ready = wait(
                [w.conn for w in busy] + [w.process.sentinel for w in busy],
                timeout=max(0.0, min(0.25, nearest - now)),
            )
            for worker in busy:
                outcome = self._collect(worker, ready)
                if outcome is not None:
                    yield outcome

    def _dispatch(self, window: list[Job]) -> None:
        """Give idle workers the largest jobs of the window that the budget admits."""
        window.sort(key=lambda job: job.cost, reverse=True)
        while window:
            idle = next((w for w in self._pool if w.job is None), None)
            if idle is None and len(self._pool) < self.workers:
                idle = self._spawn()
                self._pool.append(idle)
            if idle is None:
                return
            job = self._admit(window)
            if job is None:
                return
            self._send(idle, job)

    def _admit(self, window: list[Job]) -> Job | None:
        if self.budget is None:
            return window.pop(0)
        running = any(w.job is not None for w in self._pool)
        head = window[0]
        if self.budget.try_acquire(head.cost):
            return window.pop(0)
        if not running:
            # Bigger than what is free with nothing running: it runs alone.
            self.budget.force_acquire(head.cost)
            return window.pop(0)
        # The largest job waits for memory; smaller ones may go only if they
        # leave room for it, or it could wait behind them for ever.
        for index, job in enumerate(window[1:], start=1):
            if self.budget.try_acquire(job.cost, reserve=head.cost):
                return window.pop(index)
        return None

    def _send(self, worker: _Worker, job: Job) -> None:
        try:
            worker.conn.send(job)
        except OSError:
            self._replace(worker)
            worker = self._pool[-1]
            worker.conn.send(job)
        worker.job, worker.started = job, time.monotonic()
        self._started += 1
        self._last_dispatch = worker.started

    def _collect(self, worker: _Worker, ready: Sequence[object]) -> Outcome | None:
        job = worker.job
        assert job is not None
        if worker.conn in ready:
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                return self._crashed_outcome(worker, job)
            self._finish(worker)
            worker.tasks_done += 1
            self._completed += 1
            if self.max_tasks_per_worker and worker.tasks_done >= self.max_tasks_per_worker:
                self._replace(worker)
            if kind == "ok":
                return Outcome(job, payload, None, worker.name)
            error = payload if isinstance(payload, ImageError) else WorkerCrashed(str(payload))
            return Outcome(job, None, error, worker.name)
        if worker.process.sentinel in ready:
            return self._crashed_outcome(worker, job)
        if time.monotonic() - worker.started > self.timeout:
            self._finish(worker)
            self._timed_out += 1
            self._replace(worker, kill=True)
            error = WorkerCrashed(f"timed out after {self.timeout:g} s; the worker was killed")
            return Outcome(job, None, error, worker.name)
        return None

    def _finish(self, worker: _Worker) -> None:
        if self.budget is not None and worker.job is not None:
            self.budget.release(worker.job.cost)
        now = time.monotonic()
        self._busy_seconds += now - worker.started
        self._last_done = now
        worker.job = None

    def _crashed_outcome(self, worker: _Worker, job: Job) -> Outcome | None:
        self._finish(worker)
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        self._replace(worker, kill=True)
        if self._aborted:
            return None  # killed by us: abandoned, not failed
        self._crashed += 1
        return Outcome(job, None, WorkerCrashed(_describe_exit(code)), worker.name)

    def _replace(self, worker: _Worker, *, kill: bool = False) -> None:
        self._retire(worker, kill=kill)
        index = self._pool.index(worker)
        self._restarts += 1
        if self._stopping:
            del self._pool[index]
            return
        self._pool[index] = self._spawn()
        # Keep the replacement at the end so callers can find it.
        self._pool.append(self._pool.pop(index))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (killed: out of memory?)" if name == "SIGKILL" else ""
        return f"{name}{hint}"
    return f"the worker exited with status {code}"
