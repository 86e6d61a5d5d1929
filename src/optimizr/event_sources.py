"""Where ``optimizr watch`` takes its messages from: a small interface for every broker.

An :class:`EventSource` hands out :class:`Message` objects; the service parses each
body (:mod:`optimizr.bucket_events`), converts what it names, and settles the message
with exactly one of these calls:

* ``ack()`` only once every output the message asked for is **committed**: the WebP
  is in DEST and its manifest row is flushed. A message acknowledged earlier could be
  lost with the output (a kill -9 between the two); one acknowledged later is merely
  delivered again, and the manifest (source ETag + options fingerprint) makes that
  second delivery a no-op. At-least-once in, exactly-once effect.
* ``nak(delay)`` on a transient failure (a full disk, a store that timed out, an
  image not yet retried up to --max-attempts): deliver it again after ``delay``
  seconds. A broker with its own redelivery limit (SQS redrive policy, JetStream
  max_deliver) may dead-letter it itself after enough of these.
* ``term(reason)`` for a message that can never succeed: unparseable, or naming an
  image that failed --max-attempts times. It goes to the dead letters with the
  one-line reason and is not delivered again.
* ``extend(seconds)`` while a message is still being worked on (a large image):
  keep it invisible to other consumers that much longer (SQS visibility timeout,
  JetStream in-progress ack, Redis XCLAIM of one's own entry).

``receive(max_messages, timeout)`` returns at most ``max_messages`` messages, waiting
at most ``timeout`` seconds for the first; an empty list means none came.
``delivery_count`` is 1 on first delivery. ``stop_accepting()`` is the first step
of a graceful drain (no new messages are taken in; those handed out may still be
settled), ``close()`` the last. ``depth()`` is the number of messages waiting (the
consumer lag), None when the broker cannot say.

Implementations: :class:`QueueSource` over the durable local queue
(:class:`~optimizr.event_queue.EventQueue`) that the HTTP webhook fills
(:mod:`optimizr.webhook`), and :class:`MemorySource`, an in-memory fake for tests.
SQS, NATS JetStream and Redis Streams plug in here (issue 16, a later slice).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from optimizr.event_queue import EventQueue


class Message(ABC):
    """One delivery of one message."""

    #: The raw body, as the broker delivered it.
    body: bytes
    #: 1 on the first delivery, 2 on the next...
    delivery_count: int
    #: The broker's id of the message (for logs).
    id: str

    @abstractmethod
    def ack(self) -> None:
        """Done: every output it asked for is committed. Never delivered again."""

    @abstractmethod
    def nak(self, delay: float = 0.0) -> None:
        """Not done, for a reason that may pass: deliver again after ``delay`` seconds."""

    @abstractmethod
    def term(self, reason: str) -> None:
        """Never deliverable: dead-letter it with ``reason``."""

    @abstractmethod
    def extend(self, seconds: float) -> None:
        """Still being worked on: keep it from redelivery ``seconds`` more."""


@dataclass(frozen=True)
class SourceStatistics:
    """What a source counts itself (the service counts outcomes)."""

    #: Messages taken in (a webhook's accepted posts; a broker's deliveries).
    received: int
    #: Refused at the door as garbage (a webhook's 4xx), dead-lettered there.
    refused: int
    acked: int
    naked: int
    termed: int
    #: Messages waiting now (None: not known).
    depth: int | None


class EventSource(ABC):
    @abstractmethod
    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        """Up to ``max_messages`` messages, waiting at most ``timeout`` s for one."""

    def depth(self) -> int | None:
        """Messages waiting to be received (the consumer lag); None if unknown."""
        return None

    def stop_accepting(self) -> None:  # noqa: B027 - optional hook
        """Take in no new messages (the first step of a graceful drain)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the connection (messages not settled are redelivered later)."""

    @abstractmethod
    def statistics(self) -> SourceStatistics: ...

    @abstractmethod
    def describe(self) -> str: ...


# -- the local durable queue ------------------------------------------------------------------


class _QueueMessage(Message):
    def __init__(self, queue: EventQueue, row_id: int, body: bytes, deliveries: int) -> None:
        self.queue = queue
        self.row_id = row_id
        self.body = body
        self.delivery_count = deliveries
        self.id = str(row_id)

    def ack(self) -> None:
        self.queue.ack(self.row_id)

    def nak(self, delay: float = 0.0) -> None:
        self.queue.nak(self.row_id, delay)

    def term(self, reason: str) -> None:
        self.queue.term(self.row_id, reason)

    def extend(self, seconds: float) -> None:
        self.queue.extend(self.row_id, seconds)


class QueueSource(EventSource):
    """Messages from the durable local queue in DEST/.optimizr/ (what the webhook fills).

    ``visibility``: seconds a received message stays hidden before it is handed out
    again unless settled or extended (a lease; after a restart every lease is void:
    the DEST lock says no other consumer can hold one)."""

    def __init__(
        self,
        queue: EventQueue,
        *,
        visibility: float = 600.0,
        text: str = "",
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.visibility = visibility
        self._text = text or f"queue {queue.path}"
        #: What stops new messages coming in (the webhook's server closing its door).
        self._on_stop = on_stop

    def stop_accepting(self) -> None:
        if self._on_stop is not None:
            self._on_stop()

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            rows = self.queue.receive(max_messages, self.visibility)
            if rows:
                return [_QueueMessage(self.queue, *row) for row in rows]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            # Woken by a put, or when the next delayed message becomes visible.
            self.queue.wait(min(left, self.queue.next_visible_in() or left))

    def depth(self) -> int | None:
        return self.queue.depth()

    def statistics(self) -> SourceStatistics:
        stats = self.queue.statistics()
        return SourceStatistics(
            stats.put, stats.refused, stats.acked, stats.naked, stats.termed, stats.ready
        )

    def describe(self) -> str:
        return self._text


# -- the in-memory fake ---------------------------------------------------------------------------


class _MemoryMessage(Message):
    def __init__(self, source: MemorySource, body: bytes, deliveries: int, number: int) -> None:
        self.source = source
        self.body = body
        self.delivery_count = deliveries
        self.id = str(number)
        self.settled: str | None = None

    def _settle(self, how: str) -> None:
        if self.settled is not None:
            raise RuntimeError(f"message {self.id} settled twice ({self.settled}, then {how})")
        self.settled = how

    def ack(self) -> None:
        self._settle("ack")
        self.source.acked.append(self.body)

    def nak(self, delay: float = 0.0) -> None:
        self._settle("nak")
        self.source.naked += 1
        self.source.offer(self.body, _deliveries=self.delivery_count)

    def term(self, reason: str) -> None:
        self._settle("term")
        self.source.termed.append((self.body, reason))

    def extend(self, seconds: float) -> None:
        self.source.extended += 1


class MemorySource(EventSource):
    """An in-memory broker for tests: ``offer`` bodies, read what was acked or termed."""

    def __init__(self, bodies: list[bytes] | None = None) -> None:
        self._ready: deque[tuple[bytes, int]] = deque()
        self._lock = threading.Condition()
        self._count = 0
        self.acked: list[bytes] = []
        self.termed: list[tuple[bytes, str]] = []
        self.naked = 0
        self.extended = 0
        for body in bodies or []:
            self.offer(body)

    def offer(self, body: bytes, *, _deliveries: int = 0) -> None:
        with self._lock:
            self._ready.append((body, _deliveries))
            self._lock.notify_all()

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        with self._lock:
            if not self._ready:
                self._lock.wait(timeout)
            out: list[Message] = []
            while self._ready and len(out) < max_messages:
                body, deliveries = self._ready.popleft()
                self._count += 1
                out.append(_MemoryMessage(self, body, deliveries + 1, self._count))
            return out

    def depth(self) -> int | None:
        with self._lock:
            return len(self._ready)

    def statistics(self) -> SourceStatistics:
        with self._lock:
            return SourceStatistics(
                self._count, 0, len(self.acked), self.naked, len(self.termed), len(self._ready)
            )

    def describe(self) -> str:
        return "memory"
