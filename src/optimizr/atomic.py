"""Atomic file writes: a reader sees the old file or the whole new one, never half.

The temporary file lives in the target's own directory (a rename across
filesystems is a copy, not atomic), is fsynced before the rename, and the
directory is fsynced after it so the rename itself survives a power cut.
The temporary name starts with a dot and ends in ``.optimizr-tmp`` so that an
interrupted run's leftovers are recognisable and never mistaken for output.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".optimizr-tmp"


def temp_name_for(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(target: Path, *, sync: bool = True, exclusive: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target``: whatever the block writes there replaces
    ``target`` when the block ends (fsynced first, unless the writer already did),
    or is removed if the block raises. For writers that want a path (SQLite).

    ``exclusive``: never replace, raise FileExistsError if ``target`` exists by then
    (a hard link is created or fails atomically, as a rename cannot)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(target)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: an interrupted write must leave nothing behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


class AtomicFile:
    """What ``atomic_open`` yields: buffered writes through ``os.write``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= 1 << 16:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self._buffer)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        view.release()
        self._buffer.clear()


@contextlib.contextmanager
def atomic_open(
    target: Path, *, mode: int = 0o644, exclusive: bool = False
) -> Iterator[AtomicFile]:
    """Stream a file into place: ``target`` appears whole when the block ends, or
    not at all if it raises (``exclusive``: see atomic_path)."""
    with atomic_path(target, sync=False, exclusive=exclusive) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
        try:
            fh = AtomicFile(fd)
            yield fh
            fh.flush()
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(
    target: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    mtime_ns: int | None = None,
    exclusive: bool = False,
) -> None:
    """Write ``data`` to ``target`` atomically, creating parent directories.

    With ``mtime_ns``, the file carries that modification time from the moment
    it appears (set on the temporary, before the rename). ``exclusive``: raise
    FileExistsError rather than replace a file that is there."""
    with atomic_open(target, mode=mode, exclusive=exclusive) as fh:
        fh.write(data)
        if mtime_ns is not None:
            fh.flush()
            os.utime(fh.fd, ns=(mtime_ns, mtime_ns))


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and all of Windows) cannot fsync a directory
    finally:
        os.close(fd)
