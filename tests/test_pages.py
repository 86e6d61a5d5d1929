"""Multi-page TIFF (issue 10 item 8): never silently its first page only."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner, Result
from PIL import Image

from conftest import age, decode, photo_array
from optimizr.cli import main
from optimizr.config import EncodeOptions, RunConfig
from optimizr.encode import encode_webp
from optimizr.manifest import options_fingerprint

#: Page sizes of the test TIFF: each page its own size, as scanners write them.
PAGES = [(96, 64), (80, 80), (64, 120)]


def multi_page_tiff(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(photo_array(w, h, seed=i)) for i, (w, h) in enumerate(PAGES)]
    images[0].save(path, save_all=True, append_images=images[1:], compression="tiff_lzw")
    return path


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_first_page_only_is_said_and_counted(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    multi_page_tiff(src / "scan.tif")
    Image.fromarray(photo_array(64, 48)).save(src / "single.tif")
    result = run("convert", src, dest, "--no-progress")
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING scan.tif: multi-page: 3 pages, only the first was converted "
        "(--pages all converts each)"
    ]
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["files"]["warned_by_kind"] == {"multi-page": 1}
    assert doc["files"]["converted"] == 2
    assert sorted(p.name for p in dest.glob("*.webp")) == ["scan.webp", "single.webp"]
    assert decode(dest / "scan.webp").size == PAGES[0]


def test_json_log_event_carries_the_warning(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    multi_page_tiff(src / "scan.tif")
    result = run("convert", src, dest, "--log-format", "json")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    [image] = [e for e in events if e["event"] == "image"]
    assert image["level"] == "warning" and image["status"] == "converted"
    assert image["warnings"][0].startswith("multi-page: 3 pages")


def test_all_pages_become_outputs_and_resume(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    tiff = multi_page_tiff(src / "scan.tif")
    age(src)
    result = run("convert", src, dest, "--no-progress", "--pages", "all")
    assert result.exit_code == 0 and "WARNING" not in result.stderr
    outputs = {p.name: decode(p).size for p in dest.glob("*.webp")}
    assert outputs == {"scan.webp": PAGES[0], "scan.p2.webp": PAGES[1], "scan.p3.webp": PAGES[2]}
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    assert doc["bytes"]["out"] == sum((dest / name).stat().st_size for name in outputs)
    assert doc["bytes"]["in"] == tiff.stat().st_size
    # Up to date on a re-run; a page deleted by hand is made again.
    run("convert", src, dest, "--no-progress", "--pages", "all")
    again = json.loads((dest / "optimizr-summary.json").read_text())
    assert again["files"]["skipped_by_reason"] == {"up to date": 1}
    (dest / "scan.p3.webp").unlink()
    run("convert", src, dest, "--no-progress", "--pages", "all")
    assert json.loads((dest / "optimizr-summary.json").read_text())["files"]["converted"] == 1
    assert (dest / "scan.p3.webp").is_file()


def test_pages_all_shrinks_each_page() -> None:
    array = (np.arange(90 * 60 * 3) % 251).astype(np.uint8).reshape(60, 90, 3)
    out = io.BytesIO()
    pages = [Image.fromarray(array), Image.fromarray(np.ascontiguousarray(array[:, :30]))]
    pages[0].save(out, format="TIFF", save_all=True, append_images=pages[1:])
    encoded = encode_webp(out.getvalue(), EncodeOptions(pages="all", max_width=45))
    assert encoded.facts.pages == 2 and encoded.facts.warnings == ()
    assert decode(encoded.webp).size == (45, 30)
    [second] = encoded.more_pages
    assert decode(second).size == (30, 60)  # narrower than the box already: kept


def test_pages_option_shapes_the_fingerprint_but_its_default_changes_nothing() -> None:
    base = RunConfig(Path("a"), Path("b"))
    every = RunConfig(Path("a"), Path("b"), encode=EncodeOptions(pages="all"))
    assert options_fingerprint(base) != options_fingerprint(every)
    # The fingerprint of the default options as manifests written before --pages
    # existed recorded it: an upgrade must not make every done file look stale.
    assert options_fingerprint(base) == "095bf5fae9e393dd"
