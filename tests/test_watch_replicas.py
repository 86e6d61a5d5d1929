"""``optimizr watch`` into a bucket, by several replicas of the service at once.

Replicas (Kubernetes pods) consume one queue and write one DEST bucket; each keeps its
own manifest in its own --state-dir. Against the session's real SeaweedFS
(``s3_server``), through the tests' FaultProxy, which records every request the store
answered: so a test counts the PUTs of an output that landed (200) and those whose
If-None-Match lost (412).

The race is made real, not sequential: the replicas' executor converts, then waits at
a barrier both replicas share, so that both hold a converted image before either
writes it (``RacingExecutor``: test code, as the fault injectors are).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from broker_servers import RedisTopic, Server
from conftest import photo_array
from faultproxy import FaultProxy
from optimizr.config import RunConfig
from optimizr.errors import DestBusy
from optimizr.event_sources import MemorySource
from optimizr.executors.base import Job, Outcome, Wakeup
from optimizr.executors.inline import InlineExecutor
from optimizr.storage.base import FINGERPRINT_METADATA, OUTPUT_METADATA, SOURCE_ETAG_METADATA
from optimizr.storage.lease import RemoteLease
from optimizr.storage.objectstore import ObjectStorage, StoreOptions, storage_for
from optimizr.storage.urls import parse_location
from optimizr.watch import WatchConfig, WatchStatistics, read_watch_state
from optimizr.watch_setup import run_watch
from servers import SeaweedS3

#: Generous: a busy 2-core machine shared by several test runs.
WAIT = 120.0


@pytest.fixture
def server(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return s3_server


@pytest.fixture
def proxy(server: SeaweedS3) -> Iterator[FaultProxy]:
    with FaultProxy(server.endpoint) as running:
        yield running


@pytest.fixture
def where(server: SeaweedS3) -> tuple[str, str]:
    """(SRC URL, DEST URL): a fresh prefix of the session's bucket."""
    prefix = f"rep-{uuid.uuid4().hex[:10]}"
    return f"s3://{server.bucket}/{prefix}/src", f"s3://{server.bucket}/{prefix}/dest"


def store_of(server: SeaweedS3, url: str) -> ObjectStorage:
    return storage_for(
        parse_location(url), StoreOptions(endpoint_url=server.endpoint, s3_path_style=True)
    )


def jpeg_bytes(seed: int = 0) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(photo_array(160, 120, seed)).save(out, "JPEG", quality=90)
    return out.getvalue()


def s3_event(bucket: str, key: str) -> bytes:
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 1}},
    }
    return json.dumps({"Records": [record]}).encode()


def output_puts(proxy: FaultProxy, key: str) -> list[int]:
    """The statuses of the PUTs of ``key`` (bucket/...) the store answered."""
    return [
        status
        for method, target, status in proxy.statistics().answered
        if method == "PUT" and target.partition("?")[0].endswith(f"/{key}")
    ]


class RacingExecutor(InlineExecutor):
    """Converts in the calling thread, then waits at ``barrier`` before handing the
    outcome on: with one such executor per replica, every replica has converted its
    image before any of them writes it."""

    def __init__(self, barrier: threading.Barrier) -> None:
        super().__init__()
        self.barrier = barrier

    def imap_unordered(self, jobs: Iterable[Job | Wakeup]) -> Iterator[Outcome]:
        for outcome in super().imap_unordered(jobs):
            self.barrier.wait(WAIT)
            yield outcome


def replica_config(src: str, dest: str, state: Path, endpoint: str, consumer: str) -> WatchConfig:
    return WatchConfig(
        events="memory",
        run=RunConfig(
            src=src,
            dest=dest,
            endpoint_url=endpoint,
            s3_path_style=True,
            state_dir=state,
            workers=1,
        ),
        once=True,
        consumer=consumer,
    )


