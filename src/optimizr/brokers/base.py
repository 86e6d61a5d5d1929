"""The interface every broker client implements, for ``optimizr watch`` (issue 16).

An :class:`EventSource` hands out :class:`Message` objects. The service converts what
a message names and then settles it with exactly one of:

* ``ack()`` only once every output the message asked for is **committed** (the WebP
  written and its manifest row flushed). Acknowledged earlier, a kill -9 between the
  two loses the event; acknowledged later, it is merely delivered again, and the
  manifest (source ETag + options fingerprint) makes the second delivery a no-op:
  at-least-once in, exactly-once effect.
* ``nak(delay)`` on a transient failure (a full disk, a store that timed out): deliver
  it again, not sooner than about ``delay`` seconds from now (Redis caps the delay at
  its lease, see :mod:`optimizr.brokers.redis_streams`).
* ``term(reason)`` for a message that can never succeed (unparseable, or naming a
  known-bad image): it is dead-lettered with the reason where the broker keeps one and
  never handed out again by this source (SQS with a redrive policy: the queue moves it
  to its DLQ once its receive count passes maxReceiveCount; see ``sqs.py``).
* ``extend(seconds)`` while a large image still converts: keep the message invisible
  (in progress) to every other consumer about ``seconds`` longer. Brokers whose lease
  has a fixed length (JetStream ack_wait, the Redis min-idle time) restart their full
  lease instead, so a caller calls ``extend`` again before :attr:`EventSource.lease`
  seconds have passed since the last call (every ``lease / 2`` is safe).

A message that is never settled (its consumer died) is handed to another consumer once
its lease runs out, with ``delivery_count`` one higher. One delivered more than
``BrokerOptions.max_deliver`` times without being settled is dead-lettered by the broker
(JetStream max_deliver; the SQS redrive policy; this client for Redis).

Settling never raises: a broker that cannot be reached at that moment means the message
is delivered again later, which at-least-once delivery allows anyway, and the failure is
counted (``settle_failures``) and logged. ``receive`` does not raise on a lost
connection either: it waits out its timeout, returns what it has (maybe nothing) and
the client reconnects; ``statistics().connected`` says so for ``/readyz``. What cannot
work at all (the stream does not exist, the URL is malformed, the extra is missing) is
a :class:`~optimizr.errors.UsageError` from :func:`optimizr.brokers.open_source`.

The API is synchronous and thread-safe: the service's loop receives on one thread while
conversion threads settle and extend the messages they hold.

``EventSource.ack_all(messages)`` acks many at once, in as few requests as the broker
allows (SQS: DeleteMessageBatch, ten a request; Redis: one XACK; JetStream: the acks
sent together and their confirmations awaited together), with the same settle-once and
never-raise rules as ``ack``. A service that acks one message at a time pays one round
trip per image, as much as a small image's conversion against a remote broker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from optimizr.errors import UsageError

_log = logging.getLogger("optimizr.brokers")


class Message(ABC):
    """One delivery of one broker message."""

    #: The body as the broker delivered it (for Redis, see redis_streams.py).
    body: bytes
    #: 1 on the first delivery, 2 on the next, as the broker counts them.
    delivery_count: int
    #: The broker's id of the message (JetStream stream sequence, Redis entry id, SQS
    #: MessageId): for logs, and to tell two deliveries of one message apart from two
    #: messages.
    id: str

    @abstractmethod
    def ack(self) -> None:
        """Done: every output it named is committed. Never delivered again."""

    @abstractmethod
    def nak(self, delay: float = 0.0) -> None:
        """Not done, for a reason that may pass: deliver again after about ``delay`` s."""

    @abstractmethod
    def term(self, reason: str) -> None:
        """Can never succeed: dead-letter it with the one-line ``reason``."""

    @abstractmethod
    def extend(self, seconds: float) -> None:
        """Still being worked on: keep it from other consumers about ``seconds`` longer."""


@dataclass(frozen=True)
class BrokerStatistics:
    """What a broker client counts itself (the service counts conversion outcomes)."""

    #: Deliveries handed out by ``receive`` (redeliveries included).
    received: int
    acked: int
    naked: int
    termed: int
    extended: int
    #: Deliveries with ``delivery_count`` > 1: a consumer died, a nak, a lease ran out.
    redelivered: int
    #: Messages the broker (or this client, for Redis) dead-lettered after more than
    #: ``max_deliver`` deliveries, without the service seeing them again.
    dead_lettered: int
    #: Settling calls that did not reach the broker (the message comes again).
    settle_failures: int
    #: Times the connection was lost (NATS: disconnects; Redis, SQS: a request that
    #: failed after one that worked: a run of failures counts once).
    connection_errors: int
    #: Is the broker reachable now (as of the last request)?
    connected: bool
    #: Messages waiting for this consumer (the consumer lag), None if the broker
    #: cannot say (or has not yet).
    lag: int | None


@dataclass(frozen=True)
class BrokerOptions:
    """How a broker client consumes, whatever the broker (one frozen object, not flags)."""

    #: This process's name among the consumers of a Redis group (NATS and SQS have no
    #: per-process name). Default: ``host-pid``, distinct for every replica.
    consumer: str = ""
    #: The lease, in seconds: how long a received message stays invisible to other
    #: consumers before it is handed out again, unless settled or extended. It is the
    #: ack_wait of a JetStream consumer this client creates, the Redis min-idle time
    #: after which XAUTOCLAIM takes a message over. An SQS queue has its own
    #: (the VisibilityTimeout attribute), which this client reads and keeps.
    lease: float = 60.0
    #: Deliveries after which an unsettled message is dead-lettered (a JetStream
    #: consumer created here; Redis). SQS: the queue's redrive policy decides.
    max_deliver: int = 5

    def __post_init__(self) -> None:
        if not self.lease > 0:
            raise UsageError(f"the broker lease must be more than 0 seconds, not {self.lease}")
        if self.max_deliver < 1:
            raise UsageError(f"max_deliver must be 1 or more, not {self.max_deliver}")
        if not self.consumer:
            object.__setattr__(self, "consumer", f"{socket.gethostname()}-{os.getpid()}")


class EventSource(ABC):
    """Messages from one broker. Open one with :func:`optimizr.brokers.open_source`."""

    #: Seconds a received message stays invisible without ``extend``; see the module.
    lease: float
    #: Messages one receive request hands out at most (SQS: 10). The service takes at
    #: least this many per batch: each request costs a round trip, and on SQS money.
    batch_hint: int = 1

    @abstractmethod
    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        """Up to ``max_messages`` messages, waiting at most about ``timeout`` s for the
        first (an empty list: none came). A timeout of 0 still asks the broker once."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection; messages not yet settled are redelivered after their
        lease. Idempotent."""

    @abstractmethod
    def statistics(self) -> BrokerStatistics: ...

    @abstractmethod
    def describe(self) -> str:
        """The source in words, for logs and ``status`` (no credentials)."""

    def depth(self) -> int | None:
        """Messages waiting (the consumer lag), None when unknown: ``statistics().lag``."""
        return self.statistics().lag

    def ack_all(self, messages: Sequence[Message]) -> None:
        """``ack`` each of ``messages`` (all received from this source). A broker that
        acks many in one request overrides this (see the module)."""
        for message in messages:
            message.ack()

    def stop_accepting(self) -> None:  # noqa: B027 - optional hook
        """The first step of a graceful drain. A pull client takes nothing it is not asked
        for, so there is nothing to stop: the service simply stops calling ``receive``."""

    def __enter__(self) -> EventSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Counters:
    """The counts behind :class:`BrokerStatistics`, shared by the conversion threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = self.acked = self.naked = self.termed = self.extended = 0
        self.redelivered = self.dead_lettered = self.settle_failures = 0
        self.connection_errors = 0
        self.connected = True
        self.lag: int | None = None

    def add(self, name: str, count: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def delivered(self, delivery_counts: list[int]) -> None:
        with self._lock:
            self.received += len(delivery_counts)
            self.redelivered += sum(1 for count in delivery_counts if count > 1)

    def set_connected(self, connected: bool) -> None:
        with self._lock:
            if self.connected and not connected:
                self.connection_errors += 1
            self.connected = connected

    def snapshot(self) -> BrokerStatistics:
        with self._lock:
            return BrokerStatistics(
                received=self.received,
                acked=self.acked,
                naked=self.naked,
                termed=self.termed,
                extended=self.extended,
                redelivered=self.redelivered,
                dead_lettered=self.dead_lettered,
                settle_failures=self.settle_failures,
                connection_errors=self.connection_errors,
                connected=self.connected,
                lag=self.lag,
            )


class BrokerMessage(Message):
    """What the three clients share: settle at most once, count, never raise for the
    broker. A subclass implements ``_ack``, ``_nak``, ``_term`` and ``_extend``, raising
    one of ``broker_errors`` when the broker cannot be reached."""

    #: The client library's errors for "the broker did not answer / refused".
    broker_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(self, counters: Counters, body: bytes, delivery_count: int, id: str) -> None:
        self.body = body
        self.delivery_count = delivery_count
        self.id = id
        self._counters = counters
        self._lock = threading.Lock()
        self._settled: str | None = None

    @property
    def settled(self) -> str | None:
        """How it was settled ("ack", "nak", "term"), None while it is not."""
        return self._settled

    def ack(self) -> None:
        self._settle("ack", "acked", self._ack)

    def nak(self, delay: float = 0.0) -> None:
        self._settle("nak", "naked", lambda: self._nak(max(0.0, delay)))

    def term(self, reason: str) -> None:
        self._settle("term", "termed", lambda: self._term(reason))

    def extend(self, seconds: float) -> None:
        # A heartbeat thread may extend just as the conversion thread settles: late
        # extends are dropped rather than sent for a message that is gone, and one on
        # its way holds the settling back until it is done (an SQS extend arriving after
        # the DeleteMessage would be refused, a settle failure for nothing).
        with self._lock:
            if self._settled is not None:
                return
            if self._call("extend", lambda: self._extend(max(0.0, seconds))):
                self._counters.add("extended")

    def _settle(self, how: str, counter: str, call: Callable[[], None]) -> None:
        self._claim(how)
        if self._call(how, call):
            self._counters.add(counter)

    def _claim(self, how: str) -> None:
        """Mark it settled as ``how``, waiting for an extend on its way (see extend)."""
        with self._lock:
            if self._settled is not None:
                raise RuntimeError(f"message {self.id} settled twice ({self._settled}, then {how})")
            self._settled = how

    def _failed(self, how: str, exc: BaseException | str) -> None:
        self._counters.add("settle_failures")
        what = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else exc
        _log.warning(
            "%s of message %s did not reach the broker (%s): it will be delivered again",
            how,
            self.id,
            what,
        )

    def _call(self, how: str, call: Callable[[], None]) -> bool:
        try:
            call()
        except self.broker_errors as exc:
            self._failed(how, exc)
            return False
        return True

    @abstractmethod
    def _ack(self) -> None: ...

    @abstractmethod
    def _nak(self, delay: float) -> None: ...

    @abstractmethod
    def _term(self, reason: str) -> None: ...

    @abstractmethod
    def _extend(self, seconds: float) -> None: ...


M = TypeVar("M", bound=BrokerMessage)


def ack_together(
    messages: Sequence[M], size: int, send: Callable[[list[M]], dict[int, str]]
) -> None:
    """Ack ``messages`` in requests of at most ``size``: ``send(chunk)`` makes one
    request and returns those it could not ack (index in the chunk: reason); raising one of the
    messages' ``broker_errors`` fails the whole chunk. Each message is claimed before
    its request goes (settled once, after any extend on its way), and counted acked or
    failed after, as ``ack`` does."""
    for start in range(0, len(messages), size):
        chunk = list(messages[start : start + size])
        for message in chunk:
            message._claim("ack")
        try:
            failures = send(chunk)
        except chunk[0].broker_errors as exc:
            for message in chunk:
                message._failed("ack", exc)
            continue
        for index, message in enumerate(chunk):
            if index in failures:
                message._failed("ack", failures[index])
            else:
                message._counters.add("acked")


def own(messages: Sequence[Message], kind: type[M]) -> list[M]:
    """``messages`` as the source's own kind: ``ack_all`` takes only messages that its
    source received."""
    mine = [message for message in messages if isinstance(message, kind)]
    if len(mine) != len(messages):
        raise TypeError(f"ack_all: a message that is not a {kind.__name__}")
    return mine
