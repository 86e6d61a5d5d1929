"""discover -> plan -> execute -> commit, for a whole tree.

* **discover**: the source storage is walked one directory at a time, lazily.
* **plan**: each file gets its output key; two sources claiming one output are
  caught here (they can only meet inside one directory), outputs already newer
  than their source are skipped without being opened.
* **execute**: jobs go to an :class:`~optimizr.executors.base.Executor`, which
  pulls them only as workers free up, so the walk stays a small window ahead.
* **commit**: the parent alone writes outputs, each atomically, after checking
  that the source did not change while it was being converted.

Stopping is cooperative: :class:`StopToken` asks once for a graceful stop (no
new work, in-flight images finish) and a second time for an abort.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Protocol

from optimizr.atomic import atomic_write
from optimizr.budget import MemoryBudget, default_memory_budget, estimate_peak_bytes
from optimizr.config import EncodeOptions, IfLarger, NameMode, RunConfig, available_cpus
from optimizr.errors import (
    TRANSIENT,
    ImageError,
    NoSpaceLeft,
    NotAnImage,
    OutputConflict,
    PermissionDenied,
    SourceChanged,
    SourceUnreadable,
    TooLarge,
    UnsupportedImage,
    UsageError,
    WriteFailed,
)
from optimizr.executors.base import Executor, Job, Outcome
from optimizr.lock import RunLock
from optimizr.manifest import (
    FAILED_LIST_NAME,
    Manifest,
    Row,
    options_fingerprint,
    state_dir,
)
from optimizr.metrics.memory import TreeMemorySampler
from optimizr.probe import probe
from optimizr.results import (
    DRY_RUN,
    LARGER_THAN_SOURCE,
    NOT_AN_IMAGE,
    UNSUPPORTED,
    UP_TO_DATE,
    Result,
    RunSummary,
    options_dict,
)
from optimizr.sniff import looks_like_image_name, sniff_file
from optimizr.storage.base import DirectoryListing, FileStat, SourceEntry, Storage, WalkOptions
from optimizr.storage.local import LocalStorage
from optimizr.verify import file_is_complete_webp


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
    """Asked once: finish what is in flight. Asked twice: abort now."""

    graceful: bool = False
    hard: bool = False
    _listeners: list[Executor] = field(default_factory=list)

    def request(self) -> None:
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


def output_key(key: str, name: NameMode) -> str:
    """``a/b/photo.jpg`` -> ``a/b/photo.webp`` (replace) or ``a/b/photo.jpg.webp`` (append)."""
    if name == "append":
        return key + ".webp"
    # Plain string work, as PurePosixPath(key).with_suffix would do it: called
    # for every file of every re-run, where path objects cost a third of the time.
    dot = key.rfind(".")
    if key.rfind("/") + 1 < dot < len(key) - 1:  # a suffix: not a dotfile, not a trailing dot
        return key[:dot] + ".webp"
    return key + ".webp"


def classify_error(key: str, error: ImageError) -> Result:
    """Not every ImageError is a failure: a stray text file is skipped, not failed."""
    cls = type(error).__name__
    if isinstance(error, NotAnImage) and not looks_like_image_name(key):
        return Result(key, "skipped", NOT_AN_IMAGE, error.message, error_class=cls)
    if isinstance(error, UnsupportedImage):
        return Result(key, "skipped", UNSUPPORTED, error.message, error_class=cls)
    return Result(key, "failed", error.reason, error.message, error_class=cls)


def larger_than_source(
    key: str, webp_size: int, source_size: int, if_larger: IfLarger
) -> Result | None:
    """The skip result when ``--if-larger skip`` keeps no output, else None."""
    if if_larger != "skip" or webp_size < source_size:
        return None
    message = f"WebP would be {webp_size:,} bytes, source is {source_size:,}"
    return Result(key, "skipped", LARGER_THAN_SOURCE, message, None, source_size, webp_size)


def write_failure(key: str, target: str, exc: OSError) -> Result:
    error_type = NoSpaceLeft if exc.errno in (errno.ENOSPC, errno.EDQUOT) else WriteFailed
    error = error_type(f"{target}: {exc.strerror or exc}")
    return Result(key, "failed", error.reason, error.message, error_class=error_type.__name__)


@dataclass(frozen=True)
class _InFlight:
    entry: SourceEntry
    checked_ns: int
    attempts: int


class Pipeline:
    def __init__(
        self,
        config: RunConfig,
        source: Storage,
        dest: Storage,
        executor: Executor,
        *,
        listener: ProgressListener | None = None,
        stop: StopToken | None = None,
        prune: tuple[str, ...] = (),
        budget: MemoryBudget | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.config = config
        self.budget = budget
        self.source = source
        self.dest = dest
        self.executor = executor
        self.listener = listener
        self.stop = stop or StopToken()
        self.prune = prune
        self.manifest = manifest
        self.fingerprint = options_fingerprint(config)
        self.summary = RunSummary(src=source.describe(), dest=dest.describe())
        self.summary.workers = executor.workers
        self.summary.options = {
            **options_dict(config.encode),
            "name": config.name,
            "if_larger": config.if_larger,
            "force": config.force,
            "include": list(config.include),
            "exclude": list(config.exclude),
            "follow_symlinks": config.follow_symlinks,
            "retry_failed": config.retry_failed,
            "max_attempts": config.max_attempts,
            "verify": config.verify,
            "fingerprint": self.fingerprint,
        }
        self._in_flight: dict[int, _InFlight] = {}
        self._next_id = 0
        self._found = 0
        self._walk_done = False
        self._last_progress = time.monotonic()

    def snapshot(self) -> RunSnapshot:
        summary = self.summary
        executor = self.executor.statistics()
        budget = self.budget.statistics() if self.budget is not None else None
        in_flight = len(self._in_flight)
        return RunSnapshot(
            found=self._found,
            walk_done=self._walk_done,
            finished=summary.found,
            converted=summary.converted,
            skipped=summary.skipped,
            failed=summary.failed,
            bytes_in=summary.bytes_in,
            bytes_out=summary.bytes_out,
            running=executor.running,
            queued=max(0, in_flight - executor.running),
            workers=executor.workers,
            workers_alive=executor.alive,
            worker_restarts=executor.restarts,
            budget_total=budget.total if budget else 0,
            budget_in_use=budget.in_use if budget else 0,
            draining=self.stop.graceful,
            last_progress=self._last_progress,
        )

    def run(self) -> RunSummary:
        if self.listener:
            self.listener.started(self.snapshot)
        self.stop.attach(self.executor)
        if not self.config.dry_run:
            self.dest.remove_stale_temporaries()
        try:
            for outcome in self.executor.imap_unordered(self._jobs()):
                if self.stop.hard:
                    break
                self._commit(outcome)
        finally:
            self.summary.interrupted = self.stop.graceful
            self.summary.finished_at = time.time()
        return self.summary

    # -- plan --------------------------------------------------------------------

    def _jobs(self) -> Iterator[Job]:
        config = self.config
        walk = WalkOptions(
            include=config.include,
            exclude=config.exclude,
            follow_symlinks=config.follow_symlinks,
            prune=self.prune,
        )
        found = 0
        for listing in self.source.walk(walk):
            if self.stop.graceful:
                return
            found += len(listing.entries)
            self._found = found
            if self.listener:
                self.listener.found(len(listing.entries))
            planner = _DirectoryPlan(self, listing.directory)
            for entry in listing.entries:
                job = self._plan(entry, planner)
                if job is not None:
                    yield job
                if self.stop.graceful:
                    return
            self._forget_deleted(listing, planner)
        self._walk_done = True
        if self.listener:
            self.listener.walk_done(found)

    def _forget_deleted(self, listing: DirectoryListing, plan: _DirectoryPlan) -> None:
        """Rows of this directory whose source is gone (not merely excluded) are dropped,
        so status and failed.jsonl do not report files that no longer exist."""
        if self.manifest is None or self.config.dry_run or plan.matched == len(plan.rows):
            return
        listed = {e.key.rpartition("/")[2] for e in listing.entries}
        for name, row in plan.rows.items():
            if name not in listed and self.source.stat(row.key) is None:
                self.manifest.forget(row.key)

    def _plan(self, entry: SourceEntry, plan: _DirectoryPlan) -> Job | None:
        checked_ns = plan.checked_ns
        if entry.error is not None:
            kind = PermissionDenied if entry.error == "permission denied" else SourceUnreadable
            error = kind(f"cannot read: {entry.error}")
            self._record(_failure(entry.key, error), entry, checked_ns)
            return None
        out_key = output_key(entry.key, self.config.name)
        if out_key in plan.claimed:
            conflict = OutputConflict(
                f"{out_key} is already the output of {plan.claimed[out_key]}; "
                "use --name append to keep both"
            )
            self._record(_failure(entry.key, conflict), entry, checked_ns)
            return None
        plan.claimed[out_key] = entry.key
        attempts = 0
        if not self.config.force:
            row = plan.rows.get(entry.key.rpartition("/")[2])
            if row is not None:
                plan.matched += 1
            if row is not None and row.describes(entry.size, entry.mtime_ns, self.fingerprint):
                settled = self._settled(entry, row, out_key, plan)
                if settled is not None:
                    self._record(settled)
                    return None
                attempts = row.attempts if row.status == "failed" else 0
            elif row is None and self.manifest is not None and self.manifest.rebuilt:
                if self._adopt(entry, out_key, plan):
                    return None
        if self.config.dry_run:
            self._record(self._dry_run_result(entry, out_key))
            return None
        source: str | bytes | None = self.source.local_path(entry.key)
        if source is None:
            try:
                source = self.source.read_bytes(entry.key)
            except OSError as exc:
                unreadable = SourceUnreadable(exc.strerror or str(exc))
                self._record(_failure(entry.key, unreadable), entry, checked_ns, attempts)
                return None
        cost = 0
        if self.budget is not None:
            header = probe(source)
            if header is not None:
                cost = estimate_peak_bytes(header, self.config.encode)
                if not self.budget.fits_alone(cost):
                    refusal = TooLarge(
                        f"{header.width}x{header.height} needs about {cost / 2**20:,.0f} MiB to "
                        f"convert, more than --max-memory {self.budget.total / 2**20:,.0f} MiB "
                        f"leaves for one image ({self.budget.capacity / 2**20:,.0f} MiB); "
                        "raise --max-memory or use --max-width/--max-height"
                    )
                    self._record(_failure(entry.key, refusal), entry, checked_ns, attempts)
                    return None
        self._next_id += 1
        self._in_flight[self._next_id] = _InFlight(entry, checked_ns, attempts)
        return Job(
            self._next_id, entry.key, source, self.config.encode, cost, verify=self.config.verify
        )

    def _settled(
        self, entry: SourceEntry, row: Row, out_key: str, plan: _DirectoryPlan
    ) -> Result | None:
        """The result that stands without opening the file, if the manifest proves one."""
        if row.status == "done":
            output = plan.outputs().get(out_key.rpartition("/")[2])
            if row.output == out_key and output is not None and output.size == row.output_size:
                return Result(entry.key, "skipped", UP_TO_DATE, "", out_key)
            return None  # the output is gone or was changed: make it again
        if row.status == "skipped":
            return Result(entry.key, "skipped", row.reason, row.message)
        if row.reason in TRANSIENT:
            return None  # the disk was full, the file unreadable...: not the image's fault
        if self.config.retry_failed and row.attempts < self.config.max_attempts:
            return None
        self.summary.known_failed += 1
        if self.config.retry_failed:
            hint = f"gave up after {row.attempts} attempts (--max-attempts)"
        else:
            hint = f"known bad after {row.attempts} attempt(s); --retry-failed tries again"
        return Result(
            entry.key,
            "failed",
            row.reason,
            f"{row.message} [{hint}]" if row.message else hint,
            error_class=row.error_class,
        )

    def _adopt(self, entry: SourceEntry, out_key: str, plan: _DirectoryPlan) -> bool:
        """After --rebuild-manifest: an output already on disk, complete and newer
        than its source, is taken as done under the current options."""
        assert self.manifest is not None
        output = plan.outputs().get(PurePosixPath(out_key).name)
        path = self.dest.local_path(out_key)
        if output is None or output.mtime_ns < entry.mtime_ns or path is None:
            return False
        if not file_is_complete_webp(path):
            return False
        self.manifest.stats.adopted += 1
        self.manifest.record(
            entry.key,
            size=entry.size,
            mtime_ns=entry.mtime_ns,
            checked_ns=plan.checked_ns,
            fingerprint=self.fingerprint,
            status="done",
            output=out_key,
            output_size=output.size,
        )
        self._record(Result(entry.key, "skipped", UP_TO_DATE, "adopted by --rebuild-manifest"))
        return True

    def _dry_run_result(self, entry: SourceEntry, out_key: str) -> Result:
        path = self.source.local_path(entry.key)
        try:
            if path is not None:
                with open(path, "rb") as fh:
                    sniffed = sniff_file(fh)
            else:
                from optimizr.sniff import sniff_bytes

                sniffed = sniff_bytes(self.source.read_bytes(entry.key))
        except OSError as exc:
            return Result(entry.key, "failed", "unreadable", exc.strerror or str(exc))
        if sniffed.format is None:
            return classify_error(entry.key, NotAnImage("no known image signature"))
        if not sniffed.supported:
            return classify_error(
                entry.key, UnsupportedImage(f"{sniffed.format} is not a format optimizr converts")
            )
        kind = "apng" if sniffed.animated_png else sniffed.format
        return Result(entry.key, "skipped", DRY_RUN, f"would convert {kind} -> {out_key}", out_key)

    # -- commit ------------------------------------------------------------------

    def _commit(self, outcome: Outcome) -> None:
        flight = self._in_flight.pop(outcome.job.id)
        entry, key = flight.entry, flight.entry.key
        record = partial(
            self._record, entry=entry, checked_ns=flight.checked_ns, attempts=flight.attempts
        )
        if outcome.error is not None or outcome.encoded is None:
            error = outcome.error or ImageError("no result")
            record(classify_error(key, error))
            return
        encoded = outcome.encoded
        out_key = output_key(key, self.config.name)
        size = len(encoded.webp)
        larger = larger_than_source(key, size, entry.size, self.config.if_larger)
        if larger is not None:
            record(larger)
            return
        now = self.source.stat(key)
        if now is None or (now.size, now.mtime_ns) != (entry.size, entry.mtime_ns):
            what = "was deleted" if now is None else "was modified"
            changed = SourceChanged(f"the source {what} while it was being converted")
            # Recorded with the size and mtime it had when listed: the next run
            # sees the difference and converts it again.
            record(_failure(key, changed))
            return
        write_started = time.perf_counter()
        try:
            self.dest.write_atomic(out_key, encoded.webp)
        except OSError as exc:
            record(write_failure(key, out_key, exc))
            return
        written = time.perf_counter() - write_started
        # Only now, with the output renamed into place, may the row say done.
        record(
            Result(
                key,
                "converted",
                None,
                "",
                out_key,
                entry.size,
                size,
                encoded.facts,
                write_seconds=written,
            )
        )

    def _record(
        self,
        result: Result,
        entry: SourceEntry | None = None,
        checked_ns: int = 0,
        attempts: int = 0,
    ) -> None:
        self.summary.record(result)
        self._last_progress = time.monotonic()
        if self.listener:
            self.listener.finished(result)
        if entry is None or self.manifest is None or self.config.dry_run:
            return
        status = {"converted": "done", "skipped": "skipped", "failed": "failed"}[result.status]
        self.manifest.record(
            entry.key,
            size=entry.size,
            mtime_ns=entry.mtime_ns,
            checked_ns=checked_ns,
            fingerprint=self.fingerprint,
            status=status,
            reason=result.reason,
            output=result.output if status == "done" else None,
            output_size=result.bytes_out if status == "done" else None,
            error_class=result.error_class,
            message=result.message,
            attempts=attempts + 1 if status == "failed" else attempts,
        )


class _DirectoryPlan:
    """What the pipeline knows about one source directory while planning it."""

    def __init__(self, pipeline: Pipeline, directory: str) -> None:
        self.directory = directory
        self.dest = pipeline.dest
        # Taken before the rows are read: an edit after this moment shows as a
        # newer mtime than the row's, or falls inside the settle window.
        self.checked_ns = time.time_ns()
        self.claimed: dict[str, str] = {}
        use_rows = pipeline.manifest is not None and not pipeline.config.force
        self.rows = pipeline.manifest.rows_in(directory) if use_rows and pipeline.manifest else {}
        self.matched = 0  # rows that a listed file found
        self._outputs: dict[str, FileStat] | None = None

    def outputs(self) -> dict[str, FileStat]:
        """The files in the mirrored DEST directory, listed once and only if needed."""
        if self._outputs is None:
            self._outputs = self.dest.list_files(self.directory)
        return self._outputs


def _failure(key: str, error: ImageError) -> Result:
    return Result(key, "failed", error.reason, error.message, error_class=type(error).__name__)


# -- the library API -------------------------------------------------------------


def convert_tree(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    options: EncodeOptions | RunConfig | None = None,
    *,
    executor: Executor | None = None,
    listener: ProgressListener | None = None,
    stop: StopToken | None = None,
) -> RunSummary:
    """Convert every image under ``src`` into a mirrored tree of WebP files under ``dest``.

    ``options`` is an :class:`EncodeOptions` (run settings left at their
    defaults) or a whole :class:`RunConfig`. Per-file problems never raise:
    they are counted and listed in the returned :class:`RunSummary`, which is
    also written to ``DEST/optimizr-summary.json`` (or ``RunConfig.summary_path``).
    Raises :class:`~optimizr.errors.UsageError` when SRC or DEST cannot be used.
    """
    src_path, dest_path = Path(src), Path(dest)
    if isinstance(options, RunConfig):
        config = options
    else:
        config = RunConfig(src=src_path, dest=dest_path, encode=options or EncodeOptions())
    if not src_path.exists():
        raise UsageError(f"SRC does not exist: {src_path}")
    if not src_path.is_dir():
        raise UsageError(f"SRC is not a folder: {src_path}")
    src_real, dest_real = src_path.resolve(), dest_path.resolve()
    if src_real == dest_real:
        raise UsageError("DEST must be a different folder from SRC")
    if dest_real.exists() and not dest_real.is_dir():
        raise UsageError(f"DEST exists and is not a folder: {dest_path}")
    prune: tuple[str, ...] = ()
    if dest_real.is_relative_to(src_real):
        prune = (dest_real.relative_to(src_real).as_posix(),)
    if not config.dry_run:
        try:
            dest_path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create DEST {dest_path}: {exc.strerror or exc}") from None

    lock: RunLock | None = None
    manifest: Manifest | None = None
    if config.dry_run:
        # Read-only: a dry run reports what the manifest would let a real run skip.
        manifest = Manifest.open_readonly(dest_path) if dest_real.is_dir() else None
    else:
        lock = RunLock(state_dir(dest_path))
        try:
            lock.acquire()
        except OSError as exc:
            raise UsageError(f"cannot use DEST {dest_path}: {exc.strerror or exc}") from None
    try:
        if lock is not None:
            try:
                manifest = (
                    Manifest.rebuild(dest_path)
                    if config.rebuild_manifest
                    else Manifest.open(dest_path)
                )
            except OSError as exc:
                raise UsageError(
                    f"cannot create the manifest in {state_dir(dest_path)}: {exc.strerror or exc}"
                ) from None
            assert manifest is not None
            try:
                manifest.begin_run(config, options_fingerprint(config))
            except sqlite3.OperationalError:
                pass  # a full disk: the rows themselves are retried as the run goes
        summary = _execute(config, src_path, dest_path, prune, manifest, executor, listener, stop)
        if manifest is not None and lock is not None:
            _finish_manifest(summary, manifest, dest_path)
        if not config.dry_run:
            try:
                write_summary(summary, config.effective_summary_path)
            except OSError as exc:  # DEST full: the run's results still stand
                summary.warnings.append(f"could not write the summary: {exc.strerror or exc}")
    finally:
        if manifest is not None:
            manifest.close()
        if lock is not None:
            lock.release()
    return summary


def _finish_manifest(summary: RunSummary, manifest: Manifest, dest: Path) -> None:
    manifest.finish_run(
        summary.found, summary.converted, summary.skipped, summary.failed, summary.exit_code
    )
    failed_list = state_dir(dest) / FAILED_LIST_NAME
    try:
        failed_listed = manifest.write_failed_list(failed_list)
    except (OSError, sqlite3.Error) as exc:
        failed_listed = -1
        summary.warnings.append(f"could not write {failed_list}: {exc}")
    stats = manifest.statistics()
    if stats.unsaved_rows:
        summary.warnings.append(
            f"{stats.unsaved_rows} results could not be saved to the manifest "
            f"({stats.last_error}); those files will be converted again next time"
        )
    summary.manifest = {
        "path": str(manifest.path),
        "run_id": manifest.run_id,
        "rows_written": stats.rows_written,
        "commits": stats.commits,
        "commit_seconds": round(stats.commit_seconds, 3),
        "commit_failures": stats.commit_failures,
        "unsaved_rows": stats.unsaved_rows,
        "rebuilt": manifest.rebuilt,
        "adopted": stats.adopted,
        "failed_list": str(failed_list),
        "failed_listed": failed_listed,
    }


def _execute(
    config: RunConfig,
    src_path: Path,
    dest_path: Path,
    prune: tuple[str, ...],
    manifest: Manifest | None,
    executor: Executor | None,
    listener: ProgressListener | None,
    stop: StopToken | None,
) -> RunSummary:
    own_executor = executor is None
    workers = config.effective_workers if executor is None else executor.workers
    total_memory = config.max_memory or default_memory_budget()
    budget = MemoryBudget(total_memory, workers)
    if executor is None:
        from optimizr.executors.local import ProcessExecutor

        executor = ProcessExecutor(
            workers,
            # workers x libvips threads never exceeds the cores: no oversubscription.
            threads_per_worker=max(1, available_cpus() // workers),
            timeout=config.timeout,
            max_tasks_per_worker=config.max_tasks_per_worker,
            budget=budget,
            lookahead=max(1, config.lookahead_per_worker * workers),
            grace=config.grace,
        )
    sampler = TreeMemorySampler().start()
    times_start, wall_start = os.times(), time.monotonic()
    try:
        pipeline = Pipeline(
            config,
            LocalStorage(src_path),
            LocalStorage(dest_path),
            executor,
            listener=listener,
            stop=stop,
            prune=prune,
            budget=budget if own_executor else None,
            manifest=manifest,
        )
        summary = pipeline.run()
    finally:
        if own_executor:
            executor.close()
    memory = sampler.stop()
    wall = time.monotonic() - wall_start
    times_end = os.times()
    # The parent's whole life, start-up imports included: all of it is overhead.
    parent_cpu = times_end.user + times_end.system
    workers_cpu = (times_end.children_user - times_start.children_user) + (
        times_end.children_system - times_start.children_system
    )
    total_cpu = parent_cpu + workers_cpu
    cores = min(available_cpus(), workers * max(1, available_cpus() // workers))
    stats = executor.statistics()
    budget_stats = budget.statistics()
    summary.memory = {
        "budget_bytes": total_memory,
        "budget_for_images_bytes": budget_stats.capacity,
        "peak_rss_bytes": memory.peak_bytes,
        "peak_estimated_in_flight_bytes": budget_stats.peak_in_use,
        "admissions_waited": budget_stats.waited,
        "ran_alone": budget_stats.ran_alone,
        "samples": memory.samples,
        "timeline": [list(point) for point in memory.timeline],
    }
    summary.cpu = {
        "cores": cores,
        "wall_seconds": round(wall, 3),
        "parent_cpu_seconds": round(parent_cpu, 3),
        "workers_cpu_seconds": round(workers_cpu, 3),
        "codec_cpu_seconds": round(summary.codec_cpu_seconds, 3),
        # All CPU spent outside the codec (the parent, worker start-up, passing
        # jobs and results), as a share of all CPU: the cost of orchestration.
        "orchestration_share": round(1 - summary.codec_cpu_seconds / total_cpu, 4)
        if total_cpu > 0
        else 0.0,
        # Codec CPU over the CPU the machine offered during the run.
        "efficiency": round(summary.codec_cpu_seconds / (cores * wall), 4) if wall > 0 else 0.0,
    }
    summary.executor = {
        "workers": stats.workers,
        "started": stats.started,
        "crashed": stats.crashed,
        "timed_out": stats.timed_out,
        "restarts": stats.restarts,
        "tail_seconds": round(stats.tail_seconds, 3),
        "busy_seconds": round(stats.busy_seconds, 3),
        # Share of the workers' time spent holding an image.
        "utilisation": round(stats.busy_seconds / (stats.workers * wall), 4) if wall > 0 else 0.0,
    }
    summary.tool = tool_versions()
    return summary


def tool_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    import pyvips

    from optimizr import __version__

    try:
        binary = metadata.version("pyvips-binary")
    except metadata.PackageNotFoundError:
        binary = "none (system libvips)"
    return {
        "name": "optimizr",
        "version": __version__,
        "python": platform.python_version(),
        "pyvips": metadata.version("pyvips"),
        "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}",
        # libvips links libwebp statically and exports neither its symbols nor
        # its version; the wheel that bundles it is the most precise fact there is.
        "libwebp": f"bundled with pyvips-binary {binary}",
    }


def write_summary(summary: RunSummary, path: Path) -> None:
    data = json.dumps(summary.to_dict(), indent=2, sort_keys=False).encode() + b"\n"
    atomic_write(path, data)


def convert_file(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    options: EncodeOptions | None = None,
    *,
    if_larger: IfLarger = "skip",
) -> Result:
    """Convert one image file to ``dest`` (a ``.webp`` path), atomically.

    Runs in the calling process. Never raises for a bad image: the returned
    :class:`Result` says ``converted``, ``skipped`` (with the reason) or
    ``failed`` (with the reason and a one-line message).
    """
    from optimizr.encode import encode_webp

    options = options or EncodeOptions()
    src_path, dest_path = Path(src), Path(dest)
    try:
        size = src_path.stat().st_size
        encoded = encode_webp(str(src_path), options)
    except ImageError as exc:
        return classify_error(str(src_path), exc)
    except OSError as exc:
        error = SourceUnreadable(exc.strerror or str(exc))
        return Result(str(src_path), "failed", error.reason, error.message)
    webp_size = len(encoded.webp)
    larger = larger_than_source(str(src_path), webp_size, size, if_larger)
    if larger is not None:
        return larger
    try:
        atomic_write(dest_path, encoded.webp)
    except OSError as exc:
        return write_failure(str(src_path), str(dest_path), exc)
    return Result(
        str(src_path), "converted", None, "", str(dest_path), size, webp_size, encoded.facts
    )
