"""Set ``optimizr watch`` up and run it: the library call behind the command.

:func:`run_watch` opens what a batch run opens (DEST's lock and manifest, the memory
budget and the worker pool, the source store) once for the service's life, plus the
event source (a bucket DEST: this replica's state root, manifest and snapshot, no
DEST-wide lock, see :mod:`optimizr.watch_dest`), runs the
:class:`~optimizr.watch.WatchService` loop, and closes all of it after. The event
source is the HTTP webhook and its durable queue in DEST/.optimizr/
(``http://HOST:PORT/``), or a broker (``nats://``, ``redis://``, ``sqs://``: see
:mod:`optimizr.brokers`), opened with the watch's lease, consumer name and a delivery
limit from --max-attempts. With a broker no HTTP server is started here: /healthz,
/readyz and /metrics are served where a batch run serves them (--metrics-port).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optimizr.brokers.base import EventSource
from optimizr.budget import MemoryBudget, default_memory_budget
from optimizr.config import RunConfig
from optimizr.dest_state import local_state_root
from optimizr.errors import UsageError
from optimizr.event_queue import EventQueue
from optimizr.event_sources import QueueSource
from optimizr.events import ProgressListener
from optimizr.executors.base import Executor
from optimizr.manifest import state_dir
from optimizr.sources import IN_PLACE_NEEDS_APPEND, Layout, OwnOutputs, resolve_layout
from optimizr.storage.base import Storage
from optimizr.storage.local import LocalStorage
from optimizr.storage.urls import Location, is_url, parse_location
from optimizr.versions import check_encoder
from optimizr.watch import WatchConfig, WatchService, WatchStatistics, Where
from optimizr.watch_dest import open_dest
from optimizr.webhook import Answer, WebhookServer, parse_listen_url


def run_watch(
    config: WatchConfig,
    *,
    listener: ProgressListener | None = None,
    answer: Callable[[WatchService], Answer] | None = None,
    on_started: Callable[[WatchService], None] | None = None,
    executor: Executor | None = None,
    source: EventSource | None = None,
) -> WatchStatistics:
    """Serve ``config.events`` and convert what arrives until stopped (``on_started``
    gets the service: call its ``request_stop`` from a signal handler), or with
    ``once`` until the queue is empty. ``answer(service)`` gives the GET handler of
    the webhook (health, metrics); without it GETs are 404. With a broker ``answer`` is
    called too (the CLI attaches its exporter there), but its handler is not served
    here: the caller serves it (--metrics-port). ``source``: an event source of the
    caller's own, instead of the one ``config.events`` names (``config.events`` then
    only labels it)."""
    run = config.run
    webhook_listen = (
        parse_listen_url(config.events)
        if source is None and config.events.lower().startswith("http://")
        else None
    )
    if isinstance(run.dest, tuple):
        raise UsageError("watch writes to one DEST (a folder or a bucket URL)")
    remote_dest = isinstance(run.dest, str) and is_url(run.dest)
    if not remote_dest and not isinstance(run.dest, Path):
        raise UsageError(f"watch writes to a DEST folder or bucket URL, not {run.dest}")
    dest_location = parse_location(str(run.dest)) if remote_dest else None
    store, layout, where = _source(run.src, dest_location, config)
    check_encoder(run.encode)
    # A folder: its flock, one service at a time. A bucket: this replica's own state
    # root and manifest snapshot, shared with other replicas (see watch_dest).
    opened_dest = open_dest(run, config.consumer)
    opened: list[Callable[[], Any]] = [opened_dest.close]
    try:
        dest_root, manifest, dest = opened_dest.root, opened_dest.manifest, opened_dest.storage
        webhook_box: list[WebhookServer] = []
        queue: EventQueue | None = None
        event_source: EventSource
        if source is not None:
            event_source = source
        elif webhook_listen is None:
            from optimizr.brokers import open_source

            # UsageError (exit 2) for a malformed URL, a missing extra, a stream or
            # queue that does not exist, a broker that cannot be reached at start.
            event_source = open_source(config.events, config.broker_options())
            opened.append(event_source.close)
        else:
            try:
                queue = EventQueue.open(dest_root)
            except (OSError, sqlite3.Error) as exc:
                raise UsageError(
                    f"cannot open the state in {state_dir(dest_root)}: {exc}"
                ) from None
            opened.append(queue.close)
            # Leases of a killed predecessor are void: the lock says we are the only consumer.
            queue.release_leases()

            def close_the_door() -> None:
                # The drain's first step: no new posts are taken in.
                for webhook in webhook_box:
                    webhook.stop_accepting()

            event_source = QueueSource(
                queue,
                lease=config.effective_lease,
                text=f"webhook {config.events}",
                on_stop=close_the_door,
            )
        workers = executor.workers if executor is not None else run.effective_workers
        budget = MemoryBudget(run.max_memory or default_memory_budget(), workers)
        if executor is None:
            from optimizr.executors.local import local_pool

            executor = local_pool(run, workers, budget)
            opened.append(executor.close)
        own = OwnOutputs(layout, manifest, dest)
        opened.append(own.close)
        transfers_factory = None
        if not isinstance(store, LocalStorage) or remote_dest:
            # An object store: fetches and uploads on I/O threads, and outputs written
            # there with If-None-Match (Pipeline._upload).
            from optimizr.transfers import Transfers, default_io_concurrency

            def transfers_factory() -> Transfers:
                return Transfers(run.io_concurrency or default_io_concurrency(workers), budget)

        service = WatchService(
            config,
            event_source,
            src=store,
            dest=dest,
            dest_root=dest_root,
            where=where,
            manifest=manifest,
            executor=executor,
            budget=budget,
            own_outputs=own,
            transfers_factory=transfers_factory,
            listener=listener,
        )
        get_answer = answer(service) if answer is not None else _health_only(service)
        if queue is not None and webhook_listen is not None:
            webhook = WebhookServer(queue, get_answer)
            service.url = webhook.serve(*webhook_listen)
            webhook_box.append(webhook)
            opened.append(webhook.close)
        if on_started is not None:
            on_started(service)
        return service.run()
    finally:
        for close in reversed(opened):
            close()


def _health_only(service: WatchService) -> Answer:
    """GET answers without the metrics exporter (the library call): /readyz, /healthz."""

    def respond(path: str) -> tuple[int, str, bytes]:
        route = path.split("?")[0].rstrip("/")
        if route in ("/readyz", "/healthz"):
            ready, status, reason, figures = service.readiness()
            ok = ready or route == "/healthz"
            doc = {"status": status if route == "/readyz" else "ok", "reason": reason, **figures}
            return 200 if ok else 503, "application/json", json.dumps(doc).encode() + b"\n"
        return 404, "text/plain; charset=utf-8", b"not found: try /healthz, /readyz\n"

    return respond


def _source(
    src: Path | tuple[Path, ...] | str, dest: Location | None, config: WatchConfig
) -> tuple[Storage, Layout, Where]:
    """The SRC store, its layout (what is pruned, own outputs) and how keys map onto it.
    ``dest``: a remote DEST's location (None: DEST is the folder config.run.dest)."""
    run = config.run
    root = local_state_root(dest.url(), run.state_dir) if dest is not None else Path(str(run.dest))
    if isinstance(src, tuple):
        raise UsageError("watch takes one SRC (a folder or a bucket URL)")
    if isinstance(src, str) and is_url(src):
        from optimizr.storage.objectstore import StoreOptions, probe, storage_for

        location = parse_location(src)
        store = storage_for(location, StoreOptions.for_run(run))
        probe(store, write=False)
        prune, in_place, own_prefix = _one_bucket(location, dest, run)
        layout = Layout(store, root, None, prune, in_place, own_prefix)
        return store, layout, Where(location.bucket or None, location.prefix.strip("/"), prune)
    path = Path(src)
    if not path.is_dir():
        raise UsageError(f"watch takes a SRC folder or bucket URL: {src} is not a folder")
    if dest is not None:  # a folder into a bucket: nothing of one lies in the other
        return LocalStorage(path), Layout(LocalStorage(path), root), Where(None, "")
    layout = resolve_layout([path], str(root), run)
    return LocalStorage(path), layout, Where(None, "", layout.prune)


def _one_bucket(
    src: Location, dest: Location | None, run: RunConfig
) -> tuple[tuple[str, ...], bool, str | None]:
    """SRC and DEST in one bucket, as a batch run takes them: (the SRC keys under which
    DEST lies, never sources; in place; the prefix of SRC inside DEST)."""
    if dest is None or (src.scheme, src.bucket) != (dest.scheme, dest.bucket):
        return (), False, None
    src_prefix, dest_prefix = src.prefix.strip("/"), dest.prefix.strip("/")
    if src_prefix == dest_prefix:
        if run.name != "append":
            raise UsageError(IN_PLACE_NEEDS_APPEND.format(name=run.name))
        return (), True, ""
    if dest_prefix.startswith(src_prefix + "/") or (not src_prefix and dest_prefix):
        return (dest_prefix[len(src_prefix) :].lstrip("/"),), False, None
    if src_prefix.startswith(dest_prefix + "/") or (not dest_prefix and src_prefix):
        return (), False, src_prefix[len(dest_prefix) :].lstrip("/")
    return (), False, None
