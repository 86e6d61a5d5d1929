"""``optimizr watch`` with its HTTP webhook: real HTTP posts into a real service (the
library call on a thread, or the CLI as a process for the signal tests), real worker
processes, real files. The SeaweedFS end-to-end test is tests/test_watch_seaweed.py."""

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from conftest import age, manifest_rows, photo_array, save_jpeg
from optimizr.brokers.base import EventSource, Message
from optimizr.config import RunConfig
from optimizr.event_queue import EventQueue, read_queue_counts
from optimizr.storage.base import Storage
from optimizr.watch import WatchConfig, WatchService, WatchStatistics, read_watch_state
from optimizr.watch_setup import run_watch

ROOT = Path(__file__).parent.parent
#: Generous: a busy 2-core machine shared by several test runs.
WAIT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], object], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def s3_event(key: str, name: str = "ObjectCreated:Put", bucket: str = "photos") -> bytes:
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": name,
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
    }
    return json.dumps({"Records": [record]}).encode()


def post(url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Running:
    """The service on a thread of this process (the library call), stopped after."""

    def __init__(self, src: Path, dest: Path, **run: Any) -> None:
        self.url = f"http://127.0.0.1:{free_port()}/"
        retry_delay = run.pop("retry_delay", 0.0)
        self.config = WatchConfig(
            events=self.url,
            run=RunConfig(src=src, dest=dest, workers=1, **run),
            retry_delay=retry_delay,
        )
        self.dest = dest
        self._started = threading.Event()
        self.service: WatchService | None = None
        self.stats: WatchStatistics | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: self._started.is_set() or self.error, "the service to start")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        def started(service: WatchService) -> None:
            self.service = service
            self._started.set()

        try:
            self.stats = run_watch(self.config, on_started=started)
        except BaseException as exc:  # handed to the test's thread
            self.error = exc

    @property
    def counters(self) -> WatchStatistics:
        assert self.service is not None
        return self.service.stats

    def stop(self) -> None:
        if self.service is not None:
            self.service.request_stop(signal.SIGTERM)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(src: Path | None = None, dest: Path | None = None, **run: Any) -> Running:
        service = Running(src or tmp_path / "src", dest or tmp_path / "dest", **run)
        started.append(service)
        return service

    (tmp_path / "src").mkdir(exist_ok=True)
    yield start
    for service in started:
        service.stop()


def photo(path: Path, seed: int = 0) -> Path:
    save_jpeg(path, photo_array(160, 120, seed))
    age(path)  # the manifest does not trust a file written within moments of its listing
    return path


# -- the webhook -----------------------------------------------------------------------------


