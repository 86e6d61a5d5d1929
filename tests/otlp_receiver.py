"""A tiny OTLP/HTTP trace receiver for the tracing tests: POST /v1/traces, protobuf.

It decodes each ``ExportTraceServiceRequest`` with opentelemetry-proto (the
collector's own message definitions, not optimizr's code) into flat
:class:`ReceivedSpan` records, kept in arrival order. It listens on 127.0.0.1 on
a free port, in a thread of the test process, and stores a request's spans before
it answers: once the exporter's POST returned, they are here.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    name: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error (the proto's StatusCode)
    status_message: str
    start_ns: int
    end_ns: int

    @property
    def error(self) -> bool:
        return self.status_code == 2


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def decode_request(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            spans.extend(_received(span, resource) for span in scope_spans.spans)
    return spans


def _received(span: Span, resource: dict[str, Any]) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_id=span.parent_span_id.hex(),
        name=span.name,
        attributes={kv.key: _value(kv.value) for kv in span.attributes},
        resource=resource,
        status_code=span.status.code,
        status_message=span.status.message,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
    )


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # Keep-alive, as a collector answers: the exporter's session reuses one
            # connection instead of opening one per request.
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                encoding = self.headers.get("Content-Encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                spans = decode_request(body)
                with receiver._lock:
                    receiver.spans.extend(spans)
                    receiver.requests += 1
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # quiet: pytest shows what a test prints

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The base URL, as --otlp-endpoint and OTEL_EXPORTER_OTLP_ENDPOINT take it."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()

    def trace_of_run(self, dest: str) -> list[ReceivedSpan]:
        """Every span of the trace whose run span has ``optimizr.dest`` == ``dest``."""
        with self._lock:
            spans = list(self.spans)
        runs = [s for s in spans if s.name == "run" and s.attributes.get("optimizr.dest") == dest]
        assert len(runs) == 1, f"expected one run span for {dest}, got {len(runs)}"
        return [s for s in spans if s.trace_id == runs[0].trace_id]


def span_tree(spans: list[ReceivedSpan]) -> str:
    """The spans as an indented tree, children in start order, for a failure's message
    and for reading a trace."""
    children: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        children.setdefault(span.parent_id, []).append(span)
    lines: list[str] = []

    def show(span: ReceivedSpan, depth: int) -> None:
        ms = (span.end_ns - span.start_ns) / 1e6
        keep = ("optimizr.key", "optimizr.outcome", "optimizr.reason", "optimizr.converted")
        attributes = span.attributes
        shown = {k.removeprefix("optimizr."): attributes[k] for k in keep if k in attributes}
        where = f"{span.resource.get('optimizr.role')} pid {span.resource.get('process.pid')}"
        status = " ERROR " + span.status_message if span.error else ""
        lines.append(f"{'  ' * depth}{span.name} {ms:.1f} ms [{where}] {shown}{status}")
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns):
            show(child, depth + 1)

    for root in children.get("", []):
        show(root, 0)
    return "\n".join(lines)
