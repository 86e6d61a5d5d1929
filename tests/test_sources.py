"""Where sources come from: a walk that passes over optimizr's own files (nested
DESTs, state folders, outputs in place), one file, several SRCs, --files-from."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from conftest import age, decode, manifest_rows, photo_array, save_jpeg, save_png
from optimizr import RunConfig, RunSummary, UsageError, convert_tree
from optimizr.executors import InlineExecutor
from optimizr.storage import LocalStorage, WalkOptions


def run(src: Any, dest: Any, *, processes: bool = False, **kwargs: Any) -> RunSummary:
    config = RunConfig(src=src, dest=Path(dest), **kwargs)
    executor = None if processes else InlineExecutor()
    return convert_tree(src, dest, config, executor=executor)


def tree(root: Path, names: list[str]) -> list[Path]:
    return [save_jpeg(root / name, photo_array(96, 64, seed=i)) for i, name in enumerate(names)]


def files(root: Path) -> list[str]:
    """Every file under root, state folder excluded, as sorted relative paths."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and ".optimizr" not in p.relative_to(root).parts
    )


def webps(root: Path) -> list[str]:
    return [name for name in files(root) if name.endswith(".webp")]


# -- item 7: optimizr's own files are never sources -------------------------------------


def test_a_dest_folder_inside_src_is_passed_over_with_one_warning(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg", "old/b.jpg"])
    # An earlier run into a folder inside SRC: it holds .optimizr/ and optimizr-summary.json.
    assert run(src / "old", src / "old-webp").converted == 1
    summary = run(src, dest)
    assert webps(dest) == ["a.webp", "old/b.webp"]
    assert summary.found == 2 and summary.converted == 2
    assert summary.skipped_by_reason == {}  # no manifest file counted as "not an image"
    [warning] = [w for w in summary.warnings if "old-webp" in w]
    assert "optimizr DEST" in warning
    # A nested DEST deeper down is found too, and only once.
    run(src / "old", src / "deep" / "x" / "webp")
    again = run(src, tmp_path / "dest2")
    assert again.found == 2
    assert len([w for w in again.warnings if "deep/x/webp" in w]) == 1


def test_a_state_folder_is_never_entered(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg"])
    state = src / ".optimizr"
    state.mkdir()
    save_jpeg(state / "stray.jpg", photo_array(32, 32))
    (state / "failed.jsonl").write_text("{}\n")
    summary = run(src, dest)
    assert summary.found == 1 and webps(dest) == ["a.webp"]


def test_src_that_is_an_earlier_dest_yields_no_outputs_as_sources(tmp_path: Path) -> None:
    photos, webp = tmp_path / "photos", tmp_path / "webp"
    tree(photos, ["a.jpg", "sub/b.jpg"])
    run(photos, webp)
    # A real WebP source added to the old DEST by hand is still converted.
    save_png(webp / "logo.png", photo_array(40, 40, seed=9))
    summary = run(webp, tmp_path / "again")
    assert webps(tmp_path / "again") == ["logo.webp"]
    assert summary.found == 1 and summary.own_outputs == 3  # two outputs and the summary


# -- item 16: in place ---------------------------------------------------------------------


def test_in_place_with_name_append_converts_once_and_rerun_is_up_to_date(tmp_path: Path) -> None:
    site = tmp_path / "site"
    tree(site, ["a.jpg", "sub/b.jpg"])
    save_png(site / "art.png", photo_array(64, 48, seed=5))
    # A WebP that is not optimizr's output is a source like any other.
    (site / "logo.webp").write_bytes(_webp_bytes(tmp_path))
    age(site)
    # In worker processes: libvips aborts (a pyvips handle already collected) when
    # a process that converted other images converts a WebP, a bug of its own.
    # --reencode-webp: a WebP source is otherwise kept as it is ("already webp").
    first = run(site, site, name="append", processes=True, workers=1, reencode_webp=True)
    assert first.converted == 4 and first.failed == 0
    assert webps(site) == [
        "a.jpg.webp",
        "art.png.webp",
        "logo.webp",
        "logo.webp.webp",
        "sub/b.jpg.webp",
    ]
    second = run(site, site, name="append", reencode_webp=True)
    assert second.found == 4 and second.converted == 0
    assert second.skipped_by_reason == {"up to date": 4}
    assert second.own_outputs == 5  # the four outputs and optimizr-summary.json
    assert not [name for name in files(site) if name.endswith(".webp.webp.webp")]
    assert not [name for name in files(site) if name.endswith(".jpg.webp.webp")]
    # --force converts the sources again, never the outputs.
    forced = run(
        site, site, name="append", force=True, processes=True, workers=1, reencode_webp=True
    )
    assert forced.converted == 4 and forced.own_outputs == 5
    assert len(webps(site)) == 5


def test_in_place_outputs_are_recognised_without_the_manifest(tmp_path: Path) -> None:
    """Rows lost (a kill -9 loses the last batch, a rebuilt manifest has none): an
    output sitting next to its source is still not a source."""
    site = tmp_path / "site"
    tree(site, ["a.jpg", "b.jpg"])
    age(site)
    run(site, site, name="append")
    rebuilt = run(site, site, name="append", rebuild_manifest=True)
    assert rebuilt.found == 2 and rebuilt.failed == 0
    assert webps(site) == ["a.jpg.webp", "b.jpg.webp"]


def test_in_place_the_pages_of_a_multi_page_tiff_are_outputs_too(tmp_path: Path) -> None:
    from PIL import Image

    from optimizr import EncodeOptions

    site = tmp_path / "site"
    site.mkdir()
    pages = [Image.fromarray(photo_array(w, h, seed=i)) for i, (w, h) in enumerate(PAGES)]
    pages[0].save(site / "scan.tif", save_all=True, append_images=pages[1:])
    age(site)
    every = EncodeOptions(pages="all")
    assert run(site, site, name="append", encode=every).converted == 1
    assert webps(site) == ["scan.tif.p2.webp", "scan.tif.webp"]
    again = run(site, site, name="append", encode=every)
    assert again.found == 1 and again.skipped_by_reason == {"up to date": 1}
    # Without rows, the pages beside their source are still known for outputs.
    rebuilt = run(site, site, name="append", encode=every, rebuild_manifest=True)
    assert rebuilt.found == 1 and rebuilt.failed == 0
    assert webps(site) == ["scan.tif.p2.webp", "scan.tif.webp"]


PAGES = [(96, 64), (80, 80)]


def test_in_place_the_count_ahead_leaves_the_outputs_out(tmp_path: Path) -> None:
    """The progress total (the count pass, on its own thread) is of sources only."""
    import time

    from optimizr.count import TreeCounter
    from optimizr.sources import OwnOutputs, resolve_layout

    site = tmp_path / "site"
    tree(site, ["a.jpg", "sub/b.jpg", "sub/c.jpg"])
    age(site)
    run(site, site, name="append")
    config = RunConfig(src=site, dest=site, name="append")
    layout = resolve_layout((site,), str(site), config)
    own = OwnOutputs(layout, None, LocalStorage(site))
    counter = TreeCounter(layout.source, WalkOptions(), keep=own.drop_for_count).start()
    deadline = time.monotonic() + 60
    while not counter.statistics().done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter.statistics().done and counter.statistics().files == 3


def test_in_place_with_name_replace_is_refused_suggesting_append(tmp_path: Path) -> None:
    site = tmp_path / "site"
    tree(site, ["a.jpg"])
    with pytest.raises(UsageError, match="--name append") as info:
        run(site, site)
    assert info.value.exit_code == 2
    assert files(site) == ["a.jpg"] and not (site / ".optimizr").exists()


def test_in_place_from_the_command_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    site = tmp_path / "site" / "img"
    tree(site, ["a.jpg", "b/c.jpg"])
    age(site)
    for _ in range(2):
        result = cli("convert", site, site, "--name", "append", "-j", "1", "--no-progress")
        assert result.exit_code == 0, result.output
    assert webps(site) == ["a.jpg.webp", "b/c.jpg.webp"]
    doc = json.loads((site / "optimizr-summary.json").read_text())
    assert doc["files"]["found"] == 2 and doc["files"]["skipped_by_reason"] == {"up to date": 2}
    assert doc["files"]["own_outputs"] == 3


def test_src_inside_dest_never_takes_the_outputs_landing_in_it(tmp_path: Path) -> None:
    top = tmp_path / "top"
    src = top / "raw"
    tree(src, ["a.jpg", "raw/b.jpg"])  # raw/b.jpg's output is top/raw/b.webp: inside SRC
    age(src)
    first = run(src, top)
    assert first.converted == 2
    second = run(src, top)
    assert second.found == 2 and second.converted == 0 and second.own_outputs == 1


# -- item 15: one file ---------------------------------------------------------------------


def test_one_file_to_a_webp_path_writes_only_that_file(tmp_path: Path) -> None:
    [photo] = tree(tmp_path / "in", ["photo.jpg"])
    out = tmp_path / "out" / "thumb.webp"
    summary = run(photo, out)
    assert summary.converted == 1 and summary.exit_code == 0
    assert decode(out).size == (96, 64)
    assert files(tmp_path / "out") == ["thumb.webp"]
    assert not (tmp_path / "out" / ".optimizr").exists()


def test_one_file_into_a_folder_follows_the_naming(tmp_path: Path) -> None:
    [photo] = tree(tmp_path / "in", ["photo.jpg"])
    folder = tmp_path / "out"
    folder.mkdir()
    assert run(photo, folder).converted == 1
    assert run(photo, folder, name="append").converted == 1
    assert sorted(os.listdir(folder)) == ["photo.jpg.webp", "photo.webp"]


def test_one_file_dest_must_say_file_or_folder(tmp_path: Path) -> None:
    [photo] = tree(tmp_path / "in", ["photo.jpg"])
    with pytest.raises(UsageError, match=r"\.webp"):
        run(photo, tmp_path / "nowhere")
    # Its own output would be itself: refused, the source is never overwritten.
    webp = tmp_path / "in" / "x.webp"
    webp.write_bytes(_webp_bytes(tmp_path))
    with pytest.raises(UsageError, match="itself"):
        run(webp, tmp_path / "in")


def test_one_file_from_the_command_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    [photo] = tree(tmp_path, ["photo.jpg"])
    result = cli("convert", photo, tmp_path / "photo.webp", "-j", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert decode(tmp_path / "photo.webp").format == "WEBP"
    assert "summary:" not in result.output
    assert not (tmp_path / ".optimizr").exists()
    assert not (tmp_path / "optimizr-summary.json").exists()
    # Into a folder named with a trailing slash, created if missing.
    result = cli("convert", photo, f"{tmp_path / 'out'}/", "-j", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert os.listdir(tmp_path / "out") == ["photo.webp"]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo.read_bytes()[:300])
    result = cli("convert", broken, tmp_path / "broken.webp", "-j", "1", "--no-progress")
    assert result.exit_code == 1 and "FAILED broken.jpg: truncated" in result.output


# -- item 15: several SRCs -----------------------------------------------------------------


def test_several_srcs_go_under_dest_by_name_and_resume(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    tree(a, ["x.jpg", "s/y.jpg"])
    tree(b, ["z.jpg"])
    [c] = tree(tmp_path, ["c.jpg"])
    dest = tmp_path / "dest"
    age(tmp_path)
    summary = run((a, Path(f"{b}/"), c), dest)
    assert summary.converted == 4 and summary.failed == 0
    assert webps(dest) == ["a/s/y.webp", "a/x.webp", "b/z.webp", "c.webp"]
    assert set(manifest_rows(dest)) == {"a/x.jpg", "a/s/y.jpg", "b/z.jpg", "c.jpg"}
    again = run((a, b, c), dest)
    assert again.converted == 0 and again.skipped_by_reason == {"up to date": 4}


def test_several_srcs_that_collide_are_a_conflict_or_refused(tmp_path: Path) -> None:
    [jpg] = tree(tmp_path / "one", ["c.jpg"])
    png = save_png(tmp_path / "two" / "c.png", photo_array(96, 64, seed=3))
    dest = tmp_path / "dest"
    summary = run((jpg, png), dest)
    assert summary.converted == 1 and summary.failed == 1
    [failure] = summary.not_converted
    assert failure.key == "c.png" and failure.reason == "output conflict"
    tree(tmp_path / "x" / "img", ["p.jpg"])
    tree(tmp_path / "y" / "img", ["p.jpg"])
    with pytest.raises(UsageError, match="both"):
        run((tmp_path / "x" / "img", tmp_path / "y" / "img"), tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()


def test_several_srcs_from_the_command_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    tree(tmp_path / "a", ["x.jpg"])
    tree(tmp_path / "b", ["y.jpg"])
    [c] = tree(tmp_path, ["c.jpg"])
    dest = tmp_path / "dest"
    result = cli("convert", tmp_path / "a", tmp_path / "b", c, dest, "-j", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    assert webps(dest) == ["a/x.webp", "b/y.webp", "c.webp"]
    result = cli("convert", tmp_path / "a", "--no-progress")
    assert result.exit_code == 2


# -- item 15: --files-from -----------------------------------------------------------------


def test_files_from_converts_only_the_listed_files(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg", "b.jpg", "sub/c.jpg", "sub/d.jpg"])
    age(src)
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\n./sub/c.jpg\n\nsub\n.\nsub//c.jpg\n")
    summary = run(src, dest, files_from=listing)
    assert summary.found == 2 and summary.converted == 2
    assert webps(dest) == ["a.webp", "sub/c.webp"]
    # The whole tree next: the listed ones are up to date.
    full = run(src, dest)
    assert full.converted == 2 and full.skipped_by_reason == {"up to date": 2}
    # A list does not prove unlisted files gone: their rows stay.
    run(src, dest, files_from=listing)
    assert len(manifest_rows(dest)) == 4


def test_files_from_missing_and_escaping_names_fail_per_file(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg"])
    tree(tmp_path, ["secret.jpg"])
    listing = tmp_path / "list.txt"
    listing.write_text(f"a.jpg\nnope.jpg\n../secret.jpg\n{tmp_path / 'secret.jpg'}\n")
    summary = run(src, dest, files_from=listing)
    assert summary.converted == 1 and summary.failed == 3 and summary.exit_code == 1
    reasons = {r.key: r.reason for r in summary.not_converted}
    assert reasons["nope.jpg"] == "source disappeared"
    assert reasons["../secret.jpg"] == "outside SRC"
    assert reasons[str(tmp_path / "secret.jpg")] == "outside SRC"
    assert webps(dest) == ["a.webp"] and not (tmp_path / "secret.webp").exists()
    # Nothing about files that are not in SRC is kept in the manifest.
    assert set(manifest_rows(dest)) == {"a.jpg"}


def test_files_from_an_absolute_name_inside_src_is_taken(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg", "sub/b.jpg"])
    listing = tmp_path / "list.txt"
    listing.write_text(f"{src.resolve() / 'sub' / 'b.jpg'}\n")
    assert run(src, dest, files_from=listing).converted == 1
    assert webps(dest) == ["sub/b.webp"]


def test_files_from_nul_separated_names_round_trip_as_bytes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, ["line\nbreak.jpg", "plain.jpg"])
    latin1 = os.fsencode(src) + b"/caf\xe9.jpg"
    save_jpeg(Path(os.fsdecode(latin1)), photo_array(40, 30))
    listing = tmp_path / "list0"
    listing.write_bytes(b"line\nbreak.jpg\0plain.jpg\0caf\xe9.jpg\0")
    from optimizr.sources import ListedSource, read_listed_names

    names = list(read_listed_names(listing, nul=True))
    source = ListedSource(LocalStorage(src), names)
    [listing_] = list(source.walk(WalkOptions()))
    keys = [entry.key for entry in listing_.entries]
    assert sorted(keys) == sorted(["line\nbreak.jpg", "plain.jpg", os.fsdecode(b"caf\xe9.jpg")])
    assert all(entry.error is None and entry.size > 0 for entry in listing_.entries)
    assert os.fsencode(source.local_path(os.fsdecode(b"caf\xe9.jpg")) or "") == latin1


def test_files_from_stdin_nul_separated_on_the_command_line(tmp_path: Path) -> None:
    from optimizr.cli import main

    src, dest = tmp_path / "src", tmp_path / "dest"
    tree(src, ["a.jpg", "b c.jpg", "skip.jpg"])
    runner = CliRunner()
    args = ["convert", str(src), str(dest), "--files-from", "-", "-0", "-j", "1", "--no-progress"]
    result = runner.invoke(main, args, input=b"a.jpg\0b c.jpg\0", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert webps(dest) == ["a.webp", "b c.webp"]
    result = runner.invoke(main, ["convert", str(src), str(src), str(dest), "--files-from", "-"])
    assert result.exit_code == 2 and "--files-from" in result.output


def _webp_bytes(tmp_path: Path) -> bytes:
    """A real WebP made by Pillow (not by optimizr)."""
    from PIL import Image

    path = tmp_path / "pillow.webp"
    Image.fromarray(photo_array(48, 32, seed=7)).save(path, format="WEBP", quality=90)
    data = path.read_bytes()
    path.unlink()
    return data


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_walks_pass_over_state_folders_and_nested_dests(tmp_path: Path, backend: str) -> None:
    from optimizr.storage import MemoryStorage, Storage

    keys = ["a.jpg", ".optimizr/manifest.sqlite", "old/.optimizr/lock", "old/x.webp",
            "old/deep/y.webp", "keep/b.jpg"]  # fmt: skip
    storage: Storage
    if backend == "local":
        for key in keys:
            (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / key).write_bytes(b"x")
        storage = LocalStorage(tmp_path)
    else:
        storage = MemoryStorage({key: b"x" for key in keys})
    listings = list(storage.walk(WalkOptions()))
    listed = sorted(e.key for listing in listings for e in listing.entries)
    assert listed == ["a.jpg", "keep/b.jpg"]
    assert [(li.directory, li.skipped is not None) for li in listings if li.skipped] == [
        ("old", True)
    ]
