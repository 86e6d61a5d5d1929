"""The event sources that are not brokers: the webhook's durable local queue and an
in-memory fake, behind the one interface every broker client implements
(:mod:`optimizr.brokers.base`: :class:`~optimizr.brokers.base.EventSource`,
:class:`~optimizr.brokers.base.Message`, :class:`~optimizr.brokers.base.BrokerStatistics`;
its docstring is the contract: ack after commit, nak(delay), term(reason), extend).

* :class:`QueueSource` over the durable local queue (:class:`~optimizr.event_queue.EventQueue`)
  that the HTTP webhook fills (:mod:`optimizr.webhook`). Its statistics add ``accepted``
  and ``refused``: what the webhook took in, and what it refused at the door as garbage
  (a 4xx, kept as a dead letter).
* :class:`MemorySource`, an in-memory broker for tests (STYLE rule 3: every backend has a
  fake): ``offer`` bodies, read what was acked or termed.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from optimizr.brokers.base import (
    BrokerMessage,
    BrokerStatistics,
    Counters,
    EventSource,
    Message,
    ack_together,
    own,
)
from optimizr.event_queue import EventQueue

__all__ = ["EventSource", "MemorySource", "Message", "QueueSource", "QueueStatistics"]


# -- the local durable queue ------------------------------------------------------------------

#: Acks deleted in one transaction (one sync to disk).
ACK_BATCH = 1000


@dataclass(frozen=True)
class QueueStatistics(BrokerStatistics):
    """A broker's figures, plus what the webhook's door saw."""

    #: Posts the webhook accepted into the queue (since this process opened it).
    accepted: int = 0
    #: Posts refused at the door as garbage (a 4xx), kept as dead letters.
    refused: int = 0


class _QueueMessage(BrokerMessage):
    # The queue is a SQLite file in DEST: a full disk or a locked database is what
    # "the broker could not be reached" means here (the row is delivered again).
    broker_errors = (sqlite3.Error, OSError)

    def __init__(self, source: QueueSource, row_id: int, body: bytes, deliveries: int) -> None:
        super().__init__(source.counters, body, deliveries, str(row_id))
        self.queue = source.queue
        self.row_id = row_id

    def _ack(self) -> None:
        self.queue.ack(self.row_id)

    def _nak(self, delay: float) -> None:
        self.queue.nak(self.row_id, delay)

    def _term(self, reason: str) -> None:
        self.queue.term(self.row_id, reason)

    def _extend(self, seconds: float) -> None:
        self.queue.extend(self.row_id, seconds)


class QueueSource(EventSource):
    """Messages from the durable local queue in DEST/.optimizr/ (what the webhook fills).

    ``lease``: seconds a received message stays hidden before it is handed out again
    unless settled or extended (after a restart every lease is void: the DEST lock says
    no other consumer can hold one)."""

    def __init__(
        self,
        queue: EventQueue,
        *,
        lease: float = 600.0,
        text: str = "",
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        self.queue = queue
        self.lease = lease
        self.counters = Counters()
        self._text = text or f"queue {queue.path}"
        #: What stops new messages coming in (the webhook's server closing its door).
        self._on_stop = on_stop

    def stop_accepting(self) -> None:
        if self._on_stop is not None:
            self._on_stop()

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            rows = self.queue.receive(max_messages, self.lease)
            if rows:
                self.counters.delivered([deliveries for _id, _body, deliveries in rows])
                return [_QueueMessage(self, *row) for row in rows]
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            # Woken by a put, or when the next delayed message becomes visible.
            self.queue.wait(min(left, self.queue.next_visible_in() or left))

    def ack_all(self, messages: Sequence[Message]) -> None:
        ack_together(own(messages, _QueueMessage), ACK_BATCH, self._delete)

    def _delete(self, chunk: list[_QueueMessage]) -> dict[int, str]:
        self.queue.ack_many([message.row_id for message in chunk])
        return {}

    def statistics(self) -> QueueStatistics:
        mine = self.counters.snapshot()
        door = self.queue.statistics()
        fields = {**mine.__dict__, "lag": door.ready}
        return QueueStatistics(**fields, accepted=door.put, refused=door.refused)

    def close(self) -> None:
        """The queue is the caller's (run_watch opens and closes it with the lock)."""

    def describe(self) -> str:
        return self._text


# -- the in-memory fake ---------------------------------------------------------------------------


class _MemoryMessage(BrokerMessage):
    def __init__(self, source: MemorySource, body: bytes, deliveries: int, number: int) -> None:
        super().__init__(source.counters, body, deliveries, str(number))
        self.source = source

    def _ack(self) -> None:
        self.source.acked.append(self.body)

    def _nak(self, delay: float) -> None:
        self.source.offer(self.body, _deliveries=self.delivery_count)

    def _term(self, reason: str) -> None:
        self.source.termed.append((self.body, reason))

    def _extend(self, seconds: float) -> None:
        pass


class MemorySource(EventSource):
    """An in-memory broker for tests: ``offer`` bodies, read what was acked or termed.
    Its lease is never enforced (nothing is redelivered unless naked)."""

    def __init__(self, bodies: list[bytes] | None = None, *, lease: float = 60.0) -> None:
        self.lease = lease
        self.counters = Counters()
        self._ready: deque[tuple[bytes, int]] = deque()
        self._lock = threading.Condition()
        self._count = 0
        self.acked: list[bytes] = []
        self.termed: list[tuple[bytes, str]] = []
        for body in bodies or []:
            self.offer(body)

    def offer(self, body: bytes, *, _deliveries: int = 0) -> None:
        with self._lock:
            self._ready.append((body, _deliveries))
            self.counters.lag = len(self._ready)
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
            self.counters.lag = len(self._ready)
        self.counters.delivered([message.delivery_count for message in out])
        return out

    def statistics(self) -> BrokerStatistics:
        return self.counters.snapshot()

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"
