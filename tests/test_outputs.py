"""What optimizr writes into DEST and what it removes: --name auto, stale outputs,
--if-exists, --delete, --copy-unconverted, --min-saving and WebP sources, through
the library API and the CLI."""

from __future__ import annotations

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
    summary = run(src, dest, name="auto")
    assert summary.failed == 0
    assert files(dest) == ["x.jpg.webp", "x.webp"]


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
