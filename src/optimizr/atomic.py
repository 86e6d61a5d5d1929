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
from typing import BinaryIO

TMP_SUFFIX = ".optimizr-tmp"


def temp_name_for(target: Path) -> Path:
    return target.with_name(f".{target.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def atomic_write(target: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``target`` atomically, creating parent directories."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        # Also on KeyboardInterrupt: an interrupted write must leave nothing behind.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(target: Path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Stream a file into place: ``target`` appears whole when the block ends, or
    not at all if it raises. For documents too large to build in memory first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


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