def race(
    server: SeaweedS3, proxy: FaultProxy, src: str, dest: str, tmp_path: Path
) -> tuple[dict[str, WatchStatistics], dict[str, MemorySource]]:
    """Replicas r1 and r2 (state in tmp_path/r1, r2) each given the event of SRC's
    a.jpg, both converting it before either writes: their statistics and sources."""
    key = f"{parse_location(src).prefix}/a.jpg"
    barrier = threading.Barrier(2)
    results: dict[str, WatchStatistics] = {}
    sources: dict[str, MemorySource] = {}
    errors: list[BaseException] = []

    def replica(name: str) -> None:
        # The same event reaches both: a duplicate notification, or a redelivery to
        # another consumer.
        source = sources[name] = MemorySource([s3_event(server.bucket, key)])
        config = replica_config(src, dest, tmp_path / name, proxy.endpoint, name)
        try:
            results[name] = run_watch(config, executor=RacingExecutor(barrier), source=source)
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=replica, args=(name,)) for name in ("r1", "r2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return results, sources


def test_two_replicas_racing_on_one_object_write_it_once(
    server: SeaweedS3, proxy: FaultProxy, where: tuple[str, str], tmp_path: Path
) -> None:
    src, dest = where
    store_of(server, src).write_atomic("a.jpg", jpeg_bytes())
    results, sources = race(server, proxy, src, dest, tmp_path)
    dest_prefix = parse_location(dest).prefix
    # Both sent a conditional PUT of the output; exactly one landed.
    assert sorted(output_puts(proxy, f"{dest_prefix}/a.webp")) == [200, 412]
    assert sorted((s.converted, s.duplicates) for s in results.values()) == [(0, 1), (1, 0)]
    for stats in results.values():
        assert (stats.acked, stats.skipped, stats.failed, stats.retried) == (1, 0, 0, 0)
    assert all(len(source.acked) == 1 for source in sources.values())
    output = store_of(server, dest).read_object("a.webp")
    assert output.data[8:12] == b"WEBP"
    assert OUTPUT_METADATA in output.metadata
    source_etag = store_of(server, src).stat("a.jpg")
    assert source_etag is not None
    assert output.metadata[SOURCE_ETAG_METADATA] == source_etag.etag
    assert FINGERPRINT_METADATA in output.metadata
    # Each replica's manifest goes up under a key of its own: neither clobbers the other.
    state = store_of(server, dest).list_files(".optimizr/replicas")
    assert sorted(state) == ["r1.manifest.sqlite.gz", "r2.manifest.sqlite.gz"]


def test_watch_once_s3_to_s3_converts_and_a_redelivery_is_a_no_op(
    server: SeaweedS3,
    redis_server: Server,
    proxy: FaultProxy,
    where: tuple[str, str],
    tmp_path: Path,
) -> None:
    src, dest = where
    store_of(server, src).write_atomic("b/c.jpg", jpeg_bytes(seed=3))
    key = f"{parse_location(src).prefix}/b/c.jpg"
    out_key = f"{parse_location(dest).prefix}/b/c.webp"
    topic = RedisTopic(redis_server, 30.0, 6)
    try:

        def watch_once(state: Path) -> dict[str, int]:
            command = [
                sys.executable, "-m", "optimizr", "watch", "--events", topic.url, "--once",
                src, dest, "--endpoint-url", proxy.endpoint, "--s3-path-style",
                "--state-dir", str(state), "--workers", "1", "--log-format", "json",
            ]  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, timeout=WAIT, check=False, env=dict(os.environ)
            )
            assert done.returncode == 0, done.stderr.decode()
            doc = read_watch_state(state)
            assert doc is not None
            return dict(doc["counters"])

        topic.publish(s3_event(server.bucket, key))
        first = watch_once(tmp_path / "state")
        assert (first["converted"], first["acked"]) == (1, 1)
        assert output_puts(proxy, out_key) == [200]
        assert store_of(server, dest).read_bytes("b/c.webp")[8:12] == b"WEBP"
        # The same event again, to the same replica, then to a fresh one (no manifest):
        # no second write either time, both acked, both counted duplicates.
        for state in (tmp_path / "state", tmp_path / "fresh"):
            topic.publish(s3_event(server.bucket, key))
            again = watch_once(state)
            assert (again["converted"], again["duplicates"], again["acked"]) == (0, 1, 1)
            assert (again["skipped"], again["failed"]) == (0, 0)
        assert output_puts(proxy, out_key) == [200]
        assert topic.unsettled() == 0
    finally:
        topic.close()


def test_two_replicas_racing_on_a_new_version_of_the_source_replace_its_output_once(
    server: SeaweedS3, proxy: FaultProxy, where: tuple[str, str], tmp_path: Path
) -> None:
    # Both replicas' manifests know a.webp as theirs (one wrote it, the other took it),
    # then the source is replaced and the new version's event reaches both.
    src, dest = where
    out_key = f"{parse_location(dest).prefix}/a.webp"
    store_of(server, src).write_atomic("a.jpg", jpeg_bytes(seed=1))
    race(server, proxy, src, dest, tmp_path)
    assert sorted(output_puts(proxy, out_key)) == [200, 412]
    store_of(server, src).write_atomic("a.jpg", jpeg_bytes(seed=2))
    results, sources = race(server, proxy, src, dest, tmp_path)
    # The replacement is an If-Match PUT on the ETag both listed: one lands.
    assert sorted(output_puts(proxy, out_key)) == [200, 200, 412, 412]
    assert sorted((s.converted, s.duplicates) for s in results.values()) == [(0, 1), (1, 0)]
    assert all(len(source.acked) == 1 for source in sources.values())
    new_etag = store_of(server, src).stat("a.jpg")
    assert new_etag is not None
    marks = store_of(server, dest).read_metadata("a.webp")
    assert marks is not None and marks[SOURCE_ETAG_METADATA] == new_etag.etag


def test_a_second_replica_with_the_same_state_dir_is_refused_another_starts(
    server: SeaweedS3, where: tuple[str, str], tmp_path: Path
) -> None:
    src, dest = where
    seen: list[str] = []

    def start_another(state: Path, consumer: str) -> str:
        config = replica_config(src, dest, state, server.endpoint, consumer)
        try:
            run_watch(config, executor=InlineExecutor(), source=MemorySource())
        except DestBusy as exc:
            return f"busy: {exc}"
        return "started"

    def started(_service: object) -> None:
        # While r1 runs: r2 with r1's state folder (one SQLite file) cannot, r3 with
        # its own can, on the same bucket DEST.
        seen.append(start_another(tmp_path / "r1", "r2"))
        seen.append(start_another(tmp_path / "r3", "r3"))

    config = replica_config(src, dest, tmp_path / "r1", server.endpoint, "r1")
    run_watch(config, executor=InlineExecutor(), source=MemorySource(), on_started=started)
    assert seen[0].startswith("busy: another optimizr run is converting into")
    assert seen[0].endswith("each need a --state-dir of their own")
    assert seen[1] == "started"


def test_a_replica_does_not_start_while_a_batch_run_holds_the_dest(
    server: SeaweedS3, where: tuple[str, str], tmp_path: Path
) -> None:
    src, dest = where
    config = replica_config(src, dest, tmp_path / "r1", server.endpoint, "r1")
    with RemoteLease(store_of(server, dest)):  # what optimizr convert holds
        with pytest.raises(DestBusy, match="a batch optimizr run is converting into"):
            run_watch(config, executor=InlineExecutor(), source=MemorySource())
    stats = run_watch(config, executor=InlineExecutor(), source=MemorySource())
    assert stats.messages == 0
