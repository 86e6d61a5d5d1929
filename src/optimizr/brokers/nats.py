"""NATS JetStream: a pull consumer on an existing stream (``nats://HOST:4222/STREAM/CONSUMER``).

The stream must exist (it is the producer's: its subjects, retention and storage are
not ours to choose); the durable consumer is created when missing, with explicit acks,
``ack_wait`` = ``BrokerOptions.lease`` and ``max_deliver``. A consumer that already
exists is used as it is configured (several replicas share one durable pull consumer),
but it must be a pull consumer with explicit acks, or ack-after-commit cannot work.

* ack: ``+ACK`` and wait for the server to confirm it (``ack_sync``): only a confirmed
  ack counts, an unconfirmed one is a settle failure (the message comes again). A
  batch's acks go out together and their confirmations are awaited together.
* nak(delay): ``-NAK {"delay": ns}``; the server redelivers after the delay.
* term(reason): ``+TERM reason``; never redelivered, and the server publishes the
  reason in its ``$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED`` advisory (the dead
  letter a JetStream deployment watches).
* extend: ``+WPI`` (in progress), which restarts the full ack_wait.
* delivery_count: the server's ``num_delivered``; lag: its ``num_pending``.

Credentials come from the environment, never the URL: ``NATS_CREDS`` (a .creds file),
``NATS_TOKEN``, or ``NATS_USER`` and ``NATS_PASSWORD``.

nats-py is asyncio only, and the service is threaded. Each source owns one event loop
in one background thread for its whole life, and the sync methods hand coroutines to
it: the connection's reader, its pings and its reconnect logic are tasks that must keep
running *between* calls (with ``asyncio.run`` per call they would stop, the server would
drop the silent client, and a restarted server would never be reconnected to).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

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
from optimizr.brokers.urls import NatsTarget
from optimizr.errors import UsageError

_log = logging.getLogger("optimizr.brokers")
T = TypeVar("T")

CONNECT_TIMEOUT = 10.0  # seconds for the first connection and the stream/consumer set-up
ACK_TIMEOUT = 5.0  # seconds for the server to confirm an ack
ACK_BATCH = 256  # acks sent together, then their confirmations awaited together
# A fetch shorter than this cannot make its round trip to the server: receive(timeout=0)
# (the service's --once drain) asks with this instead of not at all.
MIN_FETCH = 0.2
# Seconds between reconnect attempts to the same server (nats-py's default is 2).
RECONNECT_WAIT = 1
#: What a settling call raises when the server cannot be reached or does not answer.
# (asyncio's and concurrent.futures' TimeoutError are the builtin one since 3.11.)
_BROKER_ERRORS = (nats.errors.Error, TimeoutError, OSError)


class NatsSource(EventSource):
    """A JetStream pull consumer, synchronous, over one owned event-loop thread."""

    def __init__(self, target: NatsTarget, options: BrokerOptions) -> None:
        self.target = target
        self.options = options
        self.counters = Counters()
        self.lease = options.lease
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats {target.stream}", daemon=True
        )
        self._thread.start()
        self._nc: Client | None = None
        try:
            self._sub = self._run(self._set_up(), CONNECT_TIMEOUT * 2)
        except BaseException:
            self.close()
            raise

    # -- the loop thread ----------------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coroutine`` on the source's loop; wait at most ``timeout`` seconds."""
        if self._loop.is_closed():  # a message settled after close(): as if disconnected
            coroutine.close()
            raise nats.errors.ConnectionClosedError
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    async def _set_up(self) -> JetStreamContext.PullSubscription:
        try:
            self._nc = await nats.connect(
                self.target.server,
                name="optimizr watch",
                connect_timeout=int(CONNECT_TIMEOUT),
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # a service waits for its broker forever
                reconnect_time_wait=RECONNECT_WAIT,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
                **_credentials(),
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise UsageError(
                f"--events: cannot connect to NATS at {self.target.server}: "
                f"{exc or type(exc).__name__}"
            ) from None
        js = self._nc.jetstream(timeout=CONNECT_TIMEOUT)
        stream, name = self.target.stream, self.target.consumer
        try:
            await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise UsageError(
                f"--events: NATS at {self.target.server} has no stream {stream} "
                "(the stream is the producer's: create it with its subjects first)"
            ) from None
        try:
            info = await js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                durable_name=name,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.options.lease,
                max_deliver=self.options.max_deliver,
                # Events stored before the first start are converted too.
                deliver_policy=DeliverPolicy.ALL,
            )
            # Two replicas starting together both create it: JetStream accepts the same
            # configuration twice.
            info = await js.add_consumer(stream, config)
        if info.config.deliver_subject:
            raise UsageError(f"--events: NATS consumer {name} is a push consumer, not a pull one")
        if info.config.ack_policy != AckPolicy.EXPLICIT:
            raise UsageError(
                f"--events: NATS consumer {name} does not take explicit acks "
                f"(ack policy {info.config.ack_policy}): an ack could not wait for the commit"
            )
        if info.config.ack_wait:
            self.lease = float(info.config.ack_wait)
        # The server dead-letters a message delivered max_deliver times unsettled: it says
        # so in an advisory (every replica of the consumer hears each one).
        await self._nc.subscribe(
            f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{name}", cb=self._max_delivered
        )
        return await js.pull_subscribe_bind(name, stream=stream)

    async def _max_delivered(self, msg: Msg) -> None:
        self.counters.add("dead_lettered")
        _log.warning(
            "NATS %s: a message reached max_deliver unsettled and is not delivered again: %s",
            self.target.stream,
            msg.data.decode(errors="replace")[:300],
        )

    async def _disconnected(self) -> None:
        if self._closed:  # our own close()
            return
        self.counters.set_connected(False)
        _log.warning("NATS %s: disconnected, reconnecting", self.target.server)

    async def _reconnected(self) -> None:
        self.counters.set_connected(True)
        _log.info("NATS %s: reconnected", self.target.server)

    async def _error(self, exc: Exception) -> None:
        # nats-py reports every failed reconnect attempt here: the disconnect is logged
        # once, these only at debug.
        _log.debug("NATS %s: %s: %s", self.target.server, type(exc).__name__, exc)

    async def _fetch(self, max_messages: int, timeout: float) -> list[Msg]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            return await self._sub.fetch(max_messages, timeout=max(timeout, MIN_FETCH))
        except nats.errors.TimeoutError:
            self.counters.lag = 0  # the consumer had nothing to give: nothing is waiting
            return []
        except (nats.errors.Error, OSError) as exc:
            # Disconnected, reconnecting: nats-py resubscribes by itself once the server is
            # back; wait out the caller's timeout rather than spin.
            _log.debug("NATS fetch: %s: %s", type(exc).__name__, exc)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            return []

    # -- EventSource --------------------------------------------------------------------

    def receive(self, max_messages: int, timeout: float) -> list[Message]:
        if self._closed:
            return []
        timeout = max(0.0, timeout)
        try:
            batch = self._run(self._fetch(max(1, max_messages), timeout), timeout + CONNECT_TIMEOUT)
        except TimeoutError:
            return []
        messages: list[Message] = []
        for msg in batch:
            metadata = msg.metadata
            messages.append(
                _NatsMessage(self, msg, metadata.num_delivered or 1, str(metadata.sequence.stream))
            )
            self.counters.lag = metadata.num_pending
        self.counters.delivered([m.delivery_count for m in messages])
        return messages

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._shut_down(), CONNECT_TIMEOUT)
        except (*_BROKER_ERRORS, RuntimeError) as exc:
            _log.debug("NATS close: %s: %s", type(exc).__name__, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONNECT_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shut_down(self) -> None:
        if self._nc is not None and not self._nc.is_closed:
            # Unacked messages go back to the stream after ack_wait: nothing to drain.
            try:
                await self._nc.close()
            except _BROKER_ERRORS as exc:  # nats-py 2.16 flushes even a lost connection
                _log.debug("NATS close: %s: %s", type(exc).__name__, exc)
        # What nats-py leaves behind (its subscriptions' readers) ends here, on the loop,
        # rather than be destroyed pending when the loop is closed.
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def ack_all(self, messages: Sequence[Message]) -> None:
        ack_together(own(messages, _NatsMessage), ACK_BATCH, self._ack_many)

    def _ack_many(self, chunk: list[_NatsMessage]) -> dict[int, str]:
        self._connected_for_ack()
        return self._run(_confirm_all(chunk), ACK_TIMEOUT + 1)

    def _connected_for_ack(self) -> None:
        if self._nc is None or not self._nc.is_connected:
            # Reconnecting: an ack could not be confirmed before the timeout anyway.
            raise nats.errors.ConnectionReconnectingError

    def statistics(self) -> BrokerStatistics:
        return self.counters.snapshot()

    def describe(self) -> str:
        return self.target.describe()


async def _confirm_all(chunk: list[_NatsMessage]) -> dict[int, str]:
    replies = await asyncio.gather(
        *(m._msg.ack_sync(timeout=ACK_TIMEOUT) for m in chunk), return_exceptions=True
    )
    return {
        i: f"{type(reply).__name__}: {reply}"
        for i, reply in enumerate(replies)
        if isinstance(reply, BaseException)
    }


class _NatsMessage(BrokerMessage):
    broker_errors = _BROKER_ERRORS

    def __init__(self, source: NatsSource, msg: Msg, delivery_count: int, id: str) -> None:
        super().__init__(source.counters, msg.data, delivery_count, id)
        self._source = source
        self._msg = msg

    def _ack(self) -> None:
        self._source._connected_for_ack()
        self._source._run(self._msg.ack_sync(timeout=ACK_TIMEOUT), ACK_TIMEOUT + 1)

    def _nak(self, delay: float) -> None:
        self._source._run(self._msg.nak(delay=delay or None), ACK_TIMEOUT)

    def _term(self, reason: str) -> None:
        # nats-py's term() sends no reason; the server takes one after +TERM and puts it
        # in the MSG_TERMINATED advisory (nats-server 2.15 here, which the tests check).
        line = " ".join(reason.split())  # one line, as the protocol needs
        payload = b"+TERM " + line.encode() if line else b"+TERM"
        nc = self._source._nc
        assert nc is not None and self._msg.reply
        self._source._run(_publish_and_flush(nc, self._msg.reply, payload), ACK_TIMEOUT)
        _log.info("NATS message %s terminated: %s", self.id, line)

    def _extend(self, seconds: float) -> None:
        # +WPI restarts the consumer's whole ack_wait; it cannot ask for ``seconds``.
        self._source._run(self._msg.in_progress(), ACK_TIMEOUT)


async def _publish_and_flush(nc: Client, subject: str, payload: bytes) -> None:
    await nc.publish(subject, payload)
    await nc.flush(timeout=int(ACK_TIMEOUT))


def _credentials() -> dict[str, Any]:
    if os.environ.get("NATS_CREDS"):
        return {"user_credentials": os.environ["NATS_CREDS"]}
    if os.environ.get("NATS_TOKEN"):
        return {"token": os.environ["NATS_TOKEN"]}
    if os.environ.get("NATS_USER"):
        return {"user": os.environ["NATS_USER"], "password": os.environ.get("NATS_PASSWORD", "")}
    return {}
