"""Prometheus metrics and health checks: the exporter against a fake run, then the real
CLI serving /metrics, /healthz and /readyz while it converts."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from conftest import photo_array, save_jpeg
from optimizr.encode import ImageFacts
from optimizr.errors import UsageError
from optimizr.events import RunSnapshot
from optimizr.metrics.exporter import MetricsExporter
from optimizr.results import Result as FileResult
from optimizr.storage.requests import CAUSES, RequestCounter, StorageStatistics
from test_cli import make_tree, spawn_cli, wait_for

NOW = 1000.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(host: str, port: int, path: str) -> tuple[int, str, bytes]:
    """GET with http.client: no proxy from the environment, and a 503 is an answer."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= have)


def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class FakeRun:
    """Stands in for Pipeline.snapshot: the test sets the state a scrape will see."""

    def __init__(self, **changes: object) -> None:
        self.state = RunSnapshot(
            found=10, walk_done=False, finished=0, converted=0, skipped=0, failed=0,
            bytes_in=0, bytes_out=0, running=0, queued=0, workers=2, workers_alive=0,
            worker_restarts=0, budget_total=1 << 30, budget_in_use=0, draining=False,
            last_progress=NOW,
        )  # fmt: skip
        self.set(**changes)

    def set(self, **changes: object) -> None:
        self.state = replace(self.state, **changes)  # type: ignore[arg-type]

    def __call__(self) -> RunSnapshot:
        return self.state


@pytest.fixture
def served() -> Iterator[tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]]]:
    """An exporter on a free port with a stall timeout of 60 s and a clock at NOW."""
    with MetricsExporter(stall_timeout=60, clock=lambda: NOW) as exporter:
        exporter.serve("127.0.0.1", 0)
        assert exporter.url is not None
        port = int(exporter.url.rpartition(":")[2])
        yield exporter, lambda path: get("127.0.0.1", port, path)


# -- health and readiness ----------------------------------------------------------------------


