"""Redis Streams: a consumer group (``redis://HOST:6379/STREAM?group=GROUP[&consumer=NAME]``).

The group is created when missing (``XGROUP CREATE ... 0 MKSTREAM``: from the stream's
start, so events written before the first start are converted too; the manifest makes
any already converted a no-op). Each process is one consumer of the group, named by
``consumer=`` or ``BrokerOptions.consumer`` (``host-pid``).

* receive: first ``XAUTOCLAIM`` what has sat pending longer than the lease (the
  min-idle time): messages a dead consumer left, and naked ones whose delay is over;
  then ``XREADGROUP ... >`` for new ones. delivery_count is the entry's times-delivered
  (``XPENDING``): XREADGROUP makes it 1, each XAUTOCLAIM adds one.
* ack: ``XACK`` (after the commit); a batch's acks: one ``XACK`` naming them all.
* nak(delay): the entry stays pending, its idle time set (``XCLAIM ... IDLE JUSTID``,
  which does not count a delivery) so that it reaches the min-idle time ``delay``
  seconds from now; the next XAUTOCLAIM, by any consumer, redelivers it. The delay is
  therefore at most the lease: a longer one is cut to it.
* term(reason): ``XADD STREAM:dead`` (the entry's own fields, plus ``optimizr-reason``,
  ``optimizr-id``, ``optimizr-delivery-count``, ``optimizr-consumer``) and ``XACK``, in
  one MULTI. An operator replays a dead letter by XADDing its fields back.
* extend: ``XCLAIM`` to self with JUSTID, which resets the idle time (a whole lease
  more), done only while this consumer still owns the entry (a Lua check: the entry
  may have been claimed by another consumer after the lease ran out).
* an entry delivered more than ``max_deliver`` times unsettled (a consumer that dies on
  it each time) goes to ``STREAM:dead`` at its next claim instead of out again.

The body is the entry's ``body`` field, or its only field, or else all its fields as a
JSON object. Credentials come from the environment, never the URL: ``REDIS_USERNAME``
and ``REDIS_PASSWORD``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import redis
import redis.exceptions

from optimizr.brokers.base import (
    BrokerMessage,
    BrokerOptions,
    BrokerStatistics,
    Counters,
    EventSource,
    Message,
    ack_together,
    own,
)
from optimizr.brokers.urls import RedisTarget
from optimizr.errors import UsageError

_log = logging.getLogger("optimizr.brokers")

CONNECT_TIMEOUT = 5.0
# Longer than the longest XREADGROUP BLOCK (MAX_BLOCK), so a blocked read is never cut.
SOCKET_TIMEOUT = 30.0
MAX_BLOCK = 20.0
# The dead-letter stream is trimmed (approximately) to this many entries.
DEAD_MAXLEN = 100_000
# How often receive() asks the server for the group's lag (XINFO GROUPS), in seconds.
LAG_EVERY = 1.0
ACK_BATCH = 1000  # entry ids named in one XACK
_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# Reset an entry's idle time, only if this consumer still owns it:
# KEYS[1] stream; ARGV group, consumer, id, idle-ms. 1 if done, 0 if not ours (any more).
_CLAIM_IF_OURS = """
local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #entry == 0 or entry[1][2] ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
return 1
"""


def _value(reply: Any) -> Any:
    # redis-py types every reply as Awaitable | Any (its sync and async clients share
    # the annotations); the sync client's is the value itself.
    return cast(Any, reply)


class RedisStreamSource(EventSource):
    """One consumer of a Redis Streams consumer group."""

    def __init__(self, target: RedisTarget, options: BrokerOptions) -> None:
        self.target = target
        self.options = options
        self.consumer = target.consumer or options.consumer
        self.lease = options.lease
        self.dead_stream = f"{target.stream}:dead"
        self.counters = Counters()
        self._min_idle_ms = max(1, int(options.lease * 1000))
        self._cursor = "0-0"
        self._lag_at = 0.0
        self._closed = False
        self._lock = threading.Lock()
        self.client = redis.Redis(
            host=target.host,
            port=target.port,
            db=target.db,
            username=os.environ.get("REDIS_USERNAME") or None,
            password=os.environ.get("REDIS_PASSWORD") or None,
            socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=15,
            client_name=f"optimizr-watch-{self.consumer}",
        )
        self._claim_script = self.client.register_script(_CLAIM_IF_OURS)
        try:
            self._create_group()
        except _CONNECTION_ERRORS as exc:
            self.client.close()
            raise UsageError(
                f"--events: cannot connect to Redis at {target.host}:{target.port}: {exc}"
            ) from None
        except redis.exceptions.ResponseError as exc:
            self.client.close()
            raise UsageError(f"--events: {target.describe()}: {exc}") from None

    def _create_group(self) -> None:
        try:
            self.client.xgroup_create(self.target.stream, self.target.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists: another replica made it
                raise

    # -- receive ------------------------------------------------------------------------

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        count = max(1, max_messages)
        try:
            messages = self._reclaim(count)
            if len(messages) < count:
                # Block for new ones only when nothing was reclaimed: what we have is
                # handed out now. BLOCK 0 would mean forever, so no BLOCK at timeout 0.
                block = None if messages or timeout <= 0 else min(timeout, MAX_BLOCK)
                messages += self._read_new(count - len(messages), block)
            self._refresh_lag()
        except _CONNECTION_ERRORS as exc:
            self._lost(exc, deadline)
            return []
        except redis.exceptions.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The server lost the group (restarted without persistence, or someone
            # deleted it): make it again rather than fail forever.
            _log.warning("Redis %s: the group is gone (%s), creating it again", self.target, exc)
            self._create_group()
            return []
        self.counters.set_connected(True)
        self.counters.delivered([m.delivery_count for m in messages])
        return messages

    def _lost(self, exc: Exception, deadline: float) -> None:
        self.counters.set_connected(False)
        _log.warning("Redis %s: %s: %s", self.describe(), type(exc).__name__, exc)
        # redis-py reconnects on the next command; until then wait out the timeout
        # rather than spin on a server that is down.
        time.sleep(max(0.0, deadline - time.monotonic()))

    def _reclaim(self, count: int) -> list[Message]:
        stream, group = self.target.stream, self.target.group
        with self._lock:  # the cursor is shared state
            reply = _value(
                self.client.xautoclaim(
                    stream, group, self.consumer, self._min_idle_ms, self._cursor, count=count
                )
            )
            self._cursor = _text(reply[0])
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]
        for gone in [entry_id for entry_id, fields in reply[1] if fields is None]:
            self.client.xack(stream, group, gone)  # trimmed away (Redis 6.2 says so this way)
        if not claimed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        pending = pipe.execute()
        messages: list[Message] = []
        for (entry_id, fields), rows in zip(claimed, pending, strict=True):
            # Not pending any more: acked meanwhile by the consumer it was taken from.
            if not rows:
                continue
            deliveries = int(rows[0]["times_delivered"])
            message = _RedisMessage(self, _text(entry_id), fields, deliveries)
            if deliveries > self.options.max_deliver:
                message.dead_letter(
                    f"delivered {deliveries - 1} times without being settled "
                    f"(max_deliver {self.options.max_deliver})"
                )
                self.counters.add("dead_lettered")
                continue
            messages.append(message)
        return messages

    def _read_new(self, count: int, block: float | None) -> list[Message]:
        reply = _value(
            self.client.xreadgroup(
                self.target.group,
                self.consumer,
                {self.target.stream: ">"},
                count=count,
                block=None if block is None else max(1, int(block * 1000)),
            )
        )
        messages: list[Message] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                messages.append(_RedisMessage(self, _text(entry_id), fields, 1))
        return messages

    def _refresh_lag(self) -> None:
        now = time.monotonic()
        if now - self._lag_at < LAG_EVERY:
            return
        self._lag_at = now
        for info in _value(self.client.xinfo_groups(self.target.stream)):
            if _text(info["name"]) == self.target.group:
                # "lag" is Redis 7's: entries not yet delivered to the group (nil when it
                # cannot tell, after deletions).
                lag = info.get("lag")
                self.counters.lag = None if lag is None else int(lag)

    # -- EventSource --------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    def ack_all(self, messages: Sequence[Message]) -> None:
        ack_together(own(messages, _RedisMessage), ACK_BATCH, self._xack)

    def _xack(self, chunk: list[_RedisMessage]) -> dict[int, str]:
        # XACK answers how many were pending; one that was not (claimed by another
        # consumer and acked there) needs nothing more, as with a single ack.
        self.client.xack(self.target.stream, self.target.group, *[m.id for m in chunk])
        return {}

    def statistics(self) -> BrokerStatistics:
        return self.counters.snapshot()

    def describe(self) -> str:
        return self.target.describe() + f" consumer {self.consumer}"


class _RedisMessage(BrokerMessage):
    broker_errors = (redis.exceptions.RedisError,)

    def __init__(
        self, source: RedisStreamSource, entry_id: str, fields: dict[bytes, bytes], deliveries: int
    ) -> None:
        super().__init__(source.counters, _body(fields), deliveries, entry_id)
        self._source = source
        self.fields = fields

    def _ack(self) -> None:
        source = self._source
        source.client.xack(source.target.stream, source.target.group, self.id)

    def _nak(self, delay: float) -> None:
        # Idle time such that the entry reaches the min-idle time after ``delay``.
        idle = max(0, self._source._min_idle_ms - int(delay * 1000))
        self._claim_if_ours(idle)

    def _term(self, reason: str) -> None:
        self.dead_letter(reason)

    def _extend(self, seconds: float) -> None:
        # XCLAIM resets the idle time: a whole lease from now, whatever ``seconds`` is.
        if not self._claim_if_ours(0):
            _log.warning(
                "Redis message %s: its lease ran out and another consumer claimed it", self.id
            )

    def _claim_if_ours(self, idle_ms: int) -> bool:
        source = self._source
        done = source._claim_script(
            keys=[source.target.stream],
            args=[source.target.group, source.consumer, self.id, idle_ms],
        )
        return bool(done)

    def dead_letter(self, reason: str) -> None:
        """XADD to STREAM:dead with the reason, and XACK, atomically (MULTI)."""
        source = self._source
        letter: dict[Any, Any] = dict(self.fields)
        letter.update(
            {
                "optimizr-reason": " ".join(reason.split()),
                "optimizr-id": self.id,
                "optimizr-delivery-count": self.delivery_count,
                "optimizr-consumer": source.consumer,
            }
        )
        pipe = source.client.pipeline(transaction=True)
        pipe.xadd(source.dead_stream, letter, maxlen=DEAD_MAXLEN, approximate=True)
        pipe.xack(source.target.stream, source.target.group, self.id)
        pipe.execute()
        _log.warning(
            "Redis message %s dead-lettered to %s: %s", self.id, source.dead_stream, reason
        )


def _body(fields: dict[bytes, bytes]) -> bytes:
    if b"body" in fields:
        return fields[b"body"]
    if len(fields) == 1:
        return next(iter(fields.values()))
    return json.dumps({_text(k): _text(v) for k, v in fields.items()}).encode()


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
