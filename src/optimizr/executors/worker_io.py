"""What a cluster worker does around one conversion: it reads the source from the
store, converts it, writes the outputs to the store, and hands back a record.

The coordinator of a ``--cluster`` run never carries image bytes (issue 15): it
walks, plans, submits a :class:`~optimizr.executors.base.Job` whose ``io`` says
where the source is and where its outputs go, and commits the manifest row from
the :class:`Stored` record that comes back (sizes, facts, timings, the ETag of
what was written). Reading and writing are :func:`read_source` and
:func:`write_outputs`, each one step a trace can wrap.

A location is opened on the worker from its URL (:class:`Place`): an object
store from ``s3://...`` and the run's :class:`~optimizr.storage.objectstore.StoreOptions`,
a folder from its path, which every worker must then see at the same path (a
shared filesystem). Outputs are written as the coordinator writes them: a
single PUT on an object store, a temporary file renamed into place on a disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from optimizr.config import IfLarger
from optimizr.storage.base import OUTPUT_METADATA, SourceEntry, Storage, StoredObject
from optimizr.storage.objectstore import StoreOptions

if TYPE_CHECKING:
    from optimizr.encode import Encoded
    from optimizr.executors.base import Job, Outcome


@dataclass(frozen=True)
class Place:
    """A SRC or DEST as a worker opens it: a folder's path, or an object-store URL."""

    url: str
    store: StoreOptions = dataclasses.field(default_factory=StoreOptions)

    def open(self) -> Storage:
        from optimizr.storage.local import LocalStorage
        from optimizr.storage.objectstore import storage_for
        from optimizr.storage.urls import parse_location

        location = parse_location(self.url)
        if location.scheme == "local":
            assert location.path is not None
            return LocalStorage(location.path)
        return storage_for(location, self.store)


@dataclass(frozen=True)
class WorkerRun:
    """What every image of a run shares: its places and its write policy."""

    src: Place
    dest: Place
    if_larger: IfLarger = "skip"
    min_saving: float = 0.0
    preserve_mtime: bool = False
    #: --metadata all: the source object's user metadata goes onto the output.
    copy_metadata: bool = False
    reencode_webp: bool = False
    #: Sources larger than this are read into a temporary file, not memory.
    spool_above: int = 64 << 20


@dataclass(frozen=True)
class WorkerIO:
    """Where one image comes from and goes to."""

    run: WorkerRun
    #: The source as the walk listed it: the write checks it is still that.
    entry: SourceEntry
    out_key: str
    #: Write the main output only if it is still absent (--if-exists skip, and the
    #: DEST listing had none): a file appearing meanwhile is kept.
    if_absent: bool = False


StoredStatus = Literal["written", "own output", "already webp", "larger", "exists"]


@dataclass(frozen=True)
class Stored:
    """The record a worker hands back instead of the image: what it did."""

    status: StoredStatus
    #: Bytes of the outputs written (or that would have been, for "larger").
    bytes_out: int = 0
    #: Of those, the pages 2, 3, ... (--pages all).
    more_bytes: int = 0
    written: tuple[str, ...] = ()
    #: The store's ETag of the main output written (None on a filesystem).
    etag: str | None = None
    #: "exists": the key found in the way.
    target: str = ""
    read_seconds: float = 0.0
    write_seconds: float = 0.0


@dataclass
class Fetched:
    """A source at hand on the worker: its path or bytes, and what the store said."""

    source: str | bytes
    etag: str | None
    metadata: dict[str, str]
    seconds: float
    spool: Path | None = None

    def discard(self) -> None:
        if self.spool is not None:
            with contextlib.suppress(FileNotFoundError):
                self.spool.unlink()
            self.spool = None


def read_source(io: WorkerIO, source: Storage) -> Fetched:
    """The source of ``io``: a path where the store is a folder this worker sees,
    else its bytes (or, above ``spool_above``, a temporary file). Raises OSError."""
    started = time.perf_counter()
    key = io.entry.key
    path = source.local_path(key)
    if path is not None:
        return Fetched(path, None, {}, time.perf_counter() - started)
    if io.entry.size > io.run.spool_above:
        fd, name = tempfile.mkstemp(prefix="optimizr-source-")
        spool = Path(name)
        with contextlib.suppress(OSError):
            import os

            os.close(fd)
        try:
            stored = source.read_to_file(key, spool)
        except BaseException:
            spool.unlink(missing_ok=True)
            raise
        return Fetched(
            str(spool), stored.etag, stored.metadata, time.perf_counter() - started, spool
        )
    stored = source.read_object(key)
    return Fetched(stored.data, stored.etag, stored.metadata, time.perf_counter() - started)


