"""summary.json: valid against its published JSON Schema, and internally consistent."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from PIL import Image

from conftest import age, photo_array, save_jpeg
from optimizr import RunConfig, StopToken, convert_tree
from optimizr.executors import InlineExecutor
from optimizr.metrics.analysis import analyse
from optimizr.metrics.stats import LogHistogram, Timeline, TopN

SCHEMA = json.loads(
    resources.files("optimizr").joinpath("schemas/summary-2.schema.json").read_text()
)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.FormatChecker())


def check(doc: dict[str, Any]) -> None:
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "g").mkdir(parents=True)
    for i in range(12):
        save_jpeg(src / f"p/img{i:02}.jpg", photo_array(160 + 8 * i, 120, seed=i))
    # Two-colour noise: a 1-bit PNG stores it far better than lossy WebP can.
    noise = np.random.default_rng(0).random((64, 64)) > 0.5
    Image.fromarray(noise).save(src / "g" / "bilevel.png")
    (src / "g/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (src / "notes.txt").write_text("hello")
    age(src)
    return src


def run(src: Path, dest: Path, executor: Any = None, **kwargs: Any) -> dict[str, Any]:
    config = RunConfig(src=src, dest=dest, **kwargs)
    convert_tree(src, dest, config, executor=executor)
    doc: dict[str, Any] = json.loads((dest / "optimizr-summary.json").read_text())
    return doc


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema"]["const"] == "optimizr-summary/2"


def test_summaries_validate_and_add_up(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    doc = run(tree, dest, workers=2)
    check(doc)
    files = doc["files"]
    assert files["found"] == files["converted"] + files["skipped"] + files["failed"] == 15
    assert (files["converted"], files["failed"]) == (12, 1)
    assert files["skipped_by_reason"] == {"larger than source": 1, "not an image": 1}
    # Byte totals are the sizes on disk.
    outputs = list(dest.rglob("*.webp"))
    assert doc["bytes"]["out"] == sum(p.stat().st_size for p in outputs)
    assert doc["bytes"]["in"] == sum((tree / "p" / (p.stem + ".jpg")).stat().st_size
                                     for p in outputs)  # fmt: skip
    by_format = doc["files"]["by_format"]
    assert by_format["jpeg"]["converted"] == 12 and by_format["png"]["skipped"] == 1
    assert sum(f["bytes_out"] for f in by_format.values()) == doc["bytes"]["out"]
    assert sum(f["converted"] + f["skipped"] + f["failed"] for f in by_format.values()) == 15
    latency = doc["latency_seconds"]
    assert latency["count"] == 12
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    for name in ("latency_seconds", "bytes_in", "bytes_out"):
        assert sum(n for _, n in doc["histograms"][name]["buckets"]) == 12
    phases = doc["phases_seconds"]
    assert phases["encode"] > 0 and phases["decode"] > 0 and phases["write"] > 0
    codec = doc["cpu"]["codec_cpu_seconds"]
    assert codec > 0
    timeline = doc["timeline"]
    assert [p[0] for p in timeline] == sorted(p[0] for p in timeline)
    assert timeline[-1][1:] == [15, doc["bytes"]["in"], doc["bytes"]["out"]]
    savings = doc["largest_savings"]
    assert len(savings) == 10 and savings == sorted(savings, key=lambda s: -s["saved"])
    assert savings[0]["saved"] == max(s["bytes_in"] - s["bytes_out"] for s in savings)
    assert [g["path"] for g in doc["grew"]] == ["g/bilevel.png"]
    [group] = doc["failures_by_reason"]
    assert group["count"] == 1 and group["examples"][0]["path"] == "g/broken.png"
    assert doc["tool"]["libvips"].count(".") == 2
    assert doc["executor"]["utilisation"] > 0


def test_rerun_interrupted_and_inline_summaries_validate(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    check(run(tree, dest, InlineExecutor()))
    again = run(tree, dest, InlineExecutor())
    check(again)
    assert again["files"]["skipped_by_reason"]["up to date"] == 12
    assert again["latency_seconds"]["count"] == 0 and again["largest_savings"] == []
    stop = StopToken()
    stop.request()
    config = RunConfig(src=tree, dest=tmp_path / "stopped")
    summary = convert_tree(tree, tmp_path / "stopped", config, stop=stop)
    doc = json.loads((tmp_path / "stopped/optimizr-summary.json").read_text())
    check(doc)
    assert doc["interrupted"] is True and doc["exit_code"] == 130 == summary.exit_code


def test_log_histogram_percentiles_are_upper_bounds_within_a_bucket() -> None:
    hist = LogHistogram(1e-3, 1e3)
    values = [0.001 * 1.07**i for i in range(200)]
    for v in values:
        hist.add(v)
    exact = sorted(values)
    for q in (50, 95, 99):
        true = exact[max(0, int(q / 100 * len(exact) + 0.999) - 1)]
        assert true <= hist.percentile(q) <= true * 10 ** (1 / 20) + 1e-12
    assert hist.percentile(100) == hist.max == max(values)
    assert hist.count == 200 and abs(hist.total - sum(values)) < 1e-9


def test_topn_and_timeline_stay_bounded() -> None:
    top = TopN(3)
    for i in range(100):
        top.offer(i % 17, {"i": i})
    assert [item["i"] for item in top.items()] == [16, 33, 50]
    timeline = Timeline(interval=0.0, max_points=8)
    for i in range(1000):
        timeline.sample(i)
    assert len(timeline.points) <= 8 and timeline.points[0][1] == 0


def base_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "seconds": 100.0,
        "files": {"converted": 100, "skipped_by_reason": {}},
        "bytes": {"in": 10**9, "out": 3 * 10**8, "saving_ratio": 0.7},
        "cpu": {"efficiency": 0.95, "orchestration_share": 0.01, "parent_cpu_seconds": 2.0},
        "executor": {
            "workers": 2,
            "utilisation": 0.98,
            "tail_seconds": 1.0,
            "crashed": 0,
            "timed_out": 0,
        },  # fmt: skip
        "memory": {"peak_rss_bytes": 400, "budget_bytes": 1000, "admissions_waited": 0},
        "phases_seconds": {"read": 1.0, "decode": 40.0, "encode": 150.0, "write": 1.0},
        "grew": [],
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = doc
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return doc


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, ["the encoder dominates"]),
        ({"cpu__efficiency": 0.5}, ["I/O-bound", "the encoder dominates"]),
        ({"cpu__efficiency": 0.5, "executor__utilisation": 0.6}, ["starved", "the encoder"]),
        (
            {"cpu__efficiency": 0.5, "executor__utilisation": 0.6, "memory__admissions_waited": 40},
            ["memory-bound", "the encoder dominates"],
        ),
        ({"cpu__orchestration_share": 0.05}, ["orchestration overhead", "the encoder"]),
        ({"executor__tail_seconds": 20.0}, ["the run ended with cores idle", "the encoder"]),
        ({"memory__peak_rss_bytes": 950}, ["memory ran close", "the encoder dominates"]),
        ({"executor__crashed": 2}, ["crashed or hung", "the encoder dominates"]),
        ({"bytes__saving_ratio": 0.05}, ["already well compressed", "the encoder"]),
        ({"phases_seconds__encode": 10.0}, []),
        ({"seconds": 1.0}, []),
    ],
)
def test_analysis_findings_follow_their_rules(changes: dict[str, Any], expected: list[str]) -> None:
    findings = analyse(base_doc(**changes))
    assert len(findings) == len(expected)
    for finding, text in zip(findings, expected, strict=True):
        assert text in finding["finding"]
        assert finding["rule"] and finding["figures"]


# -- the run history: every run's summary kept, the latest one still in place ---------------


def kept(dest: Path) -> list[Path]:
    return sorted((dest / ".optimizr" / "runs").iterdir())


def test_each_run_keeps_its_summary_and_the_latest_is_in_place(tree: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    first = run(tree, dest, InlineExecutor())
    again = run(tree, dest, InlineExecutor())
    # DEST/optimizr-summary.json is the latest run, as scripts expect...
    assert (first["files"]["converted"], again["files"]["converted"]) == (12, 0)
    # ... and the real conversion is not lost: each run is kept, oldest first.
    docs = [json.loads(p.read_text()) for p in kept(dest)]
    assert [d["files"]["converted"] for d in docs] == [12, 0]
    assert docs[1] == again and docs[0]["manifest"]["run_id"] < docs[1]["manifest"]["run_id"]
    for doc in docs:
        check(doc)
    names = [p.name for p in kept(dest)]
    assert names[0].endswith(f"-run{first['manifest']['run_id']}-work.json")
    assert names[1].endswith(f"-run{again['manifest']['run_id']}-idle.json")
    assert [p for p in dest.rglob("*") if p.name.endswith(".optimizr-tmp")] == []


def test_a_summary_written_elsewhere_is_kept_in_the_history_too(tree: Path, tmp_path: Path) -> None:
    dest, elsewhere = tmp_path / "dest", tmp_path / "reports" / "latest.json"
    config = RunConfig(src=tree, dest=dest, summary_path=elsewhere)
    convert_tree(tree, dest, config, executor=InlineExecutor())
    [only] = kept(dest)
    assert only.read_bytes() == elsewhere.read_bytes()
    assert not (dest / "optimizr-summary.json").exists()


def test_the_history_is_bounded_but_keeps_the_last_run_that_did_work(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optimizr import history

    monkeypatch.setattr(history, "MAX_RUNS", 3)
    dest = tmp_path / "dest"
    worked = run(tree, dest, InlineExecutor())
    idle = [run(tree, dest, InlineExecutor()) for _ in range(4)]
    docs = [json.loads(p.read_text()) for p in kept(dest)]
    # Three documents: the run that converted, and the two newest of the idle ones.
    assert [d["manifest"]["run_id"] for d in docs] == [
        worked["manifest"]["run_id"],
        idle[-2]["manifest"]["run_id"],
        idle[-1]["manifest"]["run_id"],
    ]


def mark(root: Path, stamp: str, run_id: int, kind: str, size: int) -> None:
    folder = root / ".optimizr" / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stamp}-run{run_id}-{kind}.json").write_bytes(b" " * size)


@pytest.mark.parametrize(
    ("runs", "max_runs", "max_bytes", "kept_ids"),
    [
        # Under both limits: nothing goes.
        ([(1, "work", 10), (2, "idle", 10)], 5, 100, [1, 2]),
        # Over the count: the oldest go, but not the newest run that did work.
        ([(1, "work", 10), (2, "idle", 10), (3, "idle", 10), (4, "idle", 10)], 2, 100, [1, 4]),
        ([(1, "work", 1), (2, "work", 1), (3, "idle", 1), (4, "idle", 1)], 3, 100, [2, 3, 4]),
        # Over the bytes: the newest and the last work stay, however large.
        ([(1, "idle", 10), (2, "work", 500), (3, "idle", 10), (4, "idle", 500)], 9, 100, [2, 4]),
        ([(1, "idle", 10), (2, "work", 50), (3, "idle", 30), (4, "idle", 10)], 9, 95, [2, 3, 4]),
    ],
)
def test_pruning_limits(
    tmp_path: Path,
    runs: list[tuple[int, str, int]],
    max_runs: int,
    max_bytes: int,
    kept_ids: list[int],
) -> None:
    from optimizr.history import kept_runs, prunable

    for run_id, kind, size in runs:
        mark(tmp_path, f"20240501T1200{run_id:02}.000000Z", run_id, kind, size)
    (tmp_path / ".optimizr" / "runs" / "notes.txt").write_text("not a run: never pruned")
    listed = kept_runs(tmp_path)
    assert [r.run_id for r in listed] == [r[0] for r in runs]
    dropped = {r.run_id for r in prunable(listed, max_runs, max_bytes)}
    assert [r.run_id for r in listed if r.run_id not in dropped] == kept_ids
