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
from optimizr.errors import ImageError
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
    # Listed and counted, but no longer new: only --strict fails the run for it.
    assert gave_up.known_failed == 1 and gave_up.new_failed == 0 and gave_up.exit_code == 0
    assert run(src, dest, retry_failed=True, strict=True).exit_code == 1
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


# -- failures decided by the run's settings or by other files: decided again -------------

MB = 1 << 20


def test_memory_budget_refusal_is_decided_again_under_the_current_max_memory(
    tmp_path: Path,
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "huge.jpg", photo_array(4000, 3000, seed=1), quality=50)
    age(src)

    def refused_under(max_memory: int) -> str:
        config = RunConfig(src=src, dest=dest, workers=1, max_memory=max_memory)
        summary = convert_tree(src, dest, config)
        [refused] = summary.not_converted
        assert (refused.key, refused.reason) == ("huge.jpg", "too large")
        assert summary.known_failed == 0  # decided from the header, not replayed
        return refused.message

    assert "--max-memory 120 MiB" in refused_under(120 * MB)
    # The same budget refuses it again, quoting the budget of this run...
    assert "--max-memory 100 MiB" in refused_under(100 * MB)
    assert manifest_rows(dest)["huge.jpg"]["attempts"] == 0  # the image was never tried
    # ...and raising it, as the message advises, converts it: no --retry-failed needed.
    raised = convert_tree(src, dest, RunConfig(src=src, dest=dest, workers=1, max_memory=2 << 30))
    assert raised.converted == 1 and raised.failed == 0 and raised.exit_code == 0
    assert decode(dest / "huge.webp").size == (4000, 3000)


def test_output_conflict_is_decided_again_from_the_files_of_this_run(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    # a.jpeg sorts first and claims a.webp; a.jpg conflicts with it.
    save_jpeg(src / "a.jpeg", photo_array(96, 64, seed=1))
    save_jpeg(src / "a.jpg", photo_array(80, 60, seed=2))
    age(src)
    first = run(src, dest)
    [conflict] = first.not_converted
    assert (conflict.key, conflict.reason) == ("a.jpg", "output conflict")
    again = run(src, dest)  # both still there: still a conflict, decided afresh
    assert [(r.key, r.reason) for r in again.not_converted] == [("a.jpg", "output conflict")]
    assert again.known_failed == 0 and "known bad" not in again.not_converted[0].message
    # The other source left out of this run: nothing claims a.webp but a.jpg.
    alone = run(src, dest, include=("*.jpg",))
    assert alone.converted == 1 and alone.failed == 0
    assert decode(dest / "a.webp").size == (80, 60)
    # A run of both again: the first in name order has the output back.
    save_jpeg(src / "b.jpeg", photo_array(96, 64, seed=3))
    save_jpeg(src / "b.jpg", photo_array(72, 48, seed=4))
    age(src)
    both = run(src, dest)
    assert [(r.key, r.reason) for r in both.not_converted] == [
        ("a.jpg", "output conflict"),
        ("b.jpg", "output conflict"),
    ]
    assert decode(dest / "a.webp").size == (96, 64)
    # The other source deleted: the conflict is gone with it.
    (src / "b.jpeg").unlink()
    gone = run(src, dest)
    assert gone.converted == 1 and [r.key for r in gone.not_converted] == ["a.jpg"]
    assert decode(dest / "b.webp").size == (72, 48)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height over a few bytes of data: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bomb_over_max_pixels_is_told_about_max_pixels_not_max_memory(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "bomb_png_65536x65536.png").write_bytes(png_header_only(65536, 65536))
    # Under --max-pixels, but more than 300 MiB to convert: that one is the budget's call.
    (src / "wide_png_12000x9000.png").write_bytes(png_header_only(12000, 9000))
    age(src)
    config = RunConfig(src=src, dest=dest, workers=1, max_memory=300 * MB)
    summary = convert_tree(src, dest, config)
    assert summary.converted == 0
    by_key = {r.key: r for r in summary.not_converted}
    bomb = by_key["bomb_png_65536x65536.png"]
    assert bomb.reason == "too large" and bomb.error_class == "TooLarge"
    assert "--max-pixels" in bomb.message and "--max-memory" not in bomb.message
    assert "65536x65536" in bomb.message
    wide = by_key["wide_png_12000x9000.png"]
    assert "--max-memory" in wide.message and "--max-pixels" not in wide.message
    # The bomb is too large under these options whatever the budget: known bad.
    again = convert_tree(src, dest, RunConfig(src=src, dest=dest, workers=1, max_memory=2 << 30))
    assert again.known_failed == 1
    [replayed] = [r for r in again.not_converted if r.key == "bomb_png_65536x65536.png"]
    assert "--max-pixels" in replayed.message and "known bad" in replayed.message


def test_every_image_error_states_its_cause_in_the_drawn_tree() -> None:
    import optimizr
    from optimizr import errors

    assert errors.__doc__ is not None
    tree = errors.__doc__.splitlines()
    classes = [getattr(optimizr, n) for n in optimizr.__all__]
    image_errors = [
        c
        for c in classes
        if isinstance(c, type) and issubclass(c, ImageError) and c is not ImageError
    ]
    assert len(image_errors) > 15
    for cls in image_errors:
        [line] = [t for t in tree if f" {cls.__name__} " in t]
        assert line.split()[-1] == cls.cause, cls.__name__
    transient = {c.reason for c in image_errors if c.cause == "transient"}
    assert errors.TRANSIENT == transient and "no space left" in transient
    assert errors.cause_of("OverMemoryBudget", "too large") == "run"
    assert errors.cause_of("TooLarge", "too large") == "image"
    assert errors.cause_of(None, "no space left") == "transient"  # a row with no class


def test_a_run_whose_outputs_are_unconfirmed_leaves_them_to_the_next_run(tmp_path: Path) -> None:
    # A cluster run that lost its scheduler: its workers may have written outputs
    # whose results never reached the manifest. Its figures are kept, but like a
    # killed run it has no finish time, so the next run may take those outputs as
    # its own instead of keeping them as someone else's.
    from optimizr.config import RunConfig
    from optimizr.manifest import Manifest

    dest = tmp_path / "dest"
    dest.mkdir()
    config = RunConfig(src=tmp_path, dest=dest)
    for confirmed, expect_unfinished in ((True, False), (False, True)):
        first = Manifest.open(dest)
        first.begin_run(config, "fp")
        first.finish_run(5, 2, 0, 0, 5, outputs_confirmed=confirmed)
        first.close()
        second = Manifest.open(dest)
        second.begin_run(config, "fp")
        assert (second.unfinished_since() is not None) is expect_unfinished
        assert second.previous_run_finished() is not expect_unfinished
        second.finish_run(0, 0, 0, 0, 0)
        second.close()


def test_the_manifests_page_cache_is_bounded_small_whatever_its_size(tmp_path: Path) -> None:
    """SQLite's default cache (2 MB) filled only once a manifest passed ~9,000 rows, so
    the coordinator's memory rose with the run that long (issue 15: flat from 1,000 to
    20,000 images). The run's connection keeps CACHE_KIB, which a small run fills too."""
    from optimizr.manifest import CACHE_KIB, Manifest

    manifest = Manifest.open(tmp_path)
    try:
        (cache,) = manifest.conn.execute("PRAGMA cache_size").fetchone()
    finally:
        manifest.close()
    assert cache == -CACHE_KIB
    assert CACHE_KIB <= 512
