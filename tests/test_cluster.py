"""--cluster: whole runs on a real Dask scheduler and worker processes (the session's
``dask_cluster``: two one-thread workers under nannies), SeaweedFS as SRC and DEST,
and the faults a cluster meets: a worker killed, an image that kills every worker,
a codec segfault inside a worker, the scheduler lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from conftest import dask_env
from optimizr.config import EncodeOptions, RunConfig
from optimizr.convert import convert_tree
from optimizr.executors.base import Job, Outcome
from optimizr.executors.worker_io import Place, WorkerIO, WorkerRun
from optimizr.storage.base import SourceEntry
from servers import DaskCluster, SeaweedS3, start_dask
from test_remote import keys, prefix, server, store_of, upload_sources, url
from test_summary import VALIDATOR

__all__ = ["prefix", "server"]  # fixtures, used by name

pytest.importorskip("distributed", reason="--cluster needs optimizr[cluster]")


def s3_args(server: SeaweedS3) -> list[str]:
    return ["--endpoint-url", server.endpoint, "--s3-path-style"]


def run_cli(
    server: SeaweedS3, src: str, dest: str, state: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``optimizr convert`` as a user runs it, in its own process (so a test can kill
    the cluster's processes under it): its summary on stdout, its log on stderr."""
    command = [
        sys.executable, "-m", "optimizr", "convert", src, dest, *s3_args(server),
        "--state-dir", str(state), "--summary", "-", "--no-progress", *extra,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def start_cli(
    server: SeaweedS3, src: str, dest: str, state: Path, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    command = [
        sys.executable, "-m", "optimizr", "convert", src, dest, *s3_args(server),
        "--state-dir", str(state), "--summary", str(state / "summary.json"), "--no-progress",
        *extra,
    ]  # fmt: skip
    with log.open("wb") as err:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)


def wait_for_file(path: Path, process: subprocess.Popen[bytes], log: Path) -> str:
    """Poll until ``path`` exists (the run must still be going); its text."""
    deadline = time.monotonic() + 180
    while not path.exists() or not path.read_text():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path.name} never appeared: {log.read_text()}"
        time.sleep(0.05)  # polling for a condition, not racing
    return path.read_text()


def manifest_counts(state: Path) -> dict[str, int]:
    """Rows by status in the run's manifest (the local state of a remote DEST)."""
    [db] = state.rglob("manifest.sqlite")
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT status, count(*) FROM files GROUP BY status").fetchall())


