"""A fault-injecting HTTP/1.1 reverse proxy on 127.0.0.1, for the object-store tests
and the storage benchmark (it imports nothing from pytest).

Clients use the proxy's address as their endpoint; every request is forwarded to
the upstream byte for byte, on one upstream connection per client connection, and
the answer is relayed byte for byte. Nothing is rewritten, not even ``Host``: the
client signed the request (SigV4) for the address it talked to, which is the
proxy's, and SeaweedFS checks the signature against the ``Host`` it receives, which
is that same header. So signatures verify without the proxy knowing any key.

Faults are queued while it runs (thread-safe) and each one applies to the next
requests it matches::

    with FaultProxy(server.endpoint) as proxy:
        proxy.slow_down(3)                       # the next 3 requests: 503 SlowDown
        proxy.reset(1, matching(method="GET"))   # the next GET: connection reset
        proxy.stall(1)                           # held until proxy.release()
        proxy.lose_response(1)                   # forwarded, carried out, answer lost
        proxy.latency = 0.05                     # 50 ms added to every request
        proxy.statistics().requests              # requests seen so far

Limits (what the S3 clients used here never need): no ``Expect: 100-continue``, no
HTTP/2, no TLS, no pipelining beyond one request at a time per connection.
"""

from __future__ import annotations

import itertools
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import urlsplit

#: Bytes of one request or response head, at most (S3 heads are a few hundred).
MAX_HEAD = 64 * 1024
#: How often a stalled request checks whether its client gave up or it was released.
STALL_POLL = 0.02


@dataclass(frozen=True)
class Request:
    """What a fault's predicate sees of a request."""

    method: str
    #: The request target as sent (``/bucket/key?query``).
    target: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


Predicate = Callable[[Request], bool]


def matching(method: str | None = None, path_contains: str | None = None) -> Predicate:
    """A predicate: the request's method is ``method`` and/or its path holds ``path_contains``."""

    def predicate(request: Request) -> bool:
        if method is not None and request.method != method.upper():
            return False
        return path_contains is None or path_contains in request.path

    return predicate


def _any_request(request: Request) -> bool:
    return True


@dataclass
class _Fault:
    kind: str  # "status", "reset", "stall" or "lose"
    remaining: int
    predicate: Predicate
    status: int = 503
    code: str = "SlowDown"
    #: A stall's length in seconds; None: until release() (or the proxy stops).
    seconds: float | None = None


@dataclass(frozen=True)
class ProxyStatistics:
    #: Requests read from clients (every one, faulted or forwarded).
    requests: int
    by_method: dict[str, int]
    #: Requests passed on to the upstream and answered by it.
    forwarded: int
    #: Faults applied, by kind ("status", "reset", "stall", "lose").
    faults: dict[str, int]
    #: Requests being held by a stall right now.
    stalled_now: int
    connections: int
    #: (method, target) of every request, in arrival order.
    seen: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: (method, target, status) of every request the upstream answered, in answer order:
    #: which conditional PUTs landed (200) and which lost (412).
    answered: tuple[tuple[str, str, int], ...] = field(default_factory=tuple)


