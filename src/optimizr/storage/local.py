"""The local filesystem as a :class:`Storage`."""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
from collections.abc import Iterator, Mapping
from pathlib import Path

from optimizr.atomic import atomic_open, atomic_write, fsync_dir, is_temp_name
from optimizr.storage.base import (
    DEST_FOLDER,
    STATE_DIR,
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    WalkOptions,
    WalkStatistics,
)


class LocalStorage(Storage):
    """The folder ``root``; with a ``prefix``, its keys are ``prefix/...`` (one of
    several SRCs, mirrored under DEST/prefix/) and the walk starts at ``prefix``."""

    def __init__(self, root: Path, prefix: str = "") -> None:
        self.root = root
        self.prefix = prefix
        self.walk_stats = WalkStatistics()

    def describe(self) -> str:
        return str(self.root)

    def path_of(self, key: str) -> Path:
        if self.prefix:
            key = key[len(self.prefix) + 1 :]
        return self.root / key if key else self.root

    def local_path(self, key: str) -> str | None:
        return str(self.path_of(key))

    def stat(self, key: str) -> FileStat | None:
        try:
            st = os.stat(self.path_of(key))
        except OSError:
            return None
        return FileStat(st.st_size, st.st_mtime_ns)

    def list_files(self, directory: str) -> dict[str, FileStat]:
        files: dict[str, FileStat] = {}
        try:
            with os.scandir(self.path_of(directory)) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat_mod.S_ISREG(st.st_mode):
                        files[entry.name] = FileStat(st.st_size, st.st_mtime_ns)
        except OSError:
            return {}
        return files

    def read_bytes(self, key: str) -> bytes:
        return self.path_of(key).read_bytes()

    def read_head(self, key: str, size: int) -> bytes:
        with self.path_of(key).open("rb") as fh:
            return fh.read(size)

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
        atomic_write(self.path_of(key), data, mtime_ns=mtime_ns, exclusive=if_absent)
        return None

    def copy_in(
        self, key: str, source: Storage, source_key: str, *, mtime_ns: int | None = None
    ) -> int:
        path = source.local_path(source_key)
        if path is None:
            return super().copy_in(key, source, source_key, mtime_ns=mtime_ns)
        copied = 0
        # Streamed: a 2 GB unsupported file must not be read into memory whole.
        with open(path, "rb") as fh, atomic_open(self.path_of(key)) as out:
            while chunk := fh.read(1 << 20):
                out.write(chunk)
                copied += len(chunk)
            if mtime_ns is not None:
                out.flush()
                os.utime(out.fd, ns=(mtime_ns, mtime_ns))
        return copied

    def delete(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty (or not ours to remove): stop climbing
            parent = parent.parent
        return True

    def remove_stale_temporaries(self) -> int:
        removed = 0
        if not self.root.is_dir():
            return 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if is_temp_name(name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        """Depth-first, one directory in memory at a time.

        Loops through symlinks are cut by remembering the (device, inode) of
        the directories on the current path only, so memory is bounded by depth.
        """
        stats = self.walk_stats
        root_st = os.stat(self.root)
        stack: list[tuple[str, tuple[tuple[int, int], ...]]] = [
            (self.prefix, ((root_st.st_dev, root_st.st_ino),))
        ]
        while stack:
            key, ancestors = stack.pop()
            stats.directories += 1
            try:
                with os.scandir(self.path_of(key)) as it:
                    dir_entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                stats.errors += 1
                reason = "permission denied" if isinstance(exc, PermissionError) else str(exc)
                yield DirectoryListing(key, (SourceEntry(key or ".", error=reason),))
                continue
            if key != self.prefix and any(_is_state_dir(e) for e in dir_entries):
                # Another run's DEST (this run's own is pruned): outputs, not sources.
                stats.dest_folders += 1
                yield DirectoryListing(key, skipped=DEST_FOLDER)
                continue
            files: list[SourceEntry] = []
            subdirs: list[tuple[str, tuple[tuple[int, int], ...]]] = []
            for entry in dir_entries:
                if _is_state_dir(entry):
                    continue  # SRC's own state folder (in place, or SRC is a DEST)
                child = f"{key}/{entry.name}" if key else entry.name
                try:
                    is_link = entry.is_symlink()
                    if is_link and not options.follow_symlinks:
                        stats.symlinks_skipped += 1
                        continue
                    st = entry.stat(follow_symlinks=True)
                except OSError as exc:
                    if is_temp_name(entry.name):
                        continue
                    stats.errors += 1
                    files.append(SourceEntry(child, error=os_reason(exc)))
                    continue
                if stat_mod.S_ISDIR(st.st_mode):
                    ident = (st.st_dev, st.st_ino)
                    if ident in ancestors:
                        stats.loops_avoided += 1
                        continue
                    if options.wants_dir(child):
                        subdirs.append((child, (*ancestors, ident)))
                    else:
                        stats.excluded += 1
                elif stat_mod.S_ISREG(st.st_mode):
                    if is_temp_name(entry.name):
                        continue
                    if options.wants_file(child):
                        stats.files += 1
                        files.append(SourceEntry(child, st.st_size, st.st_mtime_ns))
                    else:
                        stats.excluded += 1
            if files:
                yield DirectoryListing(key, tuple(files))
            # Reversed so the stack pops subdirectories in name order.
            stack.extend(reversed(subdirs))


def _is_state_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.name == STATE_DIR and entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "disappeared while being listed"
    return exc.strerror or str(exc)
