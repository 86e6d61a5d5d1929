"""Run the images on a Dask cluster (``--cluster``), behind the same executor seam.

The coordinator (``optimizr convert``) walks, plans, submits and commits; each
Dask task reads its source from the store, converts it and writes its outputs
itself (``worker_io.py``), and hands back only the record. Three choices:

* **Backpressure is ours.** Tasks with ``resources=`` are never queued by the
  scheduler: they go to workers at once, so ``worker-saturation`` holds nothing
  back. At most ``window`` tasks (2x the worker threads) are in flight, collected
  with ``as_completed`` and released as each finishes: the coordinator never
  holds a future, nor a result, per file of the run.
* **Memory is a resource.** A task asks for its header-based estimate as
  ``resources={"MEMORY": bytes}``; workers declare theirs with ``dask worker
  --resources MEMORY=...``. An image larger than every worker's MEMORY is refused
  before it is submitted (``too large``), as the local budget refuses it.
* **A codec cannot take a Dask worker down.** Each task converts in a child
  process of its worker (the local pool's :class:`ProcessExecutor`, one child per
  worker thread, kept between tasks), so a segfault or a hang fails that image
  (``worker crashed: SIGSEGV``, ``timed out``) and the worker, with the other
  images queued on it, lives on. The cost, measured on a loaded 2-core machine
  (inline ``convert_job`` against the same job through the child, medians of 40):
  0.6-1.1 ms per task for a 64x48 JPEG, about 4 ms for a 640x480 one (its bytes
  cross a socket both ways), against 50-110 ms to convert that one.

A Dask worker process that dies all the same (kill -9, the nanny's memory limit)
makes the scheduler run its tasks elsewhere; one that dies with a task every time
it runs fails it with ``KilledWorker``. Every task on a dying worker is
"suspicious", so an innocent image that merely shared it could be blamed: a
KilledWorker image is run once more *alone* (nothing else in flight) before it
is recorded as ``worker crashed``. A lost scheduler ends the run: what finished
is committed, the summary says why (exit 5), and a re-run resumes from the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import distributed

from optimizr.errors import EncodeFailed, OverWorkerMemory, UsageError, WorkerCrashed
from optimizr.executors.base import (
    Executor,
    ExecutorStatistics,
    Job,
    Outcome,
    Wakeup,
    WorkerFigures,
)

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

    from optimizr.executors.local import ProcessExecutor
    from optimizr.executors.memory_watch import ConversionMemoryWatch
    from optimizr.executors.worker_io import Place
    from optimizr.storage.base import Storage

logger = logging.getLogger(__name__)

#: The name the worker plugin is registered under on every worker.
PLUGIN_NAME = "optimizr"
#: Test-only: the folder where the ``block-once`` fault leaves its marker.
FAULT_DIR_ENV = "OPTIMIZR_TEST_FAULT_DIR"
#: How often the coordinator asks the scheduler which workers are connected.
REFRESH_SECONDS = 0.25
#: How long the coordinator waits for a first worker to connect.
WORKER_WAIT_SECONDS = 60.0


@dataclass
class _Figures:
    host: str
    images: int = 0
    busy_seconds: float = 0.0
    peak_rss_bytes: int = 0


@dataclass(frozen=True)
class TaskResult:
    """What one task sends back: the outcome (no image bytes) and its worker's figures."""

    outcome: Outcome
    worker: str
    host: str
    seconds: float
    peak_rss_bytes: int


#: distributed.admin.low-level-log-length in the coordinator (see DaskExecutor).
LOW_LEVEL_LOG_LENGTH = 32