class FaultProxy:
    """The proxy in front of ``upstream`` (``http://host:port``); see the module docstring."""

    def __init__(self, upstream: str, *, host: str = "127.0.0.1") -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.host = host
        #: Seconds added before each request is forwarded (0: none).
        self.latency = 0.0
        self._lock = threading.Lock()
        self._faults: list[_Fault] = []
        self._released = threading.Event()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self._requests = 0
        self._by_method: Counter[str] = Counter()
        self._forwarded = 0
        self._applied: Counter[str] = Counter()
        self._stalled_now = 0
        self._connections = 0
        self._seen: list[tuple[str, str]] = []
        self._answered: list[tuple[str, str, int]] = []
        self.endpoint = ""

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> str:
        """Listen on a free port of ``host``; return the endpoint clients should use."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, 0))
        listener.listen(64)
        self._listener = listener
        self.endpoint = f"http://{self.host}:{listener.getsockname()[1]}"
        self._accepter = threading.Thread(target=self._accept, name="faultproxy", daemon=True)
        self._accepter.start()
        return self.endpoint

    def stop(self) -> None:
        """Stop listening, cut every connection, release stalls and join the threads."""
        self._stopping.set()
        self._released.set()
        if self._listener is not None:
            # shutdown() wakes the accept() blocked in the other thread; close() alone
            # does not on Linux.
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _close(sock)
        if self._accepter is not None:
            self._accepter.join()
        for thread in list(self._threads):
            thread.join()

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- faults ----------------------------------------------------------------------

    def fail(
        self,
        count: int,
        status: int = 503,
        code: str = "SlowDown",
        predicate: Predicate | None = None,
    ) -> None:
        """Answer the next ``count`` matching requests ``status`` with an S3 error body."""
        self._queue(_Fault("status", count, predicate or _any_request, status=status, code=code))

    def slow_down(self, count: int, predicate: Predicate | None = None) -> None:
        """The next ``count`` matching requests: 503 SlowDown, as S3 throttles."""
        self.fail(count, 503, "SlowDown", predicate)

    def reset(self, count: int, predicate: Predicate | None = None) -> None:
        """Read the next ``count`` matching requests, then reset the connection (RST)."""
        self._queue(_Fault("reset", count, predicate or _any_request))

    def stall(
        self, count: int, seconds: float | None = None, predicate: Predicate | None = None
    ) -> None:
        """Hold the next ``count`` matching requests for ``seconds`` (None: until
        :meth:`release`), then forward them; one whose client gave up meanwhile is
        dropped unforwarded, so a cut request never lands late."""
        self._released.clear()
        self._queue(_Fault("stall", count, predicate or _any_request, seconds=seconds))

    def lose_response(self, count: int, predicate: Predicate | None = None) -> None:
        """Forward the next ``count`` matching requests, then reset the connection
        instead of relaying the answer: the request was carried out, and the client
        cannot know it (a timeout after the server acted looks the same)."""
        self._queue(_Fault("lose", count, predicate or _any_request))

    def release(self) -> None:
        """End every stall now."""
        self._released.set()

    def clear(self) -> None:
        """Forget the faults not applied yet."""
        with self._lock:
            self._faults.clear()

    def pending(self) -> int:
        """Requests the queued faults are still waiting for."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    def statistics(self) -> ProxyStatistics:
        with self._lock:
            return ProxyStatistics(
                requests=self._requests,
                by_method=dict(self._by_method),
                forwarded=self._forwarded,
                faults=dict(self._applied),
                stalled_now=self._stalled_now,
                connections=self._connections,
                seen=tuple(self._seen),
                answered=tuple(self._answered),
            )

    def _queue(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("a fault applies to at least one request")
        with self._lock:
            self._faults.append(fault)

    def _take(self, request: Request) -> _Fault | None:
        """Count ``request`` and take the first queued fault it matches, if any."""
        with self._lock:
            self._requests += 1
            self._by_method[request.method] += 1
            self._seen.append((request.method, request.target))
            for fault in self._faults:
                if fault.predicate(request):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    self._applied[fault.kind] += 1
                    return fault
        return None

    # -- serving ---------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        for number in itertools.count():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._stopping.is_set():
                    client.close()
                    return
                self._sockets.add(client)
                self._connections += 1
                # Finished connections' threads are dropped as new ones come, so a
                # long benchmark does not keep one Thread object per connection.
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(
                    target=self._serve, args=(client,), name=f"faultproxy-{number}", daemon=True
                )
                self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        reader = _Reader(client)
        try:
            while not self._stopping.is_set():
                head = reader.head()
                if head is None:
                    return  # the client closed its keep-alive connection
                request = _parse_request(head)
                body = reader.body(request.headers, request_method=None)
                fault = self._take(request)
                if self.latency > 0:
                    # The injected latency itself, not a wait for something: every
                    # request pays it, faulted or not, as a round trip over a WAN would.
                    time.sleep(self.latency)
                if fault is not None and fault.kind == "reset":
                    _reset(client)
                    return
                if fault is not None and fault.kind == "status":
                    client.sendall(_error_response(fault.status, fault.code, request))
                    continue
                if fault is not None and fault.kind == "stall" and not self._hold(client, fault):
                    return  # the client gave up (or the proxy stops): drop it unforwarded
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=60)
                    with self._lock:
                        self._sockets.add(upstream)
                upstream.sendall(head + body)
                answer = _Reader(upstream)
                response_head = answer.head()
                if response_head is None:
                    raise ConnectionError("the upstream closed the connection")
                status = _status_of(response_head)
                response_body = answer.body(
                    _parse_headers(response_head), request_method=request.method,
                    status=status,
                )  # fmt: skip
                with self._lock:
                    self._forwarded += 1
                    self._answered.append((request.method, request.target, status))
                if fault is not None and fault.kind == "lose":
                    _reset(client)
                    return
                client.sendall(response_head + response_body)
                if answer.closed_after:
                    _close(upstream)
                    upstream = None
        except (OSError, ValueError):
            # A peer went away mid-exchange (or sent what is not HTTP): so does this
            # connection, as a server's would; the client sees it closed.
            return
        finally:
            with self._lock:
                self._sockets.discard(client)
                if upstream is not None:
                    self._sockets.discard(upstream)
            _close(client)
            if upstream is not None:
                _close(upstream)

    def _hold(self, client: socket.socket, fault: _Fault) -> bool:
        """Hold a stalled request; False if its client hung up or the proxy stops."""
        deadline = None if fault.seconds is None else time.monotonic() + fault.seconds
        with self._lock:
            self._stalled_now += 1
        try:
            while deadline is None or time.monotonic() < deadline:
                if self._stopping.is_set():
                    return False
                if self._released.wait(STALL_POLL):
                    break
                readable, _, _ = select.select([client], [], [], 0)
                if readable and client.recv(1, socket.MSG_PEEK) == b"":
                    return False
            return not self._stopping.is_set()
        finally:
            with self._lock:
                self._stalled_now -= 1


