"""The library API: convert one file, or a whole tree.

``convert_tree`` sets a run up (resolves SRC... and DEST into a layout, see
``sources.py``; takes DEST's lock, opens the manifest, builds the memory budget
and the worker pool), runs the
:class:`~optimizr.pipeline.Pipeline`, then gathers each component's figures
into the summary and writes it. ``convert_file`` is the one-image version,
in the calling process, with no manifest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optimizr.atomic import atomic_write
from optimizr.budget import MemoryBudget, default_memory_budget
from optimizr.config import SUMMARY_NAME, EncodeOptions, IfLarger, RunConfig, available_cpus
from optimizr.errors import (
    ImageError,
    SourceUnreadable,
    UsageError,
)
from optimizr.events import ProgressListener, StopToken
from optimizr.executors.base import Executor
from optimizr.heap import HeapTrimmer
from optimizr.history import RUNS_DIR, keep_run, runs_dir
from optimizr.lock import RunLock
from optimizr.manifest import (
    FAILED_LIST_NAME,
    Manifest,
    options_fingerprint,
    state_dir,
)
from optimizr.metrics.machine import MachineCpuSampler
from optimizr.metrics.memory import TreeMemorySampler
from optimizr.pipeline import Pipeline, classify_error, larger_than_source, write_failure
from optimizr.results import (
    Result,
    RunSummary,
)
from optimizr.sources import (
    IN_PLACE_NEEDS_APPEND,
    Layout,
    ListedSource,
    OwnOutputs,
    read_listed_names,
    resolve_layout,
)
from optimizr.storage.base import STATE_DIR, Storage
from optimizr.storage.local import LocalStorage
from optimizr.storage.objectstore import ObjectStorage, StoreOptions
from optimizr.storage.urls import is_url
from optimizr.transfers import Transfers, default_io_concurrency
from optimizr.versions import check_encoder, tool_versions

if TYPE_CHECKING:
    from optimizr.executors.worker_io import WorkerRun

PathArg = str | os.PathLike[str]


_log = logging.getLogger("optimizr")


def convert_tree(
    src: PathArg | Sequence[PathArg],
    dest: PathArg,
    options: EncodeOptions | RunConfig | None = None,
    *,
    executor: Executor | None = None,
    listener: ProgressListener | None = None,
    stop: StopToken | None = None,
    stores: list[ObjectStorage] | None = None,
) -> RunSummary:
    """Convert every image under ``src`` into a mirrored tree of WebP files under ``dest``.

    ``src`` is one folder (mirrored into ``dest``; ``dest`` may be ``src`` itself,
    *in place*, with ``name="append"``), one file (converted to ``dest``, a
    ``.webp`` path or a folder, with no manifest or summary, as cwebp does), or a
    sequence of them (each folder mirrored under ``dest/<its name>/``, each file
    into ``dest``). ``RunConfig.files_from`` names the files to take from one folder.

    ``options`` is an :class:`EncodeOptions` (run settings left at their
    defaults) or a whole :class:`RunConfig`. Per-file problems never raise:
    they are counted and listed in the returned :class:`RunSummary`, which is
    also written to ``DEST/optimizr-summary.json`` (or ``RunConfig.summary_path``) and
    kept in DEST's run history (``DEST/.optimizr/runs/``, see :mod:`optimizr.history`).
    Raises :class:`~optimizr.errors.UsageError` when SRC or DEST cannot be used.

    SRC and DEST may be object-store URLs (``s3://bucket/prefix``...); ``stores``, if
    given, receives the object stores the run uses (their ``statistics()`` are live:
    the Prometheus exporter reads them while the run goes).
    """
    given = (src,) if isinstance(src, str | os.PathLike) else tuple(src)
    if any(isinstance(s, str) and is_url(s) for s in (*given, dest)):
        return _convert_remote(given, dest, options, executor, listener, stop, stores)
    srcs = tuple(Path(s) for s in given)
    dest_path = Path(dest)
    if isinstance(options, RunConfig):
        config = options
    else:
        one = srcs[0] if len(srcs) == 1 else srcs
        config = RunConfig(src=one, dest=dest_path, encode=options or EncodeOptions())
    if not srcs:
        raise UsageError("convert needs a SRC and a DEST")
    layout = resolve_layout(srcs, os.fspath(dest), config)
    if not config.dry_run:
        try:
            layout.dest_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create DEST {dest_path}: {exc.strerror or exc}") from None

    lock: RunLock | None = None
    manifest: Manifest | None = None
    own: OwnOutputs | None = None
    if layout.one_file:
        pass  # like cwebp: the output alone, no DEST/.optimizr
    elif config.dry_run:
        # Read-only: a dry run reports what the manifest would let a real run skip.
        manifest = Manifest.open_readonly(dest_path) if dest_path.is_dir() else None
    else:
        lock = _take_lock(dest_path, f"DEST {dest_path}")
    try:
        if lock is not None:
            manifest = _open_manifest(dest_path, config)
        dest_storage = LocalStorage(layout.dest_root)
        if not layout.one_file:
            own = OwnOutputs(layout, manifest, dest_storage)
        summary = _execute(
            config, layout, dest_storage, manifest, own, executor, listener, stop, store=None
        )
        if own is not None:
            summary.warnings.extend(own.warnings)
        if layout.one_file:
            summary.dest = str(dest_path)
        if manifest is not None and lock is not None:
            _finish_manifest(summary, manifest, dest_path, config)
        # One file (like cwebp): a summary only where --summary asks, and no history.
        latest = config.summary_path if layout.one_file else config.effective_summary_path
        if config.summary_to_stdout:
            latest = None  # "--summary -": the caller (the CLI) prints it on stdout
        if not config.dry_run:
            run_id = manifest.run_id if manifest is not None else 0
            history = None if layout.one_file else dest_path
            _write_summaries(summary, latest, history, run_id)
    finally:
        if own is not None:
            own.close()
        if manifest is not None:
            manifest.close()
        if lock is not None:
            lock.release()
    return summary


def _take_lock(root: Path, what: str) -> RunLock:
    """The lock of ``root``'s state folder (one run at a time on this machine)."""
    lock = RunLock(state_dir(root))
    try:
        lock.acquire()
    except OSError as exc:
        raise UsageError(f"cannot use {what}: {exc.strerror or exc}") from None
    return lock


def _open_manifest(root: Path, config: RunConfig, *, restored: bool = False) -> Manifest:
    """``root``'s manifest (rebuilt with --rebuild-manifest), with this run begun in it.

    ``restored``: it came down from a remote DEST's snapshot (see Manifest.restored)."""
    try:
        manifest = Manifest.rebuild(root) if config.rebuild_manifest else Manifest.open(root)
    except OSError as exc:
        raise UsageError(
            f"cannot create the manifest in {state_dir(root)}: {exc.strerror or exc}"
        ) from None
    manifest.restored = restored
    try:
        manifest.begin_run(config, options_fingerprint(config))
    except sqlite3.OperationalError:
        pass  # a full disk: the rows themselves are retried as the run goes
    return manifest


def _finish_manifest(
    summary: RunSummary, manifest: Manifest, dest: Path, config: RunConfig
) -> None:
    # On a cluster the workers write the outputs: a run that lost its scheduler, or
    # cancelled its tasks after --grace, may leave outputs whose results never came
    # back. Like a killed run's, they are the next run's to recognise as its own.
    confirmed = config.cluster is None or (summary.cluster_lost is None and not summary.interrupted)
    manifest.finish_run(
        summary.found,
        summary.converted,
        summary.skipped,
        summary.failed,
        summary.exit_code,
        outputs_confirmed=confirmed,
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
        "directory_lookups": stats.lookups,
        "unsaved_rows": stats.unsaved_rows,
        "rebuilt": manifest.rebuilt,
        "adopted": stats.adopted,
        "failed_list": str(failed_list),
        "failed_listed": failed_listed,
    }


def _execute(
    config: RunConfig,
    layout: Layout,
    dest: Storage,
    manifest: Manifest | None,
    own_outputs: OwnOutputs | None,
    executor: Executor | None,
    listener: ProgressListener | None,
    stop: StopToken | None,
    *,
    remote: bool = False,
    store: StoreOptions | None = None,
) -> RunSummary:
    own_executor = executor is None
    encoder = check_encoder(config.encode)
    if encoder.fallback and config.encode.encoder == "auto":
        # Said once, at the start; the summary's tool.encoder says it too.
        _log.warning("%s", encoder.describe())
    if executor is not None:
        workers = executor.workers
    else:
        workers = 1 if layout.one_file else config.effective_workers
    total_memory = config.max_memory or default_memory_budget()
    worker_run: WorkerRun | None = None
    if executor is None and config.cluster is not None and not layout.one_file:
        worker_run = _worker_run(config, layout.source, dest, store or StoreOptions())
        executor = _cluster_executor(config, workers, total_memory)
        workers = executor.workers
    budget = MemoryBudget(total_memory, workers)
    if executor is None:
        from optimizr.executors.local import local_pool

        executor = local_pool(config, workers, budget)
    transfers = (
        Transfers(config.io_concurrency or default_io_concurrency(workers), budget)
        if remote and worker_run is None  # a cluster's workers do their own transfers
        else None
    )
    sampler = TreeMemorySampler().start()
    machine_sampler = MachineCpuSampler(available_cpus()).start()
    # The coordinator's own memory flat whatever the run's length (see heap.py).
    heap = HeapTrimmer().start()
    times_start, wall_start = os.times(), time.monotonic()
    try:
        pipeline = Pipeline(
            config,
            layout.source,
            dest,
            executor,
            listener=listener,
            stop=stop,
            prune=layout.prune,
            budget=budget if own_executor else None,
            manifest=manifest,
            target=layout.target,
            own_outputs=own_outputs,
            transfers=transfers,
            worker_run=worker_run,
        )
        summary = pipeline.run()
    finally:
        if own_executor:
            executor.close()
        if transfers is not None:
            transfers.close()
        heap_stats = heap.stop()
    memory = sampler.stop()
    wall = time.monotonic() - wall_start
    times_end = os.times()
    machine = machine_sampler.stop()
    # The parent's whole life, start-up imports included.
    parent_cpu = times_end.user + times_end.system
    # ... and during the run alone: the orchestration's cost, start-up excluded
    # (a fixed cost, paid once whatever the run's size).
    parent_run_cpu = (times_end.user - times_start.user) + (times_end.system - times_start.system)
    workers_cpu = (times_end.children_user - times_start.children_user) + (
        times_end.children_system - times_start.children_system
    )
    run_cpu = parent_run_cpu + workers_cpu
    threads = max(1, available_cpus() // workers)
    cores = min(available_cpus(), workers * threads)
    codec_cpu, codec_wall = summary.codec_cpu_seconds, summary.codec_seconds
    stats = executor.statistics()
    budget_stats = budget.statistics()
    summary.memory = {
        "budget_bytes": total_memory,
        "budget_for_images_bytes": budget_stats.capacity,
        "peak_rss_bytes": memory.peak_bytes,
        "peak_estimated_in_flight_bytes": budget_stats.peak_in_use,
        "admissions_waited": budget_stats.waited,
        "ran_alone": budget_stats.ran_alone,
        # Of the images run alone, those whose pool retired its other workers meanwhile.
        "ran_with_workers_retired": stats.alone_runs,
        "workers_refreshed_for_alone": stats.workers_refreshed,
        "budget_alone_bytes": budget_stats.alone_capacity,
        "parent_baseline_bytes": budget_stats.parent_baseline,
        "worker_baseline_bytes": budget_stats.worker_baseline,
        "fresh_worker_bytes": budget_stats.fresh_worker,
        # The ceiling: what the executor measured while images converted, and did.
        "peak_measured_bytes": budget_stats.peak_measured,
        "ceiling_margin_bytes": budget_stats.margin,
        "jobs_over_estimate": budget_stats.over_estimate,
        "held_admissions": budget_stats.held,
        "stopped_and_retried_alone": budget_stats.retried_alone,
        "too_large_alone": budget_stats.too_large_alone,
        "peak_transfer_bytes": budget.peak_io_bytes,
        "heap_trims": heap_stats.trims,
        "heap_released_bytes": heap_stats.released_bytes,
        "samples": memory.samples,
        "timeline": [list(point) for point in memory.timeline],
    }
    summary.cpu = {
        "cores": cores,
        "threads_per_worker": threads,
        "wall_seconds": round(wall, 3),
        "parent_cpu_seconds": round(parent_cpu, 3),
        "parent_run_cpu_seconds": round(parent_run_cpu, 3),
        "workers_cpu_seconds": round(workers_cpu, 3),
        "codec_cpu_seconds": round(codec_cpu, 3),
        "codec_wall_seconds": round(codec_wall, 3),
        # CPU a worker got per second it spent converting: near 1 (or more, with
        # libvips threads) unless it waited, for a disk or for a CPU others held.
        "codec_cpu_per_wall": round(codec_cpu / codec_wall, 4) if codec_wall > 0 else 0.0,
        # The CPU the run used outside the codec (the parent during the run, worker
        # start-up, passing jobs and results), as a share of all it used: the cost
        # of orchestration. CPU time, not wall: waiting for a CPU costs none.
        "orchestration_share": round(max(0.0, run_cpu - codec_cpu) / run_cpu, 4)
        if run_cpu > 0
        else 0.0,
        # Codec CPU over the CPU the machine offered during the run.
        "efficiency": round(codec_cpu / (cores * wall), 4) if wall > 0 else 0.0,
        "machine": None
        if machine is None
        else {
            "cpus": machine.cpus,
            "busy_seconds": round(machine.busy_seconds, 3),
            # What the same CPUs gave to processes other than this run's.
            "others_cpu_seconds": round(max(0.0, machine.busy_seconds - run_cpu), 3),
            "iowait_seconds": round(machine.iowait_seconds, 3),
            "steal_seconds": round(machine.steal_seconds, 3),
        },
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
    if worker_run is not None:
        summary.executor["cluster"] = config.cluster
        summary.executor["per_worker"] = [
            {
                "worker": w.name,
                "host": w.host,
                "images": w.images,
                "busy_seconds": round(w.busy_seconds, 3),
                "peak_rss_bytes": w.peak_rss_bytes,
            }
            for w in stats.per_worker
        ]
        summary.executor["conversions_over_memory"] = stats.conversions_over_memory
        summary.executor["memory_restarts"] = stats.memory_restarts
    summary.tool = tool_versions(config.encode.encoder)
    if transfers is not None:
        summary.storage["transfers"] = transfers.stats.to_dict(transfers.concurrency)
    for role, storage in (("src", layout.source), ("dest", dest)):
        statistics = getattr(storage, "statistics", None)
        if callable(statistics):
            summary.storage[role] = statistics().to_dict()
    return summary


def _cluster_executor(config: RunConfig, workers: int, memory: int) -> Executor:
    """--cluster: the Dask executor (its scheduler reached, a worker connected)."""
    assert config.cluster is not None
    try:
        from optimizr.executors.dask import DaskExecutor
    except ImportError:
        raise UsageError(
            "--cluster needs Dask distributed, which is not installed: "
            "pip install 'optimizr[cluster]'"
        ) from None
    return DaskExecutor(
        config.cluster,
        workers=workers,
        memory=memory,
        timeout=config.timeout,
        max_tasks_per_worker=config.max_tasks_per_worker,
        grace=config.grace,
    )


def _worker_run(
    config: RunConfig, source: Storage, dest: Storage, store: StoreOptions
) -> WorkerRun:
    """Where a cluster's workers read and write: the places of SRC and DEST by URL
    (a folder by its path, which every worker must see at the same path)."""
    from optimizr.executors.worker_io import Place, WorkerRun

    def place(storage: Storage, role: str) -> Place:
        if isinstance(storage, LocalStorage) and not storage.prefix:
            return Place(str(storage.root.resolve()))
        if isinstance(storage, ObjectStorage) and storage.location.scheme != "memory":
            return Place(storage.location.url(), store)
        raise UsageError(
            f"--cluster takes one SRC folder or URL and one DEST; {role} {storage.describe()} "
            "cannot be opened by the workers"
        )

    return WorkerRun(
        place(source, "SRC"),
        place(dest, "DEST"),
        if_larger=config.if_larger,
        min_saving=config.min_saving,
        preserve_mtime=config.preserve_mtime,
        copy_metadata=config.encode.metadata == "all",
        reencode_webp=config.reencode_webp,
        spool_above=config.spool_above,
    )


def _summary_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=False).encode() + b"\n"


def _write_summaries(
    summary: RunSummary, latest: Path | None, dest: Path | None, run_id: int
) -> None:
    """The run's summary into DEST's history (DEST/.optimizr/runs/, unless ``dest`` is
    None), then as the latest run's (``latest``, DEST/optimizr-summary.json unless
    --summary; None: nowhere): both the same document. A write that fails is a
    warning: the run's results still stand."""
    doc = summary.to_dict()
    if dest is not None:
        try:
            keep_run(dest, doc, _summary_json(doc), summary.started_at, run_id)
        except OSError as exc:  # DEST full
            summary.warnings.append(
                f"could not keep the summary in {runs_dir(dest)}: {exc.strerror or exc}"
            )
            doc["warnings"] = list(summary.warnings)
    if latest is None:
        return
    try:
        atomic_write(latest, _summary_json(doc))
        summary.summary_file = latest
    except OSError as exc:
        summary.warnings.append(f"could not write the summary: {exc.strerror or exc}")


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


# -- object stores -------------------------------------------------------------------------


def _convert_remote(
    given: tuple[PathArg, ...],
    dest: PathArg,
    options: EncodeOptions | RunConfig | None,
    executor: Executor | None,
    listener: ProgressListener | None,
    stop: StopToken | None,
    stores: list[ObjectStorage] | None,
) -> RunSummary:
    """A run whose SRC or DEST (or both) is an object store.

    The layout is one SRC tree mirrored into DEST. The source and DEST are probed
    first (a listing, and a write to DEST/.optimizr/) so that wrong credentials or
    a missing bucket stop the run before anything starts. A remote DEST's state
    (manifest, run history) lives in a local state root (see dest_state) and its
    snapshot goes up to DEST/.optimizr/ every --checkpoint-interval and at the end."""
    from optimizr.dest_state import Checkpointer, local_state_root, restore
    from optimizr.storage.lease import RemoteLease
    from optimizr.storage.objectstore import StoreOptions, probe, storage_for
    from optimizr.storage.urls import parse_location

    if len(given) != 1:
        raise UsageError("a SRC or DEST that is a URL takes exactly one SRC")
    src_text, dest_text = os.fspath(given[0]), os.fspath(dest)
    src_loc, dest_loc = parse_location(src_text), parse_location(dest_text)
    if isinstance(options, RunConfig):
        config = options
    else:
        config = RunConfig(
            src=src_text if src_loc.scheme != "local" else Path(src_text),
            dest=dest_text if dest_loc.scheme != "local" else Path(dest_text),
            encode=options or EncodeOptions(),
        )
    store = StoreOptions.for_run(config)
    source: Storage
    if src_loc.scheme == "local":
        assert src_loc.path is not None
        if not src_loc.path.is_dir():
            raise UsageError(f"SRC must be a folder when DEST is a URL: {src_loc.path}")
        source = LocalStorage(src_loc.path)
    else:
        remote_source = storage_for(src_loc, store)
        probe(remote_source, write=False)
        source = remote_source
    dest_storage: Storage
    if dest_loc.scheme == "local":
        assert dest_loc.path is not None
        root = dest_loc.path
        dest_storage = LocalStorage(root)
    else:
        remote_dest = storage_for(dest_loc, store)
        # Listed here; written first by the lease on its lock (a real write, so a DEST
        # that cannot be written is told then, before any work), one request each.
        probe(remote_dest, write=False)
        dest_storage = remote_dest
        root = local_state_root(dest_loc.url(), config.state_dir)
    prune: tuple[str, ...] = ()
    in_place = False
    own_prefix: str | None = None
    if src_loc.is_remote and (src_loc.scheme, src_loc.bucket) == (dest_loc.scheme, dest_loc.bucket):
        # One bucket: DEST inside SRC is never walked; SRC == DEST is in place.
        src_prefix, dest_prefix = src_loc.prefix, dest_loc.prefix
        if src_prefix == dest_prefix:
            if config.name != "append":
                raise UsageError(IN_PLACE_NEEDS_APPEND.format(name=config.name))
            in_place, own_prefix = True, ""
        elif dest_prefix.startswith(src_prefix + "/") or (not src_prefix and dest_prefix):
            prune = (dest_prefix[len(src_prefix) :].lstrip("/"),)
        elif src_prefix.startswith(dest_prefix + "/") or (not dest_prefix and src_prefix):
            own_prefix = src_prefix[len(dest_prefix) :].lstrip("/")
    if config.files_from is not None:
        if not isinstance(source, LocalStorage):
            raise UsageError("--files-from takes a local SRC folder (not yet a URL)")
        names = read_listed_names(config.files_from, nul=config.files_from_nul)
        source = ListedSource(source, names)
    # In place, the summary DEST gets sits among the sources; and a SRC that is
    # another run's DEST holds that run's summary: never a source either way.
    other_dest = not in_place and bool(source.list_files(STATE_DIR))
    passed = (SUMMARY_NAME,) if in_place or other_dest else ()
    layout = Layout(source, root, None, prune, in_place, own_prefix, (), passed)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the state folder {root}: {exc.strerror or exc}") from None

    remote_dest_storage = dest_storage if isinstance(dest_storage, ObjectStorage) else None
    if stores is not None:
        stores.extend(s for s in (source, dest_storage) if isinstance(s, ObjectStorage))
    lock: RunLock | None = None
    manifest: Manifest | None = None
    checkpointer: Checkpointer | None = None
    own: OwnOutputs | None = None
    restored = False
    if config.dry_run:
        manifest = Manifest.open_readonly(root)
    else:
        lock = _take_lock(root, f"the state folder {root}")
    lease: RemoteLease | None = None
    stop = stop or StopToken()
    try:
        if lock is not None and remote_dest_storage is not None:
            # One run per DEST across machines: the lease on DEST/.optimizr/lock. Lost
            # (taken over, or not renewable in time), the run stops as on SIGTERM.
            lease = RemoteLease(
                remote_dest_storage, on_lost=lambda _why: stop.request(signal.SIGTERM)
            )
            try:
                lease.acquire()
            except OSError as exc:
                lease = None
                raise UsageError(
                    f"{dest_loc.url()} cannot be written: {exc.strerror or exc}"
                ) from None
        if lock is not None:
            if remote_dest_storage is not None and not config.rebuild_manifest:
                try:
                    restored = restore(remote_dest_storage, root)
                except OSError as exc:
                    raise UsageError(
                        f"cannot read the manifest snapshot in {dest_loc.url()}: "
                        f"{exc.strerror or exc}"
                    ) from None
            manifest = _open_manifest(root, config, restored=restored)
            if remote_dest_storage is not None:
                # The first snapshot at once: a run killed before the first interval
                # still leaves DEST knowing a run started (and when).
                manifest.flush()
                checkpointer = Checkpointer(remote_dest_storage, root, config.checkpoint_interval)
                checkpointer.start()  # its first upload at once, on its own thread
        own = OwnOutputs(layout, manifest, dest_storage)
        summary = _execute(
            config,
            layout,
            dest_storage,
            manifest,
            own,
            executor,
            listener,
            stop,
            remote=True,
            store=store,
        )
        summary.warnings.extend(own.warnings)
        summary.dest = dest_loc.url() if dest_loc.scheme != "local" else str(root)
        if manifest is not None and lock is not None:
            _finish_manifest(summary, manifest, root, config)
        if checkpointer is not None:
            checkpointer.stop()
            flushed = manifest is None or manifest.flush()
            if not checkpointer.upload() or not flushed:
                summary.warnings.append(
                    f"could not upload the manifest to {dest_loc.url()}/.optimizr/ "
                    f"({checkpointer.stats.last_error}); it is kept in {root}"
                )
            checkpointer.stats.restored = restored
            summary.storage["checkpoints"] = checkpointer.stats.to_dict()
        if not config.dry_run:
            latest = (
                None if config.summary_to_stdout else (config.summary_path or root / SUMMARY_NAME)
            )
            run_id = manifest.run_id if manifest is not None else 0
            _write_summaries(summary, latest, root, run_id)
            if remote_dest_storage is not None:
                _upload_state(summary, remote_dest_storage, root, config)
    finally:
        if checkpointer is not None:
            checkpointer.stop()
        if own is not None:
            own.close()
        if manifest is not None:
            manifest.close()
        if lease is not None:
            lease.release()
        if lock is not None:
            lock.release()
    if lease is not None and lease.lost is not None:
        summary.warnings.append(f"the lock of {dest_loc.url()} was lost: {lease.lost}")
    return summary


def _upload_state(summary: RunSummary, dest: Storage, root: Path, config: RunConfig) -> None:
    """What a local DEST holds beside its outputs, put in a remote DEST too: the
    run's summary (DEST/optimizr-summary.json, unless --summary sends it elsewhere),
    its copy in the history, and the failed list. A failure is a warning."""
    doc = summary.to_dict()
    data = _summary_json(doc)
    puts: list[tuple[str, bytes | Path]] = []
    if config.summary_path is None:
        puts.append((SUMMARY_NAME, data))
    history = runs_dir(root)
    latest_run = max(history.glob("*.json"), default=None, key=lambda p: p.name)
    if latest_run is not None:
        puts.append((f"{STATE_DIR}/{RUNS_DIR}/{latest_run.name}", latest_run))
    failed = state_dir(root) / FAILED_LIST_NAME
    if failed.exists():
        puts.append((f"{STATE_DIR}/{FAILED_LIST_NAME}", failed))

    def put(key: str, what: bytes | Path) -> str | None:
        try:
            if isinstance(what, Path):
                dest.write_from_file(key, what)
            else:
                dest.write_atomic(key, what)
        except OSError as exc:
            return f"could not upload {key}: {exc.strerror or exc}"
        return None

    # At once: each is a request's latency that would add to the run's end.
    with ThreadPoolExecutor(len(puts) or 1) as pool:
        problems = list(pool.map(lambda item: put(*item), puts))
    summary.warnings.extend(problem for problem in problems if problem is not None)
