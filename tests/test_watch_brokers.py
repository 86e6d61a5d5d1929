"""``optimizr watch --events nats://|redis://|sqs://``: the service over real brokers.

The session's servers are conftest.py's (a real ``nats-server -js`` with a file store, a
real ``redis-server``, moto's SQS emulator in server mode), each test on a stream or
queue of its own (tests/broker_servers.py). The service is the real one: the library
call on a thread with its real worker pool, or ``optimizr watch`` as a process of its
own session where it is killed (SIGKILL) or must serve /readyz. Slowness comes from the
workers' test fault ``hold-1:NAME`` (the image waits for a file NAME.release), never
from a big image; every wait polls for a condition (``wait_for``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker_servers import NatsTopic, RedisTopic, Server, SqsTopic, Topic
from conftest import age, decode, manifest_rows, photo_array, save_jpeg
from optimizr.brokers import Message
from optimizr.config import RunConfig
from optimizr.watch import TRANSIENT_FACTOR, WatchConfig, WatchService, read_watch_state
from optimizr.watch_setup import run_watch

#: A short lease, so that a message left unsettled comes back within seconds.
LEASE = 2.0
MAX_ATTEMPTS = 2
#: Generous: a busy 2-core machine shared by several test runs.
WAIT = 120.0

MakeTopic = Callable[..., Topic]


# -- helpers ----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)  # polling interval: the loop checks the condition
    raise AssertionError(f"timed out waiting for {what}")


def s3_event(key: str, bucket: str = "photos") -> bytes:
    """An S3 ``Records`` notification, as a bucket sends it through SQS, SNS or a bridge."""
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
    }
    return json.dumps({"Records": [record]}).encode()


def photo(path: Path, seed: int = 0) -> Path:
    save_jpeg(path, photo_array(160, 120, seed))
    age(path)  # the manifest does not trust a file written within moments of its listing
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_one_valid_webp(dest: Path, key: str) -> None:
    """Exactly one manifest row for ``key``, done, and its output a WebP that decodes."""
    rows = manifest_rows(dest)
    assert list(rows) == [key] and rows[key]["status"] == "done"
    output = dest / Path(key).with_suffix(".webp")
    image = decode(output)
    assert image.format == "WEBP" and image.size == (160, 120)


@pytest.fixture(params=["nats", "redis", "sqs"])
def make_topic(request: pytest.FixtureRequest) -> Iterator[MakeTopic]:
    """``make_topic(lease=)``: a fresh stream (queue) on the parameter's session server.
    An SQS queue's redrive policy allows as many receives as the service would retry."""
    kind: str = request.param
    server: Server = request.getfixturevalue("sqs_env" if kind == "sqs" else f"{kind}_server")
    made: list[Topic] = []

    def make(lease: float = LEASE) -> Topic:
        cls = {"nats": NatsTopic, "redis": RedisTopic, "sqs": SqsTopic}[kind]
        topic: Topic = cls(server, lease, TRANSIENT_FACTOR * MAX_ATTEMPTS)
        made.append(topic)
        return topic

    yield make
    for topic in made:
        topic.close()


class ServiceThread:
    """The library call (run_watch) on a thread, with its real worker pool."""

    def __init__(
        self,
        events: str,
        src: Path,
        dest: Path,
        *,
        once: bool = False,
        lease: float = LEASE,
        config: WatchConfig | None = None,
    ) -> None:
        self.config = config or WatchConfig(
            events=events,
            run=RunConfig(src=src, dest=dest, workers=1, max_attempts=MAX_ATTEMPTS),
            once=once,
            retry_delay=0.0,
            lease=lease,
        )
        self.service: WatchService | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        def started(service: WatchService) -> None:
            self.service = service
            self._started.set()

        try:
            run_watch(self.config, on_started=started)
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    def __enter__(self) -> WatchService:
        self.thread.start()
        wait_for(lambda: self._started.is_set() or self.error, "the service to start")
        if self.error is not None:
            raise self.error
        assert self.service is not None
        return self.service

    def __exit__(self, *exc: object) -> None:
        if self.service is not None and not self.config.once:  # --once ends by itself
            self.service.request_stop(signal.SIGTERM)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


