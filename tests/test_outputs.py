"""What optimizr writes into DEST and what it removes: --name auto, stale outputs,
--if-exists, --delete, --copy-unconverted, --min-saving and WebP sources, through
the library API and the CLI."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import Result as CliResult

from conftest import (
    age,
    assert_manifest_agrees_with_disk,
    manifest_rows,
    photo_array,
    save_jpeg,
    save_png,
)
from optimizr import RunConfig, RunSummary, convert_tree
from optimizr.executors import InlineExecutor


def run(src: Path, dest: Path, **kwargs: Any) -> RunSummary:
    config = RunConfig(src=src, dest=dest, **kwargs)
    return convert_tree(src, dest, config, executor=InlineExecutor())


def files(dest: Path) -> list[str]:
    """Every file in DEST but optimizr's own state and summary."""
    return sorted(
        p.relative_to(dest).as_posix()
        for p in dest.rglob("*")
        if p.is_file() and ".optimizr" not in p.parts and p.name != "optimizr-summary.json"
    )


# ---------------------------------------------------------------- --name auto


def test_output_keys_auto_appends_only_for_sources_that_collide() -> None:
    from optimizr.pipeline import output_keys

    keys = ["d/a.jpg", "d/a.png", "d/b.jpg", "d/c.tar.gz", "d/c.tar.png", "d/x.jpg", "d/x.webp"]
    assert output_keys(keys, "auto") == {
        "d/a.jpg": "d/a.jpg.webp",
        "d/a.png": "d/a.png.webp",
        "d/b.jpg": "d/b.webp",
        "d/c.tar.gz": "d/c.tar.gz.webp",
        "d/c.tar.png": "d/c.tar.png.webp",
        "d/x.jpg": "d/x.jpg.webp",
        # A source already named like its output keeps that name: it is the
        # other one that moves aside.
        "d/x.webp": "d/x.webp",
    }
    assert output_keys(keys[:3], "replace") == {
        "d/a.jpg": "d/a.webp", "d/a.png": "d/a.webp", "d/b.jpg": "d/b.webp"
    }  # fmt: skip
    assert output_keys(keys[:2], "append") == {"d/a.jpg": "d/a.jpg.webp", "d/a.png": "d/a.png.webp"}


