"""Where the state of a DEST lives when DEST is a bucket.

A local DEST keeps its state (manifest, lock, run history) in ``DEST/.optimizr/``.
An object store cannot hold a live SQLite database, so for a remote DEST the
manifest lives in a local *state root* (``--state-dir``, by default under the
user's cache directory, one folder per DEST URL) laid out as a local DEST's is
(``ROOT/.optimizr/manifest.sqlite``), so every part of optimizr that reads a
DEST's state reads it the same way. Snapshots of it go up to
``DEST/.optimizr/manifest.sqlite.gz`` (see ``Checkpointer``), from which another
machine can resume.

The snapshot goes up gzip'd (``manifest.sqlite.gz``): a manifest is mostly paths and
hex, which deflate at level 1 makes 4.3x smaller for about 8 ms of CPU a MiB (level 6:
4.9x for 3x the CPU; bench/snapshot.py). That is 4.3x fewer bytes sent at every
checkpoint and read at every restore, and, because a request's body (one part, at
most 5 MiB) has to be whole in memory while it is sent, 4.3x less memory for the
upload until the snapshot reaches that bound. The plain form older versions uploaded
(``manifest.sqlite``) is still read; of the two, the newer is the snapshot.
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
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from optimizr.atomic import atomic_write
from optimizr.errors import UsageError
from optimizr.manifest import CACHE_KIB, MANIFEST_NAME, manifest_path, state_dir
from optimizr.storage.base import FileStat, Storage

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from optimizr.status import StatusReport
    from optimizr.storage.objectstore import StoreOptions
    from optimizr.storage.urls import Location

#: What a compressed snapshot's key ends with.
GZIP_SUFFIX = ".gz"
#: The key, under DEST, of the manifest's snapshot.
SNAPSHOT_KEY = f".optimizr/{MANIFEST_NAME}{GZIP_SUFFIX}"
#: deflate's fastest level: 4.3x on a manifest; higher levels gain little on hex and
#: paths for several times the CPU (bench/snapshot.py).
GZIP_LEVEL = 1
#: What is read and compressed at a time: the memory a snapshot takes stays this,
#: whatever the manifest's size.
CHUNK_BYTES = 256 * 1024


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
    #: What went up, compressed; and the manifest's own size at the last upload.
    upload_bytes: int = 0
    manifest_bytes: int = 0
    upload_seconds: float = 0.0
    failures: int = 0
    last_error: str = ""
    restored: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "uploads": self.uploads,
            "upload_bytes": self.upload_bytes,
            "manifest_bytes": self.manifest_bytes,
            "upload_seconds": round(self.upload_seconds, 3),
            "failures": self.failures,
            "last_error": self.last_error,
            "restored_from_dest": self.restored,
        }


def snapshot_forms(key: str) -> tuple[str, str]:
    """The two keys a snapshot may have: (compressed, plain as older versions wrote)."""
    plain = key.removesuffix(GZIP_SUFFIX)
    return plain + GZIP_SUFFIX, plain


def find_snapshot(dest: Storage, key: str = SNAPSHOT_KEY) -> tuple[str, FileStat] | None:
    """The snapshot in DEST, in either form (the newer if both are there: an older
    version ran last), with what its listing says of it; None if there is none.
    One listing of its folder."""
    folder = key.rpartition("/")[0]
    listed = dest.list_files(folder)
    found = [
        (form, listed[form.rpartition("/")[2]])
        for form in snapshot_forms(key)
        if form.rpartition("/")[2] in listed
    ]
    if not found:
        return None
    return max(found, key=lambda item: item[1].mtime_ns)  # a tie: the compressed one


def download_snapshot(dest: Storage, key: str, path: Path) -> None:
    """The snapshot at ``key`` (either form) into ``path`` as the SQLite file, streamed.

    A compressed one that does not inflate whole (cut short, damaged) raises OSError
    naming it, and leaves nothing at ``path``."""
    if not key.endswith(GZIP_SUFFIX):
        dest.read_to_file(key, path)
        return
    packed = path.with_name(f"{path.name}{GZIP_SUFFIX}")
    try:
        dest.read_to_file(key, packed)
        _inflate(packed, path)
    except (zlib.error, EOFError, ValueError) as exc:
        path.unlink(missing_ok=True)
        raise OSError(f"the snapshot {key} is damaged: {exc}") from None
    except BaseException:  # the disk full, the run stopped: no half of a manifest left
        path.unlink(missing_ok=True)
        raise
    finally:
        packed.unlink(missing_ok=True)


def restore(dest: Storage, root: Path, key: str = SNAPSHOT_KEY) -> bool:
    """Bring DEST's snapshot down as the local manifest when the local one is missing
    or not the last one uploaded (another machine ran since); True if it did.

    One listing of ``.optimizr/`` on every run; the download only when needed.
    The local manifest it replaces, if any, is kept beside it. ``key``: where the
    snapshot is (a watch replica's own: see watch_dest)."""
    found = find_snapshot(dest, key)
    if found is None:
        return False
    key, listed = found
    local = manifest_path(root)
    marker = state_dir(root) / SNAPSHOT_ETAG_NAME
    known = marker.read_text().strip() if marker.exists() else None
    if local.exists() and listed.etag is not None and known == listed.etag:
        return False  # the snapshot is this manifest's own last upload
    # Streamed into a file beside it first (a manifest of a million rows is hundreds
    # of MB): the local one is set aside only once the snapshot is whole on disk.
    download = local.with_name(f".{MANIFEST_NAME}.download")
    download_snapshot(dest, key, download)
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
    """Uploads snapshots of the manifest to ``DEST/.optimizr/manifest.sqlite.gz``: every
    ``interval`` seconds on a thread of its own, and once more at the end.

    A snapshot is taken with SQLite's online backup through a connection of its
    own (the manifest is in WAL mode: the run's writer is never blocked), into a
    temporary file beside the manifest, gzip'd into another that is streamed up (see
    the module's docstring); both are removed. It holds
    what the run had committed: a run killed later loses at most the rows since,
    which the next run recovers from DEST's listing (see Pipeline._adopt)."""

    def __init__(self, dest: Storage, root: Path, interval: float, key: str = SNAPSHOT_KEY) -> None:
        self.dest = dest
        #: Where the snapshot goes under DEST (a watch replica's own: see watch_dest),
        #: always in its compressed form: what goes up is gzip.
        self.key = snapshot_forms(key)[0]
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
            packed = tmp.with_name(f"{tmp.name}{GZIP_SUFFIX}")
            try:
                with contextlib.closing(sqlite3.connect(source)) as live:
                    with contextlib.closing(sqlite3.connect(tmp)) as copy:
                        # In steps, with small caches: the memory a snapshot takes stays
                        # the same whatever the manifest's size (it is ~200 B a row).
                        for conn in (live, copy):
                            conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
                        live.backup(copy, pages=256, sleep=0)
                manifest_bytes = tmp.stat().st_size
                _deflate(tmp, packed)
                size = packed.stat().st_size
                etag = self.dest.write_from_file(self.key, packed)
            except (OSError, sqlite3.Error) as exc:
                self.stats.failures += 1
                self.stats.last_error = str(exc)
                return False
            finally:
                for path in (tmp, packed):
                    path.unlink(missing_ok=True)
            _remember(state_dir(self.root) / SNAPSHOT_ETAG_NAME, etag)
            self.stats.uploads += 1
            self.stats.manifest_bytes = manifest_bytes
            self.stats.upload_bytes += size
            self.stats.upload_seconds += time.perf_counter() - started
            return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _deflate(source: Path, target: Path) -> None:
    """``source`` gzip'd into ``target`` (written whole or raising), CHUNK_BYTES at a time.

    Read with read(), never mapped: the pages stay the page cache's, not the
    process's, so the coordinator's RSS does not grow with the manifest here."""
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # 31: the gzip container
    with source.open("rb") as fin, target.open("wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            fout.write(packer.compress(chunk))
        fout.write(packer.flush())


def _inflate(source: Path, target: Path) -> None:
    """``source`` gunzip'd into ``target``, in bounded steps; raises zlib.error or
    EOFError (cut short) unless the stream is whole, its CRC checked."""
    unpacker = zlib.decompressobj(31)
    with source.open("rb") as fin, target.open("wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            # max_length bounds each step's output: a small gzip of a large file (a
            # manifest of repeated rows) never inflates into memory at once.
            fout.write(unpacker.decompress(chunk, CHUNK_BYTES))
            while unpacker.unconsumed_tail:
                fout.write(unpacker.decompress(unpacker.unconsumed_tail, CHUNK_BYTES))
        fout.write(unpacker.flush())
        if not unpacker.eof:
            raise EOFError("compressed data ended before the end-of-stream marker")
        if unpacker.unused_data:
            raise ValueError("trailing bytes after the end of the gzip stream")


def _remember(marker: Path, etag: str | None) -> None:
    with contextlib.suppress(OSError):
        if etag is None:
            marker.unlink(missing_ok=True)
        else:
            atomic_write(marker, etag.encode())


@contextlib.contextmanager
def remote_manifest_root(
    location: Location, state_dir: Path | None, storage: Callable[[], Storage]
) -> Iterator[tuple[Path, str | None]]:
    """For a reader of a remote DEST's manifest (status, urls): the folder whose
    ``.optimizr/manifest.sqlite`` it is, and the URL of the snapshot it was downloaded
    from (None: the local state root's own).

    The local state root if it has one; else DEST's snapshot, streamed into a
    temporary folder (removed when the block ends; a download cut short is never
    opened as a manifest that lists fewer outputs). ``storage`` is called only then:
    a reader of the local state needs neither credentials nor the network."""
    root = local_state_root(location.url(), state_dir)
    if manifest_path(root).exists():
        yield root, None
        return
    where = f"{location.url()}/{SNAPSHOT_KEY}"
    with tempfile.TemporaryDirectory(prefix="optimizr-snapshot-") as tmp:
        try:
            dest = storage()
            found = find_snapshot(dest)
            if found is None:
                raise FileNotFoundError(where)
            where = f"{location.url()}/{found[0]}"
            download_snapshot(dest, found[0], manifest_path(Path(tmp)))
        except FileNotFoundError:  # none, or deleted between the listing and the read
            raise UsageError(
                f"no optimizr manifest for {location.url()}: neither a local one "
                f"({manifest_path(root)}; see --state-dir) nor a snapshot at {where}"
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot download {where}: {exc.strerror or exc}") from None
        yield Path(tmp), where


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
