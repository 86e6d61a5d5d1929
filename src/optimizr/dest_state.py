"""Where the state of a DEST lives when DEST is a bucket.

A local DEST keeps its state (manifest, lock, run history) in ``DEST/.optimizr/``.
An object store cannot hold a live SQLite database, so for a remote DEST the
manifest lives in a local *state root* (``--state-dir``, by default under the
user's cache directory, one folder per DEST URL) laid out as a local DEST's is
(``ROOT/.optimizr/manifest.sqlite``), so every part of optimizr that reads a
DEST's state reads it the same way. Snapshots of it go up to
``DEST/.optimizr/manifest.sqlite`` (see ``checkpoint``), from which another
machine can resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import sqlite3
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optimizr.atomic import atomic_write
from optimizr.errors import UsageError
from optimizr.manifest import CACHE_KIB, MANIFEST_NAME, manifest_path, state_dir
from optimizr.storage.base import Storage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from optimizr.status import StatusReport
    from optimizr.storage.objectstore import StoreOptions
    from optimizr.storage.urls import Location

#: The key, under DEST, of the manifest's snapshot.
SNAPSHOT_KEY = ".optimizr/manifest.sqlite"


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return Path(base) if base else Path.home() / ".cache"


def local_state_root(dest_url: str, state_dir: Path | None = None) -> Path:
    """The local folder that stands in for a remote DEST's ``.optimizr/`` parent.

    ``state_dir`` (--state-dir) is used as it is; the default is keyed by the URL
    (readable slug + hash: two DESTs never share one, and a user can tell which is which)."""
    if state_dir is not None:
        return state_dir
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", dest_url)[:60].strip("-")
    digest = hashlib.sha256(dest_url.encode()).hexdigest()[:12]
    return cache_home() / "optimizr" / "dests" / f"{slug}-{digest}"


#: Beside the local manifest: the ETag of the snapshot in DEST this manifest was last
#: uploaded as or restored from. Another ETag in DEST means another machine ran since.
SNAPSHOT_ETAG_NAME = "snapshot-etag"


@dataclass
class CheckpointStatistics:
    uploads: int = 0
    upload_bytes: int = 0
    upload_seconds: float = 0.0
    failures: int = 0
    last_error: str = ""
    restored: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "uploads": self.uploads,
            "upload_bytes": self.upload_bytes,
            "upload_seconds": round(self.upload_seconds, 3),
            "failures": self.failures,
            "last_error": self.last_error,
            "restored_from_dest": self.restored,
        }


def restore(dest: Storage, root: Path, key: str = SNAPSHOT_KEY) -> bool:
    """Bring DEST's snapshot down as the local manifest when the local one is missing
    or not the last one uploaded (another machine ran since); True if it did.

    One HEAD (a listing of ``.optimizr/``) on every run; the download only when needed.
    The local manifest it replaces, if any, is kept beside it. ``key``: where the
    snapshot is (a watch replica's own: see watch_dest)."""
    folder, _, name = key.rpartition("/")
    listed = dest.list_files(folder).get(name)
    if listed is None:
        return False
    local = manifest_path(root)
    marker = state_dir(root) / SNAPSHOT_ETAG_NAME
    known = marker.read_text().strip() if marker.exists() else None
    if local.exists() and listed.etag is not None and known == listed.etag:
        return False  # the snapshot is this manifest's own last upload
    # Streamed into a file beside it first (a manifest of a million rows is hundreds
    # of MB): the local one is set aside only once the snapshot is whole on disk.
    download = local.with_name(f".{MANIFEST_NAME}.download")
    dest.read_to_file(key, download)
    if local.exists():
        aside = local.with_name(f"{MANIFEST_NAME}.replaced-{int(time.time())}")
        # With its WAL: the copy kept aside is the whole of what it said.
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{local}{suffix}", f"{aside}{suffix}")
    os.replace(download, local)
    _remember(marker, listed.etag)
    return True


class Checkpointer:
    """Uploads snapshots of the manifest to ``DEST/.optimizr/manifest.sqlite``: every
    ``interval`` seconds on a thread of its own, and once more at the end.

    A snapshot is taken with SQLite's online backup through a connection of its
    own (the manifest is in WAL mode: the run's writer is never blocked), into a
    temporary file beside the manifest that is streamed up and removed. It holds
    what the run had committed: a run killed later loses at most the rows since,
    which the next run recovers from DEST's listing (see Pipeline._adopt)."""

    def __init__(self, dest: Storage, root: Path, interval: float, key: str = SNAPSHOT_KEY) -> None:
        self.dest = dest
        #: Where the snapshot goes under DEST (a watch replica's own: see watch_dest).
        self.key = key
        self.root = root
        self.interval = interval
        self.stats = CheckpointStatistics()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one upload at a time: the thread's or the last
        self._thread: threading.Thread | None = None

    def start(self) -> Checkpointer:
        self._thread = threading.Thread(target=self._loop, name="optimizr-checkpoint", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        # The first at once: a run killed before the first interval still leaves DEST
        # knowing that a run started, and when (what recovery adopts from).
        self.upload()
        while not self._stop.wait(self.interval):
            self.upload()

    def upload(self) -> bool:
        """One snapshot up; a failure is counted (the run goes on), never raised."""
        with self._lock:
            started = time.perf_counter()
            source = manifest_path(self.root)
            tmp = state_dir(self.root) / f".snapshot-{threading.get_ident()}.sqlite"
            try:
                with contextlib.closing(sqlite3.connect(source)) as live:
                    with contextlib.closing(sqlite3.connect(tmp)) as copy:
                        # In steps, with small caches: the memory a snapshot takes stays
                        # the same whatever the manifest's size (it is ~200 B a row).
                        for conn in (live, copy):
                            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
                        live.backup(copy, pages=256, sleep=0)
                size = tmp.stat().st_size
                etag = self.dest.write_from_file(self.key, tmp)
            except (OSError, sqlite3.Error) as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
            _remember(state_dir(self.root) / SNAPSHOT_ETAG_NAME, etag)
            self.stats.uploads += 1
            self.stats.upload_bytes += size
            self.stats.upload_seconds += time.perf_counter() - started
            return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _remember(marker: Path, etag: str | None) -> None:
    with contextlib.suppress(OSError):
        if etag is None:
            marker.unlink(missing_ok=True)
        else:
            atomic_write(marker, etag.encode())


@contextlib.contextmanager
def remote_manifest_root(
    location: Location, state_dir: Path | None, storage: Callable[[], Storage]
) -> Iterator[tuple[Path, bool]]:
    """For a reader of a remote DEST's manifest (status, urls): the folder whose
    ``.optimizr/manifest.sqlite`` it is, and whether that is a downloaded snapshot.

    The local state root if it has one; else DEST's snapshot, streamed into a
    temporary folder (removed when the block ends; a download cut short is never
    opened as a manifest that lists fewer outputs). ``storage`` is called only then:
    a reader of the local state needs neither credentials nor the network."""
    root = local_state_root(location.url(), state_dir)
    if manifest_path(root).exists():
        yield root, False
        return
    where = f"{location.url()}/{SNAPSHOT_KEY}"
    with tempfile.TemporaryDirectory(prefix="optimizr-snapshot-") as tmp:
        try:
            storage().read_to_file(SNAPSHOT_KEY, manifest_path(Path(tmp)))
        except FileNotFoundError:
            raise UsageError(
                f"no optimizr manifest for {location.url()}: neither a local one "
                f"({manifest_path(root)}; see --state-dir) nor a snapshot at {where}"
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot download {where}: {exc.strerror or exc}") from None
        yield Path(tmp), True


def remote_status(url: str, state_dir: Path | None, options: StoreOptions) -> StatusReport:
    """``optimizr status`` of a remote DEST (see remote_manifest_root), shown by its URL."""
    from optimizr.status import read_status
    from optimizr.storage.objectstore import storage_for
    from optimizr.storage.urls import parse_location

    location = parse_location(url)
    with remote_manifest_root(location, state_dir, lambda: storage_for(location, options)) as (
        root,
        _,
    ):
        report = read_status(root)
    return dataclasses.replace(report, dest=location.url())
