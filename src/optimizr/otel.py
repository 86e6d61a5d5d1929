"""The OpenTelemetry side of :mod:`optimizr.tracing`: providers, exporters, spans.

Imported only when tracing is on (an endpoint set): importing it imports the SDK
and the OTLP/HTTP exporter (the ``tracing`` extra), which a run without tracing
never loads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from optimizr.encode import ImageFacts
from optimizr.errors import ImageError
from optimizr.results import Result, RunSummary
from optimizr.tracing import ENDPOINT_KEY, Carrier, ImageTrace, RunTrace

_log = logging.getLogger("optimizr")

SERVICE_NAME = "optimizr"
#: Seconds one export may take, retries included. A worker waits for its export
#: before it answers (the image's time), so a collector that is down must cost
#: little, and only once per worker (see WorkerSpans).
EXPORT_TIMEOUT = 3.0

_PROPAGATOR = TraceContextTextMapPropagator()


def _resource(role: str) -> Resource:
    return Resource.create(
        {
            "service.name": SERVICE_NAME,
            "host.name": socket.gethostname(),
            "process.pid": os.getpid(),
            "optimizr.role": role,
        }
    )


def _error_status(span: Span | trace.Span, reason: str, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, f"{reason}: {message}" if message else reason))


# -- the coordinator ----------------------------------------------------------------------


class _CountingExporter(SpanExporter):
    """The OTLP exporter, counting failed exports for the run's one warning."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.failed = 0
        self.lost = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.inner.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self.failed += 1
            self.lost += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


#: Where the OTLP exporter logs each retry and failure.
EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


class _KeepFirstMessage(logging.Filter):
    """Holds back the exporter's own log lines (one per retry, several lines per
    failed export) and keeps the first, for the run's one warning line."""

    def __init__(self) -> None:
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.first is None:
            # "Transient error X encountered while exporting spans batch, retrying in 1s"
            message = record.getMessage().removeprefix("Transient error ")
            self.first = message.partition(" encountered while exporting")[0]
        return False


class _TracedImage(ImageTrace):
    def __init__(self, run: TracedRun, span: trace.Span) -> None:
        self.run, self.span = run, span
        self.context = trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=self.context)
        carrier[ENDPOINT_KEY] = run.url
        self.carrier = tuple(sorted(carrier.items()))

    def phase(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[None]:
        return _span(self.run.tracer, name, self.context, attributes)

    def timed(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        span = self.run.tracer.start_span(
            name, context=self.context, attributes=attributes, start_time=start_ns
        )
        span.end(end_time=max(start_ns, end_ns))

    def finished(self, result: Result) -> None:
        if not self.run.close_image(self):
            return  # ended already
        span = self.span
        span.set_attribute("optimizr.outcome", result.status)
        span.set_attribute("optimizr.bytes_out", result.bytes_out)
        if result.reason:
            span.set_attribute("optimizr.reason", result.reason)
        if result.status == "failed":
            span.set_attribute("optimizr.error", result.message)
            if result.error_class:
                span.set_attribute("optimizr.error_class", result.error_class)
            _error_status(span, result.reason or "failed", result.message)
        span.end()


class TracedRun(RunTrace):
    """The run span, with every image span of the run under it, exported in batches
    from a thread of its own (the pipeline never waits on the collector)."""

    def __init__(self, url: str, source: str, dest: str) -> None:
        self.url = url
        self.provider = TracerProvider(resource=_resource("coordinator"), shutdown_on_exit=False)
        self.exporter = _CountingExporter(OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT))
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self._said = _KeepFirstMessage()
        logging.getLogger(EXPORTER_LOGGER).addFilter(self._said)
        self.tracer = self.provider.get_tracer("optimizr")
        self.span = self.tracer.start_span(
            "run", attributes={"optimizr.source": source, "optimizr.dest": dest}
        )
        self.context = trace.set_span_in_context(self.span)
        self._lock = threading.Lock()
        #: Image spans not ended yet (in flight): ended as unfinished with the run.
        self._open: set[_TracedImage] = set()

    def image(self, key: str, size: int, started_ns: int) -> ImageTrace:
        span = self.tracer.start_span(
            "image",
            context=self.context,
            attributes={"optimizr.key": key, "optimizr.bytes_in": size},
            start_time=started_ns,
        )
        image = _TracedImage(self, span)
        with self._lock:
            self._open.add(image)
        return image

    def close_image(self, image: _TracedImage) -> bool:
        """Take ``image`` off the open ones; False when it was not open any more."""
        with self._lock:
            if image not in self._open:
                return False
            self._open.discard(image)
            return True

    def finish(self, summary: RunSummary) -> None:
        with self._lock:
            left, self._open = self._open, set()
        for image in left:  # stopped (Ctrl-C, abort) before a result was recorded
            image.span.set_attribute("optimizr.outcome", "unfinished")
            image.span.end()
        span = self.span
        for name in ("found", "converted", "skipped", "failed", "bytes_in", "bytes_out"):
            span.set_attribute(f"optimizr.{name}", getattr(summary, name))
        span.set_attribute("optimizr.interrupted", summary.interrupted)
        span.end()
        self.provider.shutdown()  # exports what is left, within EXPORT_TIMEOUT
        logging.getLogger(EXPORTER_LOGGER).removeFilter(self._said)
        if self.exporter.failed:
            _log.warning(
                "tracing: %d export(s) to %s failed, %d of the run's spans lost (%s)",
                self.exporter.failed,
                self.url,
                self.exporter.lost,
                self._said.first or "no reason given",
            )


# -- a worker ---------------------------------------------------------------------------


class _Collect(SpanProcessor):
    """Keeps the ended spans of the job being traced, for one export at its end."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self._lock = threading.Lock()

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.spans.append(span)

    def take(self) -> list[ReadableSpan]:
        with self._lock:
            spans, self.spans = self.spans, []
        return spans


class _WorkerExport:
    """This process's provider and exporter for one traces URL."""

    def __init__(self, url: str) -> None:
        self.provider = TracerProvider(resource=_resource("worker"), shutdown_on_exit=False)
        self.collect = _Collect()
        self.provider.add_span_processor(self.collect)
        self.tracer = self.provider.get_tracer("optimizr")
        self.exporter = OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT)
        self.broken = False

    def export(self) -> None:
        spans = self.collect.take()
        if spans and not self.broken:
            self.broken = self.exporter.export(spans) is not SpanExportResult.SUCCESS


