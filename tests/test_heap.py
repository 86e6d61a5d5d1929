"""optimizr.heap: glibc's freed memory handed back, in a worker and in the coordinator."""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from pathlib import Path

import pytest

from conftest import photo_array, save_jpeg
from optimizr.config import RunConfig
from optimizr.convert import convert_tree
from optimizr.heap import HeapTrimmer
from optimizr.metrics.memory import private_rss_of

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="malloc_trim and mallopt are glibc's",
)

MIB = 1 << 20


@glibc
def test_a_trim_hands_back_freed_memory_a_live_block_above_it_kept_resident() -> None:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    trimmer = HeapTrimmer(interval=3600.0)
    trimmer.start()
    try:
        # 40 MiB of 4 KiB blocks, touched, then freed but for the last: that one pins
        # the top of the heap, so glibc's own trimming of the top cannot give any back.
        blocks = [libc.malloc(4096) for _ in range(10_240)]
        assert all(blocks)
        for block in blocks:
            ctypes.memset(block, 1, 4096)
        for block in blocks[:-1]:
            libc.free(block)
        freed_resident = private_rss_of(os.getpid())
        trimmer.trim()
        assert trimmer.stats.released_bytes >= 30 * MIB
        assert private_rss_of(os.getpid()) <= freed_resident - 30 * MIB
        libc.free(blocks[-1])
    finally:
        stats = trimmer.stop()
    assert stats.trims == 2  # the one asked for, and the one at stop


def test_the_trimmer_trims_on_its_thread_until_stopped() -> None:
    trimmer = HeapTrimmer(interval=0.01).start()
    deadline = time.monotonic() + 30
    while trimmer.stats.trims < 3:
        assert time.monotonic() < deadline, "no periodic trim"
        time.sleep(0.01)  # polling a counter, not racing it
    stats = trimmer.stop()
    after = stats.trims
    # Joined: nothing is left to trim later.
    assert "optimizr-heap" not in {t.name for t in threading.enumerate()}
    assert trimmer.stop().trims == after  # a second stop is a no-op, no extra trim


def test_a_run_reports_its_coordinators_trims(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for n in range(3):
        save_jpeg(src / f"{n}.jpg", photo_array(64, 48, n))
    summary = convert_tree(src, tmp_path / "dest", RunConfig(src=src, dest=tmp_path / "dest"))
    assert summary.converted == 3
    assert summary.memory["heap_trims"] >= 1  # at least the one when the run ends
    assert summary.memory["heap_released_bytes"] >= 0