def test_an_s3_to_s3_run_on_the_cluster_is_the_same_as_a_local_run(
    dask_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src_url = url(server, f"{prefix}/in")
    src = store_of(server, src_url)
    names = [f"a/img{n}.jpg" for n in range(5)] + ["b/img5.jpg"]
    upload_sources(src, names)
    src.write_atomic("a/notes.txt", b"not an image")
    local = run_cli(server, src_url, url(server, f"{prefix}/local"), tmp_path / "l", "-j", "2")
    cluster = run_cli(
        server,
        src_url,
        url(server, f"{prefix}/cluster"),
        tmp_path / "c",
        "--cluster",
        dask_cluster.address,
    )
    assert local.returncode == cluster.returncode == 0, cluster.stderr
    one, other = json.loads(local.stdout), json.loads(cluster.stdout)
    VALIDATOR.validate(other)
    for field in ("found", "converted", "skipped", "failed", "skipped_by_reason"):
        assert one["files"][field] == other["files"][field], field
    assert one["bytes"] == other["bytes"]
    local_dest = store_of(server, url(server, f"{prefix}/local"))
    cluster_dest = store_of(server, url(server, f"{prefix}/cluster"))
    outputs = {k for k in keys(cluster_dest) if k.endswith(".webp")}
    assert outputs == {n.replace(".jpg", ".webp") for n in names}
    assert outputs == {k for k in keys(local_dest) if k.endswith(".webp")}
    for key in outputs:  # the same encoder and options: the same bytes
        assert cluster_dest.read_bytes(key) == local_dest.read_bytes(key), key
    per_worker = other["executor"]["per_worker"]
    assert sum(w["images"] for w in per_worker) == len(names) + 1  # the text file went too
    assert all(w["peak_rss_bytes"] > 0 and w["busy_seconds"] > 0 for w in per_worker)
    assert {w["worker"] for w in per_worker} <= set(dask_cluster.workers())
    assert manifest_counts(tmp_path / "c") == {"done": len(names), "skipped": 1}
    # Nothing was fetched by the coordinator: its GETs are the ranged header reads.
    assert other["storage"].get("transfers") is None


def test_a_codec_segfault_fails_that_image_and_the_dask_worker_lives_on(
    dask_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src_url = url(server, f"{prefix}/in")
    names = ["dask-segv.jpg", "one.jpg", "two.jpg"]
    upload_sources(store_of(server, src_url), names)
    before = dask_cluster.wait_for_workers(2)
    done = run_cli(
        server, src_url, url(server, f"{prefix}/out"), tmp_path, "--cluster", dask_cluster.address
    )
    doc = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr
    assert doc["files"]["converted"] == 2
    assert doc["files"]["failed_by_reason"] == {"worker crashed": 1}
    [failure] = [r for r in doc["not_converted"] if r["path"] == "dask-segv.jpg"]
    assert "SIGSEGV" in failure["message"]
    # The child process died, not the Dask worker: the same worker processes serve on.
    assert dask_cluster.workers() == before


def test_a_worker_killed_mid_run_loses_nothing_and_commits_nothing_twice(
    dask_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src_url, dest_url = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    names = [f"img{n:02d}.jpg" for n in range(8)] + ["dask-block.jpg"]
    upload_sources(store_of(server, src_url), names)
    dask_cluster.wait_for_workers(2)
    log = tmp_path / "run.log"
    state = tmp_path / "state"
    state.mkdir()
    process = start_cli(server, src_url, dest_url, state, log, "--cluster", dask_cluster.address)
    try:
        marker = dask_cluster.fault_dir / "dask-block.jpg.blocked"
        pid = int(wait_for_file(marker, process, log))
        os.kill(pid, signal.SIGKILL)  # the Dask worker holding dask-block.jpg
        assert process.wait(timeout=300) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    doc = json.loads((state / "summary.json").read_text())
    assert doc["files"]["converted"] == len(names)
    assert doc["files"]["failed"] == 0
    assert "Dask worker" in log.read_text() and "left the cluster" in log.read_text()
    dest = store_of(server, dest_url)
    assert {k for k in keys(dest) if k.endswith(".webp")} == {
        n.replace(".jpg", ".webp") for n in names
    }
    assert manifest_counts(state) == {"done": len(names)}
    # Each image recorded once: the manifest has one row each, the summary's results
    # add up, and a re-run finds every one done.
    again = run_cli(server, src_url, dest_url, state, "--cluster", dask_cluster.address)
    assert json.loads(again.stdout)["files"]["skipped_by_reason"] == {"up to date": len(names)}
    dask_cluster.wait_for_workers(2)  # its nanny started the killed one again


def test_an_image_that_kills_every_worker_is_worker_crashed_and_the_run_goes_on(
    dask_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src_url = url(server, f"{prefix}/in")
    names = ["dask-killer.jpg", "one.jpg", "two.jpg", "three.jpg"]
    upload_sources(store_of(server, src_url), names)
    dask_cluster.wait_for_workers(2)
    done = run_cli(
        server, src_url, url(server, f"{prefix}/out"), tmp_path, "--cluster", dask_cluster.address
    )
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["files"]["converted"] == 3, (doc["not_converted"], done.stderr)
    [failure] = doc["not_converted"]
    assert (failure["path"], failure["reason"]) == ("dask-killer.jpg", "worker crashed")
    assert "died each time it held this image" in failure["message"]
    dask_cluster.wait_for_workers(2)


def test_a_conversion_over_the_workers_memory_limit_is_worker_crashed_and_the_run_goes_on(
    dask_small_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    """dask-oom.jpg's conversion child grows past what its worker's --memory-limit
    leaves it (the nanny watches the worker process alone, never its children): it
    is stopped on every worker it runs on, alone too, and fails; the others convert."""
    src_url = url(server, f"{prefix}/in")
    names = ["dask-oom.jpg", "one.jpg", "two.jpg", "three.jpg"]
    upload_sources(store_of(server, src_url), names)
    before = dask_small_cluster.wait_for_workers(2)
    done = run_cli(
        server, src_url, url(server, f"{prefix}/out"), tmp_path, "--cluster",
        dask_small_cluster.address,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    VALIDATOR.validate(doc)
    assert doc["files"]["converted"] == 3, (doc["not_converted"], done.stderr)
    [failure] = doc["not_converted"]
    assert (failure["path"], failure["reason"]) == ("dask-oom.jpg", "worker crashed")
    message = failure["message"]
    assert message.startswith("out of memory: its conversion grew to"), message
    assert "the Dask worker's --memory-limit 256 MiB leaves" in message, message
    assert "; 3 attempts, the last alone on tcp://" in message and "\n" not in message
    [said] = [line for line in done.stderr.splitlines() if "dask-oom.jpg" in line]
    assert "out of memory" in said
    # Stopped as often as a worker restarted by its nanny would be: allowed-failures
    # (1 here) + 1 times, then once alone.
    assert doc["executor"]["conversions_over_memory"] == 3
    assert doc["executor"]["memory_restarts"] == 0
    # The children were killed, not the Dask workers: the same processes serve on.
    assert dask_small_cluster.workers() == before


def test_a_worker_restarted_by_its_nanny_over_its_memory_limit_loses_nothing(
    dask_small_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    """The Dask worker that takes dask-leak.jpg grows (the worker process itself, not a
    conversion child) until its nanny restarts it over --memory-limit: the images it
    held, dask-leak.jpg among them, run again elsewhere; none fails, none is
    committed twice, and the run says why the worker went."""
    src_url, dest_url = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    names = ["dask-leak.jpg"] + [f"img{n:02d}.jpg" for n in range(10)]
    upload_sources(store_of(server, src_url), names)
    dask_small_cluster.wait_for_workers(2)
    state = tmp_path / "state"
    done = run_cli(server, src_url, dest_url, state, "--cluster", dask_small_cluster.address)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    VALIDATOR.validate(doc)
    assert doc["files"]["converted"] == len(names), (doc["not_converted"], done.stderr)
    assert doc["files"]["failed"] == 0
    leaked = int((dask_small_cluster.fault_dir / "dask-leak.jpg.leaked").read_text())
    logs = "".join(p.read_text() for p in dask_small_cluster.log_dir.glob("worker-*.log"))
    assert f"(pid={leaked}) exceeded 95% memory budget" in logs  # its nanny restarted it
    assert "restarted by its nanny over its --memory-limit" in done.stderr, done.stderr
    assert doc["executor"]["memory_restarts"] == 1
    assert doc["executor"]["conversions_over_memory"] == 0  # no child was blamed
    dest = store_of(server, dest_url)
    assert {k for k in keys(dest) if k.endswith(".webp")} == {
        n.replace(".jpg", ".webp") for n in names
    }
    assert manifest_counts(state) == {"done": len(names)}
    again = run_cli(server, src_url, dest_url, state, "--cluster", dask_small_cluster.address)
    assert json.loads(again.stdout)["files"]["skipped_by_reason"] == {"up to date": len(names)}
    dask_small_cluster.wait_for_workers(2)  # its nanny started it again


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that says it is ``width`` x ``height`` (its pixels never come): a header."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_an_image_larger_than_every_workers_memory_is_too_large_and_never_submitted(
    dask_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src_url = url(server, f"{prefix}/in")
    src = store_of(server, src_url)
    upload_sources(src, ["small.jpg"])
    src.write_atomic("huge.png", png_header_only(12000, 12000))  # about 415 MiB to convert
    done = run_cli(
        server, src_url, url(server, f"{prefix}/out"), tmp_path, "--cluster", dask_cluster.address
    )
    doc = json.loads(done.stdout)
    assert doc["files"]["converted"] == 1
    [failure] = doc["not_converted"]
    assert (failure["path"], failure["reason"]) == ("huge.png", "too large")
    assert "more than any worker's MEMORY resource (256 MiB)" in failure["message"]
    assert doc["executor"]["started"] == 1  # only small.jpg went to a worker


def test_the_scheduler_lost_mid_run_is_one_error_an_exact_summary_and_a_rerun_resumes(
    server: SeaweedS3, prefix: str, tmp_path: Path, s3_server: SeaweedS3
) -> None:
    # A cluster of its own: this test kills its scheduler.
    cluster = start_dask(tmp_path / "dask", 1, dask_env(s3_server, "block-once:dask-lost.jpg"))
    src_url, dest_url = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    names = ["a0.jpg", "a1.jpg", "dask-lost.jpg", "z0.jpg", "z1.jpg"]
    upload_sources(store_of(server, src_url), names)
    log, state = tmp_path / "run.log", tmp_path / "state"
    state.mkdir()
    try:
        process = start_cli(server, src_url, dest_url, state, log, "--cluster", cluster.address)
        try:
            wait_for_file(cluster.fault_dir / "dask-lost.jpg.blocked", process, log)
            cluster.scheduler.kill()
            code = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        cluster.stop()
    errors = [line for line in log.read_text().splitlines() if "error" in line]
    assert code == 5, log.read_text()
    assert len(errors) == 1 and f"the Dask scheduler {cluster.address} was lost" in errors[0]
    doc = json.loads((state / "summary.json").read_text())
    VALIDATOR.validate(doc)
    assert doc["exit_code"] == 5 and doc["cluster_lost"]
    files = doc["files"]
    assert files["found"] == len(names) and files["failed"] == 0
    assert files["converted"] + files["remaining"] == len(names)
    assert files["remaining"] >= 1  # dask-lost.jpg at least
    committed = manifest_counts(state).get("done", 0)
    assert committed == files["converted"]
    # Another cluster; the re-run converts only what the lost one did not commit.
    again_cluster = start_dask(tmp_path / "dask2", 1, dask_env(s3_server, ""))
    try:
        again = run_cli(server, src_url, dest_url, state, "--cluster", again_cluster.address)
    finally:
        again_cluster.stop()
    assert again.returncode == 0, again.stderr
    files = json.loads(again.stdout)["files"]
    assert files["converted"] == len(names) - committed
    assert files["skipped_by_reason"] == {"up to date": committed}


def test_grace_bounds_how_long_a_stopped_cluster_run_waits(
    server: SeaweedS3, prefix: str, tmp_path: Path, s3_server: SeaweedS3
) -> None:
    """SIGTERM, then --grace 1: an image still converting after it is abandoned (its
    task cancelled, nothing committed) and the run ends, as with the local pool."""
    # A cluster of its own: its one worker stays held by the blocked image.
    cluster = start_dask(tmp_path / "dask", 1, dask_env(s3_server, "block-once:dask-grace.jpg"))
    src_url, dest_url = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    names = ["a0.jpg", "dask-grace.jpg", "z0.jpg"]
    upload_sources(store_of(server, src_url), names)
    log, state = tmp_path / "run.log", tmp_path / "state"
    state.mkdir()
    try:
        args = ("--cluster", cluster.address, "--grace", "1")
        process = start_cli(server, src_url, dest_url, state, log, *args)
        try:
            wait_for_file(cluster.fault_dir / "dask-grace.jpg.blocked", process, log)
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=120)  # without --grace on a cluster: forever
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    finally:
        cluster.stop()
    said = log.read_text()
    assert code == 143, said
    assert "--grace 1s is over:" in said and "in flight abandoned" in said, said
    doc = json.loads((state / "summary.json").read_text())
    VALIDATOR.validate(doc)
    files = doc["files"]
    assert doc["interrupted"] is True
    assert files["converted"] + files["remaining"] == len(names) and files["remaining"] >= 1
    assert manifest_counts(state).get("done", 0) == files["converted"]


def test_cluster_without_distributed_is_one_line_naming_the_extra(
    cli: Callable[..., Result], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "optimizr.executors.dask", raising=False)
    result = cli("convert", str(tmp_path / "in"), str(tmp_path / "out"), "--cluster", "local")
    assert result.exit_code == 2
    assert "pip install 'optimizr[cluster]'" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", ["tcp://nohost", "local:0", "http://x:1", "locals"])
def test_a_malformed_cluster_address_is_a_usage_error(bad: str, tmp_path: Path) -> None:
    from optimizr.errors import UsageError

    with pytest.raises(UsageError, match="--cluster must be"):
        RunConfig(src=tmp_path, dest=tmp_path / "out", cluster=bad)


def test_a_local_cluster_converts_a_folder(tmp_path: Path, make_photo: Callable[..., Path]) -> None:
    src = tmp_path / "src"
    for n in range(3):
        make_photo(f"p{n}.jpg", seed=n)
    config = RunConfig(src=src, dest=tmp_path / "out", cluster="local:2")
    summary = convert_tree(src, tmp_path / "out", config)
    assert summary.converted == 3
    assert sorted(p.name for p in (tmp_path / "out").glob("*.webp")) == [
        "p0.webp",
        "p1.webp",
        "p2.webp",
    ]
    assert summary.executor["cluster"] == "local:2"
    assert len(summary.executor["per_worker"]) >= 1


def local_job(src: Path, dest: Path, key: str, job_id: int) -> Job:
    """A job whose worker reads ``src/key`` and writes into ``dest`` (one filesystem)."""
    stat = (src / key).stat()
    run = WorkerRun(Place(str(src)), Place(str(dest)))
    io = WorkerIO(run, SourceEntry(key, stat.st_size, stat.st_mtime_ns), key + ".webp")
    return Job(job_id, key, "", EncodeOptions(), 1 << 20, io=io)


def test_no_connected_worker_is_seen_and_a_worker_joining_finishes_the_job(
    tmp_path: Path, make_photo: Callable[..., Path], s3_server: SeaweedS3
) -> None:
    from optimizr.executors.dask import DaskExecutor

    make_photo("dask-wait.jpg")
    src, dest = tmp_path / "src", tmp_path / "out"
    dest.mkdir()
    cluster = start_dask(tmp_path / "dask", 1, dask_env(s3_server, "block-once:dask-wait.jpg"))
    try:
        executor = DaskExecutor(cluster.address)
        outcomes: list[Outcome] = []
        thread = threading.Thread(
            target=lambda: outcomes.extend(
                executor.imap_unordered([local_job(src, dest, "dask-wait.jpg", 1)])
            )
        )
        thread.start()
        try:
            marker = cluster.fault_dir / "dask-wait.jpg.blocked"
            deadline = time.monotonic() + 120
            while not marker.exists() or not marker.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.05)  # polling for a condition
            assert executor.statistics().connected == 1
            [nanny] = cluster.nannies
            os.kill(int(marker.read_text()), signal.SIGKILL)
            nanny.kill()  # no nanny to start it again: no worker at all
            nanny.wait()
            while executor.statistics().connected != 0:
                assert time.monotonic() < deadline, "the executor never saw the worker go"
                time.sleep(0.05)
            assert executor.statistics().alive == 0
            cluster.add_worker()  # a worker joins: the image runs again there
            thread.join(timeout=180)
            assert not thread.is_alive()
        finally:
            executor.close()
            thread.join(timeout=30)
    finally:
        cluster.stop()
    [outcome] = outcomes
    assert outcome.error is None and outcome.stored is not None
    assert outcome.stored.status == "written"
    assert (dest / "dask-wait.jpg.webp").stat().st_size == outcome.stored.bytes_out


def test_the_coordinators_low_level_message_log_is_short(
    dask_cluster: DaskCluster, tmp_path: Path, make_photo: Callable[..., Path]
) -> None:
    """distributed keeps the last messages of the client's stream to the scheduler, 1,000
    by default, each submit's task among them: the coordinator's memory rose with the
    run until that log was full (issue 15). It is set before the client connects."""
    from optimizr.executors.dask import LOW_LEVEL_LOG_LENGTH, DaskExecutor

    src, dest = tmp_path / "src", tmp_path / "out"
    dest.mkdir()
    names = [f"p{n:02d}.jpg" for n in range(LOW_LEVEL_LOG_LENGTH + 8)]
    for n, name in enumerate(names):
        make_photo(name, width=32, height=24, seed=n)
    dask_cluster.wait_for_workers(2)
    executor = DaskExecutor(dask_cluster.address)
    try:
        jobs = (local_job(src, dest, name, n) for n, name in enumerate(names, 1))
        outcomes = list(executor.imap_unordered(jobs))
        log = executor.client.scheduler_comm.recent_message_log
    finally:
        executor.close()
    assert len(outcomes) == len(names)
    assert log.maxlen == LOW_LEVEL_LOG_LENGTH
    assert len(log) <= LOW_LEVEL_LOG_LENGTH


def test_at_most_two_tasks_per_worker_thread_are_in_flight_and_futures_are_released(
    dask_cluster: DaskCluster, tmp_path: Path, make_photo: Callable[..., Path]
) -> None:
    from optimizr.executors.dask import DaskExecutor

    src, dest = tmp_path / "src", tmp_path / "out"
    dest.mkdir()
    names = [f"p{n:02d}.jpg" for n in range(24)]
    for n, name in enumerate(names):
        make_photo(name, width=64, height=48, seed=n)
    dask_cluster.wait_for_workers(2)
    executor = DaskExecutor(dask_cluster.address)
    pulled = 0
    in_flight: list[int] = []
    held: list[int] = []

    def jobs() -> Iterator[Job]:
        nonlocal pulled
        for n, name in enumerate(names, 1):
            pulled += 1
            yield local_job(src, dest, name, n)

    try:
        assert executor.window == 4  # two one-thread workers
        outcomes = []
        for outcome in executor.imap_unordered(jobs()):
            outcomes.append(outcome)
            in_flight.append(pulled - len(outcomes))
            held.append(len(executor.client.futures))
    finally:
        executor.close()
    assert sorted(o.job.key for o in outcomes) == names
    assert all(o.error is None and o.stored is not None for o in outcomes)
    assert max(in_flight) <= 4  # the window, never the whole run
    assert max(held) <= 4  # each future let go as its result came
    assert sorted(p.name for p in dest.iterdir()) == [n + ".webp" for n in names]


def test_one_image_is_one_trace_across_the_coordinator_and_the_dask_workers(
    dask_cluster: DaskCluster, server: SeaweedS3, prefix: str, tmp_path: Path, otlp_receiver: Any
) -> None:
    """--otlp-endpoint on a cluster: the image span is the coordinator's; its fetch and
    write spans come from the Dask worker that read and wrote the store, its read,
    decode and encode spans from that worker's conversion child, all in one trace."""
    from otlp_receiver import span_tree

    src_url, dest_url = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    names = [f"img{n}.jpg" for n in range(3)]
    upload_sources(store_of(server, src_url), names)
    done = run_cli(
        server, src_url, dest_url, tmp_path / "s", "--cluster", dask_cluster.address,
        "--otlp-endpoint", otlp_receiver.url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    spans = otlp_receiver.trace_of_run(dest_url)
    tree = span_tree(spans)
    coordinator = next(s for s in spans if s.name == "run").resource["process.pid"]
    images = [s for s in spans if s.name == "image"]
    assert len(images) == len(names), tree
    for image in images:
        assert image.resource["process.pid"] == coordinator
        by_name = {s.name: s for s in spans if s.parent_id == image.span_id}
        assert sorted(by_name) == ["decode", "encode", "fetch", "read", "write"], tree
        worker = by_name["fetch"].resource["process.pid"]
        child = by_name["decode"].resource["process.pid"]
        assert worker == by_name["write"].resource["process.pid"] != coordinator
        assert child == by_name["encode"].resource["process.pid"] not in (worker, coordinator)
        assert by_name["fetch"].end_ns <= by_name["decode"].start_ns
        assert by_name["encode"].end_ns <= by_name["write"].start_ns


def test_the_workers_seen_are_the_schedulers_answer_not_the_clients_cached_identity(
    dask_cluster: DaskCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Client.scheduler_info() fetches the scheduler's identity with every worker into the
    # client's cache, then returns the cache; the client's periodic callback (every
    # distributed.client.scheduler-info-interval, 2 s) refreshes that cache with an
    # identity that lists no worker. When it lands in between, the executor saw no
    # worker at all: "Dask worker ... left the cluster (0 connected)" for each, then
    # "joined" again, tasks submitted without their MEMORY resource meanwhile (seen in
    # `make image-cluster-smoke` on a loaded machine). The fault: that interleaving, made
    # certain by running the periodic refresh right after each fetch.
    from conftest import DASK_MEMORY
    from optimizr.executors.dask import DaskExecutor

    dask_cluster.wait_for_workers(2)
    executor = DaskExecutor(dask_cluster.address)
    try:
        client = executor.client
        fetch = client._update_scheduler_info

        async def fetch_then_the_periodic_refresh(n_workers: int = 0) -> None:
            await fetch(n_workers=n_workers)
            await fetch(n_workers=0)  # what the client's PeriodicCallback runs

        monkeypatch.setattr(client, "_update_scheduler_info", fetch_then_the_periodic_refresh)
        executor._refresh_workers(log=False)
        assert executor.statistics().connected == 2
        assert executor.window == 4  # two one-thread workers
        assert executor.memory_capacity() == DASK_MEMORY
    finally:
        executor.close()


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN that one of ``pids`` holds (Linux)."""
    import socket

    inodes = set()
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:[") : -1])
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            raw = b"".join(
                bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8)
            )
            found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_the_session_cluster_listens_on_127_0_0_1_only(dask_cluster: DaskCluster) -> None:
    # `dask scheduler/worker --no-dashboard` still serve their HTTP routes (/health,
    # /metrics), on every address, the scheduler's on the fixed 8787 (which a second
    # session then finds taken): the tests' servers listen on 127.0.0.1 alone.
    workers = dask_cluster.wait_for_workers(2)
    pids = [dask_cluster.scheduler.pid, *(n.pid for n in dask_cluster.nannies), *workers.values()]
    found = listening_addresses(pids)
    assert len(found) >= 5  # the scheduler's, each nanny's and each worker's
    assert {address for address, _ in found} == {"127.0.0.1"}, sorted(found)
    assert 8787 not in {port for _, port in found}