#: One exporter per traces URL for the life of this worker process. Made on the
#: first traced job rather than at start-up because a Dask worker runs no
#: initializer of optimizr's; a worker only ever serves one coordinator's URL.
_EXPORTS: dict[str, _WorkerExport] = {}
_EXPORTS_LOCK = threading.Lock()


@contextlib.contextmanager
def _span(
    tracer: trace.Tracer, name: str, parent: Context, attributes: dict[str, Any]
) -> Iterator[None]:
    """A span under ``parent`` for the block; an exception leaving it marks it failed."""
    span = tracer.start_span(name, context=parent, attributes=attributes)
    try:
        yield
    except BaseException as exc:
        _error_status(span, type(exc).__name__, str(exc))
        raise
    finally:
        span.end()


class WorkerSpans:
    """The spans of one job in a worker, children of its image span."""

    def __init__(self, export: _WorkerExport, parent: Context) -> None:
        self._export, self._parent = export, parent

    def phase(
        self, name: str, attributes: dict[str, Any]
    ) -> contextlib.AbstractContextManager[None]:
        return _span(self._export.tracer, name, self._parent, attributes)

    def _timed(
        self, name: str, start: int, end: int, attributes: dict[str, Any], error: str = ""
    ) -> None:
        span = self._export.tracer.start_span(
            name, context=self._parent, attributes=attributes, start_time=start
        )
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=max(start, end))

    def conversion(self, started_ns: int, facts: ImageFacts) -> None:
        # The phase clock's durations, end to end from the conversion's start: libvips
        # decodes lazily inside the save, so these are measured boundaries in one
        # streaming pass, not separate calls (encode.ImageFacts).
        read_end = started_ns + int(facts.read_seconds * 1e9)
        decode_end = read_end + int(facts.decode_seconds * 1e9)
        encoder = facts.import_seconds + facts.encode_seconds + facts.mux_seconds
        encode_end = decode_end + int(encoder * 1e9)
        self._timed("read", started_ns, read_end, {"optimizr.format": facts.format})
        self._timed(
            "decode",
            read_end,
            decode_end,
            {
                "optimizr.width": facts.width_in,
                "optimizr.height": facts.height_in,
                "optimizr.frames": facts.frames,
            },
        )
        encode: dict[str, Any] = {
            "optimizr.bytes_out": facts.bytes_out,
            "optimizr.import_seconds": facts.import_seconds,
            "optimizr.mux_seconds": facts.mux_seconds,
        }
        if facts.probes:  # --target-score: the search's encodes and what it chose
            encode["optimizr.probes"] = facts.probes
            encode["optimizr.chosen"] = facts.chosen or ""
            if facts.score is not None:
                encode["optimizr.score"] = facts.score
        if facts.target_encodes:  # --target-size
            encode["optimizr.target_encodes"] = facts.target_encodes
        self._timed("encode", decode_end, encode_end, encode)

    def failed(self, name: str, start: int, end: int, error: ImageError | None) -> None:
        reason = error.reason if error is not None else "failed"
        message = error.message if error is not None else ""
        attributes = {"optimizr.reason": reason, "optimizr.error": message}
        self._timed(name, start, end, attributes, f"{reason}: {message}" if message else reason)

    def export(self) -> None:
        self._export.export()


def worker_spans(carrier: Carrier) -> WorkerSpans | None:
    """The spans of the job ``carrier`` came with, or None: this worker's exports
    failed before (not tried again) or the carrier names no URL."""
    values = dict(carrier)
    url = values.get(ENDPOINT_KEY)
    if not url:
        return None
    with _EXPORTS_LOCK:
        export = _EXPORTS.get(url)
        if export is None:
            # A worker's stderr becomes its image's messages (codec_messages.py): the
            # SDK's complaints are not the image's. Its logging then stays quiet
            # unless the host (a Dask worker) configured handlers of its own.
            logging.getLogger("opentelemetry").addHandler(logging.NullHandler())
            export = _EXPORTS[url] = _WorkerExport(url)
    if export.broken:
        return None
    return WorkerSpans(export, _PROPAGATOR.extract(values))
