"""The storage seam: where sources come from and where outputs go.

A backend maps *relative POSIX keys* (``a/b/photo.jpg``) to bytes. The local
filesystem is the first backend; S3 comes next; ``MemoryStorage`` is the fake
the tests run the pipeline on. The pipeline only ever talks to this interface.
"""

from __future__ import annotations

import fnmatch
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar

#: The folder in which optimizr keeps a DEST's state (manifest, lock, failed.jsonl).
#: A walk never enters one, and a folder that holds one is an optimizr DEST: its
#: files are optimizr's outputs, never sources.
STATE_DIR = ".optimizr"

#: User metadata on every .webp optimizr writes to an object store (its version):
#: a WebP that carries it is an output, never a source, in a bucket that mixes both.
OUTPUT_METADATA = "optimizr-output"
#: ... and what it was made from: the source's ETag and the options fingerprint. Two
#: writers (watch replicas) racing on one output tell by these that the output in
#: their way is the very one they made, not a file optimizr did not write.
SOURCE_ETAG_METADATA = "optimizr-source-etag"
FINGERPRINT_METADATA = "optimizr-fingerprint"

#: ``SourceEntry.error`` of a name given in a list of sources that is not in SRC
#: (no manifest row is kept for it: the manifest describes files that exist).
NOT_FOUND = "not found"
#: ... and of a listed name that leads out of SRC (``../x``, or an absolute path elsewhere).
OUTSIDE_SRC = "outside SRC"


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    #: The object store's ETag (None on a filesystem): evidence of "unchanged" there.
    etag: str | None = None


@dataclass(frozen=True)
class StoredObject:
    """What one read of a key gave: its bytes, and, on an object store, the ETag of
    exactly those bytes and the object's user metadata."""

    data: bytes
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceEntry:
    """One file found by a walk, or a place the walk could not enter (``error`` set)."""

    key: str
    size: int = 0
    mtime_ns: int = 0
    error: str | None = None
    etag: str | None = None


@dataclass(frozen=True)
class WalkOptions:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    #: Keys (directories) never to enter, relative to the root: DEST inside SRC.
    prune: tuple[str, ...] = ()

    def wants_file(self, key: str) -> bool:
        if not self.include and not self.exclude:
            return True
        if self.include and not _matches_any(key, self.include):
            return False
        return not _matches_any(key, self.exclude)

    def wants_dir(self, key: str) -> bool:
        if key.rpartition("/")[2] == STATE_DIR:
            return False
        return key not in self.prune and not _matches_any(key, self.exclude)


def _matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    # A pattern with a slash is matched against the whole relative path, one
    # without against the name alone: "*.png" and "raw/**" both do what they say.
    name = PurePosixPath(key).name
    for pattern in patterns:
        target = key if "/" in pattern else name
        if fnmatch.fnmatchcase(target, pattern):
            return True
        if pattern.endswith("/**") and (key + "/").startswith(pattern[:-2]):
            return True
    return False


@dataclass
class WalkStatistics:
    directories: int = 0
    files: int = 0
    symlinks_skipped: int = 0
    excluded: int = 0
    errors: int = 0
    loops_avoided: int = 0
    #: Folders passed over whole because they are optimizr DESTs (they hold STATE_DIR).
    dest_folders: int = 0


@dataclass(frozen=True)
class DirectoryListing:
    """The wanted files of one directory, sorted by name: the unit the pipeline
    plans outputs for, so that two sources claiming one output are caught."""

    directory: str
    entries: tuple[SourceEntry, ...] = field(default_factory=tuple)
    #: Set when the walk passed this directory over whole (with no entries), and why:
    #: the pipeline says so once in the run's warnings.
    skipped: str | None = None


#: Why a folder holding STATE_DIR is passed over.
DEST_FOLDER = (
    f"passed over: it is an optimizr DEST (it holds {STATE_DIR}/), its files are "
    "optimizr's outputs; to convert sources kept in it, give it as a SRC of its own"
)


