"""The manifest as evidence: what a re-run skips, redoes and retries, through the library API."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import (
    age,
    assert_manifest_agrees_with_disk,
    decode,
    manifest_rows,
    photo_array,
    save_jpeg,
    save_png,
)
from optimizr import (
    DestBusy,
    EncodeOptions,
    ManifestDamaged,
    RunConfig,
    RunSummary,
    convert_tree,
    read_status,
)
from optimizr.executors import InlineExecutor
from optimizr.lock import RunLock


def run(src: Path, dest: Path, **kwargs: Any) -> RunSummary:
    config = RunConfig(src=src, dest=dest, **kwargs)
    return convert_tree(src, dest, config, executor=InlineExecutor())


@pytest.fixture
def library(tmp_path: Path) -> tuple[Path, Path]:
    """Four photos in two folders, a corrupt JPEG and a text file, dated an hour back."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i, name in enumerate(["a/one.jpg", "a/two.jpg", "b/three.jpg"]):
        save_jpeg(src / name, photo_array(96, 64, seed=i))
    alpha = photo_array(64, 48, seed=9)
    rgba = np.dstack([alpha, np.full((48, 64), 128, "uint8")])
    save_png(src / "b/four.png", rgba)
    (src / "b/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 300)
    (src / "notes.txt").write_text("not an image")
    age(src)
    return src, dest


def test_rows_record_every_source(library: tuple[Path, Path]) -> None:
    src, dest = library
    first = run(src, dest)
    assert (first.converted, first.failed, first.skipped) == (4, 1, 1)
    rows = manifest_rows(dest)
    assert set(rows) == {"a/one.jpg", "a/two.jpg", "b/three.jpg", "b/four.png", "b/bad.jpg",
                         "notes.txt"}  # fmt: skip
    one = rows["a/one.jpg"]
    st = (src / "a/one.jpg").stat()
    assert (one["status"], one["size"], one["mtime_ns"]) == ("done", st.st_size, st.st_mtime_ns)
    assert one["output"] == "a/one.webp"
    assert one["output_size"] == (dest / "a/one.webp").stat().st_size
    assert one["attempts"] == 0 and one["fingerprint"]
    bad = rows["b/bad.jpg"]
    assert bad["status"] == "failed" and bad["attempts"] == 1
    assert bad["error_class"] in ("CorruptImage", "TruncatedImage") and bad["message"]
    assert rows["notes.txt"]["status"] == "skipped"
    assert rows["notes.txt"]["reason"] == "not an image"
    assert_manifest_agrees_with_disk(dest)


def test_rerun_skips_on_evidence_without_opening_the_source(library: tuple[Path, Path]) -> None:
    src, dest = library
    run(src, dest)
    # Same size, same mtime, different bytes: only a run that opened the file
    # could notice. The manifest's evidence says unchanged, so it is not opened.
    one = src / "a/one.jpg"
    st = one.stat()
    one.write_bytes(b"\x00" * st.st_size)
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = run(src, dest)
    assert again.converted == 0
    assert again.skipped_by_reason == {"up to date": 4, "not an image": 1}
    assert again.failed == 1 and again.known_failed == 1
    assert decode(dest / "a/one.webp").size == (96, 64)


def test_changed_source_changed_option_missing_output_are_redone(
    library: tuple[Path, Path],
) -> None:
    src, dest = library
    run(src, dest)
    save_jpeg(src / "a/two.jpg", photo_array(80, 60, seed=5))
    age(src / "a/two.jpg", 60)
    (dest / "b/three.webp").unlink()
    four = dest / "b/four.webp"
    four.write_bytes(four.read_bytes()[:-10])  # altered output: its size no longer matches
    again = run(src, dest)
    assert again.converted == 3
    assert decode(dest / "a/two.webp").size == (80, 60)
    assert_manifest_agrees_with_disk(dest)
    # An option that shapes the output changes the fingerprint: everything is redone...
    assert run(src, dest, encode=EncodeOptions(quality=60)).converted == 4
    # ...while run settings that do not (workers, verify, timeout) redo nothing.
    same = run(src, dest, encode=EncodeOptions(quality=60), verify=True, timeout=30, workers=1)
    assert same.converted == 0 and same.skipped_by_reason["up to date"] == 4
    assert run(src, dest, encode=EncodeOptions(quality=60), force=True).converted == 4


def test_failures_are_known_bad_until_retry_failed_then_max_attempts(
    library: tuple[Path, Path],
) -> None:
    src, dest = library
    run(src, dest)
    again = run(src, dest)
    [known] = [r for r in again.not_converted if r.key == "b/bad.jpg"]
    assert known.status == "failed" and "--retry-failed" in known.message
    assert manifest_rows(dest)["b/bad.jpg"]["attempts"] == 1
    assert run(src, dest, retry_failed=True).known_failed == 0
    assert manifest_rows(dest)["b/bad.jpg"]["attempts"] == 2
    run(src, dest, retry_failed=True)
    assert manifest_rows(dest)["b/bad.jpg"]["attempts"] == 3
    gave_up = run(src, dest, retry_failed=True)
    assert gave_up.known_failed == 1 and gave_up.exit_code == 1
    [known] = [r for r in gave_up.not_converted if r.key == "b/bad.jpg"]
    assert "gave up after 3 attempts" in known.message
    assert manifest_rows(dest)["b/bad.jpg"]["attempts"] == 3
    # A fixed file is new evidence: converted without any flag.
    save_jpeg(src / "b/bad.jpg", photo_array(40, 30))
    age(src / "b/bad.jpg", 60)
    fixed = run(src, dest)
    assert fixed.converted == 1 and fixed.failed == 0 and fixed.exit_code == 0
    assert manifest_rows(dest)["b/bad.jpg"]["status"] == "done"


def test_failed_list_is_the_dead_letter_list(library: tuple[Path, Path]) -> None:
    src, dest = library
    run(src, dest)
    lines = (dest / ".optimizr/failed.jsonl").read_text().splitlines()
    [item] = [json.loads(line) for line in lines]
    assert item["path"] == "b/bad.jpg" and item["attempts"] == 1
    assert item["error_class"] in ("CorruptImage", "TruncatedImage")
    assert item["message"] and item["last_time"].endswith("Z")


def test_sources_modified_just_before_listing_are_not_trusted(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    fresh = save_jpeg(src / "fresh.jpg", photo_array(64, 48))
    coarse_recent = save_jpeg(src / "coarse_recent.jpg", photo_array(64, 48, seed=1))
    coarse_old = save_jpeg(src / "coarse_old.jpg", photo_array(64, 48, seed=2))
    # A future mtime stands for "written in the same clock tick as the listing".
    future = time.time_ns() + 5 * 10**9
    os.utime(fresh, ns=(future, future))
    # Whole-second mtimes come from 1-2 s granularity filesystems: 2 s of doubt.
    now_s = int(time.time())
    os.utime(coarse_recent, (now_s, now_s))
    os.utime(coarse_old, (now_s - 10, now_s - 10))
    assert run(src, dest).converted == 3
    again = run(src, dest)
    redone = {r.key for r in again.not_converted} | set()
    assert again.converted == 2, redone
    assert again.skipped_by_reason == {"up to date": 1}
    rows = manifest_rows(dest)
    assert rows["coarse_old.jpg"]["run_id"] == 1
    assert rows["fresh.jpg"]["run_id"] == rows["coarse_recent.jpg"]["run_id"] == 2


def test_second_run_on_the_same_dest_is_refused(library: tuple[Path, Path]) -> None:
    src, dest = library
    lock = RunLock(dest / ".optimizr")
    lock.acquire()
    try:
        with pytest.raises(DestBusy, match=f"pid {os.getpid()}"):
            run(src, dest)
        status = read_status(dest) if (dest / ".optimizr/manifest.sqlite").exists() else None
        assert status is None  # refused before anything was created
    finally:
        lock.release()
    assert run(src, dest).converted == 4
    assert read_status(dest).lock_holder is None


def test_status_counts_failures_and_bytes(library: tuple[Path, Path]) -> None:
    src, dest = library
    summary = run(src, dest)
    report = read_status(dest)
    assert report.by_status == {"done": 4, "failed": 1, "skipped": 1}
    assert report.bytes_in == summary.bytes_in
    assert report.bytes_out == sum(p.stat().st_size for p in dest.rglob("*.webp"))
    assert report.saved == summary.bytes_in - summary.bytes_out
    [group] = report.failures
    assert group.count == 1 and group.example == "b/bad.jpg" and group.message
    assert report.skipped_by_reason == {"not an image": 1}
    assert report.last_run is not None and report.last_run["exit_code"] == 1


def test_disk_full_fails_files_cleanly_then_a_rerun_completes(
    library: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An injected filesystem that runs out of space part-way through a write."""
    import optimizr.atomic

    src, dest = library
    real_write = os.write
    budget = {"bytes": 1500}

    class FullDisk:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        @staticmethod
        def write(fd: int, data: Any) -> int:
            if budget["bytes"] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            chunk = bytes(data[: budget["bytes"]])
            budget["bytes"] -= len(chunk)
            return real_write(fd, chunk)

    monkeypatch.setattr(optimizr.atomic, "os", FullDisk())
    full = run(src, dest)
    assert full.failed_by_reason["no space left"] >= 3
    assert any("No space left" in r.message for r in full.not_converted)
    for path in dest.rglob("*.webp"):
        decode(path)  # whatever was written is whole
    assert_manifest_agrees_with_disk(dest)
    monkeypatch.undo()  # space freed
    again = run(src, dest)
    assert again.converted == 4 - full.converted
    assert again.failed == 1 and again.known_failed == 1  # only the corrupt JPEG
    assert_manifest_agrees_with_disk(dest)


@pytest.mark.parametrize("damage", ["truncated", "torn page", "empty"])
def test_damaged_manifest_is_refused_then_rebuilt(library: tuple[Path, Path], damage: str) -> None:
    src, dest = library
    run(src, dest)
    path = dest / ".optimizr/manifest.sqlite"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2 + 100])
    elif damage == "torn page":
        page = 4096
        path.write_bytes(data[:page] + os.urandom(page) + data[2 * page :])
    else:
        path.write_bytes(b"")
    outputs = {p: p.stat().st_mtime_ns for p in dest.rglob("*.webp")}
    with pytest.raises(ManifestDamaged, match="--rebuild-manifest"):
        run(src, dest)
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*.webp")} == outputs
    rebuilt = run(src, dest, rebuild_manifest=True)
    assert rebuilt.converted == 0, rebuilt.not_converted
    assert rebuilt.skipped_by_reason["up to date"] == 4
    assert rebuilt.known_failed == 1  # brought back from failed.jsonl
    assert list((dest / ".optimizr").glob("manifest.sqlite.damaged-*"))
    assert_manifest_agrees_with_disk(dest)
    assert run(src, dest).converted == 0


def test_manifest_is_plain_sqlite_in_wal_mode(library: tuple[Path, Path]) -> None:
    src, dest = library
    run(src, dest)
    conn = sqlite3.connect(dest / ".optimizr/manifest.sqlite")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        [(runs,)] = conn.execute("SELECT COUNT(*) FROM runs WHERE finished_at IS NOT NULL")
        assert runs == 1
    finally:
        conn.close()


def test_status_and_dry_run_take_relative_paths(
    library: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = library
    run(src, dest)
    monkeypatch.chdir(dest.parent)
    report = read_status("dest")
    assert report.by_status["done"] == 4
    dry = convert_tree("src", "dest", RunConfig(src=Path("src"), dest=Path("dest"), dry_run=True))
    assert dry.skipped_by_reason["up to date"] == 4 and dry.converted == 0


def test_rows_of_deleted_files_and_folders_are_dropped_excluded_ones_kept(
    library: tuple[Path, Path],
) -> None:
    src, dest = library
    run(src, dest)
    (src / "a/two.jpg").unlink()  # a file gone from a folder still walked
    (src / "b/three.jpg").unlink()  # a whole folder gone...
    (src / "b/four.png").unlink()
    (src / "b/bad.jpg").unlink()
    (src / "b").rmdir()
    # Folder a is excluded, not deleted: the row of its file that still exists stays.
    # Rows of sources gone whose outputs are still in DEST stay too, as "source
    # deleted", so that the outputs remain known as optimizr's (for --delete).
    run(src, dest, exclude=("a",))
    rows = manifest_rows(dest)
    gone = {"a/two.jpg", "b/three.jpg", "b/four.png"}
    assert set(rows) == {"a/one.jpg", "notes.txt", *gone}
    assert {rows[k]["reason"] for k in gone} == {"source deleted"}
    assert read_status(dest).failures == ()  # b/bad.jpg no longer reported
    assert run(src, dest, delete=True).skipped_by_reason["up to date"] == 1
    assert set(manifest_rows(dest)) == {"a/one.jpg", "notes.txt"}


def test_dest_is_swept_for_temporaries_only_after_an_unfinished_run(
    library: tuple[Path, Path],
) -> None:
    src, dest = library
    run(src, dest)
    planted = dest / "a" / ".one.webp.0badf00d.optimizr-tmp"
    planted.write_bytes(b"half")
    run(src, dest)  # the run before finished cleanly: it cannot have left any
    assert planted.exists()
    conn = sqlite3.connect(dest / ".optimizr/manifest.sqlite")
    with conn:
        conn.execute("UPDATE runs SET finished_at = NULL WHERE id = (SELECT MAX(id) FROM runs)")
    conn.close()
    run(src, dest)  # as after kill -9: the whole of DEST is swept
    assert not planted.exists()
