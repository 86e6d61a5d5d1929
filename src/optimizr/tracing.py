"""Traces of a run over OpenTelemetry (OTLP/HTTP), off unless an endpoint is given.

Tracing is on when ``--otlp-endpoint URL`` (``RunConfig.otlp_endpoint``) or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (a base URL: ``/v1/traces`` is added) or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the full URL) is set. Off, this module is
all that runs: no-op objects, and neither :mod:`optimizr.otel` nor the SDK is
imported, in the coordinator or in a worker. On without the ``tracing`` extra
installed, one warning line says so and the run goes on untraced.

The tree of one run (resource ``service.name=optimizr``)::

    run                    source, dest; at the end found/converted/skipped/failed, bytes
    └─ image               one per image handed to a worker: key, bytes in/out,
       │                   outcome, reason, error (status ERROR when it failed)
       ├─ fetch            coordinator: the source read from an object store (if any)
       ├─ read             worker: sniff and header   \\  the conversion's own phase
       ├─ decode           worker: pixels to encoder   }  clock (encode.ImageFacts),
       ├─ encode           worker: libwebp             /  laid end to end
       └─ write            the output stored in DEST

The coordinator makes the run and image spans; the phases of a conversion are
made where it runs. The image span's W3C trace context, and the traces URL, go
to the worker in :attr:`Job.trace <optimizr.executors.base.Job.trace>` (a carrier
of string pairs, picklable), so one image is one trace across processes and
machines. The worker side is two calls, which the local pool's worker
(``executors/worker.convert_job``) makes, and which any other executor's task
function (a Dask worker's, which also reads the source and writes the output
itself) makes the same way::

    from optimizr import tracing

    def task(job: Job) -> ...:
        with tracing.in_worker(job):           # the job's trace, exported on exit
            with tracing.phase("fetch"):
                data = store.read_object(job.key)
            result = convert_job(job, ...)     # read, decode, encode spans
            with tracing.phase("write", bytes=len(webp)):
                store.write_atomic(out_key, webp)
        return result

``in_worker`` nests (the inner one, in ``convert_job``, joins the outer one) and
exports the job's spans when the outermost one ends, in one request, before the
result goes back: a worker process may be killed or replaced (``os._exit``) at
any moment after that, so nothing waits in a buffer. A worker whose export
fails stops exporting for the rest of its life (a collector that is down costs
one timeout per worker process, not one per image). Without a trace in the job
both are no-ops that import nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optimizr.encode import ImageFacts
    from optimizr.errors import ImageError
    from optimizr.executors.base import Job
    from optimizr.otel import WorkerSpans
    from optimizr.results import Result, RunSummary

_log = logging.getLogger("optimizr")

#: A job's trace: W3C ``traceparent`` (and ``tracestate``) pairs, plus this entry.
Carrier = tuple[tuple[str, str], ...]
#: The carrier's entry naming the OTLP/HTTP traces URL the worker exports to: the
#: coordinator's, so that workers on other machines need no setting of their own.
ENDPOINT_KEY = "optimizr-otlp-traces-url"

TRACES_PATH = "v1/traces"
INSTALL_HINT = "pip install 'optimizr[tracing]'"


def traces_url(endpoint: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The OTLP/HTTP URL spans are posted to, or None (tracing off).

    ``endpoint`` (--otlp-endpoint) first, then the SDK's own variables, read the
    way the SDK reads them: the signal's full URL, else the base URL plus
    ``v1/traces``. --otlp-endpoint is a base URL like OTEL_EXPORTER_OTLP_ENDPOINT
    (one ending in /v1/traces is taken as it is)."""
    if endpoint:
        return _with_traces_path(endpoint)
    if full := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return full
    if base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return _with_traces_path(base)
    return None


def _with_traces_path(base: str) -> str:
    base = base.strip()
    if base.rstrip("/").endswith("/" + TRACES_PATH):
        return base
    return f"{base.rstrip('/')}/{TRACES_PATH}"


# -- the coordinator ----------------------------------------------------------------------


class ImageTrace:
    """One image's span, seen from the coordinator; this base class is the no-op."""

    #: What the image's Job carries to the worker (empty: no tracing).
    carrier: Carrier = ()

    def phase(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
        """A child span around the ``with`` block (on any thread)."""
        return contextlib.nullcontext()

    def timed(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A child span for a phase timed elsewhere (an I/O thread's fetch)."""

    def finished(self, result: Result) -> None:
        """End the image span with its result (once; later calls do nothing)."""


NO_IMAGE = ImageTrace()


class RunTrace:
    """One run's span and its exporter; this base class is the no-op (tracing off)."""

    def image(self, key: str, size: int, started_ns: int) -> ImageTrace:
        return NO_IMAGE

    def finish(self, summary: RunSummary) -> None:
        """End the run span with the run's counts and export what is left."""


def start_run(endpoint: str | None, source: str, dest: str) -> RunTrace:
    """The run's tracing: real when an endpoint is set (:func:`traces_url`) and the
    SDK is installed; else the no-op, after one warning line if it was asked for."""
    url = traces_url(endpoint)
    if url is None:
        return RunTrace()
    try:
        from optimizr.otel import TracedRun
    except ImportError as exc:
        _log.warning(
            "tracing is off: an OTLP endpoint is set (%s) but OpenTelemetry is not "
            "installed (%s; %s)",
            url,
            exc,
            INSTALL_HINT,
        )
        return RunTrace()
    return TracedRun(url, source, dest)


# -- a worker ---------------------------------------------------------------------------

#: The job being traced in this worker (thread or task), set by ``in_worker``.
_current: ContextVar[WorkerSpans | None] = ContextVar("optimizr_trace", default=None)


@contextlib.contextmanager
def in_worker(job: Job) -> Iterator[None]:
    """Make the phase spans of ``job`` children of its image span while the block
    runs, and export them when it ends (see the module docstring)."""
    if not job.trace or _current.get() is not None:
        yield
        return
    try:
        from optimizr.otel import worker_spans
    except ImportError:
        # The coordinator asked for traces but this worker cannot make them (the
        # extra is missing here): the image converts untraced. Nothing is printed:
        # a worker's stderr would become a message of this image.
        yield
        return
    spans = worker_spans(job.trace)
    if spans is None:  # this worker's exports failed before: not tried again
        yield
        return
    token = _current.set(spans)
    try:
        yield
    finally:
        _current.reset(token)
        spans.export()


@contextlib.contextmanager
def phase(name: str, **attributes: Any) -> Iterator[None]:
    """A span named ``name`` under the current job's image span (inside
    ``in_worker``); an exception leaving the block marks it as failed."""
    spans = _current.get()
    if spans is None:
        yield
        return
    with spans.phase(name, attributes):
        yield


def conversion(started_ns: int, facts: ImageFacts | None, error: ImageError | None) -> None:
    """The read, decode and encode spans of a conversion that began at ``started_ns``
    (time.time_ns()), from its phase clock; or, when it failed, one ``convert``
    span carrying the error (where in the conversion it failed is not known)."""
    spans = _current.get()
    if spans is None:
        return
    if facts is None:
        spans.failed("convert", started_ns, time.time_ns(), error)
        return
    spans.conversion(started_ns, facts)