class WatchProcess:
    """``optimizr watch`` as a process of its own session, health on --metrics-port."""

    def __init__(self, tmp_path: Path, events: str, *args: str, faults: str = "") -> None:
        self.metrics = f"http://127.0.0.1:{free_port()}/"
        command = [
            sys.executable, "-m", "optimizr", "watch", "--events", events,
            str(tmp_path / "src"), str(tmp_path / "dest"),
            "--workers", "1", "--lease", str(LEASE), "--max-attempts", str(MAX_ATTEMPTS),
            "--retry-delay", "0", "--log-format", "json",
            "--metrics-port", self.metrics.split(":")[2].strip("/"), *args,
        ]  # fmt: skip
        env = {**os.environ, "OPTIMIZR_TEST_FAULTS": faults}
        self.log = open(tmp_path / f"watch-{time.monotonic_ns()}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def readyz(self) -> int:
        if self.process.poll() is not None:
            raise AssertionError(f"the service exited: {self.process.returncode}")
        try:
            return get(self.metrics + "readyz")[0]
        except OSError:
            return 0

    def busy(self) -> bool:
        """Is an image in a worker now (its /healthz says so)?"""
        try:
            return bool(json.loads(get(self.metrics + "healthz")[1]).get("running"))
        except (OSError, ValueError):
            return False

    def __enter__(self) -> WatchProcess:
        wait_for(lambda: self.readyz() == 200, "the service to be ready")
        return self

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(WAIT)

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(WAIT)
        self.log.close()


# -- faults -----------------------------------------------------------------------------------


def test_a_duplicate_event_is_converted_once_and_both_messages_acked(
    make_topic: MakeTopic, tmp_path: Path
) -> None:
    topic = make_topic()
    photo(tmp_path / "src" / "a.jpg")
    topic.publish(s3_event("a.jpg"))
    topic.publish(s3_event("a.jpg"))  # the same upload's event, sent twice
    with ServiceThread(topic.url, tmp_path / "src", tmp_path / "dest", once=True) as service:
        pass  # --once: it drains what is queued and returns
    stats = service.stats
    assert (stats.messages, stats.converted, stats.duplicates, stats.acked) == (2, 1, 1, 2)
    assert service.source.statistics().acked == 2
    assert topic.unsettled() == 0
    assert_one_valid_webp(tmp_path / "dest", "a.jpg")


def test_a_poison_image_is_dead_lettered_and_the_next_good_one_converted(
    make_topic: MakeTopic, tmp_path: Path
) -> None:
    topic = make_topic()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG at all")
    age(tmp_path / "src" / "bad.jpg")
    photo(tmp_path / "src" / "good.jpg")
    with ServiceThread(topic.url, tmp_path / "src", tmp_path / "dest") as service:
        topic.publish(s3_event("bad.jpg"))
        wait_for(lambda: service.stats.dead_lettered == 1, "the poison image dead-lettered")
        topic.publish(s3_event("good.jpg"))  # the service goes on
        wait_for(lambda: service.stats.acked == 1, "the good image converted")
        # SQS: the redrive policy moves it once its receive count passes maxReceiveCount.
        dead = wait_for(topic.dead_letters, "the dead letter in the broker")
    assert [body for body, _reason in dead] == [s3_event("bad.jpg")]
    reason = dead[0][1]
    assert reason is None or reason.startswith("bad.jpg: ")  # SQS keeps no reason
    figures = service.source.statistics()
    assert figures.termed == 1 and figures.naked == MAX_ATTEMPTS - 1
    assert (service.stats.converted, service.stats.failed) == (1, MAX_ATTEMPTS)
    assert (tmp_path / "dest" / "good.webp").exists()
    assert not (tmp_path / "dest" / "bad.webp").exists()
    assert manifest_rows(tmp_path / "dest")["bad.jpg"]["attempts"] == MAX_ATTEMPTS
    assert topic.unsettled() == 0


def test_a_message_is_extended_on_a_timer_while_one_image_outlasts_the_lease(
    make_topic: MakeTopic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica polls the same consumer (group, queue) all along: before the
    heartbeat, the message was extended only when an image finished, so one image longer
    than the lease had its message handed to that replica mid-conversion."""
    lease = 3.0
    topic = make_topic(lease=lease)
    held = photo(tmp_path / "src" / "slow.jpg")
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "hold-1:slow.jpg")
    stolen: list[Message] = []
    with ServiceThread(topic.url, tmp_path / "src", tmp_path / "dest", lease=lease) as service:
        topic.publish(s3_event("slow.jpg"))
        wait_for(lambda: service.stats.messages == 1, "the message received")
        received_at = time.monotonic()
        other = topic.open("replica-2")  # the same group (queue, durable consumer)
        # Two and a half leases with the image held, the other replica asking all along.
        while time.monotonic() - received_at < 2.5 * lease:
            stolen += other.receive(10, 0.2)
        Path(f"{held}.release").touch()
        wait_for(lambda: service.stats.acked == 1, "the message acknowledged")
        stolen += other.receive(10, 0.2)
    assert [(m.body, m.delivery_count) for m in stolen] == []
    figures = service.source.statistics()
    assert figures.redelivered == 0 and figures.extended >= 3
    assert (service.stats.converted, service.stats.duplicates) == (1, 0)
    assert topic.unsettled() == 0
    assert_one_valid_webp(tmp_path / "dest", "slow.jpg")


def test_killed_mid_image_the_message_comes_again_and_is_converted_once(
    make_topic: MakeTopic, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    topic = make_topic()
    photo(tmp_path / "src" / "held.jpg")
    with WatchProcess(tmp_path, topic.url, faults="hold-1:held.jpg") as first:
        topic.publish(s3_event("held.jpg"))
        wait_for(first.busy, "the image in its worker")
        os.killpg(first.process.pid, signal.SIGKILL)  # the service and its worker, mid-image
        first.process.wait(WAIT)
    dest = tmp_path / "dest"
    assert not (dest / "held.webp").exists()
    with WatchProcess(tmp_path, topic.url) as second:  # no fault: the image converts
        # Redelivered once its lease runs out (NATS ack_wait, Redis XAUTOCLAIM of the
        # dead consumer's entry, the SQS visibility timeout).
        wait_for(lambda: (read_watch_state(dest) or {}).get("counters", {}).get("acked"), "ack")
        assert second.stop() == 0
    state = read_watch_state(dest)
    assert state is not None and state["state"] == "stopped"
    assert state["counters"]["converted"] == 1 and state["counters"]["duplicates"] == 0
    source = state["source_statistics"]
    assert (source["received"], source["redelivered"], source["acked"]) == (1, 1, 1)
    assert topic.unsettled() == 0
    assert_one_valid_webp(dest, "held.jpg")
    status = cli("status", dest)
    assert status.exit_code == 0
    assert f"service   watching {topic.url} (stopped)" in status.output
    assert "broker    connected, 1 received, 1 acked, 1 redelivered" in status.output


@pytest.mark.parametrize("kind", ["nats", "redis"])
def test_the_broker_restarted_under_the_service_is_reconnected_to(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The session's server is stopped by its PID and started again on the same port
    (NATS: the same JetStream file store, so the stream survives; this Redis keeps
    nothing, so the client makes its group again). SQS has no server to restart here."""
    server: Server = request.getfixturevalue(f"{kind}_server")
    topic: Topic = NatsTopic(server, LEASE, 5) if kind == "nats" else RedisTopic(server, LEASE, 5)
    photo(tmp_path / "src" / "before.jpg")
    photo(tmp_path / "src" / "after.jpg", seed=1)
    dest = tmp_path / "dest"
    try:
        with WatchProcess(tmp_path, topic.url) as service:
            topic.publish(s3_event("before.jpg"))
            wait_for((dest / "before.webp").exists, "the first image")
            server.stop()
            try:
                # The client sees it go; /readyz says so while it is down.
                wait_for(lambda: service.readyz() == 503, "/readyz not ready")
                status, body = get(service.metrics + "readyz")
                assert json.loads(body)["status"] == "disconnected"
            finally:
                server.restart()  # same port, same data dir
            wait_for(lambda: service.readyz() == 200, "/readyz ready again")
            topic.publish(s3_event("after.jpg"))
            wait_for((dest / "after.webp").exists, "the image published after the restart")
            depth = f'optimizr_watch_queue_depth{{source="{kind}"}} 0.0'  # the consumer lag

            def scraped() -> str | None:  # the lag is refreshed every few seconds
                text = get(service.metrics + "metrics")[1].decode()
                return text if depth in text else None

            metrics = wait_for(scraped, "the lag at 0 in /metrics")
            assert f'optimizr_watch_source_connected{{source="{kind}"}} 1.0' in metrics
            lost = f'optimizr_watch_source_connection_errors_total{{source="{kind}"}}'
            assert lost in metrics and f"{lost} 0.0" not in metrics
            received = f'optimizr_watch_source_messages_total{{kind="received",source="{kind}"}}'
            assert f"{received} 2.0" in metrics
            assert service.stop() == 0
    finally:
        topic.close()
    state = read_watch_state(dest)
    assert state is not None and state["counters"]["converted"] == 2
    assert state["source_statistics"]["connection_errors"] >= 1


# -- end to end: S3 -> SQS, both moto's ---------------------------------------------------------


def test_an_object_put_to_a_bucket_reaches_dest_through_its_sqs_notification(
    sqs_env: Server, tmp_path: Path
) -> None:
    """moto in server mode plays both S3 and SQS: the bucket's notification configuration
    sends its ObjectCreated events (and the s3:TestEvent first) to the queue, and the
    service reads SRC s3://bucket on moto's endpoint."""
    import boto3

    endpoint = f"http://{sqs_env.address}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    sqs = boto3.client("sqs", endpoint_url=endpoint)
    bucket, queue = "uploads-e2e", "uploads-e2e-events"
    s3.create_bucket(Bucket=bucket)
    queue_url = sqs.create_queue(QueueName=queue, Attributes={"VisibilityTimeout": "10"})[
        "QueueUrl"
    ]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn["Attributes"]["QueueArn"], "Events": ["s3:ObjectCreated:*"]}
            ]
        },
    )
    jpeg = save_jpeg(tmp_path / "upload.jpg", photo_array(160, 120, 7))
    dest = tmp_path / "dest"
    config = WatchConfig(
        events=f"sqs://{queue}",
        run=RunConfig(
            src=f"s3://{bucket}",
            dest=dest,
            workers=1,
            endpoint_url=endpoint,
            region="us-east-1",
            s3_path_style=True,
        ),
        retry_delay=0.0,
    )
    try:
        with ServiceThread(config.events, tmp_path, dest, config=config) as service:
            s3.put_object(Bucket=bucket, Key="summer 2024/beach.jpg", Body=jpeg.read_bytes())
            output = dest / "summer 2024" / "beach.webp"
            wait_for(lambda: service.stats.acked >= 2, "the test event and the upload settled")
            assert decode(output).format == "WEBP"
        assert (service.stats.converted, service.stats.ignored) == (1, 1)  # + s3:TestEvent
        assert manifest_rows(dest)["summer 2024/beach.jpg"]["status"] == "done"
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        left = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
        assert [int(left[name]) for name in names] == [0, 0]
    finally:
        s3.close()
        sqs.close()
