"""One run per DEST: an advisory lock on ``DEST/.optimizr/lock``.

``flock`` rather than a pid file: the kernel drops the lock when the process
dies however it dies (kill -9, OOM killer), so a killed run never leaves DEST
locked, and there is no pid to go stale and be reused. The file's content (who
holds it, since when) is for people and ``optimizr status``; the lock itself
is only the flock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from optimizr.errors import DestBusy

LOCK_NAME = "lock"


class RunLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise DestBusy(
                f"another optimizr run is converting into {self.path.parent.parent} "
                f"({describe_holder(holder)}); wait for it to finish or stop it first"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        # Who holds it is a courtesy for people; a full disk is no reason to stop.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_holder(state_dir: Path) -> dict[str, Any] | None:
    """Who holds DEST's lock now, or None when no run does."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {"pid": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder or holder.get("pid") is None:
        return "holder unknown"
    since = holder.get("since")
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"pid {holder['pid']} on {holder.get('host', '?')}, since {started}"


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        value = json.loads(data) if data else None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
