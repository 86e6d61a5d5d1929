"""convert_tree: walking, naming, skipping, summaries and safety, through the library API."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from PIL import Image

from conftest import age, decode, photo_array, save_jpeg, save_png
from optimizr import EncodeOptions, RunConfig, RunSummary, convert_tree
from optimizr.executors import InlineExecutor
from optimizr.pipeline import output_key
from optimizr.results import Result


def run(src: Path, dest: Path, **kwargs: Any) -> RunSummary:
    config = RunConfig(src=src, dest=dest, **kwargs)
    return convert_tree(src, dest, config, executor=InlineExecutor())


def tree(root: Path, names: list[str]) -> list[Path]:
    paths = []
    for i, name in enumerate(names):
        path = root / name
        paths.append(save_jpeg(path, photo_array(96, 64, seed=i)))
    return paths


def webps(dest: Path) -> list[str]:
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.webp"))


def test_output_key_modes() -> None:
    assert output_key("a/b/photo.jpg", "replace") == "a/b/photo.webp"
    assert output_key("a/b/photo.jpg", "append") == "a/b/photo.jpg.webp"
    assert output_key("noext", "replace") == "noext.webp"
    assert output_key("a.b/c.tar.png", "replace") == "a.b/c.tar.webp"
    # The fast string version agrees with pathlib on the awkward names.
    for key in (".hidden", "a/.hidden", "file.", "a/file.", "x..y", ".a.b", "a/...", "a.b/c",
                "a/..b", "a/b..", "é.JPG", "a b/c d.png"):  # fmt: skip
        path = PurePosixPath(key)
        expected = str(path.with_suffix(".webp")) if path.suffix else key + ".webp"
        assert output_key(key, "replace") == expected, key


def test_mirrors_the_tree(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["top.jpg", "a/one.jpg", "a/b/two.jpeg", "c/three.JPG"])
    summary = run(src, dest)
    assert summary.converted == 4 and summary.failed == 0
    assert webps(dest) == ["a/b/two.webp", "a/one.webp", "c/three.webp", "top.webp"]
    for rel in webps(dest):
        assert decode(dest / rel).format == "WEBP"


def test_name_append_keeps_extension(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a/photo.jpg"])
    run(src, dest, name="append")
    assert webps(dest) == ["a/photo.jpg.webp"]


def test_two_sources_for_one_output_is_an_error_not_an_overwrite(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(96, 64, seed=1))
    save_png(src / "a.png", photo_array(96, 64, seed=2))
    summary = run(src, dest)
    assert summary.converted == 1 and summary.failed == 1
    [failure] = summary.not_converted
    assert failure.key == "a.png" and failure.reason == "output conflict"
    assert "--name auto" in failure.message and "a.jpg" in failure.message
    # The one written is the JPEG's, untouched by the PNG.
    assert decode(dest / "a.webp").size == (96, 64)
    dest2 = tmp_path / "dest2"
    summary2 = run(src, dest2, name="append")
    assert summary2.converted == 2
    assert webps(dest2) == ["a.jpg.webp", "a.png.webp"]


def test_dest_inside_src_is_never_walked(tmp_path: Path) -> None:
    src = tmp_path / "src"
    dest = src / "webp"
    tree(src, ["one.jpg", "sub/two.jpg"])
    first = run(src, dest)
    second = run(src, dest, force=True)
    assert first.found == 2 and second.found == 2
    assert webps(dest) == ["one.webp", "sub/two.webp"]


def test_src_equal_to_dest_is_refused_unless_name_append(tmp_path: Path) -> None:
    from optimizr.errors import UsageError

    tree(tmp_path / "src", ["one.jpg"])
    with pytest.raises(UsageError, match="in place .* needs --name append"):
        run(tmp_path / "src", tmp_path / "src")


def test_missing_src_is_a_usage_error(tmp_path: Path) -> None:
    from optimizr.errors import UsageError

    with pytest.raises(UsageError, match="does not exist") as info:
        run(tmp_path / "nope", tmp_path / "dest")
    assert info.value.exit_code == 2


def test_symlinks_are_not_followed_unless_asked(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    outside = tmp_path / "outside"
    tree(outside, ["linked.jpg"])
    tree(src, ["real.jpg"])
    (src / "dirlink").symlink_to(outside, target_is_directory=True)
    (src / "filelink.jpg").symlink_to(outside / "linked.jpg")
    assert webps(dest) == [] and run(src, dest).converted == 1
    assert webps(dest) == ["real.webp"]
    dest2 = tmp_path / "dest2"
    run(src, dest2, follow_symlinks=True)
    assert webps(dest2) == ["dirlink/linked.webp", "filelink.webp", "real.webp"]


@pytest.mark.timeout(60)
def test_symlink_loop_cannot_hang_the_walk(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a/one.jpg"])
    (src / "a" / "back").symlink_to(src, target_is_directory=True)
    (src / "a" / "self").symlink_to(src / "a", target_is_directory=True)
    summary = run(src, dest, follow_symlinks=True)
    # Each loop is cut where it meets a directory already on the path.
    assert summary.found == 1
    assert webps(dest) == ["a/one.webp"]


def test_include_and_exclude_globs(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["keep/a.jpg", "keep/b.jpeg", "raw/c.jpg", "keep/skip_me.jpg"])
    summary = run(src, dest, include=("*.jpg",), exclude=("raw", "skip_*"))
    assert webps(dest) == ["keep/a.webp"]
    assert summary.found == 1
    dest2 = tmp_path / "dest2"
    run(src, dest2, include=("keep/*",))
    assert webps(dest2) == ["keep/a.webp", "keep/b.webp", "keep/skip_me.webp"]


def test_dry_run_writes_nothing_and_says_why(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg"])
    (src / "notes.txt").write_text("hello")
    (src / "icon.jxl").write_bytes(b"\xff\x0a" + bytes(40))
    summary = run(src, dest, dry_run=True)
    assert not dest.exists()
    reasons = {r.key: (r.reason, r.message) for r in summary.not_converted}
    # What would be converted is counted apart, not as skipped.
    assert "a.jpg" not in reasons and summary.skipped == 2
    assert (summary.would_convert, summary.would_convert_bytes) == (
        1,
        (src / "a.jpg").stat().st_size,
    )
    assert reasons["notes.txt"][0] == "not an image"
    assert reasons["icon.jxl"][0] == "unsupported" and "jpegxl" in reasons["icon.jxl"][1]


def test_up_to_date_outputs_are_skipped_then_redone_when_source_changes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    first, second = tree(src, ["one.jpg", "two.jpg"])
    age(src)
    assert run(src, dest).converted == 2
    again = run(src, dest)
    assert again.converted == 0 and again.skipped_by_reason == {"up to date": 2}
    # Up-to-date skips are counted but not listed: they are the normal re-run case.
    assert again.not_converted == []
    out = dest / "one.webp"
    os.utime(first, ns=(out.stat().st_mtime_ns + 10**9,) * 2)
    third = run(src, dest)
    assert third.converted == 1 and third.skipped == 1
    forced = run(src, dest, force=True)
    assert forced.converted == 2
    assert second.exists()


def test_bad_files_fail_with_a_reason_and_the_run_goes_on(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    [good] = tree(src, ["good.jpg"])
    data = good.read_bytes()
    (src / "cut.jpg").write_bytes(data[: len(data) // 2])
    (src / "text.jpg").write_text("this is not a jpeg")
    (src / "empty.png").write_bytes(b"")
    (src / "readme.txt").write_text("not an image, and not named like one")
    summary = run(src, dest)
    assert summary.converted == 1
    by_key = {r.key: r for r in summary.not_converted}
    assert by_key["cut.jpg"].status == "failed" and by_key["cut.jpg"].reason == "truncated"
    assert by_key["text.jpg"].status == "failed" and by_key["text.jpg"].reason == "not an image"
    assert by_key["empty.png"].status == "failed"
    assert by_key["readme.txt"].status == "skipped"
    assert summary.exit_code == 1
    line = by_key["cut.jpg"].line()
    assert line.startswith("cut.jpg: truncated") and "\n" not in line
    assert webps(dest) == ["good.webp"]


def test_not_an_image_alone_is_not_a_failure(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg"])
    (src / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    summary = run(src, dest)
    assert summary.exit_code == 0 and summary.skipped_by_reason == {"not an image": 1}


def test_larger_than_source_is_skipped_with_no_output(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    import numpy as np

    # 1-bit noise: 1 bit a pixel in PNG, but costly for a lossy RGB codec.
    noise = np.random.default_rng(0).integers(0, 2, (64, 64), dtype=np.uint8) * 255
    (src).mkdir(parents=True)
    Image.fromarray(noise).convert("1").save(src / "flat.png", optimize=True)
    summary = run(src, dest)
    [result] = summary.not_converted
    assert result.reason == "larger than source" and not (dest / "flat.webp").exists()
    run(src, tmp_path / "d2", if_larger="write")
    assert (tmp_path / "d2" / "flat.webp").exists()


def test_summary_json_lists_what_was_not_converted(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg", "sub/b.jpg"])
    (src / "sub" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    (src / "notes.txt").write_text("x")
    run(src, dest)
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    files = doc["files"]
    assert files["found"] == 4 == files["converted"] + files["skipped"] + files["failed"]
    listed = {(e["path"], e["status"]) for e in doc["not_converted"]}
    assert listed == {("sub/bad.png", "failed"), ("notes.txt", "skipped")}
    on_disk = sum((dest / p).stat().st_size for p in webps(dest))
    assert doc["bytes"]["out"] == on_disk
    assert doc["bytes"]["in"] == (src / "a.jpg").stat().st_size + (src / "sub/b.jpg").stat().st_size
    custom = tmp_path / "elsewhere" / "s.json"
    run(src, tmp_path / "d2", summary_path=custom)
    assert json.loads(custom.read_text())["files"]["converted"] == 2
    assert not (tmp_path / "d2" / "optimizr-summary.json").exists()


def test_stale_temporaries_are_cleaned_and_none_are_left(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg", "b/c.jpg"])
    (dest / "b").mkdir(parents=True)
    stale = dest / "b" / ".c.webp.deadbeef.optimizr-tmp"
    stale.write_bytes(b"half a webp")
    run(src, dest)
    assert not stale.exists()
    assert not [p for p in dest.rglob("*") if p.name.endswith(".optimizr-tmp")]


def test_sources_are_never_modified(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    paths = tree(src, ["a.jpg", "b/c.jpg"])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    listing = sorted(p.name for p in src.rglob("*"))
    run(src, dest)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths} == before
    assert sorted(p.name for p in src.rglob("*")) == listing


def test_work_starts_before_the_walk_ends(tmp_path: Path) -> None:
    """The walk is streamed: the first image is converted while folders remain unlisted."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, [f"d{i:02}/img.jpg" for i in range(12)])
    events: list[str] = []

    class Recorder:
        def found(self, count: int) -> None:
            events.append("found")

        def finished(self, result: Result) -> None:
            events.append("finished")

        def walk_done(self, total: int) -> None:
            events.append("walk_done")

        def started(self, snapshot: object) -> None: ...

        def stopping(self, hard: bool) -> None:
            events.append("stopping")

    config = RunConfig(src=src, dest=dest)
    convert_tree(src, dest, config, executor=InlineExecutor(), listener=Recorder())
    assert events.index("finished") < events.index("walk_done")
    # Never more than one folder listed ahead of the results (inline: one job at a time).
    ahead = 0
    for event in events:
        ahead += {"found": 1, "finished": -1}.get(event, 0)
        assert ahead <= 2


def test_encode_options_are_used(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "big.jpg", photo_array(800, 400, seed=3))
    config = RunConfig(src=src, dest=dest, encode=EncodeOptions(max_width=200))
    convert_tree(src, dest, config, executor=InlineExecutor())
    assert decode(dest / "big.webp").size == (200, 100)


def test_library_runs_with_worker_processes(
    tmp_path: Path, make_photo: Callable[..., Path]
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(6):
        make_photo(f"p{i}.jpg", seed=i)
    summary = convert_tree(src, dest, EncodeOptions(quality=70))
    assert summary.converted == 6 and summary.workers >= 1
    assert len(webps(dest)) == 6