def write_outputs(
    io: WorkerIO,
    dest: Storage,
    source: Storage,
    encoded: Encoded,
    fetched: Fetched,
) -> Stored:
    """Write the pages 2, 3, ... then the main output (so the main one says the whole
    source is done), after checking the source is still the one listed. Raises the
    ImageError the coordinator records (SourceChanged, WriteFailed, NoSpaceLeft)."""
    from optimizr.errors import NoSpaceLeft, SourceChanged, WriteFailed
    from optimizr.pipeline import changed_since_listed, page_key

    changed = changed_since_listed(io.entry, source.stat(io.entry.key), fetched.etag)
    if changed is not None:
        raise SourceChanged(f"the source {changed} while it was being converted")
    run, out_key = io.run, io.out_key
    writes = [(page_key(out_key, n), data) for n, data in enumerate(encoded.more_pages, 2)]
    writes.append((out_key, encoded.webp))
    mtime_ns = io.entry.mtime_ns if run.preserve_mtime else None
    started = time.perf_counter()
    done: list[str] = []
    etag: str | None = None
    for target, data in writes:
        try:
            etag = dest.write_atomic(
                target,
                data,
                mtime_ns=mtime_ns,
                if_absent=io.if_absent and target == out_key,
                metadata=fetched.metadata if run.copy_metadata else None,
            )
        except FileExistsError:
            # A task runs again when its worker died after writing but before its
            # result reached the coordinator (Dask keeps results on the worker): the
            # object in the way is then this image's own, byte for byte.
            found = _read_if_present(dest, target)
            if found is None or found.data != data:
                return Stored("exists", written=tuple(done), target=target)
            etag = found.etag
        except OSError as exc:
            import errno

            full = NoSpaceLeft if exc.errno in (errno.ENOSPC, errno.EDQUOT) else WriteFailed
            raise full(f"{target}: {exc.strerror or exc}") from None
        done.append(target)
    more = sum(len(page) for page in encoded.more_pages)
    return Stored(
        "written",
        bytes_out=len(encoded.webp) + more,
        more_bytes=more,
        written=tuple(done),
        etag=etag,
        write_seconds=time.perf_counter() - started,
    )


def convert_here(
    job: Job, storages: Callable[[Place], Storage], convert: Callable[[Job], Outcome]
) -> Outcome:
    """One image on this worker: read, convert with ``convert`` (in an isolated child
    process on a Dask worker), write; the outcome carries no image bytes."""
    from optimizr import tracing
    from optimizr.errors import SourceUnreadable
    from optimizr.executors.base import Outcome
    from optimizr.pipeline import is_webp, larger_than_source

    io = job.io
    assert io is not None, "a job for a worker that does its own I/O carries io"
    source, dest = storages(io.run.src), storages(io.run.dest)
    try:
        with tracing.phase("fetch"):
            fetched = read_source(io, source)
    except OSError as exc:
        return Outcome(job, None, SourceUnreadable(exc.strerror or str(exc)))
    try:
        if OUTPUT_METADATA in fetched.metadata:
            # An optimizr output in a bucket mixing both: never a source.
            return Outcome(job, None, None, stored=Stored("own output"))
        if not io.run.reencode_webp and is_webp(fetched.source):
            return Outcome(job, None, None, stored=Stored("already webp"))
        outcome = convert(dataclasses.replace(job, source=fetched.source))
    finally:
        fetched.discard()  # a spool file; the bytes stay for the write's checks
    fetched.source = b""
    encoded = outcome.encoded
    if outcome.error is not None or encoded is None:
        return dataclasses.replace(outcome, job=job)
    slim = _without_bytes(encoded)
    size = len(encoded.webp) + sum(len(page) for page in encoded.more_pages)
    larger = larger_than_source(
        io.entry.key, size, io.entry.size, io.run.if_larger, io.run.min_saving
    )
    if larger is not None:
        stored = Stored("larger", bytes_out=size, read_seconds=fetched.seconds)
        return Outcome(job, slim, None, outcome.worker, outcome.warnings, stored=stored)
    from optimizr.errors import ImageError

    try:
        with tracing.phase("write", **{"optimizr.bytes": size}):
            stored = write_outputs(io, dest, source, encoded, fetched)
    except ImageError as exc:
        return Outcome(job, None, exc, outcome.worker, outcome.warnings)
    except OSError as exc:  # the source's HEAD failed
        return Outcome(job, None, SourceUnreadable(exc.strerror or str(exc)), outcome.worker)
    stored = dataclasses.replace(stored, read_seconds=fetched.seconds)
    return Outcome(job, slim, None, outcome.worker, outcome.warnings, stored=stored)


def _without_bytes(encoded: Encoded) -> Encoded:
    """``encoded`` with its WebP bytes dropped (they are in the store now): the facts,
    and one empty entry per further page so the page count stays known."""
    return dataclasses.replace(encoded, webp=b"", more_pages=tuple(b"" for _ in encoded.more_pages))


def _read_if_present(storage: Storage, key: str) -> StoredObject | None:
    try:
        return storage.read_object(key)
    except OSError:
        return None
