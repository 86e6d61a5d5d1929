"""Where ``optimizr watch`` writes: a local DEST folder, or a bucket shared by replicas.

A local DEST is what a batch run's is: outputs, and the state in ``DEST/.optimizr/``
(manifest, lock, the webhook's queue, watch.json), one service at a time (the flock).

A remote DEST (``s3://bucket/prefix``...) is written as ``convert`` writes one (the
manifest in a local state root, ``--state-dir``, snapshotted up every
--checkpoint-interval; outputs as single conditional PUTs), with one difference:
**several replicas of the service may write it at once**. That is how the service is
deployed (Kubernetes replicas consuming one queue into one bucket), so what replicas
share and what they do not is decided here:

* Each replica has its **own state root and manifest**: replicas cannot share one
  SQLite file (not over a network filesystem, not in a bucket). The local flock on
  the state root keeps one process per state root: two replicas on one machine need
  two --state-dir (the default is per DEST URL, so per machine: a pod's own disk).
* There is **no DEST-wide lock**: the lease a batch run takes on ``DEST/.optimizr/lock``
  would let a single replica start. A replica only refuses to start while a batch
  ``convert`` holds that lease (a live one), as a second batch run would. The
  replicas do not need a lock among themselves: what keeps them from both committing
  one output is the store itself. Every output that is not in DEST yet is written
  with If-None-Match, so of two replicas racing on one object exactly one PUT lands;
  the other finds, in the output's metadata, the source ETag and options fingerprint
  it converted with (``optimizr-source-etag``, ``optimizr-fingerprint``, beside the
  ``optimizr-output`` marker) and records the image as done by another writer: a
  duplicate, no second write, its message acked (Pipeline._adopt_marked). A replica
  whose manifest has no row for an output in DEST (another replica wrote it) takes it
  the same way, without converting. A new source version replaces an output both
  replicas know as theirs with If-Match on the ETag they listed (S3, Azure): one lands,
  the other finds the new version's marks. An output of another source version that
  the replica's manifest does not know, or a file without the marks, is handled as a
  batch run handles it (kept under --if-exists skip, "optimizr did not write it").
* Each replica's **manifest snapshot has a key of its own**,
  ``DEST/.optimizr/replicas/NAME.manifest.sqlite.gz``, NAME being --consumer or, without
  it, the host name and a hash of the state root's path (stable across restarts of
  one pod on one volume, distinct for two state roots on one machine). One shared key
  would be clobbered by every replica in turn, and a replica restoring it would take
  another's rows for its own. A replica that starts without a local manifest
  restores its own snapshot, else the batch run's (``.optimizr/manifest.sqlite.gz``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizr.config import RunConfig
from optimizr.errors import DestBusy, UsageError
from optimizr.lock import RunLock
from optimizr.manifest import MANIFEST_NAME, Manifest, manifest_path, state_dir
from optimizr.storage.base import STATE_DIR, Storage
from optimizr.storage.local import LocalStorage
from optimizr.storage.urls import Location, is_url

_log = logging.getLogger("optimizr")

#: The folder, under DEST's ``.optimizr/``, of the replicas' manifest snapshots.
REPLICAS_DIR = "replicas"


@dataclass
class WatchDest:
    """DEST opened for a service: its storage, its state root, its manifest."""

    storage: Storage
    #: The local folder whose ``.optimizr/`` holds the state (DEST itself when local).
    root: Path
    manifest: Manifest
    #: DEST as typed: a folder, or the bucket's URL.
    text: str
    #: A remote DEST's location (None: a folder).
    location: Location | None = None
    #: Where this replica's manifest snapshot goes (a remote DEST).
    snapshot_key: str | None = None
    #: What closes it, in order (the last snapshot up, the manifest, the lock).
    closers: list[Callable[[], Any]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()


def replica_name(consumer: str, root: Path) -> str:
    """This replica's name in DEST: --consumer, else the host and its state root's hash."""
    if consumer:
        return re.sub(r"[^A-Za-z0-9._-]+", "-", consumer).strip("-") or "replica"
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-") or "host"
    return f"{host}-{digest}"


def open_dest(run: RunConfig, consumer: str) -> WatchDest:
    """DEST's storage, state root, lock and manifest, for one service (a replica)."""
    if isinstance(run.dest, str) and is_url(run.dest):
        return _open_remote(run, run.dest, consumer)
    if not isinstance(run.dest, Path):
        raise UsageError(f"watch writes to one DEST (a folder or a bucket URL), not {run.dest}")
    root = run.dest
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create DEST {root}: {exc.strerror or exc}") from None
    lock = RunLock(state_dir(root))
    lock.acquire()  # DestBusy (exit 3) while a run or another service holds DEST
    try:
        manifest = _manifest(root)
    except BaseException:
        lock.release()
        raise
    closers: list[Callable[[], Any]] = [manifest.close, lock.release]
    return WatchDest(LocalStorage(root), root, manifest, str(root), closers=closers)


