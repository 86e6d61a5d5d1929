"""Memory admission, largest-first scheduling, worker recycling and the grace period."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from conftest import photo_array, save_jpeg, save_png
from optimizr import EncodeOptions, RunConfig, convert_tree
from optimizr.budget import (
    LEAST_SHARE,
    PARENT_BASELINE,
    PARENT_GROWTH,
    PARENT_OWN_MAX,
    WORKER_BASELINE,
    WORKER_GROWTH_SLACK,
    Header,
    MemoryBudget,
    ceiling_margin,
    estimate_peak_bytes,
)
from optimizr.events import StopToken
from optimizr.executors import Job, ProcessExecutor
from optimizr.results import Result

MB = 1 << 20
#: The ceiling's margin below 1 GiB, which the capacity for images leaves free too.
MARGIN = 32 * MB
#: What a budget counts the parent as when told it measured PARENT_BASELINE.
PARENT = PARENT_BASELINE + PARENT_GROWTH


def budget_of(total: int, workers: int) -> MemoryBudget:
    return MemoryBudget(total, workers, parent_resident=PARENT_BASELINE)


def test_estimate_follows_size_mode_and_orientation() -> None:
    small = Header("jpeg", 1000, 1000, 3)
    big = Header("jpeg", 4000, 3000, 3)
    lossy = EncodeOptions()
    assert estimate_peak_bytes(big, lossy) > 10 * (estimate_peak_bytes(small, lossy) - 30 * MB)
    assert estimate_peak_bytes(big, EncodeOptions(lossless=True)) > 3 * estimate_peak_bytes(
        big, lossy
    )
    shrunk = estimate_peak_bytes(big, EncodeOptions(max_width=800))
    assert shrunk < estimate_peak_bytes(big, lossy) * 0.7
    alpha = Header("png", 4000, 3000, 4)
    assert estimate_peak_bytes(alpha, lossy) > 5 * estimate_peak_bytes(big, lossy)
    rotated = Header("jpeg", 4000, 3000, 3, orientation=6)
    assert estimate_peak_bytes(rotated, lossy) > estimate_peak_bytes(big, lossy)
    animated = Header("gif", 400, 400, 4, frames=40)
    assert estimate_peak_bytes(animated, lossy) > estimate_peak_bytes(
        Header("gif", 400, 400, 4), lossy
    )


def test_budget_takes_baselines_off_the_top() -> None:
    budget = budget_of(1024 * MB, workers=2)
    margin = ceiling_margin(1024 * MB)
    assert budget.capacity == 1024 * MB - margin - PARENT - 2 * WORKER_BASELINE
    assert budget.alone_capacity == budget.capacity + WORKER_BASELINE


def test_budget_counts_the_baselines_it_measured() -> None:
    total = 1024 * MB
    # A parent measured bigger than PARENT_BASELINE counts as it is, plus its allowance.
    big_parent = MemoryBudget(total, 2, parent_resident=PARENT_BASELINE + 10 * MB)
    assert big_parent.capacity == budget_of(total, 2).capacity - 10 * MB
    # A library caller's process beyond PARENT_OWN_MAX: the rest is the caller's.
    caller = MemoryBudget(total, 2, parent_resident=PARENT_OWN_MAX + 500 * MB)
    assert caller.statistics().parent_baseline == PARENT_OWN_MAX
    budget = budget_of(total, 2)
    before = budget.capacity
    budget.worker_measured("w1", WORKER_BASELINE - 20 * MB)
    # The other, not measured yet, counts as the largest measured so far.
    assert budget.capacity == before + 40 * MB
    budget.worker_measured("w2", WORKER_BASELINE + 10 * MB)
    assert budget.capacity == before + 20 * MB - 10 * MB
    assert budget.statistics().worker_baseline == WORKER_BASELINE + 10 * MB
    budget.worker_gone("w2")  # its replacement counts as the largest seen until measured
    assert budget.capacity == before + 20 * MB - 10 * MB


def test_the_room_alone_is_counted_beside_a_fresh_worker_not_a_grown_one() -> None:
    budget = budget_of(1024 * MB, 2)
    beside_two = budget.capacity
    # Until one says ready, a fresh worker is the constant.
    assert budget.alone_capacity == beside_two + WORKER_BASELINE
    budget.worker_measured("w1", 30 * MB, fresh=True)
    budget.worker_measured("w2", 31 * MB, fresh=True)
    fresh_alone = budget.alone_capacity
    assert fresh_alone == budget.total - budget.margin - budget.parent_charge - 31 * MB
    # Both grew as a run went on (numpy, the heap of earlier images): beside each
    # other there is less room, but a job alone gets a fresh worker, so not alone.
    budget.worker_measured("w1", 47 * MB)
    budget.worker_measured("w2", 50 * MB)
    assert budget.capacity == fresh_alone + 31 * MB - (47 + 50) * MB
    assert budget.alone_capacity == fresh_alone
    assert budget.statistics().fresh_worker == 31 * MB
    # Which worker an alone job must not be given as it is.
    assert budget.worker_outgrown(50 * MB) and budget.worker_outgrown(36 * MB)
    assert not budget.worker_outgrown(31 * MB + WORKER_GROWTH_SLACK)
    assert not budget.worker_outgrown(29 * MB)


def test_a_job_that_fits_only_alone_is_admitted_alone_when_nothing_runs() -> None:
    budget = budget_of(PARENT + 2 * WORKER_BASELINE + 100 * MB + MARGIN, workers=2)
    assert budget.capacity == 100 * MB
    big = job(100 * MB + WORKER_BASELINE, 2)
    alone = budget.alone_capacity
    assert alone == big.cost
    # Refused only when even the least share of its estimate could not fit alone.
    most = int(alone / LEAST_SHARE)
    assert budget.fits_alone(most) and not budget.fits_alone(most + 2)
    small = job(10 * MB, 1)
    assert budget.admit([small]) is small
    window = [big, job(5 * MB, 3)]
    assert budget.admit(window) is None  # it waits until nothing runs, and so does the rest
    assert len(window) == 2
    budget.release(small)
    admitted = budget.admit(window)
    assert admitted is not None and admitted.id == 2 and admitted.alone
    # While it runs, its capacity counts its own worker only, and nothing joins it.
    assert budget.capacity == budget.alone_capacity
    assert budget.admit(window) is None
    budget.release(admitted)
    assert budget.capacity == 100 * MB and budget.statistics().ran_alone == 1


def job(cost: int, id: int = 0) -> Job:
    return Job(id, f"j{id}", "unused", EncodeOptions(), cost)


def test_budget_admits_while_it_fits_and_reserves_for_the_waiting() -> None:
    budget = budget_of(PARENT + WORKER_BASELINE + 100 * MB + MARGIN, workers=1)
    assert budget.capacity == 100 * MB
    big, small = job(60 * MB, 1), job(30 * MB, 3)
    assert budget.try_acquire(big)
    assert not budget.try_acquire(job(50 * MB, 2))
    assert budget.try_acquire(small)
    # 10 MB are free, but a 90 MB job is waiting: a 5 MB job must leave room for it.
    assert not budget.try_acquire(job(5 * MB, 4), reserve=90 * MB)
    budget.release(big)
    budget.release(small)
    assert budget.in_use == 0 and budget.statistics().peak_in_use == 90 * MB
    budget.force_acquire(job(500 * MB, 5))
    assert budget.statistics().ran_alone == 1


def test_a_job_waiting_counts_once_however_often_it_is_refused() -> None:
    budget = budget_of(PARENT + WORKER_BASELINE + 100 * MB + MARGIN, workers=1)
    running, waiting = job(80 * MB, 1), job(50 * MB, 2)
    assert budget.admit([running]) is running
    for _ in range(50):  # the executor asks at every turn of its loop
        assert budget.admit([waiting]) is None
    assert budget.statistics().waited == 1
    budget.release(running)
    assert budget.admit([waiting]) is waiting and budget.statistics().waited == 1


class RecordingBudget(MemoryBudget):
    """Counts how many admitted jobs ran at once."""

    def __init__(self, total: int, workers: int) -> None:
        super().__init__(total, workers, parent_resident=PARENT_BASELINE)
        self.running = 0
        self.max_running = 0

    def _take(self, job: Job) -> None:
        super()._take(job)
        self.running += 1
        self.max_running = max(self.max_running, self.running)

    def release(self, job: Job) -> None:
        super().release(job)
        self.running -= 1

    def worker_measured(self, worker: str, resident: int, *, fresh: bool = False) -> None:
        # Workers counted at the constant, whatever they measure (29-66 MiB,
        # depending on what they import): these tests are about admission.
        super().worker_measured(worker, WORKER_BASELINE, fresh=fresh)


def jobs_for(paths: list[Path], costs: list[int]) -> list[Job]:
    return [
        Job(i, p.name, str(p), EncodeOptions(), cost)
        for i, (p, cost) in enumerate(zip(paths, costs, strict=True))
    ]


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return [save_jpeg(tmp_path / f"i{i}.jpg", photo_array(120, 90, seed=i)) for i in range(6)]


def test_jobs_that_do_not_fit_together_never_run_together(images: list[Path]) -> None:
    budget = RecordingBudget(PARENT + 2 * WORKER_BASELINE + 100 * MB + MARGIN, workers=2)
    with ProcessExecutor(2, budget=budget) as executor:
        outcomes = list(executor.imap_unordered(jobs_for(images, [60 * MB] * 6)))
    assert len(outcomes) == 6 and all(o.error is None for o in outcomes)
    assert budget.max_running == 1
    assert budget.in_use == 0 and budget.statistics().peak_in_use == 60 * MB


def test_jobs_that_fit_together_use_every_worker(images: list[Path]) -> None:
    budget = RecordingBudget(PARENT + 2 * WORKER_BASELINE + 100 * MB + MARGIN, workers=2)
    with ProcessExecutor(2, budget=budget) as executor:
        outcomes = list(executor.imap_unordered(jobs_for(images, [40 * MB] * 6)))
    assert len(outcomes) == 6
    assert budget.max_running == 2


def test_a_job_bigger_than_what_is_free_runs_alone(images: list[Path]) -> None:
    budget = RecordingBudget(PARENT + 2 * WORKER_BASELINE + 100 * MB + MARGIN, workers=2)
    costs = [10 * MB, 10 * MB, 150 * MB, 10 * MB, 10 * MB, 10 * MB]
    with ProcessExecutor(2, budget=budget, lookahead=2) as executor:
        outcomes = list(executor.imap_unordered(jobs_for(images, costs)))
    assert len(outcomes) == 6 and budget.statistics().ran_alone == 1
    assert budget.in_use == 0


def test_largest_first_within_the_lookahead(images: list[Path]) -> None:
    costs = [1 * MB, 5 * MB, 3 * MB, 4 * MB, 2 * MB, 6 * MB]
    with ProcessExecutor(1, lookahead=6) as executor:
        order = [o.job.cost for o in executor.imap_unordered(jobs_for(images, costs))]
    assert order == sorted(costs, reverse=True)


def test_workers_are_recycled_after_n_tasks(images: list[Path]) -> None:
    with ProcessExecutor(1, max_tasks_per_worker=2) as executor:
        outcomes = list(executor.imap_unordered(jobs_for(images, [0] * 6)))
        stats = executor.statistics()
    assert all(o.error is None for o in outcomes)
    assert len({o.worker for o in outcomes}) == 3
    assert stats.restarts == 3 and stats.completed == 6


def test_image_over_the_whole_budget_is_refused_with_a_reason(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "small.jpg", photo_array(200, 150))
    save_jpeg(src / "huge.jpg", photo_array(4000, 3000, seed=1), quality=50)
    # What this process and one worker leave for an image lies halfway between the
    # small image's estimate and the least share of its estimate the huge one could
    # need (the parent's figure is this test runner's, measured).
    small, huge = (
        estimate_peak_bytes(Header("jpeg", w, h, 3), EncodeOptions())
        for w, h in ((200, 150), (4000, 3000))
    )
    base = 1 << 30
    max_memory = base + (small + int(huge * LEAST_SHARE)) // 2 - MemoryBudget(base, 1).capacity
    config = RunConfig(src=src, dest=dest, workers=1, max_memory=max_memory)
    summary = convert_tree(src, dest, config)
    assert summary.converted == 1
    [refused] = summary.not_converted
    assert refused.key == "huge.jpg" and refused.reason == "too large"
    assert "--max-memory" in refused.message and "4000x3000" in refused.message
    assert summary.memory["budget_bytes"] == max_memory


@pytest.mark.timeout(60)
def test_grace_period_bounds_a_graceful_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(4):
        save_jpeg(src / f"a{i}.jpg", photo_array(64, 64, seed=i))
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "hang:a1.jpg")
    stop = StopToken()

    class StopAfterFirst:
        def found(self, count: int) -> None: ...
        def walk_done(self, total: int) -> None: ...
        def started(self, snapshot: object) -> None: ...

        def stopping(self, hard: bool) -> None: ...

        def finished(self, result: Result) -> None:
            if not stop.graceful:
                stop.request()

    config = RunConfig(src=src, dest=dest, workers=2, grace=1.0, timeout=50, lookahead_per_worker=1)
    started = time.monotonic()
    summary = convert_tree(src, dest, config, listener=StopAfterFirst(), stop=stop)
    assert time.monotonic() - started < 30  # the hang lasts 50 s; grace cut it at 1 s
    assert summary.interrupted and summary.exit_code == 130
    # The abandoned image is neither converted nor counted as a failure.
    assert not (dest / "a1.webp").exists() and summary.failed == 0
    assert not [p for p in dest.rglob("*") if p.name.endswith(".optimizr-tmp")]


def test_summary_reports_measured_memory_and_cpu(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(4):
        save_jpeg(src / f"p{i}.jpg", photo_array(400, 300, seed=i))
    summary = convert_tree(src, dest, RunConfig(src=src, dest=dest, workers=2))
    # The parent alone (Python, numpy, pyvips) is tens of MB; workers add theirs.
    assert summary.memory["peak_rss_bytes"] > 50 * MB
    assert summary.memory["samples"] >= 1
    assert 0 < summary.cpu["codec_cpu_seconds"] <= summary.cpu["workers_cpu_seconds"] * 1.05
    assert 0 <= summary.cpu["orchestration_share"] < 1
    assert summary.executor["started"] == 4 and summary.executor["crashed"] == 0


@pytest.mark.parametrize("kind", ["jpeg", "rgba"])
def test_estimate_covers_the_quality_search(tmp_path: Path, kind: str) -> None:
    """--target-score holds the whole image and the metric's planes (issue 14): the
    estimate must cover what a fresh worker-like process really grows by (with
    alpha: two pyramids, one per background)."""
    import json
    import subprocess
    import sys

    from optimizr.probe import probe

    if kind == "jpeg":
        source = save_jpeg(tmp_path / "photo.jpg", photo_array(1200, 900, seed=3))
    else:
        # Smaller: its lossless candidates make it the slowest search of the suite.
        photo = photo_array(640, 480, seed=3)
        alpha = np.linspace(40, 255, 640 * 480).reshape(480, 640, 1).astype(np.uint8)
        source = save_png(tmp_path / "photo.png", np.concatenate([photo, alpha], axis=2))
    options = EncodeOptions(target_score=80.0)
    bench = Path(__file__).resolve().parent.parent / "bench"
    done = subprocess.run(
        [
            sys.executable,
            str(bench / "calibrate_memory.py"),
            "--measure",
            str(source),
            "target_score" if kind == "jpeg" else "target_score_rgba",
        ],
        cwd=bench,
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(done.stdout)
    growth = measured["high_water"] - measured["resident_before"]
    header = probe(str(source))
    assert header is not None
    estimate = estimate_peak_bytes(header, options)
    plain = estimate_peak_bytes(header, EncodeOptions())
    assert growth <= estimate
    # ... and the term is the search's: without it the estimate would not cover it.
    assert plain < growth
