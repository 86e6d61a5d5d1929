"""summary.json: valid against its published JSON Schema, and internally consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
    # Skipped as larger (no output written), not an output that grew.
    assert doc["grew"] == [] and [g["path"] for g in doc["skipped_larger"]] == ["g/bilevel.png"]
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
    """A summary of a long run that kept two cores busy encoding: the codec used 95%
    of the CPU offered (190 of 2 cores x 100 s), the phases are mostly libwebp, and
    nothing else on the machine took CPU. ``changes`` set fields: ``cpu__machine=None``."""
    doc: dict[str, Any] = {
        "seconds": 100.0,
        "options": {"timeout": 300.0},
        "files": {"converted": 100, "skipped_by_reason": {}, "written_larger": 0},
        "bytes": {"in": 10**9, "out": 3 * 10**8, "saving_ratio": 0.7},
        "cpu": {
            "cores": 2, "threads_per_worker": 1, "wall_seconds": 100.0,
            "parent_cpu_seconds": 2.5, "parent_run_cpu_seconds": 1.0,
            "workers_cpu_seconds": 195.0, "codec_cpu_seconds": 190.0,
            "codec_wall_seconds": 195.0, "codec_cpu_per_wall": 0.97,
            "efficiency": 0.95, "orchestration_share": 0.03,
            "machine": {"cpus": 2, "busy_seconds": 198.0, "others_cpu_seconds": 2.0,
                        "iowait_seconds": 1.0, "steal_seconds": 0.0},
        },
        "executor": {"workers": 2, "utilisation": 0.99, "busy_seconds": 198.0,
                     "tail_seconds": 1.0, "crashed": 0, "timed_out": 0, "restarts": 0},
        "memory": {"peak_rss_bytes": 400, "budget_bytes": 1000, "admissions_waited": 0},
        "phases_seconds": {"read": 1.0, "decode": 40.0, "encode": 150.0, "write": 1.0},
        "grew": [],
        "skipped_larger": [],
    }  # fmt: skip
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = doc
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return doc


#: A codec that got 60 of the 195 s it spent converting: 135 core-seconds short.
SHORT = {"cpu__codec_cpu_seconds": 60.0, "cpu__codec_cpu_per_wall": 0.31,
         "cpu__workers_cpu_seconds": 65.0}  # fmt: skip
#: Workers that held images 120 of their 200 s; the codec used what it had.
IDLE = {"executor__busy_seconds": 120.0, "cpu__codec_wall_seconds": 118.0,
        "cpu__codec_cpu_seconds": 115.0, "cpu__workers_cpu_seconds": 120.0}  # fmt: skip
#: Workers that held images all the time, but half of it outside the codec.
HAND_OFF = {"cpu__codec_wall_seconds": 100.0, "cpu__codec_cpu_seconds": 95.0,
            "cpu__workers_cpu_seconds": 100.0,
            "phases_seconds__decode": 20.0, "phases_seconds__encode": 79.0}  # fmt: skip
#: The phrases of the mutually exclusive pace verdicts.
VERDICTS = ("encoder-bound", "CPU-bound", "contended", "I/O-bound", "starved", "memory-bound",
            "write-bound", "hand-off", "one core per worker", "ended with cores idle",
            "slow reads", "neither busy elsewhere")  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, ["encoder-bound"]),
        ({"phases_seconds__decode": 130.0, "phases_seconds__encode": 60.0}, ["CPU-bound"]),
        # The codec short of CPU: the machine's counters say who had it.
        ({**SHORT, "cpu__machine__others_cpu_seconds": 120.0}, ["contended"]),
        ({**SHORT, "cpu__machine__steal_seconds": 100.0}, ["contended"]),
        ({**SHORT, "cpu__machine__iowait_seconds": 100.0}, ["I/O-bound"]),
        ({**SHORT}, ["neither busy elsewhere"]),
        # Without them, a shortfall beyond all reading and decoding time is not storage...
        ({**SHORT, "cpu__machine": None}, ["contended"]),
        # ... and within it, the run cannot tell.
        (
            {
                **SHORT,
                "cpu__machine": None,
                "phases_seconds__decode": 150.0,
                "phases_seconds__encode": 40.0,
            },
            ["slow reads"],
        ),  # fmt: skip
        (IDLE, ["starved"]),
        ({**IDLE, "memory__admissions_waited": 40}, ["memory-bound"]),
        # Idle behind the last images: said once, as the verdict.
        ({**IDLE, "executor__tail_seconds": 79.0}, ["ended with cores idle"]),
        # A CPU-bound run with a long tail: both are true.
        ({"executor__tail_seconds": 20.0}, ["encoder-bound", "ended with cores idle"]),
        ({**HAND_OFF, "phases_seconds__write": 60.0}, ["write-bound"]),
        (HAND_OFF, ["hand-off"]),
        (
            {
                "executor__workers": 1,
                "executor__busy_seconds": 99.0,
                "cpu__codec_wall_seconds": 98.0,
                "cpu__codec_cpu_seconds": 98.0,
                "cpu__threads_per_worker": 2,
                "cpu__workers_cpu_seconds": 103.0,
            },
            ["one core per worker"],
        ),  # fmt: skip
        # A worker that hung until --timeout: a crash, not a hand-off problem.
        (
            {"executor__busy_seconds": 498.0, "executor__timed_out": 1},
            ["encoder-bound", "crashed or hung"],
        ),
        ({"cpu__parent_run_cpu_seconds": 30.0}, ["encoder-bound", "orchestration overhead"]),
        ({"cpu__workers_cpu_seconds": 230.0}, ["encoder-bound", "worker processes' own CPU"]),
        ({"memory__peak_rss_bytes": 950}, ["encoder-bound", "memory ran close"]),
        ({"bytes__saving_ratio": 0.05}, ["encoder-bound", "already well compressed"]),
        ({"files__written_larger": 3}, ["encoder-bound", "written although not smaller"]),
        (
            {"files__skipped_by_reason": {"larger than source": 2}},
            ["encoder-bound", "no output was written"],
        ),  # fmt: skip
        ({"seconds": 1.0, "cpu__wall_seconds": 1.0}, []),
        # A summary without the codec's wall time (an older writer): no verdict drawn.
        ({"cpu__codec_wall_seconds": None}, []),
    ],
)
def test_analysis_findings_follow_their_rules(changes: dict[str, Any], expected: list[str]) -> None:
    findings = analyse(base_doc(**changes))
    texts = [f["finding"] for f in findings]
    assert len(texts) == len(expected), texts
    for text, phrase in zip(texts, expected, strict=True):
        assert phrase in text, texts
    for finding in findings:
        assert finding["rule"] and finding["figures"]
    # One pace verdict at most: never two that contradict each other.
    assert sum(any(v in t for v in VERDICTS if v != "ended with cores idle") for t in texts) <= 1


def test_small_images_are_named_only_when_they_are_small() -> None:
    big = analyse(base_doc(**{"cpu__parent_run_cpu_seconds": 30.0}))
    assert not any("small images" in f["finding"] for f in big)
    # 5,000 images for the same codec CPU: 38 ms each.
    small = analyse(base_doc(**{"cpu__parent_run_cpu_seconds": 30.0, "files__converted": 5000}))
    assert any("small images" in f["finding"] for f in small)


def test_the_wording_about_larger_files_matches_what_was_written(
    tree: Path, tmp_path: Path
) -> None:
    # g/bilevel.png stores two-colour noise better than lossy WebP can.
    skip = run(tree, tmp_path / "skip", InlineExecutor())
    write = run(tree, tmp_path / "write", InlineExecutor(), if_larger="write")
    check(skip)
    check(write)
    assert (skip["grew"], [g["path"] for g in skip["skipped_larger"]]) == ([], ["g/bilevel.png"])
    assert ([g["path"] for g in write["grew"]], write["skipped_larger"]) == (["g/bilevel.png"], [])
    assert (skip["files"]["written_larger"], write["files"]["written_larger"]) == (0, 1)
    assert (tmp_path / "write/g/bilevel.webp").is_file()
    assert not (tmp_path / "skip/g/bilevel.webp").exists()
    skip_texts = " | ".join(f["finding"] for f in skip["analysis"])
    write_texts = " | ".join(f["finding"] for f in write["analysis"])
    assert "1 file(s) would have grown as WebP: no output was written" in skip_texts
    assert "written although not smaller" not in skip_texts
    assert "1 output(s) written although not smaller than their source" in write_texts
    assert "no output was written" not in write_texts and "grown as WebP" not in write_texts


def pinned(cpu: int, *argv: str) -> list[str]:
    """A command that runs ``argv`` (a Python program's arguments) on one CPU only."""
    code = (
        f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", code, sys.executable, *argv]


@pytest.mark.timeout(240)
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity (Linux)")
def test_a_real_run_sharing_its_cpu_is_found_contended_not_io_bound(tmp_path: Path) -> None:
    # The run and three busy loops pinned to one CPU: the worker gets a quarter of
    # it however idle the disk is. The verdict must say contended; the old rules said
    # "I/O-bound" and "the encoder dominates" side by side on such runs.
    src, dest = tmp_path / "src", tmp_path / "dest"
    photos = [photo_array(1400, 1050, seed=i) for i in range(3)]
    for i in range(10):  # 1.5 s of codec CPU alone: over 5 s, the analysis's least, shared
        save_jpeg(src / f"p{i:02}.jpg", photos[i % 3])
    cpu = min(os.sched_getaffinity(0))
    hogs = [subprocess.Popen(pinned(cpu, "-c", "while True: pass")) for _ in range(3)]
    try:
        command = pinned(cpu, "-m", "optimizr", "convert", str(src), str(dest), "--no-progress")
        done = subprocess.run(command, capture_output=True, text=True, timeout=220)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert done.returncode == 0, done.stderr
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    check(doc)
    assert doc["workers"] == 1 and doc["cpu"]["cores"] == 1
    texts = [f["finding"] for f in doc["analysis"]]
    verdicts = [t for t in texts if any(v in t for v in VERDICTS)]
    assert len(verdicts) == 1 and verdicts[0].startswith("contended"), texts
    assert doc["cpu"]["codec_cpu_per_wall"] < 0.7
    if doc["cpu"]["machine"] is not None:  # Linux without a CPU quota below the mask
        assert doc["cpu"]["machine"]["others_cpu_seconds"] > doc["cpu"]["codec_cpu_seconds"]
    # Photos of 1.5 megapixels are not "small images", whatever the overhead was.
    assert not any("small images" in t for t in texts)


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


def test_to_dict_twice_gives_the_same_document(tmp_path: Path) -> None:
    # --summary - prints the document after the history kept its copy: they must agree.
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "a.jpg", photo_array(64, 48))
    summary = convert_tree(src, dest, RunConfig(src=src, dest=dest), executor=InlineExecutor())
    kept = [json.loads(p.read_text()) for p in (dest / ".optimizr" / "runs").iterdir()]
    assert kept == [summary.to_dict()] == [summary.to_dict()]