def _manifest(root: Path) -> Manifest:
    try:
        return Manifest.open(root)
    except (OSError, sqlite3.Error) as exc:
        raise UsageError(f"cannot open the state in {state_dir(root)}: {exc}") from None


def _open_remote(run: RunConfig, url: str, consumer: str) -> WatchDest:
    from optimizr.dest_state import (
        GZIP_SUFFIX,
        SNAPSHOT_KEY,
        Checkpointer,
        local_state_root,
        restore,
    )
    from optimizr.storage.lease import describe_lease, read_lease
    from optimizr.storage.objectstore import StoreOptions, probe, storage_for
    from optimizr.storage.urls import parse_location

    location = parse_location(url)
    store = storage_for(location, StoreOptions.for_run(run))
    # A real write: a DEST that cannot be written is told now, before any event.
    probe(store, write=True)
    root = local_state_root(location.url(), run.state_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the state folder {root}: {exc.strerror or exc}") from None
    lock = RunLock(state_dir(root))
    try:
        lock.acquire()  # one process per state root (its SQLite files)
    except DestBusy as exc:
        raise DestBusy(
            f"{exc}; replicas of the service into one bucket each need a --state-dir of their own"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot use the state folder {root}: {exc.strerror or exc}") from None
    closers: list[Callable[[], Any]] = [lock.release]
    try:
        try:
            held = read_lease(store)
        except OSError as exc:
            raise UsageError(f"cannot read the lock of {location.url()}: {exc}") from None
        if held is not None and not held.expired:
            raise DestBusy(
                f"a batch optimizr run is converting into {location.url()} "
                f"({describe_lease(held)}); start the service once it has finished"
            )
        name = replica_name(consumer, root)
        key = f"{STATE_DIR}/{REPLICAS_DIR}/{name}.{MANIFEST_NAME}{GZIP_SUFFIX}"
        try:
            restored = restore(store, root, key)
            if not restored and not manifest_path(root).exists():
                # A first start: the batch run's rows, if one ran, are this replica's
                # starting point (its outputs are known as optimizr's).
                restored = restore(store, root, SNAPSHOT_KEY)
        except OSError as exc:
            raise UsageError(
                f"cannot read the manifest snapshot in {location.url()}: {exc.strerror or exc}"
            ) from None
        manifest = _manifest(root)
        closers.insert(0, manifest.close)
        manifest.restored = restored
        manifest.flush()
        # Its first upload at once, on its own thread: DEST knows the replica from the start.
        checkpointer = Checkpointer(store, root, run.checkpoint_interval, key).start()

        def last_snapshot() -> None:
            checkpointer.stop()
            if not (manifest.flush() and checkpointer.upload()):
                _log.warning(
                    "could not upload the manifest to %s/%s (%s); it is kept in %s",
                    location.url(),
                    key,
                    checkpointer.stats.last_error,
                    root,
                )

        closers.insert(0, last_snapshot)
    except BaseException:
        for close in closers:
            close()
        raise
    return WatchDest(store, root, manifest, location.url(), location, key, closers)