def test_name_auto_renames_only_the_colliding_sources(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_png(src / "a.png", photo_array(96, 64, seed=2))
    save_jpeg(src / "b.jpg", photo_array(96, 64, seed=3))
    save_jpeg(src / "sub/a.jpg", photo_array(96, 64, seed=4))
    summary = run(src, dest, name="auto")
    assert summary.converted == 4 and summary.failed == 0
    assert files(dest) == ["a.jpg.webp", "a.png.webp", "b.webp", "sub/a.webp"]
    assert_manifest_agrees_with_disk(dest)


def test_name_auto_follows_the_folder_and_removes_the_output_it_replaces(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_jpeg(src / "b.jpg", photo_array(96, 64, seed=3))
    age(src)
    assert run(src, dest, name="auto").converted == 2
    assert files(dest) == ["a.webp", "b.webp"]
    # a.png arrives: a.jpg's output becomes a.jpg.webp, and the a.webp optimizr
    # wrote for it is no longer anyone's output, so it goes.
    save_png(src / "a.png", photo_array(96, 64, seed=2))
    age(src / "a.png")
    again = run(src, dest, name="auto")
    assert again.converted == 2 and again.skipped_by_reason == {"up to date": 1}
    assert files(dest) == ["a.jpg.webp", "a.png.webp", "b.webp"]
    assert again.outputs.stale_removed == 1
    assert_manifest_agrees_with_disk(dest)
    # Stable: nothing to do next time.
    third = run(src, dest, name="auto")
    assert third.converted == 0 and third.skipped_by_reason == {"up to date": 3}
    # a.png leaves again: a.jpg is a.webp once more. (a.png.webp stays: its
    # source is gone, and only --delete removes such outputs.)
    (src / "a.png").unlink()
    fourth = run(src, dest, name="auto")
    assert fourth.converted == 1
    assert files(dest) == ["a.png.webp", "a.webp", "b.webp"]
    assert run(src, dest, name="auto", delete=True).outputs.deleted_paths == ["a.png.webp"]
    assert files(dest) == ["a.webp", "b.webp"]
    assert_manifest_agrees_with_disk(dest)


def test_switching_from_replace_to_auto_redoes_nothing_that_keeps_its_name(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_jpeg(src / "b.jpg", photo_array(96, 64, seed=3))
    age(src)
    run(src, dest)
    auto = run(src, dest, name="auto")
    assert auto.converted == 0 and auto.skipped_by_reason == {"up to date": 2}


def test_a_name_change_removes_the_outputs_of_the_old_name(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    age(src)
    run(src, dest)
    assert files(dest) == ["a.webp"]
    run(src, dest, name="append")
    assert files(dest) == ["a.jpg.webp"]
    assert_manifest_agrees_with_disk(dest)


def test_an_old_output_changed_by_hand_is_not_removed(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    age(src)
    run(src, dest)
    (dest / "a.webp").write_bytes(b"edited by hand")
    run(src, dest, name="append")
    assert files(dest) == ["a.jpg.webp", "a.webp"]
    assert (dest / "a.webp").read_bytes() == b"edited by hand"


def test_a_source_that_now_fails_keeps_its_earlier_output(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    good = save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    age(src)
    run(src, dest)
    before = (dest / "a.webp").read_bytes()
    good.write_bytes(good.read_bytes()[:300])
    age(good, 60)
    again = run(src, dest)
    assert again.failed == 1 and again.outputs.stale_removed == 0
    assert (dest / "a.webp").read_bytes() == before
    row = manifest_rows(dest)["a.jpg"]
    assert (row["status"], row["output"]) == ("failed", "a.webp")


def test_local_delete_removes_folders_it_empties(tmp_path: Path) -> None:
    from optimizr.storage.local import LocalStorage

    (tmp_path / "a/b/c").mkdir(parents=True)
    (tmp_path / "a/b/c/x.webp").write_bytes(b"x")
    (tmp_path / "a/keep.webp").write_bytes(b"k")
    storage = LocalStorage(tmp_path)
    assert storage.delete("a/b/c/x.webp") and not storage.delete("a/b/c/x.webp")
    assert not (tmp_path / "a/b").exists() and (tmp_path / "a/keep.webp").exists()


def test_webp_and_jpeg_of_one_name_under_auto(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "x.jpg", photo_array(96, 64, seed=1))
    (src / "x.webp").write_bytes(_webp(photo_array(96, 64, seed=2)))
    summary = run(src, dest, name="auto", reencode_webp=True)
    assert summary.failed == 0
    assert files(dest) == ["x.jpg.webp", "x.webp"]
    # Kept as it is, x.webp writes nothing, but x.jpg keeps its name: names do
    # not change with what becomes of a sibling.
    run(src, tmp_path / "d2", name="auto")
    assert files(tmp_path / "d2") == ["x.jpg.webp"]


def test_conflict_message_suggests_name_auto(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_png(src / "a.png", photo_array(96, 64, seed=2))
    [failure] = run(src, dest).not_converted
    assert failure.reason == "output conflict"
    assert "--name auto" in failure.message and "a.jpg.webp" in failure.message


def test_cli_name_auto(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_png(src / "a.png", photo_array(96, 64, seed=2))
    result = cli("convert", src, dest, "--name", "auto", "--no-progress")
    assert result.exit_code == 0, result.output
    assert files(dest) == ["a.jpg.webp", "a.png.webp"]


def _webp(array: Any, **kwargs: Any) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="WEBP", **kwargs)
    return buffer.getvalue()


# ---------------------------------------------------------------- --if-exists


def _foreign_file_beside_a_source(tmp_path: Path) -> tuple[Path, Path, bytes]:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "adobe rgb.jpg", photo_array(96, 64, seed=1))
    save_jpeg(src / "b.jpg", photo_array(96, 64, seed=2))
    age(src)
    mine = _webp(photo_array(40, 30, seed=7))
    (dest).mkdir()
    (dest / "adobe rgb.webp").write_bytes(mine)
    return src, dest, mine


def test_a_file_optimizr_did_not_write_is_kept_and_reported(tmp_path: Path) -> None:
    src, dest, mine = _foreign_file_beside_a_source(tmp_path)
    summary = run(src, dest)
    assert summary.converted == 1 and summary.skipped_by_reason == {"output exists": 1}
    [kept] = summary.not_converted
    assert kept.key == "adobe rgb.jpg" and "adobe rgb.webp" in kept.message
    assert "--if-exists overwrite" in kept.message
    assert (dest / "adobe rgb.webp").read_bytes() == mine
    assert summary.outputs.overwritten == 0
    # Re-runs keep it, and say so each time, without converting the source again.
    again = run(src, dest)
    assert again.skipped_by_reason == {"output exists": 1, "up to date": 1}
    assert (dest / "adobe rgb.webp").read_bytes() == mine
    # Once the file is gone, the source is converted.
    (dest / "adobe rgb.webp").unlink()
    third = run(src, dest)
    assert third.converted == 1 and (dest / "adobe rgb.webp").read_bytes() != mine
    assert_manifest_agrees_with_disk(dest)


def test_if_exists_overwrite_replaces_it_and_counts_it(tmp_path: Path) -> None:
    src, dest, mine = _foreign_file_beside_a_source(tmp_path)
    summary = run(src, dest, if_exists="overwrite")
    assert summary.converted == 2 and summary.outputs.overwritten == 1
    assert (dest / "adobe rgb.webp").read_bytes() != mine
    doc = summary.to_dict()
    assert doc["outputs"]["overwritten"] == 1
    # Now optimizr wrote it: replacing it later is not counted again.
    assert run(src, dest, force=True).outputs.overwritten == 0


def test_kept_file_is_overwritten_when_asked_on_a_later_run(tmp_path: Path) -> None:
    src, dest, mine = _foreign_file_beside_a_source(tmp_path)
    run(src, dest)
    later = run(src, dest, if_exists="overwrite")
    assert later.converted == 1 and later.outputs.overwritten == 1
    assert (dest / "adobe rgb.webp").read_bytes() != mine


def test_force_does_not_overwrite_what_optimizr_did_not_write(tmp_path: Path) -> None:
    src, dest, mine = _foreign_file_beside_a_source(tmp_path)
    forced = run(src, dest, force=True)
    assert forced.skipped_by_reason == {"output exists": 1}
    assert (dest / "adobe rgb.webp").read_bytes() == mine


def test_its_own_outputs_are_replaced_when_the_source_changes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    age(src)
    run(src, dest)
    save_jpeg(src / "a.jpg", photo_array(80, 60, seed=2))
    age(src, 60)
    again = run(src, dest)
    assert again.converted == 1 and again.outputs.overwritten == 0


def _drop_row_and_unfinish(dest: Path, key: str, *, unfinish: bool) -> None:
    import sqlite3

    conn = sqlite3.connect(dest / ".optimizr/manifest.sqlite")
    with conn:
        conn.execute("DELETE FROM files WHERE name = ?", (key,))
        if unfinish:
            conn.execute("UPDATE runs SET finished_at = NULL")
    conn.close()


def test_outputs_of_a_killed_run_whose_rows_were_lost_are_still_its_own(tmp_path: Path) -> None:
    """kill -9 between an output's rename and its row's commit: the file is newer
    than the start of a run that never finished, so it is optimizr's."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    age(src)
    run(src, dest)
    _drop_row_and_unfinish(dest, "a.jpg", unfinish=True)
    again = run(src, dest)
    assert again.converted == 1 and again.outputs.overwritten == 0
    assert_manifest_agrees_with_disk(dest)
    # The same file after a run that did finish is not known to be optimizr's.
    _drop_row_and_unfinish(dest, "a.jpg", unfinish=False)
    assert run(src, dest).skipped_by_reason == {"output exists": 1}


def test_after_rebuild_manifest_an_output_older_than_its_source_is_kept(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    source = save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_jpeg(src / "b.jpg", photo_array(96, 64, seed=2))
    age(src)
    run(src, dest)
    (dest / ".optimizr/manifest.sqlite").write_bytes(b"")
    age(source, 0)  # edited after its output was written: not adopted
    rebuilt = run(src, dest, rebuild_manifest=True)
    assert rebuilt.skipped_by_reason == {"output exists": 1, "up to date": 1}
    [kept] = rebuilt.not_converted
    assert "--rebuild-manifest" in kept.message


def test_cli_if_exists(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    import json

    src, dest, mine = _foreign_file_beside_a_source(tmp_path)
    kept = cli("convert", src, dest, "--no-progress")
    assert kept.exit_code == 0, kept.output
    assert "output exists" in kept.output
    replaced = cli("convert", src, dest, "--no-progress", "--if-exists", "overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert re.search(r"overwritten\s.*1", replaced.output), replaced.output
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["outputs"]["overwritten"] == 1 and doc["options"]["if_exists"] == "overwrite"


# ---------------------------------------------------------------- --min-saving, WebP sources


def test_min_saving_keeps_no_webp_that_saves_too_little(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    photo = save_jpeg(src / "a.jpg", photo_array(160, 120, seed=1), quality=80)
    age(src)
    first = run(src, dest)
    saving = 100 * (1 - (dest / "a.webp").stat().st_size / photo.stat().st_size)
    assert 1 < saving < 99
    # Asking for more than it saves: no output, said why; the old output goes.
    strict = run(src, dest, min_saving=saving + 1)
    [result] = strict.not_converted
    assert result.reason == "small saving" and f"--min-saving {saving + 1:g}%" in result.message
    assert files(dest) == [] and first.converted == 1
    # Asking for less keeps it (min_saving shapes outputs: it is in the fingerprint).
    assert run(src, dest, min_saving=saving - 1).converted == 1
    assert files(dest) == ["a.webp"]


def test_min_saving_is_validated() -> None:
    import pytest

    from optimizr import UsageError

    for bad in (-1, 100, 250):
        with pytest.raises(UsageError, match="--min-saving"):
            RunConfig(src=Path("a"), dest=Path("b"), min_saving=bad)
    with pytest.raises(UsageError, match="--if-larger write"):
        RunConfig(src=Path("a"), dest=Path("b"), min_saving=5, if_larger="write")


def test_webp_sources_are_kept_as_they_are_unless_asked(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "art").mkdir(parents=True)
    lossless = _webp(photo_array(64, 48, seed=3), lossless=True)
    (src / "art/lossless.webp").write_bytes(lossless)
    (src / "art/named-jpg.jpg").write_bytes(lossless)  # detected by content, not by name
    save_jpeg(src / "art/photo.jpg", photo_array(96, 64, seed=1))
    age(src)
    summary = run(src, dest)
    assert summary.converted == 1 and summary.skipped_by_reason == {"already webp": 2}
    reasons = {r.key: r for r in summary.not_converted}
    assert "--reencode-webp" in reasons["art/lossless.webp"].message
    assert files(dest) == ["art/photo.webp"]
    # Asked: re-encoded (the option shapes outputs, so it is in the fingerprint
    # and the photo is redone too).
    again = run(src, dest, reencode_webp=True)
    assert again.converted == 3
    assert files(dest) == ["art/lossless.webp", "art/named-jpg.webp", "art/photo.webp"]
    # And back: the re-encoded outputs are no longer wanted.
    back = run(src, dest)
    assert back.skipped_by_reason["already webp"] == 2 and files(dest) == ["art/photo.webp"]


def test_cli_min_saving_and_reencode_webp(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    (src / "b.webp").write_bytes(_webp(photo_array(64, 48, seed=3)))
    result = cli("convert", src, dest, "--no-progress", "--min-saving", "99.9", "-v")
    assert result.exit_code == 0, result.output
    assert "a.jpg: small saving" in result.output and "b.webp: already webp" in result.output
    again = cli("convert", src, dest, "--no-progress", "--reencode-webp", "--if-larger", "write")
    assert again.exit_code == 0, again.output
    assert files(dest) == ["a.webp", "b.webp"]
    assert cli("convert", src, dest, "--min-saving", "100").exit_code == 2


# ---------------------------------------------------------------- --copy-unconverted


def _flat_png(path: Path) -> Path:
    """1-bit noise: tiny as a PNG, bigger as a lossy WebP (larger than source)."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 2, (64, 64), dtype=np.uint8) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise).convert("1").save(path, optimize=True)
    return path


def _mixed_library(src: Path) -> None:
    save_jpeg(src / "site/photo.jpg", photo_array(96, 64, seed=1))
    _flat_png(src / "site/flat.png")
    (src / "site/favicon.jxl").write_bytes(b"\xff\x0a" + bytes(40))  # JPEG XL: not converted
    (src / "site/style.css").write_text("body { margin: 0 }")
    (src / "site/anim.webp").write_bytes(_webp(photo_array(64, 48, seed=3)))
    (src / "site/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    age(src)


COPIES = ["site/anim.webp", "site/favicon.jxl", "site/flat.png", "site/style.css"]


def test_copy_unconverted_makes_dest_a_complete_tree(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _mixed_library(src)
    summary = run(src, dest, copy_unconverted=True)
    assert summary.converted == 1 and summary.failed == 1  # bad.jpg is not copied
    assert files(dest) == sorted([*COPIES, "site/photo.webp"])
    for key in COPIES:
        assert (dest / key).read_bytes() == (src / key).read_bytes(), key
    assert summary.outputs.copied == 4
    assert summary.outputs.copied_bytes == sum((src / k).stat().st_size for k in COPIES)
    copied = {r.key: r for r in summary.not_converted if r.status == "skipped"}
    assert copied["site/flat.png"].reason == "larger than source"
    assert "copied as is" in copied["site/flat.png"].line()
    rows = manifest_rows(dest)
    assert {k: rows[k]["output"] for k in COPIES} == {k: k for k in COPIES}
    listed = {e["path"]: e for e in summary.to_dict()["not_converted"]}
    assert listed["site/favicon.jxl"]["output"] == "site/favicon.jxl"
    assert listed["site/bad.jpg"]["output"] is None


def test_copies_are_kept_in_step_on_re_runs(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _mixed_library(src)
    run(src, dest, copy_unconverted=True)
    again = run(src, dest, copy_unconverted=True)
    assert again.outputs.copied == 0 and again.converted == 0
    # A copy gone from DEST is copied again, without encoding anything.
    (dest / "site/flat.png").unlink()
    (src / "site/style.css").write_text("body { margin: 1px }")
    age(src / "site/style.css", 60)
    third = run(src, dest, copy_unconverted=True)
    assert third.outputs.copied == 2 and third.converted == 0
    assert third.outputs.overwritten == 0  # its own copy, replaced
    assert (dest / "site/style.css").read_text() == "body { margin: 1px }"
    assert (dest / "site/flat.png").read_bytes() == (src / "site/flat.png").read_bytes()
    # Without the option the copies optimizr made are no longer wanted.
    off = run(src, dest)
    assert off.outputs.stale_removed == 4 and files(dest) == ["site/photo.webp"]
    # And back on: copied again from the rows' evidence, nothing converted.
    on = run(src, dest, copy_unconverted=True)
    assert on.outputs.copied == 4 and on.converted == 0
    assert files(dest) == sorted([*COPIES, "site/photo.webp"])


def test_a_copy_never_replaces_a_file_optimizr_did_not_write(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _mixed_library(src)
    (dest / "site").mkdir(parents=True)
    (dest / "site/style.css").write_text("my own")
    summary = run(src, dest, copy_unconverted=True)
    assert summary.outputs.copied == 3 and summary.outputs.kept == 1
    [css] = [r for r in summary.not_converted if r.key == "site/style.css"]
    assert "not copied" in css.line() and "--if-exists overwrite" in css.line()
    assert (dest / "site/style.css").read_text() == "my own"
    replaced = run(src, dest, copy_unconverted=True, if_exists="overwrite")
    assert replaced.outputs.copied == 1 and replaced.outputs.overwritten == 1
    assert (dest / "site/style.css").read_text() == "body { margin: 0 }"


def test_a_copy_never_takes_the_name_of_another_source_output(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    (src / "a.jpg.webp").write_bytes(_webp(photo_array(64, 48, seed=3)))
    summary = run(src, dest, copy_unconverted=True, name="append")
    [webp] = summary.not_converted
    assert webp.reason == "already webp" and "output of a.jpg" in webp.line()
    assert files(dest) == ["a.jpg.webp"]
    assert (dest / "a.jpg.webp").read_bytes() != (src / "a.jpg.webp").read_bytes()


def test_dry_run_says_what_would_be_copied(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _mixed_library(src)
    summary = run(src, dest, copy_unconverted=True, dry_run=True)
    lines = {r.key: r.line() for r in summary.not_converted}
    assert "would be copied as is" in lines["site/favicon.jxl"]
    assert "would be copied as is" in lines["site/anim.webp"]
    assert not dest.exists()


def test_cli_copy_unconverted(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _mixed_library(src)
    result = cli("convert", src, dest, "--no-progress", "--copy-unconverted")
    assert result.exit_code == 1, result.output  # bad.jpg
    assert re.search(r"copied as is\s.*4", result.output), result.output
    assert files(dest) == sorted([*COPIES, "site/photo.webp"])


# ---------------------------------------------------------------- --delete


def _library_then_some_sources_deleted(tmp_path: Path) -> tuple[Path, Path]:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a/one.jpg", photo_array(96, 64, seed=1))
    save_jpeg(src / "a/two.jpg", photo_array(96, 64, seed=2))
    save_jpeg(src / "b/three.jpg", photo_array(96, 64, seed=3))
    (src / "b/icon.jxl").write_bytes(b"\xff\x0a" + bytes(40))  # JPEG XL: not converted
    age(src)
    run(src, dest, copy_unconverted=True)
    (dest / "a/mine.webp").write_bytes(b"a file optimizr did not write")
    (src / "a/two.jpg").unlink()
    for path in (src / "b").iterdir():
        path.unlink()
    (src / "b").rmdir()
    return src, dest


GONE = ["a/two.webp", "b/icon.jxl", "b/three.webp"]


def test_delete_removes_the_outputs_of_sources_that_are_gone(tmp_path: Path) -> None:
    src, dest = _library_then_some_sources_deleted(tmp_path)
    summary = run(src, dest, delete=True, copy_unconverted=True)
    assert files(dest) == ["a/mine.webp", "a/one.webp"]
    assert not (dest / "b").exists()  # the folder it emptied goes too
    assert summary.outputs.deleted == 3 and sorted(summary.outputs.deleted_paths) == GONE
    assert summary.to_dict()["outputs"]["deleted_paths"] == summary.outputs.deleted_paths
    assert set(manifest_rows(dest)) == {"a/one.jpg"}
    assert run(src, dest, delete=True).outputs.deleted == 0


def test_without_delete_they_stay_and_remain_optimizrs(tmp_path: Path) -> None:
    from optimizr import read_status

    src, dest = _library_then_some_sources_deleted(tmp_path)
    kept = run(src, dest, copy_unconverted=True)
    assert kept.outputs.deleted == 0 and kept.outputs.sources_gone == 3
    assert files(dest) == sorted(["a/mine.webp", "a/one.webp", *GONE])
    rows = manifest_rows(dest)
    assert {rows[k]["reason"] for k in ("a/two.jpg", "b/three.jpg", "b/icon.jxl")} == {
        "source deleted"
    }
    assert read_status(dest).skipped_by_reason == {"source deleted": 3}
    # The source comes back: its output is optimizr's own, so it is replaced.
    save_jpeg(src / "a/two.jpg", photo_array(96, 64, seed=5))
    back = run(src, dest, copy_unconverted=True)
    assert back.converted == 1 and back.skipped_by_reason.get("output exists") is None
    # --delete, runs later, still knows the others are optimizr's.
    later = run(src, dest, delete=True, copy_unconverted=True)
    assert sorted(later.outputs.deleted_paths) == ["b/icon.jxl", "b/three.webp"]
    assert files(dest) == ["a/mine.webp", "a/one.webp", "a/two.webp"]


def test_dry_run_delete_lists_and_removes_nothing(tmp_path: Path) -> None:
    src, dest = _library_then_some_sources_deleted(tmp_path)
    before = files(dest)
    rows = manifest_rows(dest)
    dry = run(src, dest, delete=True, dry_run=True)
    assert dry.outputs.deleted == 0 and dry.outputs.would_delete == 3
    assert sorted(dry.outputs.deleted_paths) == GONE
    assert files(dest) == before and manifest_rows(dest) == rows


def test_delete_spares_an_output_changed_since_optimizr_wrote_it(tmp_path: Path) -> None:
    src, dest = _library_then_some_sources_deleted(tmp_path)
    (dest / "a/two.webp").write_bytes(b"edited")
    summary = run(src, dest, delete=True)
    assert "a/two.webp" not in summary.outputs.deleted_paths
    assert (dest / "a/two.webp").read_bytes() == b"edited"


def test_delete_spares_an_output_another_source_now_has(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    age(src)
    run(src, dest)
    (src / "a.jpg").unlink()
    save_png(src / "a.png", photo_array(96, 64, seed=2))
    summary = run(src, dest, delete=True)
    assert summary.converted == 1 and summary.outputs.deleted == 0
    assert files(dest) == ["a.webp"] and set(manifest_rows(dest)) == {"a.png"}


def test_cli_delete(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    src, dest = _library_then_some_sources_deleted(tmp_path)
    dry = cli("convert", src, dest, "--delete", "--dry-run")
    assert dry.exit_code == 0, dry.output
    for path in GONE:
        assert f"would delete {path}" in dry.output
    assert files(dest) == sorted(["a/mine.webp", "a/one.webp", *GONE])
    done = cli("convert", src, dest, "--delete", "--no-progress")
    assert done.exit_code == 0, done.output
    assert re.search(r"deleted\s.*3", done.output), done.output
    assert files(dest) == ["a/mine.webp", "a/one.webp"]


def test_page_outputs_follow_their_source(tmp_path: Path) -> None:
    """--pages all: the outputs of pages 2, 3, ... are optimizr's too, renamed,
    kept or deleted with the main one."""
    from optimizr import EncodeOptions
    from test_pages import multi_page_tiff

    src, dest = tmp_path / "src", tmp_path / "dest"
    multi_page_tiff(src / "scan.tif")
    age(src)
    pages = EncodeOptions(pages="all")
    run(src, dest, encode=pages)
    assert files(dest) == ["scan.p2.webp", "scan.p3.webp", "scan.webp"]
    run(src, dest, encode=pages, name="append")
    assert files(dest) == ["scan.tif.p2.webp", "scan.tif.p3.webp", "scan.tif.webp"]
    (src / "scan.tif").unlink()
    kept = run(src, dest, encode=pages, name="append")
    assert kept.outputs.sources_gone == 1 and len(files(dest)) == 3
    gone = run(src, dest, encode=pages, name="append", delete=True)
    assert gone.outputs.deleted_paths == ["scan.tif.webp"] and files(dest) == []
