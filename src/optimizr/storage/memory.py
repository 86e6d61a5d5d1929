"""An in-memory :class:`Storage`: the fake the pipeline tests run on, and the
model the S3 backend will follow (flat keys, whole-object writes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import PurePosixPath

from optimizr.storage.base import (
    DEST_FOLDER,
    STATE_DIR,
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    WalkOptions,
)


class MemoryStorage(Storage):
    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.objects: dict[str, tuple[bytes, int]] = {}
        # I/O threads write concurrently: check-and-put of if_absent is one step.
        self._lock = threading.Lock()
        for key, data in (files or {}).items():
            self.put(key, data)
        self.writes = 0

    def describe(self) -> str:
        return "memory://"

    def put(self, key: str, data: bytes, mtime_ns: int | None = None) -> None:
        self.objects[key] = (data, time.time_ns() if mtime_ns is None else mtime_ns)

    def stat(self, key: str) -> FileStat | None:
        obj = self.objects.get(key)
        return None if obj is None else FileStat(len(obj[0]), obj[1])

    def list_files(self, directory: str) -> dict[str, FileStat]:
        prefix = f"{directory}/" if directory else ""
        return {
            key[len(prefix) :]: FileStat(len(data), mtime)
            for key, (data, mtime) in self.objects.items()
            if key.startswith(prefix) and "/" not in key[len(prefix) :]
        }

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.objects[key][0]
        except KeyError:
            raise FileNotFoundError(key) from None

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
        with self._lock:
            if if_absent and key in self.objects:
                raise FileExistsError(17, "exists", key)
            self.writes += 1
            self.put(key, bytes(data), mtime_ns)
        return None

    def delete(self, key: str) -> bool:
        return self.objects.pop(key, None) is not None

    def remove_stale_temporaries(self) -> int:
        return 0

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        # Folders (below the root) that hold a state folder are optimizr DESTs.
        dests = {
            key.rpartition(f"/{STATE_DIR}/")[0] for key in self.objects if f"/{STATE_DIR}/" in key
        }
        by_dir: dict[str, list[SourceEntry]] = {}
        for key in sorted(self.objects):
            parent = str(PurePosixPath(key).parent)
            parent = "" if parent == "." else parent
            parts = PurePosixPath(key).parts[:-1]
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(p in dests for p in prefixes):
                continue
            if any(not options.wants_dir(p) for p in prefixes) or not options.wants_file(key):
                continue
            data, mtime = self.objects[key]
            by_dir.setdefault(parent, []).append(SourceEntry(key, len(data), mtime))
        for directory in sorted(dests):
            yield DirectoryListing(directory, skipped=DEST_FOLDER)
        for directory in sorted(by_dir):
            yield DirectoryListing(directory, tuple(by_dir[directory]))
