"""The code that runs inside a worker process.

Kept apart from the pool so that a worker imports only what it needs, and so
libvips is configured before its first use: one operation cache is useless for
a stream of different images and only holds memory, and libvips' own thread
pool must be sized so that workers x threads does not oversubscribe the cores.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

#: Test-only fault injection, "KIND:NAME,...", for a file whose key ends with NAME:
#: crash (SIGSEGV), abort (SIGABRT), hang (sleep for ever), delete (the source
#: vanishes before it is read), modify (the source is rewritten after it was
#: converted), corrupt (the WebP is cut short), resize (a valid WebP of the
#: wrong size). It exists so the fault tests exercise real processes and real
#: files; nothing sets it outside the test suite.
FAULT_ENV = "OPTIMIZR_TEST_FAULTS"


def keep_heap_compact() -> Callable[[], None]:
    """Stop glibc malloc from hoarding the memory of big images; return a trim function.

    glibc raises its mmap threshold each time a large block is freed, so after a
    few big images libvips' buffers come from the heap and stay resident when
    freed: an idle worker grew from 31 to 127 MB over four 8-32 MP images
    (measured). A fixed 1 MiB threshold keeps large buffers in mmap (returned
    to the system on free), and ``malloc_trim`` after each image hands back the
    rest; the same four images then leave the worker at 33 MB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 20)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return lambda: None

    def trim_now() -> None:
        trim(0)

    return trim_now


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def configure_libvips(threads: int) -> None:
    # Must happen before pyvips starts libvips, which reads these once.
    os.environ["VIPS_CONCURRENCY"] = str(max(1, threads))
    os.environ.setdefault("VIPS_WARNING", "0")
    import pyvips

    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)


def worker_main(conn: Connection, threads: int) -> None:
    """Serve jobs from ``conn`` until it closes. Runs in a fresh (spawned) process."""
    # Ctrl-C reaches the whole process group; only the parent decides what it
    # means (finish in-flight work first), so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    trim_heap = keep_heap_compact()
    configure_libvips(threads)
    from optimizr.encode import encode_webp
    from optimizr.errors import ImageError
    from optimizr.verify import verify_webp

    faults = _parse_faults(os.environ.get(FAULT_ENV, ""))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        _maybe_fault(faults, job.key, job.source)
        try:
            encoded = encode_webp(job.source, job.options)
            if faults:
                encoded = _after_encode_fault(faults, job.key, job.source, encoded)
            if job.verify:
                verify_webp(encoded)
            result: Any = ("ok", encoded)
        except ImageError as exc:
            result = ("error", exc)
        except MemoryError:
            from optimizr.errors import TooLarge

            result = ("error", TooLarge("ran out of memory while converting"))
        except Exception as exc:  # a bug of ours must not lose the rest of the run
            from optimizr.errors import EncodeFailed

            result = ("error", EncodeFailed(f"internal error: {type(exc).__name__}: {exc}"))
        del job
        trim_heap()
        try:
            conn.send(result)
        except (OSError, EOFError):
            return


def _parse_faults(text: str) -> dict[str, str]:
    faults: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        kind, _, name = item.partition(":")
        faults[name] = kind
    return faults


def _maybe_fault(faults: dict[str, str], key: str, source: str | bytes) -> None:
    for name, kind in faults.items():
        if key.endswith(name):
            if kind == "delete" and isinstance(source, str):
                os.unlink(source)
            elif kind == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif kind == "abort":
                os.abort()
            elif kind == "hang":
                while True:
                    time.sleep(3600)


def _after_encode_fault(faults: dict[str, str], key: str, source: str | bytes, encoded: Any) -> Any:
    import dataclasses

    for name, kind in faults.items():
        if not key.endswith(name):
            continue
        if kind == "modify" and isinstance(source, str):
            with open(source, "ab") as fh:
                fh.write(b"edited meanwhile")
            os.utime(source, ns=(time.time_ns(),) * 2)
        elif kind == "corrupt":
            return dataclasses.replace(encoded, webp=encoded.webp[: len(encoded.webp) * 2 // 3])
        elif kind == "resize":
            import pyvips

            tiny = pyvips.Image.black(1, 1, bands=3).webpsave_buffer()
            return dataclasses.replace(encoded, webp=tiny)
    return encoded
