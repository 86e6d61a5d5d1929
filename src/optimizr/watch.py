"""``optimizr watch``: convert images as bucket events arrive, with a batch run's guarantees.

One loop (STYLE: "take a message, convert, commit, acknowledge")::

    receive up to --batch messages from the EventSource
    -> parse each (bucket_events) -> the source keys they name, filtered
    -> one Pipeline over exactly those keys (EventKeys, a Storage that "walks"
       only them), on the service's one executor, budget and manifest
    -> the manifest flushed -> each message settled: ack / nak / term

The pipeline is the batch run's own, so every per-image guarantee holds as it does
there: the manifest's evidence (the source's ETag, or size + mtime, and the options
fingerprint, and the output still in DEST) makes a duplicate or redelivered event a
no-op with no second write; outputs are written atomically (conditional puts on an
object store) before their rows; a source changed while converting is not
committed; the memory budget admits each image; a worker that crashes or hangs
fails that image alone.

DEST may be a bucket written by several replicas of the service at once, each with its
own manifest: a conditional put decides which replica's output lands, and the other
finds its own source version and options in that output's metadata and counts a
duplicate (see :mod:`optimizr.watch_dest`).

An event names a key, not a state: what is done is decided by the object as it is
when the batch runs. A key that exists is converted (or found up to date); one that
is gone has its output removed with --delete (if optimizr wrote it and it is
unchanged), else kept. Events arriving out of order therefore cannot undo each other.

Each batch is one run in the manifest (begin_run / finish_run), so that a service
killed mid-batch leaves an unfinished run behind and the next batch recognises the
outputs that run wrote without rows as optimizr's (see Pipeline._foreign), as after
any killed run.

From receive until settled, a heartbeat thread extends every message the service holds
every ``lease / 2`` seconds, whatever the images do: one image that takes longer than
the broker's lease would otherwise have its message handed to another consumer
mid-conversion (:class:`Heartbeat`). The broker's requests (the next batch's receive,
this batch's acks, sent together) run on a thread of their own beside the conversions
(see :meth:`WatchService.run`).

Known limit of this first slice: a batch ends when its slowest image does, so one
large image delays the messages received with it (not those received after: they
wait in the queue). The pipeline is fed in batches rather than a stream.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import posixpath
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizr.atomic import atomic_write
from optimizr.brokers.base import BrokerOptions, EventSource, Message
from optimizr.bucket_events import BucketEvent, parse_message
from optimizr.budget import MemoryBudget
from optimizr.config import RunConfig
from optimizr.errors import UsageError, cause_of
from optimizr.events import Listeners, ProgressListener, RunSnapshot, StopToken
from optimizr.executors.base import Executor
from optimizr.heap import HeapTrimmer
from optimizr.manifest import Manifest, Row, options_fingerprint, split_key, state_dir
from optimizr.pipeline import Pipeline, row_outputs
from optimizr.results import UP_TO_DATE, Result
from optimizr.sources import OwnOutputs
from optimizr.storage.base import (
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    StoredObject,
    WalkOptions,
)

_log = logging.getLogger("optimizr")

#: The service's state file in DEST/.optimizr/: what ``optimizr status`` shows of it.
STATE_NAME = "watch.json"

#: A transient failure is retried this many times --max-attempts before the message
#: is dead-lettered (a full disk, a store that is down: these usually pass).
TRANSIENT_FACTOR = 3


@dataclass(frozen=True)
class WatchConfig:
    """What ``optimizr watch`` was asked to do, frozen."""

    #: Where events come from: ``http://HOST:PORT/`` (the webhook), or a broker URL
    #: (``nats://``, ``redis://``, ``sqs://``: :mod:`optimizr.brokers`).
    events: str
    #: The conversion's settings, as for ``convert`` (src, dest, encode, --delete...).
    run: RunConfig
    #: Drain what is queued, then exit (cron, tests).
    once: bool = False
    #: Messages taken per batch; 0: the executor's window (workers x lookahead), at
    #: least the source's ``batch_hint`` (SQS: 10 a request).
    batch: int = 0
    #: Seconds before a message that failed for a passing reason is delivered again.
    retry_delay: float = 5.0
    #: Seconds between two writes of the state file while idle.
    state_interval: float = 10.0
    #: Seconds a batch's messages are kept from redelivery, extended every half of it
    #: while the batch runs; 0: --timeout plus a minute (one image may take that long).
    #: A broker's: the JetStream ack_wait of a consumer it creates, the Redis min-idle
    #: time; an SQS queue keeps its own VisibilityTimeout.
    lease: float = 0.0
    #: This replica's name among a broker's consumers (a Redis group's); "": host-pid.
    consumer: str = ""

    @property
    def effective_lease(self) -> float:
        return self.lease or self.run.timeout + 60.0

    def broker_options(self) -> BrokerOptions:
        """How a broker client consumes for this service. A broker dead-letters a message
        delivered more often than the service would retry it (a transient failure is
        retried up to TRANSIENT_FACTOR x --max-attempts deliveries), so that the service,
        not the broker, terms it with its reason whenever it can."""
        return BrokerOptions(
            consumer=self.consumer,
            lease=self.effective_lease,
            max_deliver=TRANSIENT_FACTOR * self.run.max_attempts,
        )

    def __post_init__(self) -> None:
        if self.lease < 0:
            raise UsageError(f"--lease must be 0 (auto) or more seconds, not {self.lease}")
        if self.batch < 0:
            raise UsageError(f"--batch must be 0 (auto) or more, not {self.batch}")
        if self.retry_delay < 0:
            raise UsageError(f"--retry-delay must not be negative, not {self.retry_delay}")


@dataclass
class WatchStatistics:
    """The service's own counters (per source: one source per service)."""

    messages: int = 0
    events: int = 0
    converted: int = 0
    #: Events whose source the manifest proved already converted: no write at all.
    duplicates: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0
    ignored: int = 0
    #: Messages (or records of one) dead-lettered: unparseable, or a poison image.
    dead_lettered: int = 0
    acked: int = 0
    retried: int = 0
    batches: int = 0
    #: time.time() of the last event converted (or found up to date).
    last_event_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EventKeys(Storage):
    """The keys one batch of events names, read from ``base`` and "walked" as a
    listing per folder, the unit the pipeline plans in (like --files-from)."""

    # A few keys prove nothing about the others: no manifest row is forgotten.
    complete_walk = False
    # No count pass: the pipeline's walk is the whole count, and a second walk would
    # stat every key again.
    listing_is_remote = True

    def __init__(self, base: Storage, keys: Iterable[str], stats: Mapping[str, FileStat]) -> None:
        self.base = base
        self._stats = dict(stats)
        self._keys = sorted(set(keys))

    def describe(self) -> str:
        return self.base.describe()

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        by_dir: dict[str, list[SourceEntry]] = {}
        for key in self._keys:
            parts = key.split("/")[:-1]
            folders = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if not options.wants_file(key) or not all(options.wants_dir(f) for f in folders):
                continue  # --include / --exclude, DEST inside SRC, a state folder
            found = self._stats.get(key) or self.base.stat(key)
            if found is None:
                continue  # gone since: nothing to convert (the service said so already)
            entry = SourceEntry(key, found.size, found.mtime_ns, etag=found.etag)
            by_dir.setdefault(split_key(key)[0], []).append(entry)
        for directory in sorted(by_dir):
            yield DirectoryListing(directory, tuple(by_dir[directory]))

    # Everything else is the base storage's.
    def stat(self, key: str) -> FileStat | None:
        return self.base.stat(key)

    def list_files(self, directory: str) -> dict[str, FileStat]:
        return self.base.list_files(directory)

    def read_bytes(self, key: str) -> bytes:
        return self.base.read_bytes(key)

    def read_object(self, key: str) -> StoredObject:
        return self.base.read_object(key)

    def read_head(self, key: str, size: int) -> bytes:
        return self.base.read_head(key, size)

    def read_to_file(self, key: str, path: Path) -> StoredObject:
        return self.base.read_to_file(key, path)

    def local_path(self, key: str) -> str | None:
        return self.base.local_path(key)

    def write_atomic(
        self,
        key: str,
        data: bytes,
        *,
        mtime_ns: int | None = None,
        if_absent: bool = False,
        metadata: Mapping[str, str] | None = None,
        if_match: str | None = None,
    ) -> str | None:
        raise OSError(30, "a SRC is never written", key)

    def delete(self, key: str) -> bool:
        raise OSError(30, "a SRC is never written", key)

    def remove_stale_temporaries(self) -> int:
        return 0


