"""discover -> plan -> execute -> commit, for a whole tree.

* **discover**: the source storage is walked one directory at a time, lazily.
* **plan**: each file gets its output key; two sources claiming one output are
  caught here (they can only meet inside one directory). Files the manifest
  proves unchanged (size, mtime_ns, options fingerprint, output still there at
  its size) are skipped without being opened, one manifest query and one DEST
  listing per directory.
* **count**: meanwhile a listing-only walk on its own thread
  (:class:`~optimizr.count.TreeCounter`) counts the files and bytes ahead, so
  that progress has a total long before the throttled walk reaches the end.
* **execute**: jobs go to an :class:`~optimizr.executors.base.Executor`, which
  pulls them only as workers free up, so the walk stays a small window ahead.
* **commit**: the parent alone writes outputs, each atomically, after checking
  that the source did not change while it was being converted; only then is
  the manifest row written.

Stopping is cooperative: a :class:`~optimizr.events.StopToken` asks once for a
graceful stop (no new work, in-flight images finish) and a second time for an abort.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from optimizr.budget import Header, MemoryBudget, estimate_peak_bytes
from optimizr.config import IfLarger, NameMode, RunConfig
from optimizr.count import TreeCounter
from optimizr.encode import check_pixels, check_webp_limit
from optimizr.errors import (
    ImageError,
    NoSpaceLeft,
    NotAnImage,
    OutputConflict,
    OutsideSource,
    OverMemoryBudget,
    PermissionDenied,
    SourceChanged,
    SourceDisappeared,
    SourceUnreadable,
    TooLarge,
    UnsupportedImage,
    WriteFailed,
    cause_of,
)
from optimizr.events import ProgressListener, RunSnapshot, StopToken, known_total
from optimizr.executors.base import Executor, Job, Outcome, Wakeup
from optimizr.manifest import (
    Manifest,
    Row,
    options_fingerprint,
    split_key,
)
from optimizr.probe import probe
from optimizr.results import (
    ALREADY_WEBP,
    COPYABLE,
    DRY_RUN,
    LARGER_THAN_SOURCE,
    NOT_AN_IMAGE,
    OUTPUT_EXISTS,
    SMALL_SAVING,
    SOURCE_DELETED,
    UNSUPPORTED,
    UP_TO_DATE,
    Result,
    RunSummary,
    options_dict,
)
from optimizr.sniff import looks_like_image_name, sniff_file
from optimizr.storage.base import (
    FINGERPRINT_METADATA,
    NOT_FOUND,
    OUTPUT_METADATA,
    OUTSIDE_SRC,
    SOURCE_ETAG_METADATA,
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    WalkOptions,
)
from optimizr.tracing import NO_IMAGE, ImageTrace, RunTrace, start_run
from optimizr.verify import file_is_complete_webp

if TYPE_CHECKING:
    from concurrent.futures import Future

    from optimizr.encode import Encoded
    from optimizr.executors.worker_io import WorkerRun
    from optimizr.sources import OwnOutputs
    from optimizr.storage.base import StoredObject
    from optimizr.transfers import Transfers


def output_key(key: str, name: NameMode) -> str:
    """``a/b/photo.jpg`` -> ``a/b/photo.webp`` (replace) or ``a/b/photo.jpg.webp`` (append).

    ``auto`` is decided for a whole folder (:func:`output_keys`); one key alone
    gets its replace name."""
    if name == "append":
        return key + ".webp"
    # Plain string work, as PurePosixPath(key).with_suffix would do it: called
    # for every file of every re-run, where path objects cost a third of the time.
    dot = key.rfind(".")
    if key.rfind("/") + 1 < dot < len(key) - 1:  # a suffix: not a dotfile, not a trailing dot
        return key[:dot] + ".webp"
    return key + ".webp"


def output_keys(keys: Iterable[str], name: NameMode) -> dict[str, str]:
    """The output key of every source of one folder.

    ``auto`` gives each source its replace name unless two would share one:
    then those take their append names (``a.jpg.webp``, ``a.png.webp``) and
    the rest of the folder keeps its short names. A source already named like
    that output (``x.webp`` beside ``x.jpg``) keeps it; the other moves aside.
    The names depend only on the folder's listing, so a re-run gives the same
    ones, and a sibling arriving or leaving changes only the names it touches.
    """
    if name != "auto":
        return {key: output_key(key, name) for key in keys}
    short = {key: output_key(key, "replace") for key in keys}
    claims = Counter(short.values())
    return {
        key: key + ".webp" if claims[out] > 1 and out != key else out for key, out in short.items()
    }


#: What the coordinator of a cluster run reads of a remote source for its memory
#: estimate: the header, which the formats' readers find in the first bytes.
_HEADER_BYTES = 256 << 10

#: The message of a done row whose source had several pages: "pages: 3".
PAGES_PREFIX = "pages: "


def page_key(out_key: str, page: int) -> str:
    """The output of page ``page`` (2, 3, ...) of a multi-page source: ``a/scan.p2.webp``."""
    return f"{out_key.removesuffix('.webp')}.p{page}.webp"


def classify_error(key: str, error: ImageError) -> Result:
    """Not every ImageError is a failure: a stray text file is skipped, not failed."""
    cls = type(error).__name__
    if isinstance(error, NotAnImage) and not looks_like_image_name(key):
        return Result(key, "skipped", NOT_AN_IMAGE, error.message, error_class=cls)
    if isinstance(error, UnsupportedImage):
        return Result(key, "skipped", UNSUPPORTED, error.message, error_class=cls)
    return Result(key, "failed", error.reason, error.message, error_class=cls)


def larger_than_source(
    key: str, webp_size: int, source_size: int, if_larger: IfLarger, min_saving: float = 0.0
) -> Result | None:
    """The skip result when ``--if-larger skip`` keeps no output (the WebP is no
    smaller, or saves less than ``min_saving`` percent of the source), else None."""
    if if_larger != "skip":
        return None
    if webp_size >= source_size:
        message = f"WebP would be {webp_size:,} bytes, source is {source_size:,}"
        return Result(key, "skipped", LARGER_THAN_SOURCE, message, None, source_size, webp_size)
    saving = 100 * (source_size - webp_size) / source_size
    if saving >= min_saving:
        return None
    message = (
        f"WebP would save {saving:.1f}% ({source_size - webp_size:,} of {source_size:,} "
        f"bytes), less than --min-saving {min_saving:g}%"
    )
    return Result(key, "skipped", SMALL_SAVING, message, None, source_size, webp_size)


def is_webp(source: str | bytes) -> bool:
    """Is this source a WebP already (by its signature, never its name)?"""
    if isinstance(source, bytes):
        head = source[:12]
    else:
        try:
            with open(source, "rb") as fh:
                head = fh.read(12)
        except OSError:
            return False  # the worker meets the same problem and says what it is
    return head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def already_webp(key: str) -> Result:
    message = "kept as it is, not re-encoded (--reencode-webp re-encodes it)"
    return Result(key, "skipped", ALREADY_WEBP, message)


def write_failure(key: str, target: str, exc: OSError) -> Result:
    error_type = NoSpaceLeft if exc.errno in (errno.ENOSPC, errno.EDQUOT) else WriteFailed
    error = error_type(f"{target}: {exc.strerror or exc}")
    return Result(key, "failed", error.reason, error.message, error_class=error_type.__name__)


@dataclass
class _InFlight:
    entry: SourceEntry
    checked_ns: int
    attempts: int
    known: str | None
    out_key: str
    plan: _DirectoryPlan
    #: The ETag of the bytes fetched (object stores): the commit checks it is the listed one.
    etag_read: str | None = None
    #: Bytes of the fetched source held in the budget until the image is committed.
    held: int = 0
    #: A source too large to hold in memory, fetched into this file instead.
    spool: Path | None = None
    #: The source object's user metadata (copied onto the output with --metadata all).
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    #: When the pipeline took the file on (the image span's start), and its span.
    started_ns: int = dataclasses.field(default_factory=time.time_ns)
    trace: ImageTrace = NO_IMAGE
    #: When an object store's fetch of the source ran (time.time_ns() pairs).
    fetched: tuple[int, int] | None = None


@dataclass
class _Upload:
    """An image's outputs on their way to DEST on an I/O thread."""

    flight: _InFlight
    encoded: Encoded
    warnings: tuple[str, ...]
    size: int
    more_bytes: int
    overwriting: list[str]


