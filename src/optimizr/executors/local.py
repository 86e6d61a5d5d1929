"""A pool of worker processes that a crashing or hanging codec cannot take down.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers
dies, the whole pool breaks and every job in flight fails with it, with no
way to tell which image was to blame. Here each worker runs one job at a time
over its own socket, so the parent always knows which image a dead or stuck
worker was holding: that image fails with the cause (``worker crashed:
SIGSEGV``, ``timed out after 300 s``), the worker is replaced, and the run goes on.

Why not ``multiprocessing`` either: its spawn start method re-imports the
caller's ``__main__`` in every worker, so a script without an ``if __name__ ==
"__main__":`` guard, or one piped to ``python -``, ran itself again in each
worker, which died, and its images were recorded as crashed for good (issue
10). A worker here is an interpreter of its own running ``worker.main``, with
the parent's ``sys.path`` (so it imports the same optimizr) and nothing else of
the caller's. It says "ready" once its imports and libvips set-up are done:
only then is it given a job, and the job's timeout starts when it is handed
over. Workers start when the first job comes (a re-run with nothing to do
starts none). A worker that dies before it is ready, or while idle, is
replaced without failing any image; when workers keep dying before they are
ready, the pool raises :class:`~optimizr.errors.WorkerStartFailed` (before the
first image is given out, on a broken installation).

A worker's stdout and stderr go to an in-memory file that the parent reads
between jobs: whatever a codec printed while converting an image becomes one
of that image's warnings, never a raw line on the parent's stderr (which
``--log-format json`` keeps pure JSON), and what a dying worker printed still
reaches the parent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from optimizr.budget import MemoryBudget, Stop
from optimizr.errors import ImageError, WorkerCrashed, WorkerStartFailed
from optimizr.executors.base import (
    Executor,
    ExecutorStatistics,
    Job,
    Outcome,
    Wakeup,
    first_job,
)
from optimizr.executors.codec_messages import last_line, tidy
from optimizr.metrics.memory import rss_of

if TYPE_CHECKING:
    from optimizr.config import RunConfig

logger = logging.getLogger(__name__)

#: The parent's sys.path, as JSON, for the worker to import from.
PATH_ENV = "OPTIMIZR_WORKER_PATH"
# -P: nothing from the working directory shadows json or os before sys.path is set.
_BOOTSTRAP = (
    f"import json, os, sys; sys.path[:] = json.loads(os.environ.pop({PATH_ENV!r})); "
    "from optimizr.executors.worker import main; main()"
)
# Mirrors worker.STOP_SIGNALS; the worker module is not imported by the parent.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: The most of a worker's output kept at a time (its end: a traceback's verdict).
_OUTPUT_LIMIT = 64 << 10


class CapturedOutput:
    """A worker's stdout and stderr: an in-memory file the parent empties between jobs."""

    def __init__(self) -> None:
        memfd_create = getattr(os, "memfd_create", None)
        if memfd_create is not None:
            self.fd: int = memfd_create("optimizr-worker-output")
        else:  # not Linux
            with tempfile.TemporaryFile() as spill:
                self.fd = os.dup(spill.fileno())
        # O_APPEND (shared with the worker's copy of the descriptor): its writes
        # always land at the current end, so emptying the file between jobs
        # never leaves a hole in front of the next message.
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_APPEND)

    def take(self) -> str:
        """What the worker printed since the last call (its last 64 KiB at most)."""
        size = os.fstat(self.fd).st_size
        if not size:
            return ""
        start = max(0, size - _OUTPUT_LIMIT)
        data = os.pread(self.fd, size - start, start)
        os.ftruncate(self.fd, 0)
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    conn: Connection
    output: CapturedOutput
    name: str
    spawned: float
    ready: bool = False
    job: Job | None = None
    started: float = 0.0
    tasks_done: int = 0
    #: Resident size of the process when it was handed its job: its idle size.
    baseline: int = 0