@dataclass(frozen=True)
class Where:
    """How event keys map onto SRC: the bucket (None: any, a local SRC) and prefix."""

    bucket: str | None
    prefix: str
    #: Source keys (relative to SRC) under which outputs are written: never sources.
    prune: tuple[str, ...] = ()

    def source_key(self, event: BucketEvent) -> tuple[str | None, str]:
        """(the source key, "") or (None, why the event is not for this service)."""
        if self.bucket is not None and event.bucket and event.bucket != self.bucket:
            return None, f"bucket {event.bucket} is not SRC's ({self.bucket})"
        key = posixpath.normpath(event.key.lstrip("/"))
        if key.startswith("../") or key in ("..", "."):
            return None, "the key leads out of SRC"
        if self.prefix:
            if not key.startswith(self.prefix + "/"):
                return None, f"not under SRC's prefix {self.prefix}/"
            key = key[len(self.prefix) + 1 :]
        for pruned in self.prune:
            if key == pruned or key.startswith(pruned + "/"):
                return None, "in DEST: an output, never a source"
        if any(part == ".optimizr" for part in key.split("/")):
            return None, "optimizr's own state"
        return key, ""


@dataclass
class _Plan:
    """What one message asks for, and how it went."""

    message: Message
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class _Collect:
    """The batch's results by key (a ProgressListener); ``on_result`` is called after each."""

    def __init__(self, on_result: Callable[[], None] | None = None) -> None:
        self.results: dict[str, Result] = {}
        self.on_result = on_result

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        pass

    def found(self, count: int) -> None:
        pass

    def finished(self, result: Result) -> None:
        self.results[result.key] = result
        if self.on_result is not None:
            self.on_result()

    def walk_done(self, total: int) -> None:
        pass

    def stopping(self, hard: bool) -> None:
        pass


