"""Broker clients for ``optimizr watch --events URL`` (issue 16): NATS JetStream, Redis
Streams and Amazon SQS behind one small interface (base.py). Each client library is an
optional extra (``optimizr[nats]``, ``optimizr[redis]``, ``optimizr[sqs]``), imported only
when its URL is opened."""

from __future__ import annotations

from optimizr.brokers.base import BrokerOptions, BrokerStatistics, EventSource, Message
from optimizr.brokers.urls import (
    BrokerTarget,
    NatsTarget,
    RedisTarget,
    SqsTarget,
    parse_broker_url,
)
from optimizr.errors import UsageError

__all__ = [
    "BrokerOptions",
    "BrokerStatistics",
    "BrokerTarget",
    "EventSource",
    "Message",
    "NatsTarget",
    "RedisTarget",
    "SqsTarget",
    "open_source",
    "parse_broker_url",
]


def open_source(url: str, options: BrokerOptions | None = None) -> EventSource:
    """Connect to the broker ``url`` names (see :mod:`optimizr.brokers.urls` for the forms)
    and get ready to receive: the JetStream durable consumer or the Redis group is created
    if missing. UsageError when the URL is malformed, the extra is not installed, or the
    stream or queue does not exist."""
    target = parse_broker_url(url)
    options = options or BrokerOptions()
    if isinstance(target, NatsTarget):
        _require("nats", "nats", "NATS JetStream")
        from optimizr.brokers.nats import NatsSource

        return NatsSource(target, options)
    if isinstance(target, RedisTarget):
        _require("redis", "redis", "Redis Streams")
        from optimizr.brokers.redis_streams import RedisStreamSource

        return RedisStreamSource(target, options)
    _require("boto3", "sqs", "Amazon SQS")
    from optimizr.brokers.sqs import SqsSource

    return SqsSource(target, options)


def _require(module: str, extra: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(
            f"--events: {what} needs the {module} package: pip install 'optimizr[{extra}]'"
        )
