"""Where sources come from: a walk that passes over optimizr's own files (nested
DESTs, state folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import photo_array, save_jpeg
from optimizr import RunConfig, RunSummary, convert_tree
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