class ImagesOnly:
    """A listener's image lines, without a batch run's milestones ("run started",
    "walk done"), which a service would repeat for every batch."""

    def __init__(self, listener: ProgressListener) -> None:
        self.listener = listener

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        pass

    def found(self, count: int) -> None:
        pass

    def finished(self, result: Result) -> None:
        self.listener.finished(result)

    def walk_done(self, total: int) -> None:
        pass

    def stopping(self, hard: bool) -> None:
        self.listener.stopping(hard)


class Heartbeat:
    """Extends every message the service holds every ``lease / 2`` seconds, on a thread
    of its own, from the moment it is received until its batch is settled, so that no
    broker hands a message to another consumer while its image still converts (or
    while it waits, received ahead, for the batch before it), however long that takes.
    Extending a message already settled does nothing (BrokerMessage)."""

    #: Never more often than this (a tiny lease must not become a busy loop).
    MIN_INTERVAL = 0.05

    def __init__(self, lease: float) -> None:
        self.lease = lease
        self.interval = max(self.MIN_INTERVAL, lease / 2)
        self._held: dict[int, Message] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="optimizr-heartbeat", daemon=True)

    def hold(self, messages: Iterable[Message]) -> None:
        with self._lock:
            self._held.update((id(message), message) for message in messages)

    def release(self, messages: Iterable[Message]) -> None:
        with self._lock:
            for message in messages:
                self._held.pop(id(message), None)

    def _beat(self) -> None:
        # Every message is extended within ``interval`` of being held, and every
        # ``interval`` after, so none goes a whole lease without.
        while not self._stop.wait(self.interval):
            with self._lock:
                held = list(self._held.values())
            for message in held:
                # Each extend restarts the full lease (JetStream, Redis) or sets the
                # SQS visibility to ``lease`` from now; failures are counted by the source.
                message.extend(self.lease)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class WatchService:
    """Runs the loop over one event source, into one DEST, until stopped.

    The caller holds DEST's lock and owns ``manifest``, ``executor``, ``budget`` and
    the stores; the service only uses them (tests give an inline executor and an
    in-memory source)."""

    def __init__(
        self,
        config: WatchConfig,
        source: EventSource,
        *,
        src: Storage,
        dest: Storage,
        dest_root: Path,
        where: Where,
        manifest: Manifest,
        executor: Executor,
        budget: MemoryBudget | None = None,
        own_outputs: OwnOutputs | None = None,
        transfers_factory: Callable[[], Any] | None = None,
        listener: ProgressListener | None = None,
        url: str | None = None,
    ) -> None:
        # Retries are the service's: a redelivered event retries a failed image until
        # --max-attempts, which the manifest counts across deliveries and restarts.
        self.config = dataclasses.replace(
            config, run=dataclasses.replace(config.run, retry_failed=True)
        )
        self.run_config = self.config.run
        self.source = source
        self.src = src
        self.dest = dest
        self.dest_root = dest_root
        self.where = where
        self.manifest = manifest
        self.executor = executor
        self.budget = budget
        self.own_outputs = own_outputs
        self.transfers_factory = transfers_factory
        self.listener = listener
        self.url = url
        self.stop = StopToken()
        self._batch_stop: StopToken | None = None
        self.stats = WatchStatistics()
        self.fingerprint = options_fingerprint(self.run_config)
        self.started_at = time.time()
        self.state = "starting"
        self._last_state_write = 0.0
        self._pipeline: Pipeline | None = None

    # -- control -------------------------------------------------------------------

    def request_stop(self, signum: int | None = None) -> None:
        """Graceful drain (SIGTERM): take no more messages, finish the batch in flight.
        A second request aborts the images in flight (their messages are redelivered)."""
        self.stop.request(signum)
        if self._batch_stop is not None:
            self._batch_stop.request(signum)
        if self.listener is not None:
            self.listener.stopping(hard=self.stop.hard)
        if self.stop.graceful:
            self.state = "draining"
            # The door closes first (a webhook lets its port go): the store keeps the
            # events that come meanwhile and delivers them to the next start.
            self.source.stop_accepting()

    def readiness(self) -> tuple[bool, str, str, dict[str, Any]]:
        """(ready, status, reason, figures): ready while it takes events. A batch run's
        readiness waits for a worker, which the pool starts with the first image; a
        service must be ready before that, or no event would ever reach it."""
        source = self.source.statistics()
        figures = {
            "state": self.state,
            "queue_depth": source.lag,
            "messages": self.stats.messages,
            "connected": source.connected,
        }
        if self.state == "running" and not source.connected:
            # A broker that cannot be reached: the client reconnects by itself, and no
            # event reaches this replica meanwhile (a load balancer should know).
            why = f"the event source cannot be reached: {self.source.describe()}"
            return False, "disconnected", why, figures
        if self.state == "running":
            return True, "ready", "taking events", figures
        if self.state == "starting":
            return False, "starting", "the service is starting", figures
        return False, "draining", "stopping: finishing the images in flight", figures

    def snapshot(self) -> RunSnapshot | None:
        pipeline = self._pipeline
        return pipeline.snapshot() if pipeline is not None else None

    # -- the loop --------------------------------------------------------------------

    def run(self) -> WatchStatistics:
        """Until stopped (or, with --once, until nothing is left to receive).

        Against a remote broker each request is a round trip (moto here: 50-150 ms;
        SQS: tens of ms), as long as a small image's conversion. So the broker's side
        runs on a thread of its own, beside the conversions: after a full batch (more
        are likely waiting) the next batch is received while this one converts, and a
        batch's acks are sent there, together (``EventSource.ack_all``), while the next
        one converts. A batch that came back short says the queue is empty for now: the
        next receive then waits until the acks are sent, and an empty batch received
        ahead is not believed (a message nak'd meanwhile would be missed by --once).
        """
        self.state = "running"
        self._write_state()
        batch = self.config.batch or max(
            1,
            self.executor.workers * self.run_config.lookahead_per_worker,
            self.source.batch_hint,
        )
        wait = 0.0 if self.config.once else 0.5
        heartbeat = Heartbeat(self.source.lease)

        def receive() -> list[Message]:
            messages = self.source.receive(batch, wait)
            heartbeat.hold(messages)  # held, and so extended, from the moment received
            return messages

        ahead: Future[list[Message]] | None = None
        acking: Future[None] | None = None
        broker = ThreadPoolExecutor(1, thread_name_prefix="optimizr-broker")
        heap = HeapTrimmer().start()  # a service's own memory flat over days (heap.py)
        try:
            with heartbeat:
                while not self.stop.graceful:
                    if ahead is not None:
                        messages, ahead, fresh = ahead.result(), None, False
                    else:
                        if acking is not None:
                            acking.result()  # sent before the queue is looked at again
                            acking = None
                        messages, fresh = receive(), True
                    if not messages:
                        if fresh and self.config.once:
                            break
                        if fresh:
                            self._maybe_write_state()
                        continue
                    if len(messages) >= batch:
                        ahead = broker.submit(receive)
                    acks = self._handle(messages)
                    heartbeat.release(messages)
                    if acking is not None:
                        acking.result()  # one batch's acks in flight at a time
                    acking = broker.submit(self._ack_all, acks)
                    self._write_state()
                if ahead is not None:
                    self._release(ahead.result())
                if acking is not None:
                    acking.result()
        finally:
            broker.shutdown(wait=True)
            heap.stop()
            self.source.stop_accepting()
            self.state = "stopped"
            self._write_state()
        return self.stats

    def _ack_all(self, messages: list[Message]) -> None:
        """On the broker's thread. Counted once sent, so that ``acked`` (the state file,
        /metrics) never runs ahead of the broker: a message counted acked is gone from it."""
        self.source.ack_all(messages)
        self.stats.acked += len(messages)

    def _release(self, messages: list[Message]) -> None:
        """A drain with a batch received ahead: handed back for another consumer (or
        this one, restarted) at once rather than after the lease (on SQS this counts one
        receive towards the redrive policy's maxReceiveCount)."""
        if not messages:
            return
        for message in messages:
            message.nak(0.0)
        self._event(
            logging.INFO,
            "released",
            f"{len(messages)} messages received ahead handed back unconverted (draining)",
            {"messages": len(messages)},
        )

    def _handle(self, messages: list[Message]) -> list[Message]:
        """Convert what ``messages`` name; nak or term those that need it and return
        those to ack (the caller acks them together)."""
        acks: list[Message] = []
        plans: list[_Plan] = []
        touched: dict[str, None] = {}
        for message in messages:
            self.stats.messages += 1
            plan = self._plan(message)
            if plan is None:
                continue
            if not plan.keys:
                acks.append(message)  # understood, and nothing to do
                continue
            plans.append(plan)
            touched.update(dict.fromkeys(plan.keys))
        if not plans:
            return acks
        present: dict[str, FileStat] = {}
        gone: list[str] = []
        failed_stat: dict[str, str] = {}
        for key in touched:
            try:
                found = self.src.stat(key)
            except OSError as exc:
                failed_stat[key] = exc.strerror or str(exc)
                continue
            if found is None:
                gone.append(key)
            else:
                present[key] = found
        removal_failed = self._sources_gone(gone)
        results: dict[str, Result] = {}
        committed = True
        if present:
            results, committed = self._convert(present)
        counted: set[str] = set()
        gone_keys = set(gone)
        settle = functools.partial(
            self._settle,
            results=results,
            committed=committed,
            failed_stat=failed_stat,
            removal_failed=removal_failed,
            gone=gone_keys,
            counted=counted,
        )
        # In order: a key's first message counts its result, the others are duplicates.
        acks.extend(plan.message for plan in plans if settle(plan))
        return acks

    def _plan(self, message: Message) -> _Plan | None:
        parsed = parse_message(message.body)
        if parsed.dead:
            reason = "; ".join(parsed.problems)
            self._dead(message, f"unparseable message: {reason}")
            return None
        plan = _Plan(message)
        for problem in parsed.problems:
            self.stats.dead_lettered += 1
            self._event(logging.WARNING, "dead letter", f"message {message.id}: {problem}", {})
        for why in parsed.ignored:
            self.stats.ignored += 1
            self._event(logging.DEBUG, "ignored", f"message {message.id}: ignored: {why}", {})
        for event in parsed.events:
            self.stats.events += 1
            key, why = self.where.source_key(event)
            if key is None:
                self.stats.ignored += 1
                self._event(logging.DEBUG, "ignored", f"{event.key}: ignored: {why}", {})
                continue
            if self._is_own_output(key):
                self.stats.ignored += 1
                self._event(
                    logging.DEBUG, "ignored", f"{key}: ignored: an output optimizr wrote", {}
                )
                continue
            plan.keys.append(key)
        return plan

    def _is_own_output(self, key: str) -> bool:
        """An output written next to its source (in place, or SRC that holds DEST):
        the manifest names it as some source's output."""
        if not key.endswith(".webp"):
            return False
        return self.manifest.owner_of(key) is not None

    def _dead(self, message: Message, reason: str) -> None:
        message.term(reason)
        self.stats.dead_lettered += 1
        self._event(
            logging.WARNING, "dead letter", f"message {message.id}: {reason}", {"reason": reason}
        )

    # -- converting --------------------------------------------------------------------

    def _convert(self, present: dict[str, FileStat]) -> tuple[dict[str, Result], bool]:
        """One pipeline run over ``present``'s keys: (results by key, committed)."""
        collect = _Collect()
        listener: ProgressListener = (
            Listeners(collect, self.listener) if self.listener is not None else collect
        )
        stop = self._batch_stop = StopToken()
        if self.stop.graceful:
            stop.request(self.stop.signum)
        run = self.run_config
        transfers = self.transfers_factory() if self.transfers_factory is not None else None
        with contextlib.suppress(sqlite3.OperationalError):  # a full disk: rows retried
            self.manifest.begin_run(run, self.fingerprint)
        try:
            pipeline = Pipeline(
                run,
                EventKeys(self.src, present, present),
                self.dest,
                self.executor,
                listener=listener,
                stop=stop,
                prune=self.where.prune,
                budget=self.budget,
                manifest=self.manifest,
                own_outputs=self.own_outputs,
                transfers=transfers,
            )
            self._pipeline = pipeline
            summary = pipeline.run()
        finally:
            if transfers is not None:
                transfers.close()
            self._batch_stop = None
        self.stats.batches += 1
        self.manifest.finish_run(
            summary.found, summary.converted, summary.skipped, summary.failed, summary.exit_code
        )
        committed = self.manifest.flush()
        return collect.results, committed

    def _sources_gone(self, keys: list[str]) -> set[str]:
        """Keys whose source no longer exists: their outputs go with --delete (as
        rsync's), if optimizr wrote them and they are as written. Returns the keys
        whose removal failed (a passing failure: their messages are retried)."""
        failed: set[str] = set()
        for key in keys:
            directory, name = split_key(key)
            row = self.manifest.rows_in(directory).get(name)
            if row is None or not self.run_config.delete:
                continue
            try:
                if self._remove_outputs(row):
                    self.stats.removed += 1
                    self._event(
                        logging.INFO,
                        "removed",
                        f"{key}: source removed, its output {row.output} deleted (--delete)",
                        {"path": key, "output": row.output},
                    )
            except OSError as exc:
                failed.add(key)
                self._event(
                    logging.WARNING,
                    "warning",
                    f"could not delete {row.output} (its source is gone): {exc.strerror or exc}",
                    {},
                )
                continue
            self.manifest.forget(key)
        return failed

    def _remove_outputs(self, row: Row) -> bool:
        outputs = row_outputs(row) or ([row.output] if row.output else [])
        if not outputs:
            return False
        found = self.dest.stat(outputs[0])
        if found is None or found.size != row.output_size:
            return False  # gone already, or changed since: not ours to remove
        for target in reversed(outputs):  # the main output last
            self.dest.delete(target)
        return True

    # -- settling --------------------------------------------------------------------

    def _settle(
        self,
        plan: _Plan,
        results: dict[str, Result],
        committed: bool,
        failed_stat: dict[str, str],
        removal_failed: set[str],
        gone: set[str],
        counted: set[str],
    ) -> bool:
        """Nak or term one message of the batch, or return True: it is to be acked.
        ``counted``: the keys whose result an earlier message of the same batch
        already counted (a key named twice is converted once: the second event is a
        duplicate, as it would be in the next batch)."""
        message = plan.message
        retry: list[str] = []
        poison: list[str] = []
        for key in plan.keys:
            if key in failed_stat:
                retry.append(f"{key}: cannot read: {failed_stat[key]}")
                continue
            if key in removal_failed:
                retry.append(f"{key}: its output could not be removed")
                continue
            if key in gone:
                continue
            result = results.get(key)
            if not committed or (result is None and self.stop.graceful):
                # Not in the manifest yet, or not reached (a drain stopped the batch first).
                retry.append(f"{key}: not converted yet")
                continue
            if result is None:
                # Passed over by the pipeline without a result: excluded (--include,
                # --exclude), gone since it was listed, or an output carrying the
                # optimizr-output marker (found once fetched).
                self.stats.ignored += 1
                continue
            first = key not in counted
            counted.add(key)
            if not first and result.status != "failed":
                self.stats.duplicates += 1
                continue
            if first:
                self._count(result)
            if result.status != "failed":
                continue
            line = f"{key}: {result.reason}: {result.message}" if result.message else key
            if cause_of(result.error_class, result.reason) == "image":
                if self._attempts(key) >= self.run_config.max_attempts:
                    poison.append(line)
                else:
                    retry.append(line)
            elif message.delivery_count >= TRANSIENT_FACTOR * self.run_config.max_attempts:
                poison.append(f"{line} (after {message.delivery_count} deliveries)")
            else:
                retry.append(line)
        if retry:
            delay = self.config.retry_delay if not self.stop.graceful else 0.0
            message.nak(delay)
            self.stats.retried += 1
            self._event(
                logging.INFO,
                "retry",
                f"message {message.id}: delivered again in {delay:g} s: {retry[0]}",
                {"reasons": retry},
            )
        elif poison:
            self._dead(message, "; ".join(poison))
        else:
            return True
        return False

    def _attempts(self, key: str) -> int:
        directory, name = split_key(key)
        row = self.manifest.rows_in(directory).get(name)
        return row.attempts if row is not None else 0

    def _count(self, result: Result) -> None:
        self.stats.last_event_at = time.time()
        if result.status == "converted":
            self.stats.converted += 1
        elif result.status == "failed":
            self.stats.failed += 1
        elif result.reason == UP_TO_DATE:
            self.stats.duplicates += 1
        else:
            self.stats.skipped += 1

    # -- state -------------------------------------------------------------------------

    def state_document(self) -> dict[str, Any]:
        source = self.source.statistics()
        return {
            "state": self.state,
            "events": self.config.events,
            "url": self.url,
            "source": self.source.describe(),
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "updated_at": time.time(),
            "queue_depth": source.lag,
            "counters": self.stats.to_dict(),
            # The source's own figures (BrokerStatistics: received, acked, redelivered,
            # dead_lettered, connected, lag...), for `optimizr status`.
            "source_statistics": dataclasses.asdict(source),
        }

    def _maybe_write_state(self) -> None:
        if time.monotonic() - self._last_state_write >= self.config.state_interval:
            self._write_state()

    def _write_state(self) -> None:
        """DEST/.optimizr/watch.json, the service's periodic snapshot (atomic)."""
        self._last_state_write = time.monotonic()
        path = state_dir(self.dest_root) / STATE_NAME
        try:
            atomic_write(path, json.dumps(self.state_document(), indent=2).encode() + b"\n")
        except OSError as exc:
            self._event(logging.WARNING, "warning", f"could not write {path}: {exc}", {})

    def _event(self, level: int, event: str, message: str, fields: dict[str, Any]) -> None:
        _log.log(level, "%s", message, extra={"event": event, "fields": fields})


def source_label(events: str) -> str:
    """The ``source`` label of the service's metrics: webhook, nats, redis or sqs."""
    scheme = events.partition("://")[0].lower()
    if scheme == "http":
        return "webhook"
    return "sqs" if scheme == "https" else scheme


def read_watch_state(dest: Path) -> dict[str, Any] | None:
    """The state file a watch service keeps in DEST (None: never watched)."""
    try:
        doc = json.loads((state_dir(dest) / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