class DaskExecutor(Executor):
    """Jobs as tasks of a Dask cluster: ``tcp://host:port`` of a running scheduler,
    or ``local`` / ``local:N`` (a LocalCluster of N one-thread worker processes,
    N defaulting to ``workers``, each with ``memory // N`` of MEMORY)."""

    does_io = True

    def __init__(
        self,
        address: str,
        *,
        workers: int = 1,
        memory: int = 0,
        timeout: float = 300.0,
        max_tasks_per_worker: int | None = None,
        grace: float | None = None,
    ) -> None:
        self.address = address
        #: --grace: after a graceful stop, how long in-flight images may take before
        #: they are abandoned (their futures cancelled, nothing of them committed).
        self.grace = grace
        self._stop_deadline: float | None = None
        # distributed's own lines (every connection, worker, close; it sets its logger
        # to INFO when imported) are not the run's: its warnings and errors still show.
        logging.getLogger("distributed").setLevel(logging.WARNING)
        self._cluster: LocalCluster | None = None
        self.timeout = timeout
        import dask.config

        # distributed keeps the last messages of each batched stream for debugging
        # (and, for a LocalCluster, whose scheduler lives in this process, its
        # transition and event logs): 1,000 by default, every submit's task among them.
        # That log fills over the first tens of thousands of tasks, so the coordinator's
        # memory rose with the run until it was full (issue 15: flat from 1,000 to
        # 20,000 images). Events this run subscribes to are pushed whatever the length.
        dask.config.set({"distributed.admin.low-level-log-length": LOW_LEVEL_LOG_LENGTH})
        if address == "local" or address.startswith("local:"):
            count = int(address.partition(":")[2] or workers or 1)
            resources = {"MEMORY": memory // count} if memory else None
            self._cluster = distributed.LocalCluster(
                n_workers=count,
                threads_per_worker=1,
                processes=True,
                # No dashboard, and the scheduler's HTTP routes (health, metrics) on
                # a free port of 127.0.0.1: never the fixed 8787 another run may hold.
                host="127.0.0.1",
                dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                resources=resources,
                silence_logs=logging.ERROR,
            )
            connect: Any = self._cluster
        else:
            connect = address
        try:
            self.client: Client = distributed.Client(connect, timeout=30, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            self._close_cluster()
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        try:
            self.client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
        except (OSError, TimeoutError):
            self.close()
            raise UsageError(
                f"no Dask worker connected to {address} within {WORKER_WAIT_SECONDS:g} s"
            ) from None
        plugin = ConversionPlugin(timeout, max_tasks_per_worker)
        self.client.register_plugin(plugin, name=PLUGIN_NAME)
        self._run = uuid.uuid4().hex[:8]
        #: The scheduler's allowed-failures: deaths of a worker holding a task that
        #: make it KilledWorker; an image outgrowing its worker is allowed as many.
        self._allowed_failures = _allowed_failures(self.client)
        #: Images whose conversion outgrew a worker's --memory-limit: the workers they
        #: outgrew; and those to run again meanwhile (on another worker if one is left).
        self._outgrown: dict[int, list[str]] = {}
        self._again: deque[Job] = deque()
        self._over_memory = self._memory_restarts = 0
        #: Workers that their nanny restarted over --memory-limit (the scheduler's
        #: ``worker-restart-memory`` events, pushed to this client as they come).
        self._restarted: dict[str, int] = {}
        self._limits: dict[str, int] = {}
        self.client.subscribe_topic("worker-restart-memory", self._restarted_over_memory)
        self._threads: dict[str, int] = {}
        self._capacity: int | None = None
        self._next_refresh = 0.0
        self._refresh_workers(log=False)
        self.workers = max(1, sum(self._threads.values()))
        self._lock = threading.Lock()
        #: Set by each task as it finishes: the loop's wake-up.
        self._done = threading.Event()
        self._figures: dict[str, _Figures] = {}
        self._stopping = self._aborted = False
        self._in_flight: dict[str, tuple[Future[TaskResult], Job]] = {}
        self._started = self._completed = self._crashed = self._timed_out = 0
        self._retried_alone = 0
        self._busy = 0.0
        self._last_dispatch = self._last_done = 0.0

    # -- the cluster ---------------------------------------------------------------

    def _refresh_workers(self, *, log: bool = True) -> None:
        """The workers connected now, their threads and MEMORY; joins and departures logged.
        One request to the scheduler, at most every REFRESH_SECONDS: a cluster finishing
        hundreds of images a second must not ask it for every worker each time."""
        now = time.monotonic()
        if log and now < self._next_refresh:
            return
        self._next_refresh = now + REFRESH_SECONDS
        try:
            # Asked of the scheduler, not Client.scheduler_info(): that returns the
            # client's cache, which its periodic callback may have just replaced by
            # one without workers (as if all had left).
            scheduler: Any = self.client.scheduler  # None once the client closed: caught
            info = self.client.sync(scheduler.identity, n_workers=-1)["workers"]
        except Exception:  # noqa: BLE001 - the scheduler is going: the loop sees it
            return
        threads = {addr: int(w.get("nthreads", 1)) for addr, w in info.items()}
        if log:
            for gone in sorted(self._threads.keys() - threads.keys()):
                logger.warning(
                    "Dask worker %s left the cluster (%d connected); the images it held "
                    "are run again on the others",
                    gone,
                    len(threads),
                    extra={"event": "worker_lost", "fields": {"worker": gone}},
                )
            for joined in sorted(threads.keys() - self._threads.keys()):
                logger.info("Dask worker %s joined (%d connected)", joined, len(threads))
        self._threads = threads
        self._limits.update({a: int(w.get("memory_limit") or 0) for a, w in info.items()})
        memories = [w.get("resources", {}).get("MEMORY") for w in info.values()]
        declared = [int(m) for m in memories if m is not None]
        # Every worker must declare it: a task asking for MEMORY never runs on one without.
        self._capacity = max(declared) if declared and len(declared) == len(memories) else None

    def memory_capacity(self) -> int | None:
        return self._capacity

    @property
    def window(self) -> int:
        """Tasks in flight at most: two per worker thread, so each worker has its
        next image at hand while it converts one, and no more."""
        return 2 * max(1, sum(self._threads.values()))

    def _submit(self, job: Job, tag: str = "") -> Future[TaskResult]:
        resources = {"MEMORY": max(1, job.cost)} if self._capacity is not None else None
        key = f"optimizr-{self._run}-{job.id}{tag}"
        # An image that outgrew a worker prefers the others (loosely: any will do).
        outgrown = self._outgrown.get(job.id, ())
        others = [w for w in self._threads if w not in outgrown] if outgrown else None
        future = self.client.submit(
            convert_on_worker,
            job,
            key=key,
            pure=False,
            resources=resources,
            retries=0,
            workers=others or None,
            allow_other_workers=bool(others),
        )
        future.add_done_callback(lambda _future: self._done.set())
        self._in_flight[key] = (future, job)
        self._started += 1
        self._last_dispatch = time.monotonic()
        return future

    # -- the loop ----------------------------------------------------------------

    def imap_unordered(self, jobs: Iterable[Job | Wakeup]) -> Iterator[Outcome]:
        pending = iter(jobs)
        completed = distributed.as_completed(loop=self.client.loop)
        #: KilledWorker images waiting to run once alone.
        suspects: deque[Job] = deque()
        alone: set[int] = set()
        exhausted = False
        wakeup: Wakeup | None = None
        while True:
            if self.lost is not None:
                return
            wakeup = None
            while not self._stopping and len(self._in_flight) < self.window:
                if any(job.id in alone for _, job in self._in_flight.values()):
                    break  # a suspect runs with nothing beside it
                if suspects:
                    if self._in_flight:
                        break
                    job = suspects.popleft()
                    alone.add(job.id)
                    self._retried_alone += 1
                    completed.add(self._submit(job, "-alone"))
                    break
                if self._again:
                    job = self._again.popleft()
                    completed.add(self._submit(job, f"-again{len(self._outgrown[job.id])}"))
                    continue
                if exhausted:
                    break
                item = next(pending, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, Wakeup):
                    wakeup = item
                    break
                else:
                    completed.add(self._submit(item))
            if not self._in_flight:
                if self._stopping or (exhausted and not suspects and not self._again):
                    return
                if wakeup is not None:
                    wakeup.wait(0.25)
                continue
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                # The grace is over: what is still converting is abandoned, as the
                # local pool kills its workers. A worker may still finish and write
                # an output; uncommitted, a re-run finds it identical and counts it.
                logger.warning(
                    "--grace %gs is over: %d image(s) in flight abandoned",
                    self.grace,
                    len(self._in_flight),
                    extra={"event": "grace_over"},
                )
                self.abort()
                self._in_flight.clear()
                return
            # Woken by a finished task, or every quarter second to see workers come
            # and go, a stop request and the scheduler's health.
            if not completed.has_ready():
                self._done.wait(0.25)
            self._done.clear()
            for future in completed.next_batch(block=False) if completed.has_ready() else []:
                outcome = self._collected(future, alone, suspects)
                if outcome is not None:
                    yield outcome
            self._refresh_workers()

    def _collected(
        self, future: Future[TaskResult], alone: set[int], suspects: deque[Job]
    ) -> Outcome | None:
        taken = self._in_flight.pop(str(future.key), None)
        if taken is None:  # let go when the scheduler was lost
            future.release()
            return None
        job = taken[1]
        status = future.status
        try:
            if status == "finished":
                if self.client.status != "running":
                    self._lose("its connection closed")  # the result cannot be fetched
                    return None
                try:
                    result = future.result()
                except (OSError, TimeoutError, CancelledError) as lost:
                    # The scheduler went between the task's end and the fetch of its result.
                    self._lose(f"{type(lost).__name__}: {lost}")
                    return None
                return self._finished(result, job, job.id in alone, suspects)
            if status == "cancelled":
                # Nothing of ours cancels a task but abort(): the client cancels every
                # future when its connection to the scheduler is gone.
                if not self._aborted:
                    self._lose("its connection closed")
                return None
            if status != "error":
                # "lost": it finished, but its result was held by a worker that died
                # before the coordinator fetched it (Dask keeps results on workers).
                # Nothing of it was committed: it runs again, alone like a suspect;
                # the output it already wrote is found identical and counted.
                suspects.append(job)
                return None
            exc: BaseException | None = future.exception()
        finally:
            future.release()
            self._last_done = time.monotonic()
        killed = type(exc).__name__ == "KilledWorker"
        if killed and job.id not in alone:
            suspects.append(job)  # innocent until it kills a worker while alone
            return None
        self._completed += 1
        if killed:
            self._crashed += 1
            last = getattr(getattr(exc, "last_worker", None), "address", "?")
            why = (
                ", restarted by its nanny over its --memory-limit"
                if last in self._restarted
                else ""
            )
            error = WorkerCrashed(
                f"the Dask worker process died each time it held this image, alone too "
                f"(last on {last}{why})"
            )
            return Outcome(job, None, error, last)
        return Outcome(job, None, EncodeFailed(f"internal error on the Dask worker: {exc}"))

    def _finished(
        self, result: TaskResult, job: Job, alone: bool, suspects: deque[Job]
    ) -> Outcome | None:
        outcome = result.outcome
        self._count(result)
        if isinstance(outcome.error, OverWorkerMemory):
            # Its child was killed over the worker's --memory-limit: counted as its
            # nanny counts a worker restarted over it, run again on another worker
            # while allowed-failures allows, then once alone, and only then failed.
            self._over_memory += 1
            outgrown = self._outgrown.setdefault(job.id, [])
            outgrown.append(result.worker)
            if not alone:
                if len(outgrown) > self._allowed_failures:
                    suspects.append(job)
                else:
                    self._again.append(job)
                return None
            del self._outgrown[job.id]
            error = OverWorkerMemory(
                f"{outcome.error.message}; {len(outgrown)} attempts, the last alone on "
                f"{result.worker}"
            )
            outcome = dataclasses.replace(outcome, error=error)
        self._outgrown.pop(job.id, None)
        self._completed += 1
        if outcome.error is not None and isinstance(outcome.error, WorkerCrashed):
            if outcome.error.message.startswith("timed out"):
                self._timed_out += 1
            else:
                self._crashed += 1
        return outcome

    def _count(self, result: TaskResult) -> None:
        with self._lock:
            figures = self._figures.setdefault(result.worker, _Figures(result.host))
            figures.images += 1
            figures.busy_seconds += result.seconds
            figures.peak_rss_bytes = max(figures.peak_rss_bytes, result.peak_rss_bytes)
        self._busy += result.seconds

    def _restarted_over_memory(self, event: Any) -> None:
        """A nanny restarted its worker over --memory-limit (its images run again
        elsewhere, as for any worker lost): said and counted. On the client's loop."""
        fields = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        worker = str(fields.get("worker", "?"))
        rss = int(fields.get("rss") or 0)
        with self._lock:
            self._memory_restarts += 1
            self._restarted[worker] = rss
        limit = self._limits.get(worker, 0)
        logger.warning(
            "Dask worker %s was restarted by its nanny over its --memory-limit "
            "(%d MiB resident%s); the images it held are run again",
            worker,
            rss >> 20,
            f" of {limit >> 20} MiB" if limit else "",
            extra={"event": "worker_restarted", "fields": {"worker": worker, "rss": rss}},
        )

    def _lose(self, why: str) -> None:
        left = len(self._in_flight) + 1
        self.lost = (
            f"the Dask scheduler {self.address} was lost ({why}); {left} image(s) in flight "
            "were not converted: a re-run resumes from the manifest"
        )
        logger.error("%s", self.lost, extra={"event": "cluster_lost"})
        self._in_flight.clear()
        # Said once, here: the client would otherwise try to reconnect for 30 s and
        # log its own failure to do so, then a blank error line per comm it closes.
        for name in ("distributed", "distributed.client"):  # each has its own level
            logging.getLogger(name).setLevel(logging.CRITICAL)
        with contextlib.suppress(Exception):
            self.client.close(timeout=5)

    # -- lifecycle -------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self._stopping = True
        if self.grace is not None and self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + self.grace

    def abort(self) -> None:
        self._stopping = self._aborted = True
        with contextlib.suppress(Exception):
            self.client.cancel([f for f, _ in self._in_flight.values()])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        self._close_cluster()

    def _close_cluster(self) -> None:
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.close(timeout=10)
            self._cluster = None

    def statistics(self) -> ExecutorStatistics:
        with self._lock:
            per_worker = tuple(
                WorkerFigures(name, f.host, f.images, f.busy_seconds, f.peak_rss_bytes)
                for name, f in sorted(self._figures.items())
            )
        tail = max(0.0, self._last_done - self._last_dispatch) if self._last_done else 0.0
        return ExecutorStatistics(
            self.workers,
            self._started,
            self._completed,
            self._crashed,
            self._timed_out,
            0,
            tail,
            self._busy,
            running=len(self._in_flight),
            alone_runs=self._retried_alone,
            connected=len(self._threads) if self.lost is None else 0,
            alive=len(self._threads) if self.lost is None else 0,
            per_worker=per_worker,
            conversions_over_memory=self._over_memory,
            memory_restarts=self._memory_restarts,
        )


# -- on the worker ----------------------------------------------------------------------


class ConversionPlugin(distributed.WorkerPlugin):
    """Set up on every Dask worker: the child processes that convert (one per worker
    thread, reused between tasks) and the stores opened from their URLs. Only the
    settings travel to the workers; the rest is made in ``setup``, on each."""

    name = PLUGIN_NAME

    def __init__(self, timeout: float, max_tasks_per_worker: int | None) -> None:
        self.timeout = timeout
        self.max_tasks_per_worker = max_tasks_per_worker

    def setup(self, worker: Any) -> None:
        from optimizr.executors.local import ProcessExecutor

        self._pools: queue.Queue[ProcessExecutor] = queue.Queue()
        self._all: list[ProcessExecutor] = []
        self._stores: dict[Place, Storage] = {}
        self._lock = threading.Lock()
        for _ in range(max(1, int(worker.state.nthreads))):
            pool = ProcessExecutor(
                1,
                threads_per_worker=1,
                timeout=self.timeout,
                max_tasks_per_worker=self.max_tasks_per_worker,
            )
            self._all.append(pool)
            self._pools.put(pool)
        self._watch = _memory_watch(worker, self._all)

    def teardown(self, worker: Any) -> None:
        if self._watch is not None:
            self._watch.stop()
        for pool in self._all:
            pool.close()

    def storage(self, place: Place) -> Storage:
        with self._lock:
            store = self._stores.get(place)
            if store is None:
                store = self._stores[place] = place.open()
            return store

    def convert(self, job: Job) -> Outcome:
        """Convert ``job`` (its source at hand) in a child process of this worker."""
        pool = self._pools.get()
        try:
            if self._watch is None:
                return _one_outcome(pool, job)
            with self._watch.running(pool, job.key, job.id):
                outcome = _one_outcome(pool, job)
            stopped = self._watch.verdict(job.id)
            if stopped is not None and isinstance(outcome.error, WorkerCrashed):
                # Its child was killed by the watch, not by a codec: it says why.
                return dataclasses.replace(outcome, error=stopped)
            return outcome
        finally:
            self._pools.put(pool)

    def children(self) -> list[int]:
        return [pid for pool in self._all for pid in pool.statistics().pids]


def _one_outcome(pool: ProcessExecutor, job: Job) -> Outcome:
    for outcome in pool.imap_unordered([job]):
        return outcome
    raise AssertionError("the child pool gave no outcome")


def _memory_watch(worker: Any, pools: list[ProcessExecutor]) -> ConversionMemoryWatch | None:
    """The watch that keeps this worker's conversions within its --memory-limit, as
    its nanny keeps the worker process (the same terminate fraction); None where
    nothing limits the worker (no limit, or ``terminate: false``)."""
    import dask.config

    from optimizr.executors.memory_watch import ConversionMemoryWatch

    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    fraction = dask.config.get("distributed.worker.memory.terminate")
    if not limit or not fraction:
        return None
    watch = ConversionMemoryWatch(int(limit), float(fraction), pools)
    watch.start()
    return watch


def convert_on_worker(job: Job) -> TaskResult:
    """The Dask task: one image, read, converted and written on this worker."""
    from optimizr.executors.worker_io import convert_here

    worker = distributed.get_worker()
    plugin = worker.plugins[PLUGIN_NAME]
    assert isinstance(plugin, ConversionPlugin)
    from optimizr import tracing

    started = time.monotonic()
    _task_fault(job)
    # The fetch and write spans are this process's; the child converting the image
    # exports its own read, decode and encode spans under the same image span.
    with tracing.in_worker(job):
        outcome = convert_here(job, plugin.storage, plugin.convert)
    seconds = time.monotonic() - started
    peak = _peak_rss(os.getpid()) + sum(_peak_rss(pid) for pid in plugin.children())
    return TaskResult(outcome, worker.address, socket.gethostname(), seconds, peak)


def _allowed_failures(client: Client) -> int:
    """The scheduler's ``distributed.scheduler.allowed-failures`` (this process's own
    setting if the scheduler cannot say)."""
    try:
        return int(client.run_on_scheduler(_scheduler_allowed_failures))
    except Exception:  # noqa: BLE001 - an older or stricter scheduler: the default
        import dask.config

        return int(dask.config.get("distributed.scheduler.allowed-failures"))


def _scheduler_allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


def _peak_rss(pid: int) -> int:
    """A process's peak resident size (VmHWM), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _task_fault(job: Job) -> None:
    """Test-only faults of the Dask worker process itself (worker.FAULT_ENV):
    ``kill-worker:NAME`` (the worker process is SIGKILLed as it takes the image),
    ``block-once:NAME`` (the first worker to take it writes its pid into
    ``$OPTIMIZR_TEST_FAULT_DIR/NAME.blocked`` and holds it until killed) and
    ``leak-once:NAME`` (the first worker to take it, its pid in ``NAME.leaked``,
    grows by 1 MiB a millisecond while it holds the image, until its nanny restarts
    it over ``--memory-limit``)."""
    from optimizr.executors.worker import FAULT_ENV, _parse_faults

    for kind, name in _parse_faults(os.environ.get(FAULT_ENV, "")):
        if not job.key.endswith(name):
            continue
        if kind == "kill-worker":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "leak-once" and _first_to_take(name, "leaked"):
            _leak()
        elif kind == "block-once" and _first_to_take(name, "blocked"):
            while True:
                time.sleep(3600)  # until the test kills this worker


def _first_to_take(name: str, what: str) -> bool:
    """Whether this worker is the first to take NAME (its pid is then in the marker)."""
    marker = Path(os.environ[FAULT_DIR_ENV]) / f"{name}.{what}"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False  # taken once already: this is the retry
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _leak() -> None:
    held = []
    for _ in range(2048):  # 2 GiB at most, should the nanny never act
        held.append(b"\1" * (1 << 20))  # written, so resident
        time.sleep(0.001)
    while True:
        time.sleep(3600)  # until its nanny restarts this worker
