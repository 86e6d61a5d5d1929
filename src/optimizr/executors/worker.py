"""The code that runs inside a worker process.

A worker is an interpreter of its own (see local.py), so it imports only
optimizr, never the caller's ``__main__``. libvips is configured before its
first use: one operation cache is useless for a stream of different images and
only holds memory, and libvips' own thread pool must be sized so that workers x
threads does not oversubscribe the cores. Each job's answer carries what
libvips logged while converting it (``codec_messages.py``).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from optimizr.heap import keep_heap_compact

if TYPE_CHECKING:
    from optimizr.encode import Encoded
    from optimizr.errors import ImageError
    from optimizr.executors.base import Job
    from optimizr.executors.codec_messages import CodecMessages

#: Test-only fault injection, "KIND:NAME,...", for a file whose key ends with NAME:
#: crash (SIGSEGV), abort (SIGABRT), hang (sleep for ever), delete (the source
#: vanishes before it is read), modify (the source is rewritten after it was
#: converted), corrupt (the WebP is cut short), resize (a valid WebP of the
#: wrong size), stderr (a message written straight to fd 2), raise (the worker
#: dies of a Python exception), grow-MIB (the worker's memory grows by MIB MiB,
#: 1 MiB per 20 ms as a decoder's would, before it converts), hold-MIB (the same,
#: held until a file SOURCE.release appears), keep-MIB (the worker keeps MIB MiB
#: after the image, as numpy's import or a fragmented heap would); and the start-up faults of
#: ``_startup_fault``. It exists so the fault tests exercise real processes and
#: real files; nothing sets it outside the test suite.
FAULT_ENV = "OPTIMIZR_TEST_FAULTS"


def configure_libvips(threads: int) -> None:
    """Size libvips' thread pool and turn its caches off, in this process.

    libvips reads ``VIPS_CONCURRENCY`` once, when pyvips first loads it, so the
    pool also passes it in each worker's environment; setting it here as well
    covers a caller (bench/calibrate_memory.py) whose pyvips is not loaded yet,
    and ``concurrency_set`` one whose pyvips already is.
    """
    os.environ["VIPS_CONCURRENCY"] = str(max(1, threads))
    import pyvips

    pyvips.concurrency_set(max(1, threads))
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)


#: Signals the parent alone acts on. Ctrl-C reaches the terminal's whole process
#: group, and a service manager's SIGTERM often the whole control group; either
#: means "finish the images in flight first", which the parent decides, so
#: workers ignore both (a worker killed by them would fail its image for good).
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


def main() -> None:
    """A worker process: ``python -c '...main()' FD THREADS`` (see local.py).

    Serves jobs over the connection on file descriptor FD until it is closed or
    sent None. Says ``("ready", pid)`` first, once its imports and libvips
    set-up are done, so that no job (and no job's timeout) waits on them.
    """
    fd, threads = int(sys.argv[1]), int(sys.argv[2])
    # The parent started this process with these signals blocked: ignored now,
    # none that arrived meanwhile can still be delivered.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    faults = _parse_faults(os.environ.get(FAULT_ENV, ""))
    _startup_fault(faults)
    trim_heap = keep_heap_compact()
    configure_libvips(threads)
    from optimizr.executors.codec_messages import CodecMessages
    from optimizr.libwebp import load as load_libwebp

    # Loaded (or found missing) before "ready", not inside the first image's time.
    load_libwebp()

    conn = Connection(fd)
    with CodecMessages() as messages:
        conn.send(("ready", os.getpid()))
        _serve(conn, faults, messages, trim_heap)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Nothing is left that the system does not reclaim; interpreter and libvips
    # shutdown could only print messages that no image would own.
    os._exit(0)


def _serve(
    conn: Connection,
    faults: list[tuple[str, str]],
    messages: CodecMessages,
    trim_heap: Callable[[], None],
) -> None:
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        _maybe_fault(faults, job.key, job.source)
        encoded, error, warnings = convert_job(job, messages, faults)
        answer: Any = ("ok", encoded, warnings) if error is None else ("error", error, warnings)
        del job, encoded, error
        trim_heap()
        # What a codec printed to fd 2 is read by the parent once it has the
        # answer: it must all be written by then.
        sys.stderr.flush()
        try:
            conn.send(answer)
        except (OSError, EOFError):
            return


def convert_job(
    job: Job, messages: CodecMessages, faults: list[tuple[str, str]] | None = None
) -> tuple[Encoded | None, ImageError | None, tuple[str, ...]]:
    """Convert one job: the WebP or the error, and what libvips logged meanwhile.

    A traced job's read, decode and encode spans are exported before this returns,
    so before its answer is sent (tracing.py)."""
    from optimizr import tracing

    with tracing.in_worker(job):
        started_ns = time.time_ns()
        encoded, error, warnings = _convert_job(job, messages, faults)
        tracing.conversion(started_ns, None if encoded is None else encoded.facts, error)
    return encoded, error, warnings


def _convert_job(
    job: Job, messages: CodecMessages, faults: list[tuple[str, str]] | None
) -> tuple[Encoded | None, ImageError | None, tuple[str, ...]]:
    from optimizr.encode import encode_webp
    from optimizr.errors import EncodeFailed, ImageError, TooLarge
    from optimizr.executors.codec_messages import tidy
    from optimizr.verify import verify_webp

    messages.take()  # anything logged between jobs is not this image's
    encoded: Encoded | None = None
    error: ImageError | None = None
    try:
        encoded = encode_webp(job.source, job.options)
        if faults:
            encoded = _after_encode_fault(faults, job.key, job.source, encoded)
        if job.verify:
            verify_webp(encoded)
    except ImageError as exc:
        error = _detached(exc)
    except MemoryError as exc:
        _detached(exc)
        error = TooLarge("ran out of memory while converting")
    except Exception as exc:  # a bug of ours must not lose the rest of the run
        _detached(exc)
        error = EncodeFailed(f"internal error: {type(exc).__name__}: {exc}")
    if error is not None:
        encoded = None  # verify failed: the WebP is not wanted
    # libvips says some things (``read gave 100 warnings``) only when the image
    # is freed: with the traceback gone, it was, so the messages are all here.
    return encoded, error, tidy(messages.take())


def _detached(exc: BaseException) -> Any:
    """``exc`` without its traceback and the exception it replaced: their frames
    hold the image, which must be freed now, not whenever the next job rebinds."""
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


def _parse_faults(text: str) -> list[tuple[str, str]]:
    faults: list[tuple[str, str]] = []
    for item in filter(None, text.split(",")):
        kind, _, name = item.partition(":")
        faults.append((kind, name))
    return faults


def _startup_fault(faults: list[tuple[str, str]]) -> None:
    """The start-up faults: ``startup:exit`` (every worker exits before it is
    ready, saying why on stderr), ``startup:crash`` (SIGSEGV), ``startup:hang``,
    and ``startup-once:PATH`` (only the worker that creates PATH first exits)."""
    for kind, name in faults:
        if kind == "startup-once":
            try:
                os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            name = "exit"
        elif kind != "startup":
            continue
        if name == "exit":
            print("optimizr worker: injected start-up failure", file=sys.stderr, flush=True)
            os._exit(3)
        elif name == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif name == "hang":
            while True:
                time.sleep(3600)


#: The pace of an injected growth: 50 MiB/s, slower than a real decode (the
#: ceiling's margin covers those), so that a test's tree never outruns a sample.
_GROW_STEP, _GROW_PAUSE = 1 << 20, 0.02


def _grow(mib: int, until: str | None) -> None:
    """Use ``mib`` MiB more, touched page by page, then (once ``until`` exists) free it."""
    held = []
    for _ in range(mib):
        held.append(b"\1" * _GROW_STEP)  # written, so resident: not calloc's untouched pages
        time.sleep(_GROW_PAUSE)
    while until is not None and not os.path.exists(until):
        time.sleep(_GROW_PAUSE)
    del held


#: What a ``keep-MIB`` fault keeps for the worker's life.
_KEPT: list[bytes] = []


def _maybe_fault(faults: list[tuple[str, str]], key: str, source: str | bytes) -> None:
    for kind, name in faults:
        if key.endswith(name) and kind.startswith("keep-"):
            _KEPT.extend(b"\1" * _GROW_STEP for _ in range(int(kind.partition("-")[2])))
        elif key.endswith(name) and kind.startswith(("grow-", "hold-")):
            held = kind.startswith("hold-") and isinstance(source, str)
            _grow(int(kind.partition("-")[2]), f"{source!s}.release" if held else None)
        elif key.endswith(name):
            if kind == "delete" and isinstance(source, str):
                os.unlink(source)
            elif kind == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif kind == "abort":
                os.abort()
            elif kind == "hang":
                while True:
                    time.sleep(3600)
            elif kind == "stderr":  # a C library printing straight to fd 2
                line = "(process:%d): GLib-GObject-WARNING **: 12:00:00.000: injected codec message"
                os.write(2, f"\n{line % os.getpid()}\n\n".encode())
            elif kind == "raise":  # outside the job's error handling: a Python crash
                raise RuntimeError("injected fault: the worker dies with a traceback")


def _after_encode_fault(
    faults: list[tuple[str, str]], key: str, source: str | bytes, encoded: Any
) -> Any:
    import dataclasses

    for kind, name in faults:
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