def test_a_posted_event_is_converted_and_garbage_gets_400_and_a_dead_letter(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    photo(tmp_path / "src" / "summer 2024" / "beach.jpg")
    service = running()
    status, doc = post(service.url, s3_event("summer+2024/beach.jpg"))
    assert status == 200 and doc["status"] == "queued" and doc["events"] == 1
    output = tmp_path / "dest" / "summer 2024" / "beach.webp"
    wait_for(output.exists, "the WebP")
    assert output.read_bytes()[:4] == b"RIFF"
    wait_for(lambda: service.counters.acked == 1, "the message acknowledged")

    status, doc = post(service.url, b"this is no notification")
    assert status == 400 and doc["reason"].startswith("not JSON")
    status, doc = post(service.url, b'{"Records": [{"eventVersion": "1.0"}]}')
    assert status == 400 and "only 2.x is understood" in doc["reason"]
    counts = read_queue_counts(tmp_path / "dest")
    assert counts == (0, 2)  # nothing waiting, both refusals kept as dead letters

    # The test event a store sends first is understood, and leads to nothing.
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "photos"}
    assert post(service.url, json.dumps(test_event).encode())[0] == 200

    status, body = get(service.url + "readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert get(service.url + "nowhere")[0] == 404
    rows = manifest_rows(tmp_path / "dest")
    assert rows["summer 2024/beach.jpg"]["status"] == "done"


def test_the_metrics_count_per_source_and_show_the_queue_depth(tmp_path: Path) -> None:
    # Through the CLI, which serves the exporter's /metrics on the events port.
    photo(tmp_path / "src" / "a.jpg")
    metrics = f"http://127.0.0.1:{free_port()}/"
    with cli_service(tmp_path, "--metrics-port", metrics.split(":")[2].strip("/")) as (
        process,
        url,
    ):
        assert post(url, s3_event("a.jpg"))[0] == 200
        assert post(url, b"{}")[0] == 400
        wait_for((tmp_path / "dest" / "a.webp").exists, "the WebP")

        def scraped() -> str | None:
            text = get(url + "metrics")[1].decode()
            converted = 'optimizr_watch_events_total{outcome="converted",source="webhook"} 1.0'
            return text if converted in text else None

        text = wait_for(scraped, "the converted event in /metrics")
        assert 'optimizr_watch_messages_total{source="webhook"} 1.0' in text
        assert 'optimizr_watch_refused_total{source="webhook"} 1.0' in text
        assert 'optimizr_watch_queue_depth{source="webhook"} 0.0' in text
        assert 'optimizr_images_total{format="jpeg",status="converted"} 1.0' in text
        # --metrics-port serves the same, as for convert: readiness is the service's.
        assert (
            'optimizr_watch_messages_total{source="webhook"} 1.0'
            in get(metrics + "metrics")[1].decode()
        )
        assert get(metrics + "readyz")[0] == 200
        health = json.loads(get(url + "healthz")[1])
        assert get(url + "healthz")[0] == 200 and health["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0


def test_a_duplicate_event_writes_nothing_a_second_time(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    photo(tmp_path / "src" / "a.jpg")
    service = running()
    assert post(service.url, s3_event("a.jpg"))[0] == 200
    output = tmp_path / "dest" / "a.webp"
    wait_for(lambda: service.counters.acked == 1, "the first event")
    before = output.stat()
    assert post(service.url, s3_event("a.jpg"))[0] == 200  # redelivered, or sent twice
    wait_for(lambda: service.counters.acked == 2, "the duplicate")
    after = output.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert service.counters.converted == 1 and service.counters.duplicates == 1


def test_a_poison_image_is_dead_lettered_after_max_attempts_and_the_service_goes_on(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    (tmp_path / "src" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not a jpeg" * 20)
    age(tmp_path / "src")
    photo(tmp_path / "src" / "good.jpg")
    service = running(max_attempts=2)
    assert post(service.url, s3_event("bad.jpg"))[0] == 200
    wait_for(lambda: service.counters.dead_lettered == 1, "the dead letter")
    queue = EventQueue.open(tmp_path / "dest")
    try:
        (dead,) = queue.dead_letters()
    finally:
        queue.close()
    # One line: the key, the reason, the codec's message.
    assert dead.reason.startswith("bad.jpg: truncated: ") and "\n" not in dead.reason
    assert manifest_rows(tmp_path / "dest")["bad.jpg"]["attempts"] == 2
    assert service.counters.failed == 2  # tried twice (--max-attempts 2), not more
    assert post(service.url, s3_event("good.jpg"))[0] == 200
    wait_for((tmp_path / "dest" / "good.webp").exists, "the next image")
    # A new event for the known-bad image is dead-lettered at once, not tried again.
    assert post(service.url, s3_event("bad.jpg"))[0] == 200
    wait_for(lambda: service.counters.dead_lettered == 2, "the second dead letter")
    assert (
        service.counters.failed == 3
        and manifest_rows(tmp_path / "dest")["bad.jpg"]["attempts"] == 2
    )


def test_a_removed_source_takes_its_output_with_delete(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    source = photo(tmp_path / "src" / "a.jpg")
    photo(tmp_path / "src" / "b.jpg", seed=1)
    service = running(delete=True)
    for key in ("a.jpg", "b.jpg"):
        assert post(service.url, s3_event(key))[0] == 200
    wait_for(lambda: service.counters.acked == 2, "both converted")
    source.unlink()
    assert post(service.url, s3_event("a.jpg", "ObjectRemoved:Delete"))[0] == 200
    wait_for(lambda: service.counters.removed == 1, "the removal")
    assert not (tmp_path / "dest" / "a.webp").exists()
    assert (tmp_path / "dest" / "b.webp").exists()
    assert set(manifest_rows(tmp_path / "dest")) == {"b.jpg"}


def test_without_delete_a_removed_source_keeps_its_output(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    source = photo(tmp_path / "src" / "a.jpg")
    service = running()
    assert post(service.url, s3_event("a.jpg"))[0] == 200
    wait_for(lambda: service.counters.acked == 1, "converted")
    source.unlink()
    assert post(service.url, s3_event("a.jpg", "ObjectRemoved:Delete"))[0] == 200
    wait_for(lambda: service.counters.acked == 2, "the removal event")
    assert (tmp_path / "dest" / "a.webp").exists() and service.counters.removed == 0


def test_an_output_written_beside_its_source_never_triggers_its_own_conversion(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    site = tmp_path / "site"
    photo(site / "a.jpg")
    # In place (SRC is DEST, --name append): a.jpg -> a.jpg.webp beside it.
    service = running(site, site, name="append", reencode_webp=True)
    assert post(service.url, s3_event("a.jpg"))[0] == 200
    wait_for(lambda: service.counters.acked == 1, "converted")
    assert (site / "a.jpg.webp").exists()
    # The store tells of the new object, the output: it is passed over, not converted.
    assert post(service.url, s3_event("a.jpg.webp"))[0] == 200
    wait_for(lambda: service.counters.acked == 2, "the output's event")
    assert service.counters.converted == 1 and service.counters.ignored == 1
    assert not (site / "a.jpg.webp.webp").exists()


def test_events_for_dest_inside_src_are_outputs_not_sources(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    site = tmp_path / "site"
    photo(site / "a.jpg")
    service = running(site, site / "webp")
    assert post(service.url, s3_event("a.jpg"))[0] == 200
    wait_for(lambda: service.counters.acked == 1, "converted")
    assert post(service.url, s3_event("webp/a.webp"))[0] == 200
    assert post(service.url, s3_event("webp/.optimizr/manifest.sqlite"))[0] == 200
    wait_for(lambda: service.counters.acked == 3, "the outputs' events")
    assert service.counters.converted == 1 and service.counters.ignored == 2


# -- the CLI as a process: signals ------------------------------------------------------------


class cli_service:  # noqa: N801 - used as a context manager, like open()
    """``optimizr watch`` as a process of its own session (killed by its group id)."""

    def __init__(self, tmp_path: Path, *args: str, faults: str = "", port: int = 0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {**os.environ, "OPTIMIZR_TEST_FAULTS": faults}
        command = [
            sys.executable,
            "-m",
            "optimizr",
            "watch",
            "--events",
            self.url,
            str(tmp_path / "src"),
            str(tmp_path / "dest"),
            "--workers",
            "1",
            "--log-format",
            "json",
            *args,
        ]
        self.log = open(tmp_path / f"watch-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )

    def __enter__(self) -> tuple[subprocess.Popen[bytes], str]:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited: {self.process.returncode}")
            try:
                return get(self.url + "readyz")[0] == 200
            except OSError:
                return False

        wait_for(ready, "the service to be ready")
        return self.process, self.url

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(WAIT)
        self.log.close()


def busy(url: str) -> bool:
    """Is an image in a worker now (its /healthz says so)?"""
    try:
        return bool(json.loads(get(url + "healthz")[1]).get("running"))
    except (OSError, ValueError):
        return False


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_drains_the_image_in_flight_stops_taking_events_and_exits_0(
    tmp_path: Path,
) -> None:
    held = photo(tmp_path / "src" / "held.jpg")
    with cli_service(tmp_path, faults="hold-1:held.jpg") as (process, url):
        assert post(url, s3_event("held.jpg"))[0] == 200
        wait_for(lambda: busy(url), "the image in its worker")
        process.send_signal(signal.SIGTERM)
        # The door closes first: the store keeps new events and retries them later.
        wait_for(lambda: port_closed(int(url.rsplit(":", 1)[1].strip("/"))), "the port closed")
        assert process.poll() is None  # still finishing the image in flight
        Path(f"{held}.release").touch()
        assert process.wait(WAIT) == 0
    assert (tmp_path / "dest" / "held.webp").exists()
    assert read_queue_counts(tmp_path / "dest") == (0, 0)  # acknowledged
    state = read_watch_state(tmp_path / "dest")
    assert state is not None and state["state"] == "stopped"
    assert state["counters"]["converted"] == 1


def test_sigterm_with_an_image_that_outlasts_grace_exits_0_and_keeps_its_event(
    tmp_path: Path,
) -> None:
    photo(tmp_path / "src" / "held.jpg")
    with cli_service(tmp_path, "--grace", "1", faults="hold-1:held.jpg") as (process, url):
        assert post(url, s3_event("held.jpg"))[0] == 200
        wait_for(lambda: busy(url), "the image in its worker")
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    assert not (tmp_path / "dest" / "held.webp").exists()
    assert read_queue_counts(tmp_path / "dest") == (1, 0)  # waiting for the next start


def test_killed_mid_image_then_restarted_converts_the_queued_event_exactly_once(
    tmp_path: Path,
) -> None:
    photo(tmp_path / "src" / "held.jpg")
    with cli_service(tmp_path, faults="hold-1:held.jpg") as (process, url):
        assert post(url, s3_event("held.jpg"))[0] == 200  # 2xx: durably queued
        wait_for(lambda: busy(url), "the image in its worker")
        os.killpg(process.pid, signal.SIGKILL)  # the service and its worker, mid-image
        process.wait(WAIT)
    output = tmp_path / "dest" / "held.webp"
    assert not output.exists()
    assert read_queue_counts(tmp_path / "dest") == (1, 0)
    restart = subprocess.run(
        [
            sys.executable,
            "-m",
            "optimizr",
            "watch",
            "--events",
            f"http://127.0.0.1:{free_port()}/",
            "--once",
            "--workers",
            "1",
            str(tmp_path / "src"),
            str(tmp_path / "dest"),
        ],
        capture_output=True,
        timeout=WAIT,
        check=False,
    )
    assert restart.returncode == 0, restart.stderr.decode()
    assert output.exists() and read_queue_counts(tmp_path / "dest") == (0, 0)
    state = read_watch_state(tmp_path / "dest")
    assert state is not None
    assert state["counters"]["converted"] == 1 and state["counters"]["acked"] == 1
    assert manifest_rows(tmp_path / "dest")["held.jpg"]["status"] == "done"


def test_a_second_service_on_one_dest_is_refused(tmp_path: Path) -> None:
    photo(tmp_path / "src" / "a.jpg")
    with cli_service(tmp_path):
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "optimizr",
                "watch",
                "--events",
                f"http://127.0.0.1:{free_port()}/",
                str(tmp_path / "src"),
                str(tmp_path / "dest"),
            ],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
    assert second.returncode == 3
    assert "another optimizr run is converting into" in second.stderr.decode()


# -- the command line -------------------------------------------------------------------------


def test_a_malformed_broker_url_is_refused_with_a_clear_line(
    cli: Callable[..., Any], tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    for url, reason in (
        ("redis://127.0.0.1:1/uploads", "no consumer group (add ?group=GROUP)"),
        ("nats://127.0.0.1:1/S", "the path must be /STREAM/CONSUMER"),
        ("ftp://example/", "not a broker URL"),
    ):
        result = cli("watch", "--events", url, tmp_path / "src", tmp_path / "dest")
        assert result.exit_code == 2
        assert reason in result.output


def test_a_remote_dest_is_taken_for_a_bucket_not_a_folder(
    cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bucket nothing answers for (port 1 of this machine): refused with the reason
    # before any event is taken, and no folder named "s3:" made. The bucket DEST that
    # answers is tests/test_watch_replicas.py's.
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path)
    for name, value in (("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = cli(
        "watch", "--events", "http://127.0.0.1:1/", tmp_path / "src", "s3://bucket/webp",
        "--endpoint-url", "http://127.0.0.1:1", "--s3-path-style", "--region", "us-east-1",
    )  # fmt: skip
    assert result.exit_code == 2 and "s3://bucket/webp cannot be written" in result.output
    assert not (tmp_path / "s3:").exists()


def test_status_shows_the_service(tmp_path: Path, cli: Callable[..., Any]) -> None:
    photo(tmp_path / "src" / "a.jpg")
    with cli_service(tmp_path) as (process, url):
        assert post(url, s3_event("a.jpg"))[0] == 200
        assert post(url, b"garbage")[0] == 400
        wait_for((tmp_path / "dest" / "a.webp").exists, "the WebP")
        wait_for(
            lambda: (read_watch_state(tmp_path / "dest") or {}).get("counters", {}).get("acked"),
            "the state file",
        )
        result = cli("status", tmp_path / "dest")
        assert result.exit_code == 0
        assert f"service   watching {url} (running)" in result.output
        assert "queue     0 waiting, 1 dead letter" in result.output
        assert "dead      e.g. not JSON" in result.output
        doc = json.loads(cli("status", tmp_path / "dest", "--json").output)
        assert doc["watch"]["state"] == "running" and doc["watch"]["dead_letters"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
    result = cli("status", tmp_path / "dest")
    assert f"service   watching {url} (stopped)" in result.output


def test_every_watch_option_is_in_the_readme() -> None:
    from optimizr.cli import watch

    readme = (ROOT / "README.md").read_text()
    own = [opt for param in watch.params for opt in param.opts if opt.startswith("--")]
    assert {"--events", "--once", "--batch", "--retry-delay"} <= set(own)
    assert [opt for opt in own if opt not in readme] == []
    assert "## `optimizr watch`" in readme


# -- the service over the in-memory event source ----------------------------------------------


def test_the_service_over_an_in_memory_broker_settles_every_message_once(
    tmp_path: Path,
) -> None:
    from optimizr.event_sources import MemorySource
    from optimizr.executors.inline import InlineExecutor
    from optimizr.manifest import Manifest
    from optimizr.storage.local import LocalStorage
    from optimizr.watch import Where

    src, dest = tmp_path / "src", tmp_path / "dest"
    for n in range(3):
        photo(src / f"p{n}.jpg", seed=n)
    source = MemorySource(
        [
            s3_event("p0.jpg"),
            b"{not json",
            s3_event("p1.jpg"),
            s3_event("p2.jpg"),
            s3_event("p0.jpg"),
        ]
    )
    dest.mkdir()
    manifest = Manifest.open(dest)
    try:
        service = WatchService(
            WatchConfig(
                events="memory",
                run=RunConfig(src=src, dest=dest),
                once=True,
                batch=2,
            ),
            source,
            src=LocalStorage(src),
            dest=LocalStorage(dest),
            dest_root=dest,
            where=Where(None, ""),
            manifest=manifest,
            executor=InlineExecutor(),
        )
        stats = service.run()
    finally:
        manifest.close()
    assert [json.loads(b)["Records"][0]["s3"]["object"]["key"] for b in source.acked] == [
        "p0.jpg",
        "p1.jpg",
        "p2.jpg",
        "p0.jpg",
    ]
    ((body, reason),) = source.termed
    assert body == b"{not json" and reason.startswith("unparseable message: not JSON")
    assert (stats.converted, stats.duplicates, stats.dead_lettered) == (3, 1, 1)
    assert source.statistics().received == 5 and source.depth() == 0
    assert sorted(p.name for p in dest.glob("*.webp")) == ["p0.webp", "p1.webp", "p2.webp"]


def test_an_excluded_key_is_passed_over_and_acknowledged(
    tmp_path: Path, running: Callable[..., Running]
) -> None:
    photo(tmp_path / "src" / "raw" / "a.jpg")
    photo(tmp_path / "src" / "b.jpg", seed=1)
    service = running(exclude=("raw/**",))
    assert post(service.url, s3_event("raw/a.jpg"))[0] == 200
    assert post(service.url, s3_event("b.jpg"))[0] == 200
    wait_for(lambda: service.counters.acked == 2, "both settled")
    assert not (tmp_path / "dest" / "raw" / "a.webp").exists()
    assert (tmp_path / "dest" / "b.webp").exists()
    assert service.counters.converted == 1 and service.counters.ignored == 1


class _Recording:
    """A MemorySource that logs its calls in order: "r<n>" a receive that returned n
    messages, "a<n>" an ack_all of n (and runs a hook on a given receive)."""

    def __init__(self, bodies: list[bytes], on_receive: Callable[[int], None] | None = None):
        from optimizr.event_sources import MemorySource

        recording = self

        class Source(MemorySource):
            def receive(self, max_messages: int, timeout: float) -> list[Message]:
                got = super().receive(max_messages, timeout)
                recording.calls.append(f"r{len(got)}")
                if recording.on_receive is not None:
                    recording.on_receive(len(recording.calls))
                return got

            def ack_all(self, messages: Sequence[Message]) -> None:
                recording.calls.append(f"a{len(messages)}")
                super().ack_all(messages)

        self.calls: list[str] = []
        self.on_receive = on_receive
        self.source = Source(bodies)


def _memory_service(
    tmp_path: Path, source: EventSource, src: Storage | None = None, **config: Any
) -> WatchService:
    from optimizr.executors.inline import InlineExecutor
    from optimizr.manifest import Manifest
    from optimizr.storage.local import LocalStorage
    from optimizr.watch import Where

    src_root, dest = tmp_path / "src", tmp_path / "dest"
    dest.mkdir(exist_ok=True)
    return WatchService(
        WatchConfig(events="memory", run=RunConfig(src=src_root, dest=dest), **config),
        source,
        src=src or LocalStorage(src_root),
        dest=LocalStorage(dest),
        dest_root=dest,
        where=Where(None, ""),
        manifest=Manifest.open(dest),
        executor=InlineExecutor(),
    )


def test_after_a_full_batch_the_next_is_received_while_it_converts_and_acks_go_together(
    tmp_path: Path,
) -> None:
    for n in range(5):
        photo(tmp_path / "src" / f"p{n}.jpg", seed=n)
    recording = _Recording([s3_event(f"p{n}.jpg") for n in range(5)])
    service = _memory_service(tmp_path, recording.source, once=True, batch=2)
    try:
        stats = service.run()
    finally:
        service.manifest.close()
    # The second receive (the batch received ahead) comes before the first batch's
    # acks, which go in one ack_all; the short last batch is not followed by a receive
    # ahead, and the final, empty receive waits for its acks (so --once misses nothing
    # a nak would have put back).
    assert recording.calls == ["r2", "r2", "a2", "r1", "a2", "a1", "r0"]
    assert stats.converted == 5 and stats.acked == 5
    assert sorted(recording.source.acked) == sorted(s3_event(f"p{n}.jpg") for n in range(5))


def test_an_empty_batch_received_ahead_is_not_believed_by_once(tmp_path: Path) -> None:
    """The batch received ahead came back empty, but meanwhile a message was nak'd with
    no delay: --once must look again, after the acks, rather than stop there."""
    from optimizr.storage.local import LocalStorage

    for n in range(2):
        photo(tmp_path / "src" / f"p{n}.jpg", seed=n)
    ahead_received = threading.Event()
    recording = _Recording(
        [s3_event("p0.jpg"), s3_event("p1.jpg")],
        on_receive=lambda calls: ahead_received.set() if calls == 2 else None,
    )

    class OnceUnreadable(LocalStorage):
        """p1.jpg's first stat fails (a store that hiccups), after the receive ahead."""

        failed = False

        def stat(self, key: str) -> Any:
            if key == "p1.jpg" and not self.failed:
                self.failed = True
                assert ahead_received.wait(WAIT), "no batch was received ahead"
                raise OSError(5, "Input/output error")
            return super().stat(key)

    service = _memory_service(
        tmp_path,
        recording.source,
        src=OnceUnreadable(tmp_path / "src"),
        once=True,
        batch=2,
        retry_delay=0.0,
    )
    try:
        stats = service.run()
    finally:
        service.manifest.close()
    assert recording.calls == ["r2", "r0", "a1", "r1", "a1", "r0"]
    assert (stats.converted, stats.retried, stats.acked) == (2, 1, 2)
    assert (tmp_path / "dest" / "p1.webp").exists()


def test_a_drain_hands_back_the_batch_received_ahead_unconverted(tmp_path: Path) -> None:
    for n in range(4):
        photo(tmp_path / "src" / f"p{n}.jpg", seed=n)
    bodies = [s3_event(f"p{n}.jpg") for n in range(4)]
    service: WatchService | None = None

    def sigterm_on_the_receive_ahead(calls: int) -> None:
        if calls == 2:  # the batch received while the first converts
            assert service is not None
            service.request_stop(signal.SIGTERM)

    recording = _Recording(bodies, on_receive=sigterm_on_the_receive_ahead)
    service = _memory_service(tmp_path, recording.source, batch=2)
    try:
        service.run()
    finally:
        service.manifest.close()
    source = recording.source
    handed_back = [body for body, _deliveries in source._ready]
    assert sorted(handed_back[-2:]) == sorted(bodies[2:]), "the batch received ahead"
    assert not set(bodies[2:]) & set(source.acked)
    # Every event is either done (acked) or waiting again, none lost, none twice.
    assert sorted(source.acked + handed_back) == sorted(bodies)
    assert recording.calls[:2] == ["r2", "r2"]
    assert not (tmp_path / "dest" / "p2.webp").exists()
    assert not (tmp_path / "dest" / "p3.webp").exists()


def test_the_webhook_queue_acks_a_batch_in_one_transaction(tmp_path: Path) -> None:
    from optimizr.event_sources import QueueSource

    (tmp_path / "dest").mkdir()
    queue = EventQueue.open(tmp_path / "dest")
    try:
        for n in range(5):
            queue.put(s3_event(f"p{n}.jpg"))
        source = QueueSource(queue, lease=60.0)
        got = source.receive(10, 0.0)
        statements: list[str] = []
        queue.conn.set_trace_callback(statements.append)
        source.ack_all(got[:4])
        queue.conn.set_trace_callback(None)
        assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == [
            "BEGIN IMMEDIATE",
            "COMMIT",
        ]
        assert (source.statistics().acked, queue.depth()) == (4, 1)
        with pytest.raises(RuntimeError, match="settled twice"):
            got[0].ack()
    finally:
        queue.close()
    assert read_queue_counts(tmp_path / "dest") == (1, 0)
