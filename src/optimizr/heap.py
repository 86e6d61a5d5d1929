"""Keeping glibc's malloc from hoarding freed memory: in the pool's workers, and in
the coordinator of a run or a service.

glibc raises its mmap threshold each time a large block is freed, so after a while
blocks that were mmapped (and handed back on free) come from the heap instead, and
freed memory stays resident wherever a live block sits above it. A worker grew from 31
to 127 MB over four 8-32 MP images that way (measured: see ``keep_heap_compact``).

The coordinator holds no image, but it frees and reallocates all through a run: Dask's
message frames, obstore's listing pages, SQLite's caches of each checkpoint, zlib's
state. Its private memory (RssAnon) rose 5 MiB over a 20,000-image cluster run that
way, in steps, long after everything it keeps had reached its size (1.09x the
1,000-image run's), while its Python objects stayed at 75,000. Two remedies, measured
together and apart (bench/cluster.py; bench/README.md, "Flat"):

* ``HeapTrimmer``, a ``malloc_trim`` every ``TRIM_SECONDS`` in every run and service:
  harmless in any process, so it runs wherever ``convert_tree`` or a service does.
  Alone, the cluster coordinator's peak was 1.038x from 1,000 to 20,000 images.
* with it, the workers' fixed thresholds (``keep_heap_compact``): 1.024-1.026x, and
  1.028x at 50,000 images. Those settings are the whole process's, and they make every
  block of 256 KiB or more an mmap of its own (page faults each time, which a process
  decoding images in place pays for: the test suite's in-process decodes spent 2.5x
  the system time). So the ``optimizr`` program sets them for itself (``cli.run``),
  as each conversion worker does, and a host program calling the library keeps its
  own.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from optimizr.metrics.memory import private_rss_of

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: How often the coordinator hands freed memory back. A trim walks the free lists of
#: every arena: a few microseconds for a coordinator's heap (measured), so 15 s costs nothing
#: and keeps what a burst freed from staying resident for long.
TRIM_SECONDS = 15.0


def keep_heap_compact() -> Callable[[], None]:
    """Stop glibc malloc from hoarding the memory of big blocks; return a trim function.

    A fixed 1 MiB threshold kept large buffers in mmap (returned to the system on
    free), and ``malloc_trim`` after each image handed back the rest: the four
    images above then left the worker at 33 MB.

    The threshold is 256 KiB, not 1 MiB: libvips' strips and tiles for libwebp's
    binding (about 1 MiB each) and libjpeg's buffers fall just under 1 MiB, and
    interleaved on the heap they kept a 12 MP photo's worker at 5.7 bytes per pixel
    at its peak; at 256 KiB it is 3.6 (3.55 at 128 KiB, for more mmap calls).

    The settings are the process's: call it once, when the process sets up its work.
    Not glibc (musl, macOS): nothing to tune, and the function returned does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        return lambda: None
    return trimmer()


def trimmer() -> Callable[[], None]:
    """``malloc_trim(0)``: every arena's free pages handed back, the heap's top and the
    whole pages between live blocks alike; a function that does nothing off glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def trim_now() -> None:
        trim(0)

    return trim_now


@dataclass
class HeapStatistics:
    trims: int = 0
    #: Private resident memory before a trim less after, summed over the trims that
    #: lowered it.
    released_bytes: int = 0


class HeapTrimmer:
    """A coordinator's freed memory handed back (see the module's docstring): a trim
    every ``interval`` seconds on a daemon thread, and one at ``stop`` (the run's
    structures are gone by then: what comes after, the last checkpoint and the
    summary, starts from a compact heap). It changes no malloc setting."""

    def __init__(self, interval: float = TRIM_SECONDS) -> None:
        self.interval = interval
        self.stats = HeapStatistics()
        self._trim: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # the thread's trim or the last one

    def start(self) -> HeapTrimmer:
        self._trim = trimmer()
        self._thread = threading.Thread(target=self._run, name="optimizr-heap", daemon=True)
        self._thread.start()
        return self

    def trim(self) -> None:
        with self._lock:
            before = private_rss_of(os.getpid())
            self._trim()
            self.stats.trims += 1
            self.stats.released_bytes += max(0, before - private_rss_of(os.getpid()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.trim()

    def stop(self) -> HeapStatistics:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.trim()
        return self.stats
