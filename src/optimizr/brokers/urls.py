"""``--events`` URLs of the brokers, parsed into what each client needs.

* ``nats://HOST[:4222]/STREAM/CONSUMER``: a JetStream stream and its durable consumer.
* ``redis://HOST[:6379]/STREAM?group=GROUP[&consumer=NAME][&db=N]``: a stream and its
  consumer group (the path is the stream, not the database number as in other Redis
  URLs: ``db`` says that).
* ``sqs://QUEUE-NAME``, or the queue's URL ``https://sqs.REGION.amazonaws.com/ACCOUNT/NAME``.

A malformed URL is a :class:`~optimizr.errors.UsageError` with a one-line reason. As for
storage URLs (storage/urls.py), credentials never belong in one (they end up in process
lists and logs): a URL with ``user@`` is refused without being echoed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from optimizr.errors import UsageError

# JetStream names: no whitespace, no subject tokens (. * >), no path separators.
_NATS_NAME = re.compile(r"^[^\s.*>/\\]{1,255}$")
# SQS: 1-80 of A-Z a-z 0-9 - _, and ".fifo" at the end of a FIFO queue's name.
_SQS_NAME = re.compile(r"^[A-Za-z0-9_-]{1,75}(\.fifo)?$")
_SQS_ACCOUNT = re.compile(r"^[0-9]{12}$")
# sqs.REGION.amazonaws.com (.cn in China), and the legacy REGION.queue.amazonaws.com.
_SQS_HOST = re.compile(
    r"^(?:sqs\.(?P<region>[a-z0-9-]+)|(?P<legacy>[a-z0-9-]+)\.queue|queue)"
    r"\.amazonaws\.com(?:\.cn)?$"
)

FORMS = (
    "nats://HOST:4222/STREAM/CONSUMER, redis://HOST:6379/STREAM?group=GROUP, "
    "sqs://QUEUE or https://sqs.REGION.amazonaws.com/ACCOUNT/QUEUE"
)


@dataclass(frozen=True)
class NatsTarget:
    server: str  # nats://host:port
    stream: str
    consumer: str

    def describe(self) -> str:
        return f"NATS JetStream {self.server} stream {self.stream} consumer {self.consumer}"


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int
    db: int
    stream: str
    group: str
    #: This process's consumer name if the URL names one (else BrokerOptions.consumer).
    consumer: str | None

    def describe(self) -> str:
        return f"Redis stream {self.stream} on {self.host}:{self.port} group {self.group}"


@dataclass(frozen=True)
class SqsTarget:
    name: str
    #: The queue URL when given one (else looked up by name: GetQueueUrl).
    url: str | None = None
    #: The region the queue URL names (else boto3's own configuration decides).
    region: str | None = None

    def describe(self) -> str:
        return f"SQS queue {self.url or self.name}"


BrokerTarget = NatsTarget | RedisTarget | SqsTarget


def parse_broker_url(url: str) -> BrokerTarget:
    """The broker ``url`` names; UsageError saying what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"--events: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        # Not echoed: what precedes the @ may be a secret.
        raise UsageError(
            f"--events: a {scheme}:// URL must not carry credentials (user@): "
            "see the README's 'Event sources (brokers)' for where they go"
        )
    if parts.fragment:
        raise UsageError(f"--events {url}: a broker URL takes no #fragment")
    if scheme == "nats":
        return _parse_nats(url, parts.hostname, port, parts.path, parts.query)
    if scheme == "redis":
        return _parse_redis(url, parts.hostname, port, parts.path, parts.query)
    if scheme == "sqs":
        return _parse_sqs(url, parts.netloc, parts.path, parts.query)
    if scheme == "https" and parts.hostname and _SQS_HOST.match(parts.hostname):
        return _parse_sqs_url(url, parts.hostname, parts.path, parts.query)
    raise UsageError(f"--events {url}: not a broker URL (use {FORMS})")


def _parse_nats(url: str, host: str | None, port: int | None, path: str, query: str) -> NatsTarget:
    if not host:
        raise UsageError(f"--events {url}: no host (nats://HOST:4222/STREAM/CONSUMER)")
    if query:
        raise UsageError(f"--events {url}: a nats:// URL takes no query")
    names = [unquote(part) for part in path.strip("/").split("/")] if path.strip("/") else []
    if len(names) != 2:
        raise UsageError(f"--events {url}: the path must be /STREAM/CONSUMER")
    for what, name in zip(("stream", "consumer"), names, strict=True):
        if not _NATS_NAME.match(name):
            raise UsageError(
                f"--events {url}: {name!r} is not a JetStream {what} name "
                "(no spaces, '.', '*', '>' or slashes)"
            )
    return NatsTarget(f"nats://{_host(host)}:{port or 4222}", names[0], names[1])


def _parse_redis(
    url: str, host: str | None, port: int | None, path: str, query: str
) -> RedisTarget:
    if not host:
        raise UsageError(f"--events {url}: no host (redis://HOST:6379/STREAM?group=GROUP)")
    stream = unquote(path[1:]) if path.startswith("/") else ""
    if not stream:
        raise UsageError(f"--events {url}: no stream (redis://HOST:6379/STREAM?group=GROUP)")
    params = _query(url, query, ("group", "consumer", "db"))
    group = params.get("group", "")
    if not group:
        raise UsageError(f"--events {url}: no consumer group (add ?group=GROUP)")
    db_text = params.get("db", "0")
    if not db_text.isdigit():
        raise UsageError(f"--events {url}: db must be a database number, not {db_text!r}")
    return RedisTarget(
        host, port or 6379, int(db_text), stream, group, params.get("consumer") or None
    )


def _parse_sqs(url: str, netloc: str, path: str, query: str) -> SqsTarget:
    if path.strip("/") or query:
        raise UsageError(f"--events {url}: write sqs://QUEUE-NAME, or the queue's https URL")
    return SqsTarget(_sqs_name(url, unquote(netloc)))


def _parse_sqs_url(url: str, host: str, path: str, query: str) -> SqsTarget:
    if query:
        raise UsageError(f"--events {url}: an SQS queue URL takes no query")
    segments = path.strip("/").split("/")
    if len(segments) != 2 or not _SQS_ACCOUNT.match(segments[0]):
        raise UsageError(f"--events {url}: an SQS queue URL's path is /ACCOUNT-ID/QUEUE-NAME")
    match = _SQS_HOST.match(host)
    assert match is not None  # the caller matched it
    # queue.amazonaws.com is the legacy name of us-east-1's endpoint.
    region = match.group("region") or match.group("legacy") or "us-east-1"
    name = _sqs_name(url, segments[1])
    return SqsTarget(name, f"https://{host}/{segments[0]}/{name}", region)


def _sqs_name(url: str, name: str) -> str:
    if not _SQS_NAME.match(name):
        raise UsageError(
            f"--events {url}: {name!r} is not an SQS queue name "
            "(1-80 of A-Z a-z 0-9 - _, .fifo at the end of a FIFO queue's)"
        )
    return name


def _query(url: str, query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in allowed:
            raise UsageError(f"--events {url}: unknown parameter {key!r} (known: {allowed})")
        params[key] = value
    return params


def _host(host: str) -> str:
    # urlsplit drops an IPv6 address's brackets; a URL needs them back.
    return f"[{host}]" if ":" in host else host