@dataclass(frozen=True)
class _Uploaded:
    """What an upload's thread found and did (the pipeline's thread records it)."""

    #: Set when the source changed since it was listed: nothing was written.
    changed: str | None = None
    written: tuple[str, ...] = ()
    #: A key that appeared meanwhile, where the conditional write found it (--if-exists skip).
    exists: str | None = None
    failed: tuple[str, OSError] | None = None
    seconds: float = 0.0


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
        target: str | None = None,
        own_outputs: OwnOutputs | None = None,
        transfers: Transfers | None = None,
        worker_run: WorkerRun | None = None,
    ) -> None:
        self.config = config
        #: The places and write policy of an executor whose workers read and write
        #: the stores themselves (executor.does_io): jobs then carry no bytes.
        self.worker_run = worker_run if executor.does_io else None
        #: Network I/O on its own threads (a remote SRC or DEST); None: inline.
        self.transfers = transfers
        #: Jobs whose sources were fetched, for the executor's next pulls.
        self._ready: deque[Job] = deque()
        self._fetching = 0
        self.budget = budget
        self.source = source
        self.dest = dest
        self.executor = executor
        self.listener = listener
        self.stop = stop or StopToken()
        self.prune = prune
        self.manifest = manifest
        #: One file: its output's key (DEST names the file), instead of output_key.
        self.target = target
        self.own_outputs = own_outputs
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
            "files_from": None if config.files_from is None else str(config.files_from),
            "strict": config.strict,
            "if_exists": config.if_exists,
            "delete": config.delete,
            "copy_unconverted": config.copy_unconverted,
            "min_saving": config.min_saving,
            "reencode_webp": config.reencode_webp,
            "fingerprint": self.fingerprint,
        }
        # Files in DEST newer than this may be outputs of a killed run whose rows
        # were lost with it (STYLE rule 5: coarse clocks get 2 s of doubt).
        since = manifest.unfinished_since() if manifest is not None else None
        self._unconfirmed_ns = None if since is None else int(since * 1e9) - 2_000_000_000
        self.summary.strict = config.strict
        self._in_flight: dict[int, _InFlight] = {}
        self._next_id = 0
        self._walk_done = False
        self._last_progress = time.monotonic()
        # Source bytes listed by the walk, and of the files handed to _plan:
        # those minus the bytes in flight are the bytes finished.
        self._found_bytes = 0
        self._planned_bytes = 0
        #: The count pass, running ahead of the throttled walk (None in a dry run).
        self.counter: TreeCounter | None = None
        #: The run's span and its images' (tracing.py); a no-op until run() starts it.
        self.tracing = RunTrace()

    def snapshot(self) -> RunSnapshot:
        summary = self.summary
        executor = self.executor.statistics()
        budget = self.budget.statistics() if self.budget is not None else None
        count = self.counter.statistics() if self.counter is not None else None
        # list() copies the values in one step under the GIL, so the pipeline's
        # thread adding or removing a job meanwhile cannot break the iteration.
        flights = list(self._in_flight.values())
        in_flight = len(flights)
        in_flight_bytes = sum(flight.entry.size for flight in flights)
        return RunSnapshot(
            found=summary.found,
            walk_done=self._walk_done,
            finished=summary.finished,
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
            found_bytes=self._found_bytes,
            finished_bytes=max(0, self._planned_bytes - in_flight_bytes),
            counted=count.files if count else 0,
            counted_bytes=count.bytes if count else 0,
            count_done=count.done if count else False,
            workers_connected=executor.connected,
        )

    def _publish_progress(self) -> None:
        """Tell the manifest how far the run is, for ``optimizr status`` to read.
        It goes out with the manifest's next batch commit: no commit of its own
        unless no rows come for a while (see Manifest.note_progress)."""
        if self.manifest is None or self.config.dry_run:
            return
        count = self.counter.statistics() if self.counter is not None else None
        total = known_total(
            self.summary.found,
            self._walk_done,
            count.files if count else 0,
            bool(count and count.done),
        )
        self.manifest.note_progress(self.summary.finished, total)

    def run(self) -> RunSummary:
        if self.listener:
            self.listener.started(self.snapshot)
        self.tracing = start_run(self.config.otlp_endpoint, self.summary.src, self.summary.dest)
        self.stop.attach(self.executor)
        if (
            not self.config.dry_run
            and self.target is None  # one file: never sweep the folder it is written to
            and (self.manifest is None or not self.manifest.previous_run_finished())
        ):
            # Only a run that did not finish (killed, crashed) can have left
            # temporaries behind: after a clean one, skip walking all of DEST.
            self.dest.remove_stale_temporaries()
        if not self.config.dry_run and not self.source.listing_is_remote:
            # A dry run walks unthrottled (nothing waits for a worker): no count needed.
            # Nor over an object store, where it would LIST every key a second time:
            # one LIST page per 1,000 keys is what a run costs there, and the total
            # is known once the walk ends.
            self.counter = TreeCounter(
                self.source,
                self._walk_options(),
                cancelled=lambda: self.stop.graceful or self._walk_done,
                keep=None if self.own_outputs is None else self.own_outputs.drop_for_count,
            ).start()
        try:
            for outcome in self.executor.imap_unordered(self._jobs()):
                if self.stop.hard:
                    break
                self._commit(outcome)
                self._landed()
            if not self.stop.hard:
                self._drain_uploads()
        finally:
            if self.counter is not None:
                self.counter.stop()
            self.summary.cluster_lost = self.executor.lost
            self.summary.interrupted = self.stop.graceful
            self.summary.stop_signal = self.stop.signum
            self.summary.walk_complete = self._walk_done
            self.summary.finished_at = time.time()
            self._publish_progress()
            self.tracing.finish(self.summary)
        return self.summary

    # -- plan --------------------------------------------------------------------

    def _walk_options(self) -> WalkOptions:
        config = self.config
        return WalkOptions(
            include=config.include,
            exclude=config.exclude,
            follow_symlinks=config.follow_symlinks,
            prune=self.prune,
        )

    def _jobs(self) -> Iterator[Job | Wakeup]:
        yield from self._walked()
        # The walk is over; sources still on their way are waited for.
        while self.transfers is not None and (self._fetching or self._ready):
            if self.stop.graceful:
                return
            self._landed()
            if self._ready:
                yield self._ready.popleft()
            elif self._fetching:
                yield self.transfers.wakeup

    def _walked(self) -> Iterator[Job | Wakeup]:
        visited: set[str] = set()
        for listing in self.source.walk(self._walk_options()):
            if self.stop.graceful:
                return
            if listing.skipped is not None:
                self.summary.warnings.append(f"{listing.directory}: {listing.skipped}")
                continue
            visited.add(listing.directory)
            if self.own_outputs is not None:
                before = self.own_outputs.count
                listing = self.own_outputs.drop(listing)
                self.summary.own_outputs += self.own_outputs.count - before
            self.summary.found += len(listing.entries)
            self._found_bytes += sum(entry.size for entry in listing.entries)
            if self.listener:
                self.listener.found(len(listing.entries))
            planner = _DirectoryPlan(self, listing)
            for entry in listing.entries:
                self._planned_bytes += entry.size
                if self.transfers is not None:
                    yield from self._room_for(entry.size)
                job = self._plan(entry, planner)
                if job is not None:
                    yield job
                while self._ready:
                    yield self._ready.popleft()
                if self.stop.graceful:
                    return
            self._forget_deleted(listing, planner)
        self._forget_vanished_directories(visited)
        self._walk_done = True
        if self.listener:
            self.listener.walk_done(self.summary.found)

    def _room_for(self, size: int) -> Iterator[Job | Wakeup]:
        """Wait, handing the executor what lands meanwhile, until another fetch of
        ``size`` bytes may start (a free I/O thread and room in the budget)."""
        assert self.transfers is not None
        waited = False
        while not self.transfers.has_room(size) and not self.stop.graceful:
            if not waited:
                self.transfers.stats.waited += 1
                waited = True
            self._landed()
            if self._ready:
                yield self._ready.popleft()
            else:
                yield self.transfers.wakeup

    def _landed(self, *, block: bool = False) -> None:
        """Take in the transfers that finished: fetched sources become jobs (in
        ``_ready``), finished uploads are recorded."""
        if self.transfers is None:
            return
        for tag, future in self.transfers.collect(block=block):
            if isinstance(tag, _Upload):
                self._upload_done(tag, future)
            else:
                assert isinstance(tag, _InFlight)
                self._fetching -= 1
                self._fetched(tag, future)

    def _drain_uploads(self) -> None:
        """At the end of the run: every output still uploading is waited for and
        recorded (a fetch that lands now, after a stop, is let go)."""
        while self.transfers is not None and self.transfers.in_flight:
            self._landed(block=True)
        for flight in self._ready:
            self._release(flight_of=flight)
        self._ready.clear()

    def _release(self, *, flight_of: Job) -> None:
        flight = self._in_flight.pop(flight_of.id, None)
        if flight is not None:
            self._done_with(flight)

    def _done_with(self, flight: _InFlight) -> None:
        """The fetched source is no longer needed: its bytes leave the budget, its
        spool file goes."""
        if flight.held and self.transfers is not None:
            self.transfers.free(flight.held)
            flight.held = 0
        if flight.spool is not None:
            with contextlib.suppress(FileNotFoundError):
                flight.spool.unlink()
            flight.spool = None

    def _fetch(self, flight: _InFlight) -> None:
        """Fetch ``flight``'s source on an I/O thread; ``_fetched`` takes it from there.

        Into memory, held in the budget; or, above --spool-above, into a file of the
        run's spool folder that the worker reads (streaming, like a local source),
        so an object larger than the budget converts as it would from a disk."""
        assert self.transfers is not None
        key, size = flight.entry.key, flight.entry.size
        fetch: Callable[[], StoredObject]
        if size > self.config.spool_above:
            spool = flight.spool = self.transfers.spool_path()
            fetch = partial(self.source.read_to_file, key, spool)
        else:
            flight.held = size
            self.transfers.hold(size)
            fetch = partial(self.source.read_object, key)
        self._fetching += 1
        self.transfers.submit(flight, self.transfers.timed("fetch", size, _timed(flight, fetch)))

    def _fetched(self, flight: _InFlight, future: Future[StoredObject]) -> None:
        try:
            stored = future.result()
        except OSError as exc:
            self._done_with(flight)
            unreadable = SourceUnreadable(exc.strerror or str(exc))
            self._recorder(flight, ())(_failure(flight.entry.key, unreadable))
            return
        if flight.spool is None and len(stored.data) != flight.held and self.transfers:
            # Replaced by a bigger or smaller object since the listing: hold what is held.
            self.transfers.hold(len(stored.data) - flight.held)
            flight.held = len(stored.data)
        flight.etag_read, flight.metadata = stored.etag, stored.metadata
        source: str | bytes = stored.data if flight.spool is None else str(flight.spool)
        job = self._prepared(flight, source, stored.metadata)
        if job is None:
            self._done_with(flight)
        else:
            self._ready.append(job)

    def _may_forget(self) -> bool:
        """Can the walk tell that a row's source is gone? Only with a manifest, over a
        whole tree (a list of sources proves nothing about the files it leaves out),
        and not in a dry run unless it is to report what --delete would remove."""
        return (
            self.manifest is not None
            and (not self.config.dry_run or self.config.delete)
            and self.source.complete_walk
        )

    def _forget_deleted(self, listing: DirectoryListing, plan: _DirectoryPlan) -> None:
        """Rows of this directory whose source is gone (not merely excluded) are dropped,
        so status and failed.jsonl do not report files that no longer exist; their
        outputs go with --delete."""
        if not self._may_forget() or plan.matched == len(plan.rows):
            return
        listed = {split_key(e.key)[1] for e in listing.entries}
        self._forget_missing((row for name, row in plan.rows.items() if name not in listed), plan)

    def _forget_vanished_directories(self, visited: set[str]) -> None:
        """After a whole walk: rows of directories the walk never listed, whose
        sources are gone (a folder deleted or emptied since), are dropped too.
        Directories merely excluded keep their rows: their files still exist."""
        if not self._may_forget():
            return
        assert self.manifest is not None
        for directory in self.manifest.directories():
            if directory not in visited:
                self._forget_missing(self.manifest.rows_in(directory).values(), None)

    def _forget_missing(self, rows: Iterable[Row], plan: _DirectoryPlan | None) -> None:
        for row in rows:
            if self.source.stat(row.key) is None:
                self._source_gone(row, plan)

    def _source_gone(self, row: Row, plan: _DirectoryPlan | None) -> None:
        """The source of ``row`` no longer exists: what of its output?

        With --delete it goes (rsync's --delete), if it is still as optimizr
        wrote it and no other source has that name now. Without, it stays,
        and the row stays too, as ``source deleted``: a later --delete, or the
        source coming back, still knows the file is optimizr's."""
        assert self.manifest is not None
        dry_run, output = self.config.dry_run, row.output
        taken = output is not None and plan is not None and split_key(output)[1] in plan.wanted
        found = self.dest.stat(output) if output is not None and not taken else None
        if output is None or found is None or found.size != row.output_size:
            # No output, another source's now, gone, or changed since: not ours to remove.
            if not dry_run:
                self.manifest.forget(row.key)
            return
        if self.config.delete:
            if not dry_run:
                try:
                    for target in reversed(_outputs_of(row)):  # the main output last
                        self.dest.delete(target)
                except OSError as exc:
                    self.summary.warnings.append(
                        f"could not delete {output} (its source is gone): {exc.strerror or exc}"
                    )
                    return  # the row stays: the next run tries again
                self.manifest.forget(row.key)
            self.summary.outputs.note_deleted(output, dry_run=dry_run)
            return
        self.summary.outputs.sources_gone += 1
        if row.reason != SOURCE_DELETED:
            self.manifest.record(
                row.key,
                size=row.size,
                mtime_ns=row.mtime_ns,
                checked_ns=row.checked_ns,
                fingerprint=row.fingerprint,
                status="skipped",
                reason=SOURCE_DELETED,
                output=output,
                output_size=row.output_size,
                # "pages: N" stays: it says which page outputs are optimizr's too.
                message=row.message
                if row.message.startswith(PAGES_PREFIX)
                else f"the source is gone; {output} is kept in DEST (--delete removes it)",
            )

    def _plan(self, entry: SourceEntry, plan: _DirectoryPlan) -> Job | None:
        checked_ns = plan.checked_ns
        row = plan.row(entry.key)
        # The reason this file had failed for before this run: failing the same
        # way again is not new, and does not fail the run without --strict.
        known = row.reason if row is not None and row.status == "failed" else None
        record = partial(self._record, entry=entry, checked_ns=checked_ns, known=known, plan=plan)
        if entry.error in (NOT_FOUND, OUTSIDE_SRC):
            # A listed name that is no file of SRC: no manifest row, which is about files.
            self._record(_failure(entry.key, _not_in_src(entry.error)))
            return None
        if entry.error is not None:
            kind = PermissionDenied if entry.error == "permission denied" else SourceUnreadable
            error = kind(f"cannot read: {entry.error}")
            record(_failure(entry.key, error))
            return None
        out_key = plan.names[entry.key]
        owner = plan.wanted[split_key(out_key)[1]]
        if owner != entry.key:
            record(_failure(entry.key, self._conflict(entry.key, owner, out_key)))
            return None
        attempts = 0
        if not self.config.force:
            if row is not None and row.describes(
                entry.size, entry.mtime_ns, self.fingerprint, entry.etag
            ):
                settled = self._settled(entry, row, out_key, plan)
                if (
                    settled is not None
                    and settled.status == "skipped"
                    and settled.reason != UP_TO_DATE
                    and settled.output != row.output
                ):
                    # Its copy was made or removed just now: the row must say so.
                    record(settled)
                    return None
                if settled is not None:
                    self._record(settled, known=known)
                    return None
                attempts = row.attempts if row.status == "failed" else 0
            elif row is None and self.manifest is not None and self._may_adopt():
                if self._adopt(entry, out_key, plan):
                    return None
            if row is None:
                found = plan.outputs().get(split_key(out_key)[1])
                flight = _InFlight(entry, checked_ns, 0, known, out_key, plan)
                adopted = self._adopt_marked(flight, out_key, found)
                if adopted is not None:
                    self._record(adopted)
                    return None
        if self.config.dry_run:
            self._record(self._dry_run_result(entry, out_key, plan), known=known)
            return None
        flight = _InFlight(entry, checked_ns, attempts, known, out_key, plan)
        if self.worker_run is not None:
            return self._worker_job(flight)
        source: str | bytes | None = self.source.local_path(entry.key)
        metadata: dict[str, str] = {}
        if source is None:
            if self.transfers is not None:
                self._fetch(flight)
                return None
            try:
                stored = self.source.read_object(entry.key)
            except OSError as exc:
                unreadable = SourceUnreadable(exc.strerror or str(exc))
                record(_failure(entry.key, unreadable), attempts=attempts)
                return None
            source, metadata, flight.etag_read = stored.data, stored.metadata, stored.etag
            flight.metadata = metadata
        return self._prepared(flight, source, metadata)

    def _prepared(
        self, flight: _InFlight, source: str | bytes, metadata: dict[str, str]
    ) -> Job | None:
        """The job for a source at hand (its path, or its bytes once fetched), or None
        when what it is settles it without a worker."""
        entry, plan, out_key, attempts = flight.entry, flight.plan, flight.out_key, flight.attempts
        record = partial(
            self._record,
            entry=entry,
            checked_ns=flight.checked_ns,
            known=flight.known,
            plan=plan,
        )
        if OUTPUT_METADATA in metadata:
            # An optimizr output in a bucket that mixes both: never a source (it is
            # taken out of the files found, as OwnOutputs takes out those it knows).
            self.summary.own_outputs += 1
            self.summary.found -= 1
            self._found_bytes -= entry.size
            self._planned_bytes -= entry.size
            return None
        if not self.config.reencode_webp and is_webp(source):
            # Decoding and re-encoding a WebP only loses quality (lossless ones
            # became lossy) for a few bytes: it is kept as it is unless asked.
            record(self._keep_as_is(already_webp(entry.key), entry, plan))
            return None
        if self._kept_in_the_way(out_key, plan):
            record(self._output_exists(entry.key, out_key))
            return None
        cost = 0
        if self.budget is not None:
            header = probe(source)
            if header is not None:
                cost = estimate_peak_bytes(header, self.config.encode)
                refusal = self._refusal(header, cost)
                if refusal is not None:
                    record(_failure(entry.key, refusal), attempts=attempts)
                    return None
        self._next_id += 1
        self._in_flight[self._next_id] = flight
        flight.trace = self.tracing.image(entry.key, entry.size, flight.started_ns)
        if flight.fetched is not None:
            flight.trace.timed("fetch", *flight.fetched)
        return Job(
            self._next_id,
            entry.key,
            source,
            self.config.encode,
            cost,
            verify=self.config.verify,
            trace=flight.trace.carrier,
        )

    def _worker_job(self, flight: _InFlight) -> Job | None:
        """The job for a worker that reads the source and writes the outputs itself:
        only the header comes here (a ranged read), for the memory estimate and the
        refusals the header alone decides."""
        assert self.worker_run is not None
        from optimizr.executors.worker_io import WorkerIO

        entry, plan, out_key = flight.entry, flight.plan, flight.out_key
        record = partial(
            self._record, entry=entry, checked_ns=flight.checked_ns, known=flight.known, plan=plan
        )
        if self._kept_in_the_way(out_key, plan):
            record(self._output_exists(entry.key, out_key))
            return None
        head: str | bytes | None = self.source.local_path(entry.key)
        if head is None:
            try:
                head = self.source.read_head(entry.key, _HEADER_BYTES)
            except OSError as exc:
                unreadable = SourceUnreadable(exc.strerror or str(exc))
                record(_failure(entry.key, unreadable), attempts=flight.attempts)
                return None
        if not self.config.reencode_webp and is_webp(head):
            record(self._keep_as_is(already_webp(entry.key), entry, plan))
            return None
        cost = 0
        header = probe(head)
        if header is not None:
            cost = estimate_peak_bytes(header, self.config.encode)
            refusal = self._refusal(header, cost)
            if refusal is not None:
                record(_failure(entry.key, refusal), attempts=flight.attempts)
                return None
        absent = self.config.if_exists == "skip" and split_key(out_key)[1] not in plan.outputs()
        io = WorkerIO(self.worker_run, entry, out_key, if_absent=absent)
        self._next_id += 1
        self._in_flight[self._next_id] = flight
        # The worker makes the fetch and write spans too, under this image's.
        flight.trace = self.tracing.image(entry.key, entry.size, flight.started_ns)
        return Job(
            self._next_id,
            entry.key,
            "",
            self.config.encode,
            cost,
            verify=self.config.verify,
            trace=flight.trace.carrier,
            io=io,
        )

    def _commit_stored(self, flight: _InFlight, outcome: Outcome) -> None:
        """Record what a worker did itself (it wrote the outputs, or why not)."""
        stored = outcome.stored
        assert stored is not None
        entry, key, plan = flight.entry, flight.entry.key, flight.plan
        record = self._recorder(flight, outcome.warnings)
        for target in stored.written:
            plan.written.add(split_key(target)[1])
        if stored.status == "own output":
            self.summary.own_outputs += 1
            self.summary.found -= 1
            self._found_bytes -= entry.size
            self._planned_bytes -= entry.size
        elif stored.status == "already webp":
            record(self._keep_as_is(already_webp(key), entry, plan))
        elif stored.status == "exists":
            record(self._output_exists(key, stored.target))
        elif stored.status == "larger":
            larger = larger_than_source(
                key, stored.bytes_out, entry.size, self.config.if_larger, self.config.min_saving
            )
            assert larger is not None
            record(self._keep_as_is(larger, entry, plan))
        else:
            assert outcome.encoded is not None
            result = self._converted(
                flight,
                outcome.encoded,
                stored.bytes_out,
                stored.more_bytes,
                stored.write_seconds,
                [],
            )
            record(result)

    def _conflict(self, key: str, owner: str, out_key: str) -> OutputConflict:
        if self.config.name == "replace":
            hint = (
                f"with --name auto these two become {output_key(owner, 'append')} and "
                f"{output_key(key, 'append')}, and every other file keeps its name"
            )
        else:
            hint = "rename one of them"
        return OutputConflict(f"{out_key} is already the output of {owner}; {hint}")

    def _kept_in_the_way(self, out_key: str, plan: _DirectoryPlan) -> bool:
        """Does a file optimizr did not write stand where ``out_key`` goes, to be kept?"""
        if self.config.if_exists != "skip":
            return False
        found = plan.outputs().get(split_key(out_key)[1])
        return found is not None and self._foreign(out_key, plan, found)

    def _foreign(self, out_key: str, plan: _DirectoryPlan, found: FileStat) -> bool:
        """Is the file ``found`` at ``out_key`` one optimizr did not write?

        Its own: a row of the folder names it (whatever that row's status), it
        was written earlier in this run, or it is newer than the start of a
        run that was killed before its rows were committed."""
        name = split_key(out_key)[1]
        if name in plan.owned() or name in plan.written:
            return False
        if self._unconfirmed_ns is not None and found.mtime_ns >= self._unconfirmed_ns:
            return False
        return self.manifest is None or self.manifest.owner_of(out_key) is None

    def _output_exists(self, key: str, out_key: str) -> Result:
        message = (
            f"{out_key} is in DEST and optimizr did not write it: kept, not converted "
            "(--if-exists overwrite replaces it)"
        )
        if self.manifest is not None and self.manifest.rebuilt:
            message += (
                "; after --rebuild-manifest only outputs newer than their source "
                "are known to be optimizr's"
            )
        return Result(key, "skipped", OUTPUT_EXISTS, message)

    def _refusal(self, header: Header, cost: int) -> TooLarge | None:
        """What the header alone says cannot be converted, the image's own limits first:
        a bomb over --max-pixels must be told so, not to raise --max-memory by 44 GB."""
        assert self.budget is not None
        options = self.config.encode
        try:
            check_pixels(header.width, header.height, header.frames, options)
            if options.shrink_box(header.width, header.height) is None:
                # Kept at its own size, so the worker would meet exactly this limit.
                check_webp_limit(header.width, header.height, options)
        except TooLarge as exc:
            return exc
        capacity = self.executor.memory_capacity()
        if capacity is not None:
            if cost <= capacity:
                return None
            need = -(-cost // 2**20)
            return OverMemoryBudget(
                f"{header.width}x{header.height} needs about {need:,} MiB to convert, more "
                f"than any worker's MEMORY resource ({capacity // 2**20:,} MiB); start "
                "workers with a larger --resources MEMORY=... or use --max-width/--max-height"
            )
        # Refused only if it cannot fit even alone: beside its own worker's
        # baseline, the others retired (an image bigger than what the other
        # workers leave free runs that way).
        if self.budget.fits_alone(cost):
            return None
        budget = self.budget
        # Rounded apart (need up, room down): never "134 MiB, more than ... (134 MiB)".
        need, room = -(-cost // 2**20), budget.alone_capacity // 2**20
        return OverMemoryBudget(
            f"{header.width}x{header.height} needs about {need:,} MiB to convert, more "
            f"than --max-memory {budget.total / 2**20:,.0f} MiB leaves for one image even "
            f"converting alone ({room:,} MiB); raise --max-memory or use --max-width/--max-height"
        )

    def _settled(
        self, entry: SourceEntry, row: Row, out_key: str, plan: _DirectoryPlan
    ) -> Result | None:
        """The result that stands without opening the file, if the manifest proves one."""
        if row.status == "done":
            outputs = plan.outputs()
            output = outputs.get(split_key(out_key)[1])
            pages = _pages_in(row.message)
            pages_there = all(
                split_key(page_key(out_key, n))[1] in outputs for n in range(2, pages + 1)
            )
            if (
                row.output == out_key
                and output is not None
                and output.size == row.output_size
                and pages_there
            ):
                return Result(entry.key, "skipped", UP_TO_DATE, "", out_key)
            return None  # the output is gone or was changed: make it again
        if row.status == "skipped":
            return self._settled_skip(entry, row, out_key, plan)
        if cause_of(row.error_class, row.reason) != "image":
            # Transient (a full disk, a permission...) or decided by the run's
            # settings and other files (the memory budget, an output conflict):
            # this run decides it again from what it finds.
            return None
        if self.config.retry_failed and row.attempts < self.config.max_attempts:
            return None
        self.summary.known_failed += 1
        attempts = f"{row.attempts} attempt" + ("s" if row.attempts != 1 else "")
        if self.config.retry_failed:
            hint = f"gave up after {attempts} (--max-attempts)"
        else:
            hint = f"known bad after {attempts}, not retried without --retry-failed"
        return Result(
            entry.key,
            "failed",
            row.reason,
            f"{row.message}; {hint}" if row.message else hint,
            error_class=row.error_class,
        )

    def _settled_skip(
        self, entry: SourceEntry, row: Row, out_key: str, plan: _DirectoryPlan
    ) -> Result | None:
        """A skip stands, unless it was about DEST and DEST or the options changed.

        Copies (--copy-unconverted) are made, made again or removed here, from
        the row's evidence alone: nothing is encoded again to decide them."""
        if row.reason == SOURCE_DELETED:
            return None  # it is back: convert it (its old output is optimizr's)
        if row.reason == OUTPUT_EXISTS:
            found = plan.outputs().get(split_key(out_key)[1])
            if self.config.if_exists == "overwrite" or found is None:
                return None  # the file in the way is gone, or may now be replaced
            if not self._foreign(out_key, plan, found):
                return None
        result = Result(entry.key, "skipped", row.reason, row.message)
        wanted = self.config.copy_unconverted and row.reason in COPYABLE
        if wanted and row.output is not None:
            found = plan.outputs().get(split_key(row.output)[1])
            if found is not None and found.size == row.output_size:
                return dataclasses.replace(
                    result, output=row.output, copied=found.size, note="copied as is"
                )
        if wanted:
            return self._keep_as_is(result, entry, plan)
        return result  # without output: a copy made before is removed as it is recorded

    def _keep_as_is(self, result: Result, entry: SourceEntry, plan: _DirectoryPlan) -> Result:
        """--copy-unconverted: a file not converted goes to DEST under its own name,
        so DEST is a complete tree for a web deploy."""
        key = entry.key
        if not self.config.copy_unconverted or result.reason not in COPYABLE:
            return result
        name = split_key(key)[1]
        owner = plan.wanted.get(name, key)
        if owner != key:
            return dataclasses.replace(
                result, note=f"not copied: {key} in DEST is the output of {owner}"
            )
        if self.config.dry_run:
            return dataclasses.replace(result, note="would be copied as is")
        if self._same_file(key):
            return dataclasses.replace(result, note="already in DEST")  # SRC is DEST
        found = self.dest.stat(key)
        overwriting = found is not None and self._foreign(key, plan, found)
        if overwriting and self.config.if_exists == "skip":
            self.summary.outputs.kept += 1
            return dataclasses.replace(
                result,
                note=f"not copied: {key} is in DEST and optimizr did not write it "
                "(--if-exists overwrite replaces it)",
            )
        try:
            size = self.dest.copy_in(key, self.source, key)
        except OSError as exc:
            return write_failure(key, key, exc)
        plan.written.add(name)
        outputs = self.summary.outputs
        outputs.copied += 1
        outputs.copied_bytes += size
        if overwriting:
            outputs.overwritten += 1
        return dataclasses.replace(result, output=key, copied=size, note="copied as is")

    def _same_file(self, key: str) -> bool:
        src_path, dest_path = self.source.local_path(key), self.dest.local_path(key)
        if src_path is None or dest_path is None:
            return False
        try:
            return os.path.samefile(src_path, dest_path)
        except OSError:
            return False

    def _may_adopt(self) -> bool:
        assert self.manifest is not None
        return self.manifest.rebuilt or (
            self.manifest.restored and self._unconfirmed_ns is not None
        )

    def _adopt(self, entry: SourceEntry, out_key: str, plan: _DirectoryPlan) -> bool:
        """After --rebuild-manifest: an output already in DEST, complete and newer
        than its source, is taken as done under the current options.

        After a restore from DEST's snapshot (older than DEST itself when the run
        that wrote it was killed): only outputs written since that run started,
        the ones whose rows the snapshot missed; anything older and rowless is
        not known to be optimizr's."""
        assert self.manifest is not None
        output = plan.outputs().get(split_key(out_key)[1])
        if output is None or output.mtime_ns < entry.mtime_ns:
            return False
        if not self.manifest.rebuilt:
            assert self._unconfirmed_ns is not None
            if output.mtime_ns < self._unconfirmed_ns:
                return False
        path = self.dest.local_path(out_key)
        # An object store never shows a partial object; a file may be one.
        if path is not None and not file_is_complete_webp(path):
            return False
        if path is None and output.size == 0:
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
            etag=entry.etag,
        )
        how = "--rebuild-manifest" if self.manifest.rebuilt else "recovery from DEST"
        self._record(Result(entry.key, "skipped", UP_TO_DATE, f"adopted by {how}"))
        return True

    def _adopt_marked(
        self, flight: _InFlight, out_key: str, found: FileStat | None
    ) -> Result | None:
        """An output in DEST (``found``) that another writer made from this very source
        version with these options (its metadata says: the source's ETag, the options
        fingerprint) is taken as done, with no write: a watch replica whose conditional
        PUT lost the race to another replica, or that has no row for the output another
        one wrote (issue 16). Its row is written here; the result, to record, returned.
        Only on an object store, whose listing gives ETags: one HEAD, made only for an
        output that is there with no row of this manifest."""
        entry = flight.entry
        if self.manifest is None or self.config.dry_run or entry.etag is None or found is None:
            return None
        try:
            marks = self.dest.read_metadata(out_key)
        except OSError:
            return None  # unknown: the write decides, as it would without the marks
        if (
            not marks
            or OUTPUT_METADATA not in marks
            or marks.get(SOURCE_ETAG_METADATA) != entry.etag
            or marks.get(FINGERPRINT_METADATA) != self.fingerprint
        ):
            return None
        self.manifest.record(
            entry.key,
            size=entry.size,
            mtime_ns=entry.mtime_ns,
            checked_ns=flight.checked_ns,
            fingerprint=self.fingerprint,
            status="done",
            output=out_key,
            output_size=found.size,
            etag=entry.etag,
        )
        flight.plan.written.add(split_key(out_key)[1])
        message = f"{out_key} was written by another optimizr writer from this source version"
        return Result(entry.key, "skipped", UP_TO_DATE, message, out_key)

    def _dry_run_result(self, entry: SourceEntry, out_key: str, plan: _DirectoryPlan) -> Result:
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
            error: ImageError = NotAnImage("no known image signature")
            return self._keep_as_is(classify_error(entry.key, error), entry, plan)
        if not sniffed.supported:
            error = UnsupportedImage(f"{sniffed.format} is not a format optimizr converts")
            return self._keep_as_is(classify_error(entry.key, error), entry, plan)
        if sniffed.format == "webp" and not self.config.reencode_webp:
            return self._keep_as_is(already_webp(entry.key), entry, plan)
        if self._kept_in_the_way(out_key, plan):
            return self._output_exists(entry.key, out_key)
        kind = sniffed.kind
        return Result(
            entry.key,
            "skipped",
            DRY_RUN,
            f"would convert {kind} -> {out_key}",
            out_key,
            bytes_in=entry.size,
        )

    # -- commit ------------------------------------------------------------------

    def _commit(self, outcome: Outcome) -> None:
        flight = self._in_flight.pop(outcome.job.id)
        self._done_with(flight)  # the source's bytes (or spool file) are done with
        if outcome.stored is not None and outcome.error is None:
            self._commit_stored(flight, outcome)
            return
        entry, key, out_key, plan = flight.entry, flight.entry.key, flight.out_key, flight.plan
        record = self._recorder(flight, outcome.warnings)
        if outcome.error is not None or outcome.encoded is None:
            error = outcome.error or ImageError("no result")
            record(self._keep_as_is(classify_error(key, error), entry, plan))
            return
        encoded = outcome.encoded
        more_bytes = sum(len(page) for page in encoded.more_pages)
        size = len(encoded.webp) + more_bytes
        larger = larger_than_source(
            key, size, entry.size, self.config.if_larger, self.config.min_saving
        )
        if larger is not None:
            record(self._keep_as_is(larger, entry, plan))
            return
        # Pages 2, 3, ... first: the main output, and the row after it, say the
        # whole source is done only once every page is in place.
        writes = [(page_key(out_key, n), data) for n, data in enumerate(encoded.more_pages, 2)]
        writes.append((out_key, encoded.webp))
        if self.transfers is not None and self.dest.local_path(out_key) is None:
            self._upload(flight, outcome, writes, size, more_bytes)
            return
        changed = _changed(entry, self.source.stat(key), flight.etag_read)
        if changed is not None:
            # Recorded with the size and mtime it had when listed: the next run
            # sees the difference and converts it again.
            record(
                _failure(key, SourceChanged(f"the source {changed} while it was being converted"))
            )
            return
        mtime_ns = entry.mtime_ns if self.config.preserve_mtime else None
        # Checked again here: a file may have appeared while the image converted.
        overwriting = []
        for target, _ in writes:
            found = self.dest.stat(target)
            if found is not None and self._foreign(target, plan, found):
                if self.config.if_exists == "skip":
                    record(self._output_exists(key, target))
                    return
                overwriting.append(target)
        write_started = time.perf_counter()
        with flight.trace.phase("write", **{"optimizr.bytes": size}):
            for target, data in writes:
                try:
                    self.dest.write_atomic(target, data, mtime_ns=mtime_ns)
                except OSError as exc:
                    record(write_failure(key, target, exc))
                    return
                plan.written.add(split_key(target)[1])
        written = time.perf_counter() - write_started
        record(self._converted(flight, encoded, size, more_bytes, written, overwriting))

    def _recorder(self, flight: _InFlight, warnings: tuple[str, ...]) -> Callable[[Result], None]:
        def record(result: Result) -> None:
            if warnings:  # what libvips said about this image stays with it
                result = dataclasses.replace(result, warnings=(*result.warnings, *warnings))
            flight.trace.finished(result)
            self._record(
                result,
                entry=flight.entry,
                checked_ns=flight.checked_ns,
                attempts=flight.attempts,
                known=flight.known,
                plan=flight.plan,
            )

        return record

    def _converted(
        self,
        flight: _InFlight,
        encoded: Encoded,
        size: int,
        more_bytes: int,
        written: float,
        overwriting: list[str],
    ) -> Result:
        self.summary.outputs.overwritten += len(overwriting)
        # Only now, with the output in place, may the row say done.
        return Result(
            flight.entry.key,
            "converted",
            None,
            # Kept in the manifest row: a re-run checks that every page is still there.
            f"{PAGES_PREFIX}{1 + len(encoded.more_pages)}" if encoded.more_pages else "",
            flight.out_key,
            flight.entry.size,
            size,
            encoded.facts,
            write_seconds=written,
            warnings=encoded.facts.warnings,
            more_pages_bytes=more_bytes,
            note=f"replaced {', '.join(overwriting)}, which optimizr had not written"
            if overwriting
            else "",
        )

    def _upload(
        self,
        flight: _InFlight,
        outcome: Outcome,
        writes: list[tuple[str, bytes]],
        size: int,
        more_bytes: int,
    ) -> None:
        """Hand an image's outputs to an I/O thread (a remote DEST).

        What the DEST listing says decides each write: a key that is not there is
        written only if still absent (If-None-Match) under --if-exists skip, so a
        file that appears meanwhile is kept and two machines racing on one key
        cannot both win; a foreign one that is there is kept or replaced now."""
        assert self.transfers is not None and outcome.encoded is not None
        plan, key = flight.plan, flight.entry.key
        overwriting: list[str] = []
        absent: set[str] = set()
        #: Replaced only if still as listed (If-Match): of two writers replacing one
        #: output (watch replicas, a new source version) exactly one wins too.
        listed: dict[str, str] = {}
        for target, _ in writes:
            found = plan.outputs().get(split_key(target)[1])
            if found is None:
                if self.config.if_exists == "skip":
                    absent.add(target)
            elif self._foreign(target, plan, found):
                if self.config.if_exists == "skip":
                    self._recorder(flight, outcome.warnings)(self._output_exists(key, target))
                    return
                overwriting.append(target)
            elif found.etag is not None and target not in plan.written:
                listed[target] = found.etag
        upload = _Upload(flight, outcome.encoded, outcome.warnings, size, more_bytes, overwriting)
        self.transfers.hold(size)
        mtime_ns = flight.entry.mtime_ns if self.config.preserve_mtime else None
        # The source's user metadata travels only when all metadata is kept.
        metadata = dict(flight.metadata) if self.config.encode.metadata == "all" else {}
        # What the output is made from: another writer racing on it (a watch replica)
        # tells by these that it is the output it made itself (_adopt_marked).
        metadata[FINGERPRINT_METADATA] = self.fingerprint
        if flight.entry.etag is not None:
            metadata[SOURCE_ETAG_METADATA] = flight.entry.etag

        def put() -> _Uploaded:
            # On the I/O thread: storage calls only, nothing of the manifest or summary.
            changed = _changed(flight.entry, self.source.stat(key), flight.etag_read)
            if changed is not None:
                return _Uploaded(changed=changed)
            with flight.trace.phase("write", **{"optimizr.bytes": size}):
                return write()

        def write() -> _Uploaded:
            started = time.perf_counter()
            done: list[str] = []
            for target, data in writes:
                try:
                    self.dest.write_atomic(
                        target,
                        data,
                        mtime_ns=mtime_ns,
                        if_absent=target in absent,
                        metadata=metadata,
                        if_match=listed.get(target),
                    )
                except FileExistsError:
                    return _Uploaded(written=tuple(done), exists=target)
                except OSError as exc:
                    return _Uploaded(written=tuple(done), failed=(target, exc))
                done.append(target)
            return _Uploaded(written=tuple(done), seconds=time.perf_counter() - started)

        self.transfers.submit(upload, self.transfers.timed("upload", size, put))

    def _upload_done(self, upload: _Upload, future: Future[_Uploaded]) -> None:
        assert self.transfers is not None
        self.transfers.free(upload.size)
        flight = upload.flight
        key = flight.entry.key
        record = self._recorder(flight, upload.warnings)
        try:
            result = future.result()
        except OSError as exc:  # the source's HEAD failed
            record(_failure(key, SourceUnreadable(exc.strerror or str(exc))))
            return
        for target in result.written:
            flight.plan.written.add(split_key(target)[1])
        if result.changed is not None:
            changed = SourceChanged(f"the source {result.changed} while it was being converted")
            record(_failure(key, changed))
        elif result.exists is not None:
            # Lost the If-None-Match race: to another writer of this same output?
            adopted = None
            if result.exists == flight.out_key:
                with contextlib.suppress(OSError):  # unknown: kept, as without the marks
                    found = self.dest.stat(flight.out_key)
                    adopted = self._adopt_marked(flight, flight.out_key, found)
            if adopted is not None:
                flight.trace.finished(adopted)
                self._record(adopted)
            else:
                record(self._output_exists(key, result.exists))
        elif result.failed is not None:
            record(write_failure(key, result.failed[0], result.failed[1]))
        else:
            record(
                self._converted(
                    flight,
                    upload.encoded,
                    upload.size,
                    upload.more_bytes,
                    result.seconds,
                    upload.overwriting,
                )
            )

    def _record(
        self,
        result: Result,
        entry: SourceEntry | None = None,
        checked_ns: int = 0,
        attempts: int = 0,
        known: str | None = None,
        plan: _DirectoryPlan | None = None,
    ) -> None:
        if entry is not None and result.status == "failed" and not result.bytes_in:
            # A failure still had a source of some size: logs and the report show it.
            result = dataclasses.replace(result, bytes_in=entry.size)
        self.summary.record(result)
        if result.status == "failed" and result.reason != known:
            self.summary.new_failed += 1
        if result.reason == OUTPUT_EXISTS:
            self.summary.outputs.kept += 1
        self._last_progress = time.monotonic()
        if self.listener:
            self.listener.finished(result)
        self._publish_progress()
        if entry is None or self.manifest is None or self.config.dry_run:
            return
        status = {"converted": "done", "skipped": "skipped", "failed": "failed"}[result.status]
        if status == "failed" and cause_of(result.error_class, result.reason) != "run":
            attempts += 1  # a refusal by the budget or a conflict never tried the image
        prior = plan.prior(entry.key) if plan is not None else None
        output: str | None = None
        output_size: int | None = None
        if status == "done":
            # The main output's own size: the evidence a re-run checks on disk.
            output, output_size = result.output, result.bytes_out - result.more_pages_bytes
        elif result.copied is not None:
            output, output_size = result.output, result.copied
        elif status == "failed" and prior is not None:
            # A failure leaves an earlier output where it is (a cron run that
            # meets a full disk must not take images off a site), and the row
            # goes on saying optimizr wrote it.
            output, output_size = prior.output, prior.output_size
        self.manifest.record(
            entry.key,
            size=entry.size,
            mtime_ns=entry.mtime_ns,
            checked_ns=checked_ns,
            fingerprint=self.fingerprint,
            status=status,
            reason=result.reason,
            output=output,
            output_size=output_size,
            error_class=result.error_class,
            message=result.message,
            attempts=attempts,
            etag=entry.etag,
        )
        if prior is not None and prior.output is not None and status != "failed":
            assert plan is not None
            pages = _pages_in(result.message) if status == "done" else 1
            now = set(_with_pages(output, pages)) if output is not None else set()
            self._remove_stale(entry.key, prior, now, plan)

    def _remove_stale(self, key: str, prior: Row, now: set[str], plan: _DirectoryPlan) -> None:
        """The files optimizr wrote for a source that it no longer has as outputs:
        another name now (--name), or none (skipped, its copy no longer wanted).

        Removed only as written (the main output at its recorded size), and never
        while another source of the folder claims that name (a.png taking over the
        a.webp that a.jpg had, under --name replace)."""
        for target in _outputs_of(prior):
            name = split_key(target)[1]
            if target in now or plan.wanted.get(name, key) != key or name in plan.written:
                continue  # still its own, or another source's now
            found = self.dest.stat(target)
            if found is None or (target == prior.output and found.size != prior.output_size):
                continue
            try:
                removed = self.dest.delete(target)
            except OSError as exc:
                self.summary.warnings.append(
                    f"could not remove {target}, no longer the output of anything: "
                    f"{exc.strerror or exc}"
                )
                continue
            if removed:
                self.summary.outputs.stale_removed += 1


class _DirectoryPlan:
    """What the pipeline knows about one source directory while planning it."""

    def __init__(self, pipeline: Pipeline, listing: DirectoryListing) -> None:
        directory = listing.directory
        self.directory = directory
        self.dest = pipeline.dest
        # Taken before the rows are read: an edit after this moment shows as a
        # newer mtime than the row's, or falls inside the settle window.
        self.checked_ns = time.time_ns()
        # Decided for the whole folder at once: --name auto needs every name.
        self.names = output_keys(
            (e.key for e in listing.entries if e.error is None), pipeline.config.name
        )
        if pipeline.target is not None:  # one file: its output is the path given
            self.names = dict.fromkeys(self.names, pipeline.target)
        #: Output file name -> the source that claims it (the first, in name order).
        self.wanted: dict[str, str] = {}
        for key, out_key in self.names.items():
            self.wanted.setdefault(split_key(out_key)[1], key)
        # Read under --force too: it skips nothing, but a failure is still new
        # only if the file had not failed the same way before, and the rows say
        # which files in DEST optimizr wrote.
        self.manifest = pipeline.manifest
        self.rows = self.manifest.rows_in(directory) if self.manifest is not None else {}
        self.matched = 0  # rows that a listed file found
        #: Output names written into this folder by this run.
        self.written: set[str] = set()
        self._outputs: dict[str, FileStat] | None = None
        self._owned: set[str] | None = None

    def prior(self, key: str) -> Row | None:
        """The row a source of this folder had as the run began (not counted as a match)."""
        directory, name = split_key(key)
        return self.rows.get(name) if directory == self.directory else None

    def owned(self) -> set[str]:
        """Names in the DEST folder that rows say optimizr wrote (as the run began)."""
        if self._owned is None:
            self._owned = {
                split_key(target)[1] for row in self.rows.values() for target in _outputs_of(row)
            }
        return self._owned

    def row(self, key: str) -> Row | None:
        """The manifest's row for a listed file, if it has one."""
        directory, name = split_key(key)
        if directory != self.directory:
            # The entry that stands for an unreadable directory is recorded under
            # its own key, a name in the parent directory.
            if self.manifest is None:
                return None
            return self.manifest.rows_in(directory).get(name)
        row = self.rows.get(name)
        if row is not None:
            self.matched += 1
        return row

    def outputs(self) -> dict[str, FileStat]:
        """The files in the mirrored DEST directory, listed once and only if needed."""
        if self._outputs is None:
            self._outputs = self.dest.list_files(self.directory)
        return self._outputs


def _not_in_src(error: str) -> ImageError:
    if error == NOT_FOUND:
        return SourceDisappeared("listed, but not in SRC: --files-from names are relative to SRC")
    return OutsideSource("listed, but the name leads out of SRC; refused")


def _outputs_of(row: Row) -> list[str]:
    """Every file a row says optimizr wrote: its output, and the outputs of pages 2, 3, ..."""
    if not row.output:
        return []
    return _with_pages(row.output, _pages_in(row.message))


def _with_pages(output: str, pages: int) -> list[str]:
    """``output`` and the outputs of its pages 2, 3, ... up to ``pages``."""
    return [output, *(page_key(output, n) for n in range(2, pages + 1))]


def _pages_in(message: str) -> int:
    """The page count a done row's message records ("pages: 3"), else 1."""
    if message.startswith(PAGES_PREFIX):
        try:
            return max(1, int(message[len(PAGES_PREFIX) :]))
        except ValueError:
            pass
    return 1


def row_outputs(row: Row) -> list[str]:
    """The output keys a done row stands for: its output and, after --pages all, the
    other pages' (which the walk must not take as sources when they lie in SRC)."""
    return _outputs_of(row) if row.status == "done" else []


def _changed(entry: SourceEntry, now: FileStat | None, etag_read: str | None) -> str | None:
    """How the source differs from what the walk listed ("was deleted", "was
    modified"), or None. On an object store the ETag decides (of the object now,
    and of the bytes that were fetched): its last-modified has one-second
    granularity in a HEAD but finer in a LIST, so comparing those would see
    changes that are not."""
    if now is None:
        return "was deleted"
    if entry.etag is not None and now.etag is not None:
        same = now.etag == entry.etag and etag_read in (None, entry.etag)
        return None if same and now.size == entry.size else "was modified"
    if (now.size, now.mtime_ns) != (entry.size, entry.mtime_ns):
        return "was modified"
    return None


def _timed(flight: _InFlight, fetch: Callable[[], StoredObject]) -> Callable[[], StoredObject]:
    """``fetch``, noting in ``flight`` when it ran (its span is made with the image's)."""

    def timed() -> StoredObject:
        started = time.time_ns()
        try:
            return fetch()
        finally:
            flight.fetched = (started, time.time_ns())

    return timed


#: The check a cluster worker makes before it writes (executors/worker_io.py).
changed_since_listed = _changed


def _failure(key: str, error: ImageError) -> Result:
    return Result(key, "failed", error.reason, error.message, error_class=type(error).__name__)
