"""The HTTP webhook of ``optimizr watch --events http://127.0.0.1:PORT/``.

``POST`` (any path): one bucket notification (S3 ``Records`` JSON as MinIO and Ceph
send, or a SeaweedFS filer webhook post). It is parsed at the door: garbage gets
``400`` with the reason and is kept as a dead letter; anything usable is committed
to the durable queue (:mod:`optimizr.event_queue`) and only then answered ``200``.
A queue that cannot be written answers ``503``, so the sender retries (SeaweedFS
retries any non-2xx, MinIO queues and retries too). ``GET`` serves ``/healthz``,
``/readyz`` and ``/metrics`` through the ``answer`` callback.

After ``stop_accepting`` (a graceful drain) a POST is answered ``503`` and the
listening socket is closed, so the store keeps the event and retries it later.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
from collections.abc import Callable
from functools import partial
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from optimizr.bucket_events import parse_message
from optimizr.errors import UsageError
from optimizr.event_queue import EventQueue
from optimizr.metrics.exporter import QuietHTTPServer

#: A notification is a few KB (S3 caps one at 64 KB); anything far larger is refused.
MAX_BODY = 1 << 20

Answer = Callable[[str], tuple[int, str, bytes]]


def parse_listen_url(url: str) -> tuple[str, int]:
    """``http://127.0.0.1:8080/`` -> ("127.0.0.1", 8080); UsageError if it is not one."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UsageError(f"--events {url}: expected http://HOST:PORT/ (the webhook to listen on)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise UsageError(f"--events {url}: give the port to listen on (http://HOST:PORT/)")
    return parts.hostname, port


class WebhookServer:
    """Listens for notifications and queues them; serves health and metrics."""

    def __init__(self, queue: EventQueue, answer: Answer) -> None:
        self.queue = queue
        self.answer = answer
        self.accepting = True
        self._server: QuietHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def serve(self, host: str, port: int) -> str:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = QuietHTTPServer((host, port), partial(_Handler, self), family)
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._server = server
        netloc = f"[{host}]" if family == socket.AF_INET6 else host
        self.url = f"http://{netloc}:{server.server_port}/"
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="optimizr-webhook", daemon=True
        )
        self._thread.start()
        return self.url

    def stop_accepting(self) -> None:
        """No new events: posts in progress are answered 503, the port is let go."""
        self.accepting = False
        self.close()

    def close(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()

    def take(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """The answer to one POSTed body: (HTTP status, JSON document)."""
        if not self.accepting:
            return 503, {"status": "draining", "reason": "the service is stopping; retry later"}
        parsed = parse_message(body)
        if parsed.dead:
            reason = "; ".join(parsed.problems)
            try:
                self.queue.refuse(body, reason)
            except (sqlite3.Error, OSError) as exc:  # the sender must still get its answer
                reason += f" (and it could not be kept as a dead letter: {exc})"
            return 400, {"status": "refused", "reason": reason}
        try:
            message_id = self.queue.put(body)
        except (sqlite3.Error, OSError) as exc:  # not queued: the sender retries
            return 503, {"status": "not queued", "reason": str(exc)}
        return 200, {
            "status": "queued",
            "id": message_id,
            "events": len(parsed.events),
            "ignored": len(parsed.ignored),
        }


class _Handler(BaseHTTPRequestHandler):
    server_version = "optimizr"
    protocol_version = "HTTP/1.1"

    def __init__(self, webhook: WebhookServer, *args: Any, **kwargs: Any) -> None:
        self.webhook = webhook
        super().__init__(*args, **kwargs)

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self._send(411, {"status": "refused", "reason": "a Content-Length is required"})
            return
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._send(413, {"status": "refused", "reason": f"body over {MAX_BODY:,} bytes"})
            return
        body = self.rfile.read(length)
        status, doc = self.webhook.take(body)
        self._send(status, doc)

    def do_GET(self) -> None:
        status, content_type, body = self.webhook.answer(self.path)
        self._raw(status, content_type, body)

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        self._raw(status, "application/json", json.dumps(doc).encode() + b"\n")

    def _raw(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # each post is counted and logged by the service, not as an access log
