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
    def __init__(
        self,
        workers: int,
        *,
        threads_per_worker: int = 1,
        timeout: float = 300.0,
        max_tasks_per_worker: int | None = None,
    ) -> None:
        self.workers = max(1, workers)
        self.threads_per_worker = max(1, threads_per_worker)
        self.timeout = timeout
        self.max_tasks_per_worker = max_tasks_per_worker
        self._pool: list[_Worker] = []
        self._stopping = False
        self._serial = 0
        self._started = self._completed = self._crashed = self._timed_out = self._restarts = 0

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

    def abort(self) -> None:
        self._stopping = True
        for worker in self._pool:
            if worker.job is not None:
                worker.process.kill()

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics(
            self.workers,
            self._started,
            self._completed,
            self._crashed,
            self._timed_out,
            self._restarts,
        )

    # -- the loop ----------------------------------------------------------------

    def imap_unordered(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        pending = iter(jobs)
        exhausted = False
        while True:
            if not self._stopping and not exhausted:
                exhausted = self._fill(pending)
            busy = [w for w in self._pool if w.job is not None]
            if not busy:
                return
            now = time.monotonic()
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

    def _fill(self, pending: Iterator[Job]) -> bool:
        """Hand a job to every idle worker. Returns True once ``pending`` is exhausted."""
        while True:
            idle = next((w for w in self._pool if w.job is None), None)
            if idle is None and len(self._pool) < self.workers:
                idle = self._spawn()
                self._pool.append(idle)
            if idle is None:
                return False
            job = next(pending, None)
            if job is None:
                return True
            try:
                idle.conn.send(job)
            except OSError:
                self._replace(idle)
                idle = self._pool[-1]
                idle.conn.send(job)
            idle.job, idle.started = job, time.monotonic()
            self._started += 1
            if self._stopping:
                return False

    def _collect(self, worker: _Worker, ready: Sequence[object]) -> Outcome | None:
        job = worker.job
        assert job is not None
        if worker.conn in ready:
            try:
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                return self._crashed_outcome(worker, job)
            worker.job = None
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
            self._timed_out += 1
            self._replace(worker, kill=True)
            error = WorkerCrashed(f"timed out after {self.timeout:g} s; the worker was killed")
            return Outcome(job, None, error, worker.name)
        return None

    def _crashed_outcome(self, worker: _Worker, job: Job) -> Outcome:
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        self._crashed += 1
        self._replace(worker, kill=True)
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