@pytest.mark.parametrize(("running", "queued"), [(1, 0), (0, 3), (2, 5)])
def test_healthz_is_503_when_nothing_finished_for_the_stall_timeout_with_work_pending(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
    running: int,
    queued: int,
) -> None:
    exporter, get_path = served
    run = FakeRun(running=running, queued=queued, workers_alive=2, last_progress=NOW - 59)
    exporter.started(run)
    status, content_type, body = get_path("/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["status"] == "ok"

    run.set(last_progress=NOW - 61)
    status, _, body = get_path("/healthz")
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "stalled" and "no image finished for 61 s" in doc["reason"]
    assert (doc["running"], doc["queued"], doc["stall_timeout"]) == (running, queued, 60)
    assert doc["seconds_since_progress"] == 61

    run.set(last_progress=NOW, finished=1)  # an image finished: healthy again
    assert get_path("/healthz")[0] == 200
    stats = exporter.statistics()
    assert (stats.health_checks, stats.unhealthy) == (3, 1)


def test_healthz_is_503_while_no_dask_worker_is_connected(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    run = FakeRun(running=1, workers_alive=2, workers_connected=2)
    exporter.started(run)
    assert get_path("/healthz")[0] == 200
    run.set(workers_connected=0, workers_alive=0)  # the cluster's workers are all gone
    status, _, body = get_path("/healthz")
    assert status == 503
    doc = json.loads(body)
    assert doc["status"] == "no workers" and "no Dask worker" in doc["reason"]
    run.set(workers_connected=1, workers_alive=1)
    assert get_path("/healthz")[0] == 200


def test_healthz_is_200_when_idle_or_finished_however_long_ago(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    status, _, body = get_path("/healthz")
    assert status == 200 and json.loads(body)["reason"] == "the run is starting"
    # Nothing running or queued: a slow walk or a finished run is not a stall.
    exporter.started(FakeRun(last_progress=NOW - 10_000, walk_done=True, finished=10))
    status, _, body = get_path("/healthz")
    assert status == 200
    doc = json.loads(body)
    assert doc["status"] == "ok" and doc["reason"].startswith("idle")
    assert doc["finished"] == 10


def test_readyz_waits_for_workers_and_goes_503_while_draining(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    status, _, body = get_path("/readyz")
    assert status == 503 and json.loads(body)["status"] == "starting"
    run = FakeRun(workers_alive=0)
    exporter.started(run)
    status, _, body = get_path("/readyz")
    assert status == 503 and json.loads(body)["reason"] == "no worker is up yet"

    run.set(workers_alive=2)
    status, _, body = get_path("/readyz")
    assert status == 200
    assert json.loads(body) == {
        "status": "ready", "reason": "workers are up", "workers": 2, "workers_alive": 2,
        "finished": 0, "draining": False,
    }  # fmt: skip

    run.set(workers_alive=0, finished=4)  # workers gone after finishing work: still ready
    assert get_path("/readyz")[0] == 200

    run.set(workers_alive=2, draining=True)
    status, _, body = get_path("/readyz")
    assert status == 503 and json.loads(body)["status"] == "draining"
    assert exporter.statistics().not_ready == 3


def test_readyz_goes_503_as_soon_as_the_listener_hears_of_a_stop(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    exporter.started(FakeRun(workers_alive=2))
    assert get_path("/readyz")[0] == 200
    exporter.stopping(hard=False)
    status, _, body = get_path("/readyz")
    assert status == 503 and json.loads(body)["draining"] is True


def test_unknown_paths_are_404(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    assert get_path("/")[0] == 404
    assert get_path("/metricsx")[0] == 404
    assert get_path("/metrics?name=x")[0] == 200
    assert exporter.statistics().not_found == 2


def request(host: str, port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders() if k.lower() != "date"}
        return response.status, headers, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/nothing-here"])
def test_head_answers_like_get_without_a_body(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]], path: str
) -> None:
    exporter, _ = served
    exporter.started(FakeRun(workers_alive=1))
    assert exporter.url is not None
    port = int(exporter.url.rpartition(":")[2])
    got = request("127.0.0.1", port, "GET", path)
    head = request("127.0.0.1", port, "HEAD", path)
    assert got[0] != 501 and got[2]
    # Same status and headers (Content-Length is the GET body's), and no body at all.
    assert head[:2] == got[:2]
    assert int(head[1]["content-length"]) == len(got[2])
    assert head[2] == b""
    # http.client never reads a body after HEAD: on the wire, nothing follows the headers.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        received = b""
        while chunk := raw.recv(65536):
            received += chunk
    _, separator, after = received.partition(b"\r\n\r\n")
    assert separator and after == b""


# -- /metrics ----------------------------------------------------------------------------------


def facts(fmt: str, seconds: float, size_in: int, size_out: int) -> ImageFacts:
    return ImageFacts(
        format=fmt, width_in=64, height_in=48, width_out=64, height_out=48, frames=1,
        bytes_in=size_in, bytes_out=size_out, has_alpha=False, icc_kept=False,
        converted_to_srgb=False, resized=False, seconds=seconds, cpu_seconds=seconds,
    )  # fmt: skip


def test_metrics_count_images_by_status_and_format_and_bytes_of_converted_images(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    exporter.started(FakeRun())
    for result in [
        # A PNG named .jpg: the decoded format wins over the name.
        FileResult("a/photo.jpg", "converted", None, "", "a/photo.webp", 1000, 400,
                   facts("png", 0.2, 1000, 400)),
        FileResult("b.jpg", "converted", None, "", "b.webp", 3000, 1000,
                   facts("jpeg", 3.0, 3000, 1000)),
        FileResult("c.GIF", "failed", "truncated", "ends early"),
        FileResult("notes.txt", "skipped", "not an image"),
        FileResult("d.jpeg", "skipped", "larger than source", "", None, 500),
        FileResult("e.psd.bak", "failed", "not an image"),
    ]:  # fmt: skip
        exporter.finished(result)
    status, content_type, body = get_path("/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    samples = parse(body.decode())
    images = "optimizr_images_total"
    assert value(samples, images, status="converted", format="png") == 1
    assert value(samples, images, status="converted", format="jpeg") == 1
    assert value(samples, images, status="failed", format="gif") == 1
    assert value(samples, images, status="failed", format="other") == 1
    assert value(samples, images, status="skipped", format="other") == 1
    assert value(samples, images, status="skipped", format="jpeg") == 1
    assert total(samples, images) == 6
    # As in the summary: a skipped source's size is not "bytes in".
    assert value(samples, "optimizr_bytes_in_total") == 4000
    assert value(samples, "optimizr_bytes_out_total") == 1400
    assert value(samples, "optimizr_image_seconds_count") == 2
    assert value(samples, "optimizr_image_seconds_sum") == pytest.approx(3.2)
    assert value(samples, "optimizr_image_seconds_bucket", le="0.25") == 1
    assert value(samples, "optimizr_image_seconds_bucket", le="2.5") == 1
    assert value(samples, "optimizr_image_seconds_bucket", le="5.0") == 2
    assert exporter.statistics().scrapes == 1


def test_gauges_are_read_from_the_snapshot_at_scrape_time(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    before = parse(get_path("/metrics")[2].decode())
    assert ("optimizr_images_in_flight", frozenset()) not in before  # no run yet
    run = FakeRun(running=2, queued=7, workers_alive=2, budget_in_use=300 << 20,
                  worker_restarts=1, last_progress=NOW - 4)  # fmt: skip
    exporter.started(run)
    samples = parse(get_path("/metrics")[2].decode())
    assert value(samples, "optimizr_images_in_flight") == 2
    assert value(samples, "optimizr_images_queued") == 7
    assert value(samples, "optimizr_workers") == 2
    assert value(samples, "optimizr_workers_alive") == 2
    assert value(samples, "optimizr_files_found") == 10
    assert value(samples, "optimizr_walk_done") == 0
    assert value(samples, "optimizr_memory_budget_bytes") == 1 << 30
    assert value(samples, "optimizr_memory_budget_in_use_bytes") == 300 << 20
    assert value(samples, "optimizr_worker_restarts_total") == 1
    assert value(samples, "optimizr_seconds_since_progress") == 4
    assert value(samples, "optimizr_draining") == 0
    # The next scrape sees the new state without anyone telling the exporter.
    run.set(running=1, queued=0, walk_done=True, found=12, workers_alive=1, draining=True)
    samples = parse(get_path("/metrics")[2].decode())
    assert value(samples, "optimizr_images_in_flight") == 1
    assert value(samples, "optimizr_images_queued") == 0
    assert value(samples, "optimizr_files_found") == 12
    assert value(samples, "optimizr_walk_done") == 1
    assert value(samples, "optimizr_workers_alive") == 1
    assert value(samples, "optimizr_draining") == 1


def test_each_exporter_has_its_own_registry() -> None:
    first, second = MetricsExporter(), MetricsExporter()
    first.finished(FileResult("a.jpg", "failed", "truncated"))
    assert total(parse(first.render().decode()), "optimizr_images_total") == 1
    assert total(parse(second.render().decode()), "optimizr_images_total") == 0
    assert REGISTRY.get_sample_value("optimizr_images_total") is None


def test_textfile_is_written_atomically_with_the_same_metrics(tmp_path: Path) -> None:
    exporter = MetricsExporter(labels={"dest": "/d"})
    exporter.started(FakeRun(workers_alive=1))
    exporter.finished(FileResult("a.jpg", "failed", "truncated"))
    target = tmp_path / "textfile" / "optimizr.prom"
    exporter.write_textfile(target, exit_code=1, started_at=100.0, finished_at=160.5)
    samples = parse(target.read_text())
    assert value(samples, "optimizr_images_total", status="failed", format="jpeg", dest="/d") == 1
    assert value(samples, "optimizr_workers_alive", dest="/d") == 1
    assert value(samples, "optimizr_last_run_duration_seconds", dest="/d") == 60.5
    # Served metrics carry no run labels: the scrape configuration names the target.
    assert value(parse(exporter.render().decode()), "optimizr_workers_alive") == 1
    assert [p.name for p in target.parent.iterdir()] == ["optimizr.prom"]


def storage_stats(
    store: str, requests: list[tuple[str, float]], **counts: int
) -> StorageStatistics:
    """A store's statistics after ``requests`` ((op, seconds) attempts), counted by the
    storage's own RequestCounter; ``counts``: retries as op_cause=n, failures as op=n."""
    counter = RequestCounter()
    for op, seconds in requests:
        counter.observe(op, seconds)
    for name, n in counts.items():
        op, _, cause = name.partition("_")
        for _ in range(n):
            if cause:
                counter.retried(op, cause)
            else:
                counter.failed(op)
    return counter.snapshot(store)


def test_storage_requests_retries_and_latency_are_served_by_store_and_op(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    exporter, get_path = served
    assert "optimizr_storage" not in get_path("/metrics")[2].decode()  # no store, no series
    src = storage_stats(
        "s3://bucket/photos",
        [("get", 0.003), ("get", 0.2), ("get", 0.2), ("list", 0.04)],
        get_throttled=1,
        get_timeout=1,
    )
    dest = storage_stats("s3://bucket/webp", [("put", 1.5), ("put", 70.0)], put=1)
    stores = [src]
    exporter.storage_statistics = lambda: stores
    samples = parse(get_path("/metrics")[2].decode())
    requests, retries = "optimizr_storage_requests_total", "optimizr_storage_retries_total"
    assert value(samples, requests, store="s3://bucket/photos", op="get") == 3
    assert value(samples, requests, store="s3://bucket/photos", op="list") == 1
    get = {"store": "s3://bucket/photos", "op": "get"}
    assert value(samples, retries, **get, cause="throttled") == 1
    assert value(samples, retries, **get, cause="timeout") == 1
    # Every cause is a series from the first request on, zeros included.
    causes = {dict(labels)["cause"] for name, labels in samples if name == retries}
    assert causes == set(CAUSES)
    assert value(samples, retries, **get, cause="connection") == 0
    seconds = "optimizr_storage_request_seconds"
    assert value(samples, f"{seconds}_bucket", **get, le="0.005") == 1
    assert value(samples, f"{seconds}_bucket", **get, le="0.25") == 3
    assert value(samples, f"{seconds}_bucket", **get, le="+Inf") == 3
    assert value(samples, f"{seconds}_count", **get) == 3
    assert value(samples, f"{seconds}_sum", **get) == pytest.approx(0.403)
    # Read at scrape time: a store added later is served by the next scrape.
    stores.append(dest)
    samples = parse(get_path("/metrics")[2].decode())
    put = {"store": "s3://bucket/webp", "op": "put"}
    assert value(samples, requests, **put) == 2
    assert value(samples, "optimizr_storage_failures_total", **put) == 1
    assert value(samples, f"{seconds}_bucket", **put, le="60.0") == 1
    assert value(samples, f"{seconds}_bucket", **put, le="+Inf") == 2
    assert total(samples, requests) == 6


def test_storage_series_carry_the_run_labels_in_the_textfile(tmp_path: Path) -> None:
    stats = storage_stats("s3://bucket/webp", [("put", 0.1)], put_throttled=2)
    exporter = MetricsExporter(labels={"dest": "/d"}, storage_statistics=lambda: [stats])
    target = tmp_path / "optimizr.prom"
    exporter.write_textfile(target, exit_code=0, started_at=100.0, finished_at=101.0)
    samples = parse(target.read_text())
    labels = {"dest": "/d", "store": "s3://bucket/webp", "op": "put"}
    assert value(samples, "optimizr_storage_requests_total", **labels) == 1
    assert value(samples, "optimizr_storage_retries_total", **labels, cause="throttled") == 2
    assert value(samples, "optimizr_storage_request_seconds_count", **labels) == 1


# -- the server ----------------------------------------------------------------------------------


def test_serves_only_on_the_address_asked_for() -> None:
    with MetricsExporter() as loopback, MetricsExporter() as everywhere:
        url = loopback.serve("127.0.0.1", 0)
        port = int(url.rpartition(":")[2])
        assert url == f"http://127.0.0.1:{port}"
        assert connects("127.0.0.1", port)
        # All of 127/8 reaches this host, but a socket bound to 127.0.0.1 answers only there.
        assert not connects("127.0.0.2", port)
        # The control: the check above can tell the difference.
        other = int(everywhere.serve("0.0.0.0", 0).rpartition(":")[2])
        assert connects("127.0.0.2", other)


def test_close_stops_serving_and_frees_the_port() -> None:
    exporter = MetricsExporter()
    port = int(exporter.serve("127.0.0.1", 0).rpartition(":")[2])
    assert get("127.0.0.1", port, "/healthz")[0] == 200
    exporter.close()
    exporter.close()
    assert exporter.url is None
    assert not connects("127.0.0.1", port)
    with MetricsExporter() as again:  # the same port can be served again at once
        assert again.serve("127.0.0.1", port) == f"http://127.0.0.1:{port}"


def test_a_port_in_use_is_a_usage_error(cli: Callable[..., Result], tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            MetricsExporter().serve("127.0.0.1", port)
        src = tmp_path / "src"
        make_tree(src, 1)
        result = cli("convert", src, tmp_path / "dest", "--no-progress", "--metrics-port", port)
    assert result.exit_code == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.output
    assert not (tmp_path / "dest" / "optimizr-summary.json").exists()


def samples_of(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_textfile_follows_the_batch_job_convention(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    # node_exporter's textfile collector documents batch jobs as: the last run's time,
    # the last success's time (kept while runs fail, so "no success for a day" alerts),
    # and the job's own labels on every series, so several jobs can share one collector.
    src, dest, prom = tmp_path / "src", tmp_path / "dest", tmp_path / "textfile" / "optimizr.prom"
    make_tree(src, 2)
    labels = {"dest": str(dest.resolve()), "job": "photos", "site": "eu-1"}
    args = ["-j", "1", "--no-progress", "--metrics-textfile", prom,
            "--metrics-label", "job=photos", "--metrics-label", "site=eu-1"]  # fmt: skip

    def convert(*extra: str | Path) -> tuple[Result, float, float, str]:
        before = time.time()
        result = cli("convert", src, dest, *args, *extra)
        return result, before, time.time(), prom.read_text()

    result, before, after, text = convert()
    assert result.exit_code == 0, result.output
    families = list(text_string_to_metric_families(text))
    assert families and all(s.labels.items() >= labels.items() for f in families for s in f.samples)
    [(have, ran)] = samples_of(text, "optimizr_last_run_timestamp_seconds")
    assert have == labels and before <= ran <= after
    assert samples_of(text, "optimizr_last_success_timestamp_seconds") == [(labels, ran)]
    assert samples_of(text, "optimizr_last_exit_code") == [(labels, 0)]
    [(_, duration)] = samples_of(text, "optimizr_last_run_duration_seconds")
    assert 0 < duration <= after - before
    succeeded = ran

    # A failed run advances the run's time and exit code, not the last success.
    (src / "d0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    result, before, after, text = convert()
    assert result.exit_code == 1, result.output
    [(_, ran)] = samples_of(text, "optimizr_last_run_timestamp_seconds")
    assert before <= ran <= after and ran > succeeded
    assert samples_of(text, "optimizr_last_exit_code") == [(labels, 1)]
    assert samples_of(text, "optimizr_last_success_timestamp_seconds") == [(labels, succeeded)]

    # A run that stops on a usage error (the metrics port is taken) is a failed run too.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result, before, after, text = convert("--metrics-port", taken.getsockname()[1])
    assert result.exit_code == 2, result.output
    assert samples_of(text, "optimizr_last_exit_code") == [(labels, 2)]
    assert samples_of(text, "optimizr_last_success_timestamp_seconds") == [(labels, succeeded)]
    [(_, ran)] = samples_of(text, "optimizr_last_run_timestamp_seconds")
    assert before <= ran <= after
    assert [p.name for p in prom.parent.iterdir()] == ["optimizr.prom"]


def test_textfile_of_a_job_that_never_succeeded_has_no_success_time(
    cli: Callable[..., Result], tmp_path: Path
) -> None:
    src, prom = tmp_path / "src", tmp_path / "optimizr.prom"
    make_tree(src, 1)
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    # Another job's file at the same path (other labels) lends it no success either.
    prom.write_text('optimizr_last_success_timestamp_seconds{dest="/elsewhere"} 1.7e9\n')
    result = cli("convert", src, tmp_path / "dest", "-j", "1", "--no-progress",
                 "--metrics-textfile", prom)  # fmt: skip
    assert result.exit_code == 1, result.output
    text = prom.read_text()
    assert samples_of(text, "optimizr_last_success_timestamp_seconds") == []
    [(labels, code)] = samples_of(text, "optimizr_last_exit_code")
    assert (labels, code) == ({"dest": str((tmp_path / "dest").resolve())}, 1)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("job", "KEY=VALUE"),
        ("=photos", "KEY=VALUE"),
        ("1job=x", "not a valid label name"),
        ("__name__=x", "not a valid label name"),
        ("status=x", "already a label of optimizr's metrics"),
    ],
)
def test_bad_metrics_labels_are_usage_errors(
    cli: Callable[..., Result], tmp_path: Path, label: str, message: str
) -> None:
    src = tmp_path / "src"
    make_tree(src, 1)
    result = cli("convert", src, tmp_path / "dest", "--no-progress",
                 "--metrics-textfile", tmp_path / "m.prom", "--metrics-label", label)  # fmt: skip
    assert result.exit_code == 2
    assert "--metrics-label" in result.output and message in result.output
    assert not (tmp_path / "dest").exists() and not (tmp_path / "m.prom").exists()


def test_textfile_alone_needs_no_server(cli: Callable[..., Result], tmp_path: Path) -> None:
    src, dest, prom = tmp_path / "src", tmp_path / "dest", tmp_path / "optimizr.prom"
    make_tree(src, 3)
    result = cli("convert", src, dest, "-j", "1", "--no-progress", "--metrics-textfile", prom)
    assert result.exit_code == 0, result.output
    assert "metrics: http" not in result.output
    samples = parse(prom.read_text())
    labels = {"dest": str(dest.resolve())}
    assert value(samples, "optimizr_images_total", status="converted", format="jpeg", **labels) == 3


# -- the real CLI --------------------------------------------------------------------------------


def scrape(port: int) -> Samples | None:
    """The metrics now, or None while nothing listens (before the run, or after it)."""
    try:
        status, _, body = get("127.0.0.1", port, "/metrics")
    except ConnectionRefusedError:
        return None
    assert status == 200
    return parse(body.decode())


def health(port: int, path: str) -> tuple[int, dict[str, object]] | None:
    try:
        status, _, body = get("127.0.0.1", port, path)
    except ConnectionRefusedError:
        return None
    return status, json.loads(body)


@pytest.mark.timeout(120)
def test_cli_serves_metrics_during_the_run_and_its_totals_match_the_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest, prom = tmp_path / "src", tmp_path / "dest", tmp_path / "optimizr.prom"
    make_tree(src, 60)
    good = save_jpeg(src / "broken.jpg", photo_array(96, 64, seed=99))
    good.write_bytes(good.read_bytes()[:400])
    (src / "notes.txt").write_text("not an image")
    # One image hangs until --timeout kills its worker: the run cannot end sooner, so
    # the scrape below happens during it; the kill is one more failure to count.
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "hang:img030.jpg")
    port = free_port()
    args = ("-j", "2", "--timeout", "6", "--metrics-port", str(port), "--metrics-textfile", prom,
            "--metrics-linger", "60")  # fmt: skip
    proc = spawn_cli(src, dest, *args)
    try:
        during: list[Samples] = []

        def counted_one() -> bool:
            samples = scrape(port)
            if samples is None or not total(samples, "optimizr_images_total", status="converted"):
                return False
            during.append(samples)
            return True

        wait_for(counted_one)
        [samples] = during
        assert value(samples, "optimizr_workers") == 2
        assert value(samples, "optimizr_files_found") >= 1
        assert value(samples, "optimizr_bytes_in_total") > 0
        assert value(samples, "optimizr_run_finished") == 0

        # --metrics-linger keeps the endpoint up after the run: scrape the final figures.
        def final_figures() -> bool:
            samples = scrape(port)
            if samples is None or not value(samples, "optimizr_run_finished"):
                return False
            during.append(samples)
            return True

        wait_for(final_figures, timeout=90)
        scraped = during[-1]
        proc.send_signal(signal.SIGINT)  # ends the linger early
        out, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, text
    assert f"metrics: http://127.0.0.1:{port}/metrics" in text
    assert not connects("127.0.0.1", port)  # the server went with the run

    doc = json.loads((dest / "optimizr-summary.json").read_text())
    files = doc["files"]
    assert (files["converted"], files["failed"], files["skipped"]) == (59, 2, 1)
    # The last scrape of /metrics and the textfile both equal the summary.
    check_totals(scraped, doc)
    check_totals(parse(prom.read_text()), doc, dest=str(dest.resolve()))


def check_totals(final: Samples, doc: dict[str, Any], **labels: str) -> None:
    images = "optimizr_images_total"
    files = doc["files"]
    assert total(final, images, status="converted") == files["converted"]
    assert total(final, images, status="failed") == files["failed"]
    assert total(final, images, status="skipped") == files["skipped"]
    assert total(final, images) == files["found"]
    assert value(final, "optimizr_files_found", **labels) == files["found"]
    assert value(final, "optimizr_bytes_in_total", **labels) == doc["bytes"]["in"]
    assert value(final, "optimizr_bytes_out_total", **labels) == doc["bytes"]["out"]
    assert value(final, "optimizr_image_seconds_count", **labels) == files["converted"]
    # Truncated, and hung.
    assert value(final, images, status="failed", format="jpeg", **labels) == 2
    assert value(final, images, status="skipped", format="other", **labels) == 1
    # The hung worker was killed and replaced.
    restarts = value(final, "optimizr_worker_restarts_total", **labels)
    assert restarts == doc["executor"]["restarts"] == 1


@pytest.mark.timeout(120)
def test_cli_healthz_reports_a_stalled_run_on_loopback_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    make_tree(src, 3)
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "hang:img001.jpg")  # hangs for --timeout
    port = free_port()
    args = ("-j", "2", "--timeout", "100", "--grace", "0", "--stall-timeout", "0.5")
    proc = spawn_cli(src, dest, *args, "--metrics-port", str(port))
    try:
        stalled: list[dict[str, object]] = []

        def reports_stall() -> bool:
            answer = health(port, "/healthz")
            # A slow worker start-up may look like a stall too: wait for the hung image.
            if answer is None or answer[0] != 503 or answer[1]["finished"] != 2:
                return False
            stalled.append(answer[1])
            return True

        wait_for(reports_stall)
        [doc] = stalled
        assert doc["status"] == "stalled"
        assert (doc["running"], doc["queued"]) == (1, 0)
        # The hung image holds the run open: everything below is asked during it.
        assert health(port, "/readyz") == (
            200,
            {"status": "ready", "reason": "workers are up", "workers": 2, "workers_alive": 2,
             "finished": 2, "draining": False},
        )  # fmt: skip
        assert not connects("127.0.0.2", port)  # bound to 127.0.0.1 by default
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, out.decode()
    assert not connects("127.0.0.1", port)


# -- the machine's CPU counters (the analysis tells contention from slow storage by them) --------


def test_cpu_counters_are_read_for_the_given_cpus_only(tmp_path: Path) -> None:
    from optimizr.metrics.machine import _TICK, read_cpu_times

    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 30 900 9 0 0 6 0 0\n"
        "cpu0 100 0 10 300 3 0 0 2 0 0\n"
        "cpu1 200 5 20 600 6 1 2 4 0 0\n"
        "intr 1 2 3\n"
    )
    times = read_cpu_times(frozenset({1}), stat)
    assert times is not None
    # user + nice + system + irq + softirq; iowait and steal apart; idle not at all.
    assert times.busy == pytest.approx(228 / _TICK)
    assert (times.iowait, times.steal) == (pytest.approx(6 / _TICK), pytest.approx(4 / _TICK))
    both = read_cpu_times(frozenset({0, 1}), stat)
    assert both is not None and both.busy == pytest.approx(338 / _TICK)
    # A CPU the file does not list, or no file: nothing measured rather than a wrong figure.
    assert read_cpu_times(frozenset({0, 7}), stat) is None
    assert read_cpu_times(frozenset({0}), tmp_path / "missing") is None


def test_metrics_count_what_the_quality_search_chose(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    import dataclasses

    exporter, get_path = served
    exporter.started(FakeRun())
    base = facts("jpeg", 0.5, 1000, 400)
    for chosen, probes in (("q72", 3), ("q80", 2), ("lossless", 4), ("near-lossless 60", 5)):
        searched = dataclasses.replace(base, chosen=chosen, probes=probes)
        exporter.finished(FileResult("x.jpg", "converted", None, "", "x.webp", 1000, 400, searched))
    exporter.finished(FileResult("y.jpg", "converted", None, "", "y.webp", 1000, 400, base))
    samples = parse(get_path("/metrics")[2].decode())
    name = "optimizr_quality_search_images_total"
    assert value(samples, name, kind="lossy") == 2
    assert value(samples, name, kind="lossless") == 1
    assert value(samples, name, kind="near_lossless") == 1
    assert value(samples, "optimizr_quality_search_probes_count") == 4
    assert value(samples, "optimizr_quality_search_probes_sum") == 14
    assert value(samples, "optimizr_quality_search_probes_bucket", le="3.0") == 2


def test_metrics_count_size_targets_met_and_not(
    served: tuple[MetricsExporter, Callable[[str], tuple[int, str, bytes]]],
) -> None:
    import dataclasses

    exporter, get_path = served
    exporter.started(FakeRun())
    base = facts("jpeg", 0.5, 1000, 400)
    for met in (True, True, False):
        sized = dataclasses.replace(base, target_met=met, target_encodes=2)
        exporter.finished(FileResult("x.jpg", "converted", None, "", "x.webp", 1000, 400, sized))
    exporter.finished(FileResult("y.jpg", "converted", None, "", "y.webp", 1000, 400, base))
    samples = parse(get_path("/metrics")[2].decode())
    name = "optimizr_target_size_images_total"
    assert value(samples, name, outcome="met") == 2
    assert value(samples, name, outcome="unreachable") == 1