class _Reader:
    """Reads HTTP/1.1 messages off one socket, keeping the bytes exactly as sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        #: The message just read ends with the connection (no length, or "close").
        self.closed_after = False

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def head(self) -> bytes | None:
        """The next message head up to and with its blank line; None on a clean EOF."""
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEAD:
                raise ConnectionError("message head too large")
            if not self._fill():
                if self.buffer:
                    raise ConnectionError("connection closed inside a message head")
                return None
        end = self.buffer.index(b"\r\n\r\n") + 4
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise ConnectionError("connection closed inside a message body")
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError("connection closed inside a chunk")
        end = self.buffer.index(b"\r\n") + 2
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def body(
        self, headers: dict[str, str], *, request_method: str | None, status: int = 0
    ) -> bytes:
        """The body that follows a head, raw (chunk framing kept). ``request_method``:
        None for a request, else the method of the request this response answers."""
        self.closed_after = "close" in headers.get("connection", "").lower()
        if request_method is not None and (
            request_method == "HEAD" or status in (204, 304) or 100 <= status < 200
        ):
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size_line = self.line()
                parts.append(size_line)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, up to the blank line
                        trailer = self.line()
                        parts.append(trailer)
                        if trailer == b"\r\n":
                            return b"".join(parts)
                parts.append(self.exactly(size + 2))
        if "content-length" in headers:
            return self.exactly(int(headers["content-length"]))
        if request_method is None:
            return b""  # a request without a length has no body
        # A response without a length runs to the end of the connection.
        self.closed_after = True
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data


def _parse_headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _parse_request(head: bytes) -> Request:
    first = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, _, rest = first.partition(" ")
    target = rest.rpartition(" ")[0]
    return Request(method.upper(), target, _parse_headers(head))


def _status_of(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


_REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def _error_response(status: int, code: str, request: Request) -> bytes:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the fault proxy</Message>"
        f"<Resource>{request.path}</Resource><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    reason = _REASONS.get(status, "Error")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    # A HEAD answer carries the GET's Content-Length and no body (RFC 9110, 9.3.2).
    return head if request.method == "HEAD" else head + body


def _reset(sock: socket.socket) -> None:
    # SO_LINGER on with a zero timeout: close() sends RST instead of FIN, which the
    # client sees as "connection reset by peer", the way a crashed server looks.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