class Storage(ABC):
    """A tree of files addressed by relative POSIX keys."""

    #: Does ``walk`` list every file under the root? Only then is a manifest row
    #: that no listing named evidence that its source may be gone (a list of
    #: sources, --files-from, names some files and proves nothing about the rest).
    complete_walk: ClassVar[bool] = True
    #: Does a listing cost requests to a service (an object store)? Then the tree is
    #: listed once, by the walk: no count pass ahead of it listing it all again.
    listing_is_remote: ClassVar[bool] = False

    @abstractmethod
    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        """Yield the tree one directory at a time, lazily (memory stays flat)."""

    @abstractmethod
    def stat(self, key: str) -> FileStat | None:
        """Size and mtime of ``key``, or None if it does not exist."""

    @abstractmethod
    def list_files(self, directory: str) -> dict[str, FileStat]:
        """The files directly in ``directory`` (a key prefix), by name; {} if there is none.

        One listing per directory instead of one stat per file: this is what
        makes a no-op re-run over a million outputs cheap (and, on S3, one
        LIST request per 1,000 keys instead of a HEAD per key)."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes: ...

    @abstractmethod
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
        """Replace ``key`` with ``data`` so no reader ever sees a partial object;
        ``mtime_ns``: the modification time it carries (--preserve-mtime).

        ``if_absent``: raise FileExistsError instead if ``key`` exists when the write
        lands, decided by the store itself (a hard link, an If-None-Match PUT), so
        that of two writers racing on one key exactly one wins. ``if_match``: the
        same for a replacement, raised if ``key``'s ETag is no longer this one (an
        If-Match PUT); a store that cannot compare (a filesystem, GCS) ignores it.

        ``metadata``: user metadata for the object (--metadata all copies a source's);
        a filesystem has nowhere to keep it and ignores it.

        Returns the store's ETag of what was written, where it has one (None on a
        filesystem): a Dask worker that wrote the output hands it back."""

    def read_head(self, key: str, size: int) -> bytes:
        """The first ``size`` bytes of ``key`` (fewer if it is shorter): enough of its
        header for a memory estimate, without carrying the whole image."""
        return self.read_bytes(key)[:size]

    def read_object(self, key: str) -> StoredObject:
        """``key``'s bytes with what the store knows of them (ETag, user metadata)."""
        return StoredObject(self.read_bytes(key))

    def read_metadata(self, key: str) -> dict[str, str] | None:
        """``key``'s user metadata (None: no such key); an object store reads only the
        headers (a HEAD), never the bytes. A filesystem keeps none: {}."""
        return {} if self.stat(key) is not None else None

    def write_from_file(self, key: str, path: Path) -> str | None:
        """Put the file at ``path`` as ``key`` (atomically); the new ETag, if any."""
        self.write_atomic(key, path.read_bytes())
        return None

    def read_to_file(self, key: str, path: Path) -> StoredObject:
        """Copy ``key`` into the file ``path``, whole or not at all (streamed where the
        backend can: a spooled source, a manifest snapshot); what the store said of
        it, with no bytes in ``data``."""
        from optimizr.atomic import atomic_write

        stored = self.read_object(key)
        atomic_write(path, stored.data)
        return StoredObject(b"", stored.etag, stored.metadata)

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        yield self.read_bytes(key)

    def copy_in(
        self, key: str, source: Storage, source_key: str, *, mtime_ns: int | None = None
    ) -> int:
        """Copy ``source_key`` of ``source`` to ``key``, atomically; return the bytes copied."""
        data = source.read_bytes(source_key)
        self.write_atomic(key, data, mtime_ns=mtime_ns)
        return len(data)

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the file ``key``; False if there was none. Folders it leaves
        empty go too, as rsync's --delete leaves no empty shells behind."""

    def local_path(self, key: str) -> str | None:
        """A filesystem path workers may read directly (streaming), if there is one."""
        return None

    @abstractmethod
    def remove_stale_temporaries(self) -> int:
        """Delete temporaries an interrupted run left behind; return how many."""

    @abstractmethod
    def describe(self) -> str: ...