def local_pool(run: RunConfig, workers: int, budget: MemoryBudget) -> ProcessExecutor:
    """The crash-proof pool a run's settings ask for (``convert`` and ``watch``)."""
    from optimizr.config import available_cpus

    return ProcessExecutor(
        workers,
        # workers x libvips threads never exceeds the cores: no oversubscription.
        threads_per_worker=max(1, available_cpus() // workers),
        timeout=run.timeout,
        max_tasks_per_worker=run.max_tasks_per_worker,
        budget=budget,
        lookahead=max(1, run.lookahead_per_worker * workers),
        grace=run.grace,
    )


class ProcessExecutor(Executor):
    """Worker processes, one job each at a time.

    Jobs are pulled lazily into a small lookahead window; from it the largest
    job that the memory budget admits goes first, so the run does not end with
    one core busy on the biggest photo while the others idle. A job the budget
    cannot admit yet holds back smaller ones that would delay it further.

    ``python`` is the command a worker's interpreter starts with (default: this
    one, ``sys.executable``); ``start_timeout`` bounds how long a worker may take
    to become ready, and ``max_start_failures`` how many may die in a row before
    they are ready, before the pool gives up with WorkerStartFailed.

    With a budget, every busy worker's resident size is read from /proc in the
    loop that waits for answers (no thread of its own), as often as the budget
    asks (every 5 ms near its ceiling), and handed to the budget, which
    decides; a job it stops is killed with its worker, as a hung one is, and
    goes back to the window or fails. Each worker's idle size is measured when
    it says ready and when it takes a job, for the budget's capacity.

    A job the budget hands out ``alone`` runs with its worker the only one
    alive: the others (idle, since an alone job waits until nothing runs) are
    asked to exit, or killed while still starting, before it is sent; once it
    is over, and no other job to run alone follows at once, the pool is
    topped up again with new workers, each given work after its ready
    handshake as at the start.
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
        start_timeout: float = 60.0,
        max_start_failures: int = 3,
        python: Sequence[str] | None = None,
    ) -> None:
        self.workers = max(1, workers)
        self.threads_per_worker = max(1, threads_per_worker)
        self.timeout = timeout
        self.max_tasks_per_worker = max_tasks_per_worker
        self.budget = budget
        self.lookahead = max(1, lookahead if lookahead is not None else 4 * self.workers)
        self.grace = grace
        self.start_timeout = start_timeout
        self.max_start_failures = max(1, max_start_failures)
        self.python = tuple(python) if python else (sys.executable,)
        self._next_sample = 0.0
        #: Jobs the budget stopped, to go back into the window.
        self._requeued: list[Job] = []
        self._stopped = 0
        self._pool: list[_Worker] = []
        self._stopping = False
        self._aborted = False
        self._stop_deadline: float | None = None
        self._serial = 0
        self._failed_starts = 0  # in a row, since a worker last became ready
        self._started = self._completed = self._crashed = self._timed_out = self._restarts = 0
        self._last_dispatch = self._last_done = 0.0
        self._busy_seconds = 0.0
        #: Jobs run with the other workers retired; workers retired and started again for them.
        self._alone_runs = self._retired_for_alone = self._restored = 0
        #: Workers replaced by a fresh one before an alone job, having grown.
        self._refreshed_for_alone = 0

    # -- lifecycle -------------------------------------------------------------

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        output = CapturedOutput()
        self._serial += 1
        name = f"worker-{self._serial}"
        threads = str(self.threads_per_worker)
        env = {**os.environ, PATH_ENV: json.dumps(sys.path), "VIPS_CONCURRENCY": threads}
        command = [*self.python, "-P", "-c", _BOOTSTRAP, str(theirs.fileno()), threads]
        # Blocked here, SIGINT and SIGTERM stay blocked in the new process until
        # it ignores them: a Ctrl-C while it starts up cannot kill it. It stays
        # in our process group, so the terminal's Ctrl-C still reaches it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output.fd,
                stderr=output.fd,
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        except OSError as exc:
            ours.close()
            output.close()
            raise WorkerStartFailed(
                f"cannot start a worker process ({self.python[0]}): {exc.strerror or exc}"
            ) from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            theirs.close()
        return _Worker(process, Connection(ours.detach()), output, name, time.monotonic())

    def _start(self) -> None:
        """Bring every worker up before the first job is given out: a pool that
        cannot start stops the run before any image is in a worker, so none is
        recorded as failed; every worker is ready for the first dispatch."""
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn())
        self._await_ready()

    def _await_ready(self) -> None:
        """Wait until every worker of the pool is ready (or the run stops). Only
        while no job is out: no outcome can come meanwhile."""
        while not self._stopping and not all(w.ready for w in self._pool):
            for outcome in self._poll():
                raise AssertionError(f"an outcome while no job ran: {outcome.job.key}")

    def _retire(self, worker: _Worker, *, kill: bool, asked: bool = False) -> None:
        """End a worker: ask an idle, ready one to leave (unless ``asked`` already), kill others."""
        if kill or not worker.ready or worker.job is not None:
            _kill(worker.process)
        elif not asked:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        try:
            worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(worker.process)
            worker.process.wait(timeout=5)
        worker.conn.close()
        self._log_output(worker, worker.output.take())
        worker.output.close()
        if self.budget is not None:
            self.budget.worker_gone(worker.name)

    def close(self) -> None:
        # Ask every idle worker to leave first, so that they all exit at once.
        asked = _ask_to_leave(self._pool)
        for worker in self._pool:
            self._retire(worker, kill=worker.job is not None, asked=worker.name in asked)
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
                _kill(worker.process)

    def statistics(self) -> ExecutorStatistics:
        pool = list(self._pool)  # may be asked from another thread (metrics)
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
            tuple(w.process.pid for w in pool),
            running=sum(1 for w in pool if w.job is not None),
            alive=sum(1 for w in pool if w.ready and w.process.returncode is None),
            stopped=self._stopped,
            alone_runs=self._alone_runs,
            workers_retired=self._retired_for_alone,
            workers_refreshed=self._refreshed_for_alone,
            workers_restored=self._restored,
        )

    # -- the loop ----------------------------------------------------------------

    def imap_unordered(self, jobs: Iterable[Job | Wakeup]) -> Iterator[Outcome]:
        pending = iter(jobs)
        first = first_job(pending)
        if first is None:
            return  # nothing to convert (a re-run with all up to date): no worker needed
        self._start()
        window: list[Job] = [first]
        exhausted = False
        while True:
            # Set while the stream has nothing ready: it is watched with the workers.
            wakeup: Wakeup | None = None
            if self._stopping:
                window.clear()
                self._requeued.clear()
            else:
                window.extend(self._requeued)
                self._requeued.clear()
                while not exhausted and len(window) < self.lookahead:
                    job = next(pending, None)
                    if job is None:
                        exhausted = True
                    elif isinstance(job, Wakeup):
                        wakeup = job  # fetches still on their way: ask again when one lands
                        break
                    else:
                        window.append(job)
                self._dispatch(window)
                if window or not exhausted:  # no worker is started for a run that is over
                    self._restore()
            busy = any(w.job is not None for w in self._pool)
            if not busy and not window and (exhausted or self._stopping):
                return
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                self.abort()
            yield from self._poll(wakeup)

    def _poll(self, wakeup: Wakeup | None = None) -> Iterator[Outcome]:
        """Wait for the next answer, death, timeout or start-up deadline, and act on it
        (or for ``wakeup``: a job of the stream became ready)."""
        now = time.monotonic()
        deadlines = [w.started + self.timeout for w in self._pool if w.job is not None]
        deadlines += [w.spawned + self.start_timeout for w in self._pool if not w.ready]
        # Wake at least every quarter second so a stop request is seen promptly,
        # and at each sample of the busy workers' memory.
        watching = self.budget is not None and any(w.job is not None for w in self._pool)
        if watching:
            deadlines.append(self._next_sample)
        wake = min([now + 0.25, *deadlines])
        # Every worker is watched: the busy for answers, the starting for "ready",
        # the idle for an early death, so no job is ever handed to a dead one.
        watched: list[Any] = [w.conn for w in self._pool]
        if wakeup is not None:
            watched.append(wakeup)
        ready = wait(watched, timeout=max(0.0, wake - now))
        for worker in list(self._pool):
            outcome = self._collect(worker, ready)
            if outcome is not None:
                yield outcome
        if watching and time.monotonic() >= self._next_sample:
            outcome = self._watch()
            assert self.budget is not None
            self._next_sample = time.monotonic() + self.budget.sample_interval()
            if outcome is not None:
                yield outcome

    def _watch(self) -> Outcome | None:
        """Measure the busy workers and the tree for the budget, and carry out its
        verdict: a stopped job goes back to the window to run alone, or fails."""
        assert self.budget is not None
        sizes = {w.name: rss_of(w.process.pid) for w in self._pool}
        busy = {w.job.id: w for w in self._pool if w.job is not None}
        growth = {job_id: max(0, sizes[w.name] - w.baseline) for job_id, w in busy.items()}
        tree = rss_of(os.getpid()) + sum(sizes.values())
        stop = self.budget.observe(growth, tree)
        if stop is None:
            return None
        return self._stop(busy[stop.job.id], stop)

    def _stop(self, worker: _Worker, stop: Stop) -> Outcome | None:
        job = worker.job
        assert job is not None
        self._finish(worker)
        text = worker.output.take()
        self._replace(worker, kill=True)
        self._stopped += 1
        if stop.retry is not None:
            logger.info(
                "%s: stopped at %d MiB (estimated %d MiB) near --max-memory; it runs again alone",
                job.key,
                stop.peak >> 20,
                job.cost >> 20,
            )
            self._requeued.append(stop.retry)  # what it printed will be printed again
            return None
        return Outcome(job, None, stop.error, worker.name, tidy([text]))

    def _dispatch(self, window: list[Job]) -> None:
        """Give idle workers the largest jobs of the window that the budget admits
        (a job to run alone first: it waits for the others to finish)."""
        window.sort(key=_priority, reverse=True)
        while window:
            idle = next((w for w in self._pool if w.ready and w.job is None), None)
            if idle is None:
                return
            job = window.pop(0) if self.budget is None else self.budget.admit(window)
            if job is None:
                return
            if job.alone:
                self._retire_others(idle)
                fresh = self._fresh_for_alone(idle)
                if fresh is None:  # the run stops meanwhile: dropped, as the window is
                    if self.budget is not None:
                        self.budget.release(job)
                    return
                idle = fresh
            idle.baseline = rss_of(idle.process.pid)
            if self.budget is not None:
                self.budget.worker_measured(idle.name, idle.baseline)
            try:
                idle.conn.send(job)
            except OSError:
                # Died while idle: the job goes back to the window, untouched.
                if self.budget is not None:
                    self.budget.release(job)
                window.append(job)
                window.sort(key=_priority, reverse=True)
                self._died(idle)
                continue
            idle.job, idle.started = job, time.monotonic()
            self._started += 1
            self._last_dispatch = idle.started

    def _retire_others(self, keep: _Worker) -> None:
        """Before an alone job goes to ``keep``: every other worker exits first (all
        asked at once, then waited for), so its memory is free before the job grows."""
        # The budget admits an alone job only when nothing runs: all others are idle.
        others = [w for w in self._pool if w is not keep and w.job is None]
        asked = _ask_to_leave(others)
        for worker in others:
            self._retire(worker, kill=worker.name not in asked, asked=worker.name in asked)
            self._pool.remove(worker)
        if self.workers > 1:  # with one worker there is none to retire
            self._alone_runs += 1
        self._retired_for_alone += len(others)

    def _fresh_for_alone(self, worker: _Worker) -> _Worker | None:
        """The worker an alone job goes to: ``worker``, or a fresh one in its place
        when it has grown past a fresh worker's size (numpy, the heap of earlier
        images), since the budget counts a job alone beside a fresh worker. None:
        the run is stopping. Nothing runs meanwhile (an alone job is admitted only
        then), so no outcome can come while the fresh one starts."""
        if self.budget is None or not self.budget.worker_outgrown(rss_of(worker.process.pid)):
            return worker
        self._replace(worker)
        self._refreshed_for_alone += 1
        self._await_ready()  # the others are retired: the pool is the fresh one
        if self._stopping:
            return None
        return next((w for w in self._pool if w.ready and w.job is None), None)

    def _restore(self) -> None:
        """After an alone job: start the workers retired for it again (they get work
        once ready); not while another job runs alone, nor once the run stops."""
        if self._stopping or len(self._pool) >= self.workers:
            return
        if any(w.job is not None and w.job.alone for w in self._pool):
            return
        while len(self._pool) < self.workers:
            self._pool.append(self._spawn())
            self._restored += 1

    def _collect(self, worker: _Worker, ready: Sequence[object]) -> Outcome | None:
        if worker.conn in ready:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                return self._died(worker)
            return self._answered(worker, message)
        now = time.monotonic()
        job = worker.job
        if job is not None and now - worker.started > self.timeout:
            self._finish(worker)
            self._timed_out += 1
            warnings = tidy([worker.output.take()])
            self._replace(worker, kill=True)
            error = WorkerCrashed(f"timed out after {self.timeout:g} s; the worker was killed")
            return Outcome(job, None, error, worker.name, warnings)
        if not worker.ready and now - worker.spawned > self.start_timeout:
            _kill(worker.process)
            self._start_failed(worker, f"was not ready after {self.start_timeout:g} s")
        return None

    def _answered(self, worker: _Worker, message: Any) -> Outcome | None:
        job = worker.job
        if not worker.ready:
            if message[0] == "ready":
                worker.ready = True
                self._failed_starts = 0
                if self.budget is not None:
                    size = rss_of(worker.process.pid)
                    self.budget.worker_measured(worker.name, size, fresh=True)
                self._log_output(worker, worker.output.take())
                return None
            _kill(worker.process)
            self._start_failed(worker, f"answered {message[0]!r} instead of 'ready'")
            return None
        if job is None:
            logger.warning("%s sent %r while it had no job; replaced", worker.name, message[0])
            self._replace(worker, kill=True)
            return None
        kind, payload, messages = message
        # The worker flushed everything it printed before answering.
        warnings = tidy([*messages, worker.output.take()])
        self._finish(worker)
        worker.tasks_done += 1
        self._completed += 1
        if self.max_tasks_per_worker and worker.tasks_done >= self.max_tasks_per_worker:
            self._replace(worker)
        if kind == "ok":
            return Outcome(job, payload, None, worker.name, warnings)
        error = payload if isinstance(payload, ImageError) else WorkerCrashed(str(payload))
        return Outcome(job, None, error, worker.name, warnings)

    def _died(self, worker: _Worker) -> Outcome | None:
        """The worker's connection closed: it is gone, or going."""
        job = worker.job
        try:
            code = worker.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        if not worker.ready:
            self._start_failed(worker, f"died ({_describe_exit(code)})")
            return None
        text = worker.output.take()
        if job is None:
            # No image was in it: not a failure of any image, only of the machinery.
            self._log_output(worker, text)
            logger.warning("%s died while idle (%s); replaced", worker.name, _describe_exit(code))
            self._replace(worker, kill=True)
            return None
        self._finish(worker)
        self._replace(worker, kill=True)
        if self._aborted:
            return None  # killed by us: abandoned, not failed
        self._crashed += 1
        reason = _describe_exit(code)
        if code is not None and code > 0 and last_line(text):
            reason = f"{reason}: {last_line(text)}"  # a Python traceback's verdict
        return Outcome(job, None, WorkerCrashed(reason), worker.name, tidy([text]))

    def _start_failed(self, worker: _Worker, what: str) -> None:
        """A worker is lost before it was ready: no image was in it, so none fails;
        a pool that loses one after another gives up."""
        self._failed_starts += 1
        text = worker.output.take()
        said = last_line(text)
        self._log_output(worker, text)
        self._retire(worker, kill=True)
        self._pool.remove(worker)
        self._restarts += 1
        if self._failed_starts >= self.max_start_failures:
            self.close()  # the pool gives up: no worker is left behind
            raise WorkerStartFailed(
                f"worker processes cannot start: {worker.name} {what} before it was ready"
                + (f" ({said})" if said else "")
                + f"; {self._failed_starts} in a row failed (interpreter {self.python[0]})"
            )
        logger.warning("%s %s before it was ready; starting another", worker.name, what)
        if not self._stopping:
            self._pool.append(self._spawn())

    def _finish(self, worker: _Worker) -> None:
        if self.budget is not None and worker.job is not None:
            self.budget.release(worker.job)
        now = time.monotonic()
        self._busy_seconds += now - worker.started
        self._last_done = now
        worker.job = None

    def _replace(self, worker: _Worker, *, kill: bool = False) -> None:
        self._retire(worker, kill=kill)
        self._pool.remove(worker)
        self._restarts += 1
        if not self._stopping:
            self._pool.append(self._spawn())

    def _log_output(self, worker: _Worker, text: str) -> None:
        """Output of a worker that belongs to no image (start-up, idle, exit): logged."""
        for line in tidy([text]):
            logger.warning("%s: %s", worker.name, line)


def _priority(job: Job) -> tuple[bool, int]:
    return job.alone, job.cost


def _ask_to_leave(workers: Iterable[_Worker]) -> set[str]:
    """Send each ready, idle worker the request to exit; the names of those asked."""
    asked: set[str] = set()
    for worker in workers:
        if worker.ready and worker.job is None:
            try:
                worker.conn.send(None)
                asked.add(worker.name)
            except OSError:
                pass
    return asked


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.returncode is None:
        try:
            process.kill()
        except OSError:
            pass


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
