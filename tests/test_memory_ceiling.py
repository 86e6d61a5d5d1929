"""The memory budget is a ceiling on what jobs really use, not only on their estimates.

Real worker processes, with a fault-injecting job (``grow-MIB`` / ``hold-MIB`` in
``executors/worker.py``) whose memory grows far past its estimate, as a PNG with
alpha did in issue 12 (estimated at 160 MiB, measured at 306 MiB). The parent is
this test process, which the ceiling counts as the parent's baseline and what
it grows by meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pyvips

from conftest import manifest_rows, photo_array, save_jpeg
from optimizr import EncodeOptions, RunConfig, convert_tree
from optimizr.budget import (
    PARENT_BASELINE,
    PARENT_GROWTH,
    Header,
    MemoryBudget,
    ceiling_margin,
    estimate_peak_bytes,
)
from optimizr.errors import OverMemoryBudget
from optimizr.executors import Job, Outcome, ProcessExecutor
from optimizr.executors.base import ExecutorStatistics, Wakeup

MB = 1 << 20
#: More than an idle worker's resident size (29-40 MiB measured): the figure the
#: budget counts a worker as until it measured it.
WORKER = 72 * MB
#: What the budget counts the parent as when told it measured PARENT_BASELINE.
PARENT = PARENT_BASELINE + PARENT_GROWTH


def total_for(capacity: int, workers: int = 2) -> int:
    """The --max-memory that leaves ``capacity`` for images beside idle workers."""
    fixed = PARENT + workers * WORKER + capacity
    return fixed + ceiling_margin(fixed)


class PinnedBudget(MemoryBudget):
    """Counts every worker at WORKER, whatever it measures (29-66 MiB, depending on
    what it imports): admission then leaves exactly the capacity a test asks for,
    while the ceiling still reads the real tree."""

    def worker_measured(self, worker: str, resident: int, *, fresh: bool = False) -> None:
        super().worker_measured(worker, WORKER, fresh=fresh)


def budget_for(capacity: int, workers: int = 2) -> MemoryBudget:
    budget = PinnedBudget(
        total_for(capacity, workers),
        workers,
        worker_baseline=WORKER,
        parent_resident=PARENT_BASELINE,
    )
    assert budget.capacity == capacity
    return budget


def job(path: Path, cost: int, id: int) -> Job:
    return Job(id, path.name, str(path), EncodeOptions(), cost)


def until(condition: Callable[[], bool], wakeup: Wakeup, what: str) -> Iterator[Wakeup]:
    """Hand the executor wake-ups (it goes on measuring and answering) until ``condition``."""
    deadline = time.monotonic() + 120
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        yield wakeup


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return [save_jpeg(tmp_path / f"p{i}.jpg", photo_array(160, 120, seed=i)) for i in range(4)]


@pytest.mark.timeout(180)
def test_a_job_over_its_estimate_holds_back_admissions(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    grower, other = photos[0], photos[1]
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", f"hold-90:{grower.name}")
    budget = budget_for(150 * MB)
    wakeup = Wakeup()
    seen: dict[str, int] = {}

    def jobs() -> Iterator[Job | Wakeup]:
        yield job(grower, 10 * MB, 1)
        # It fits on the estimates (10 + 100 of 150 MiB, and what measured workers
        # leave beyond), not beside the 90 MiB the grower uses.
        yield from until(lambda: budget.in_use > 88 * MB, wakeup, "the grower charged its growth")
        yield job(other, 100 * MB, 2)
        yield from until(lambda: budget.statistics().held >= 1, wakeup, "an admission held")
        seen["running"] = executor.statistics().running
        (grower.parent / f"{grower.name}.release").touch()

    with ProcessExecutor(2, budget=budget) as executor:
        outcomes = list(executor.imap_unordered(jobs()))
    wakeup.close()
    assert seen["running"] == 1  # the other job waited while the grower was over its estimate
    assert [o.job.key for o in outcomes] == [grower.name, other.name]
    assert all(o.error is None and o.encoded is not None for o in outcomes)
    stats = budget.statistics()
    assert (stats.over_estimate, stats.held, stats.retried_alone) == (1, 1, 0)
    assert stats.peak_in_use >= 90 * MB  # charged what it used, not its 10 MiB estimate
    assert budget.in_use == 0 and 0 < stats.peak_measured < budget.total


@pytest.mark.timeout(180)
def test_a_job_outgrowing_the_budget_beside_others_is_stopped_and_run_again_alone(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    grower, steady, late = photos[0], photos[1], photos[2]
    # The steady job uses what it was estimated to; the grower 160 MiB on a 10 MiB
    # estimate: it fits alone, not beside the steady one (whether an idle worker is
    # 29 MB, as now, or 49 MB, as before optimizr's package imported lazily).
    faults = f"grow-160:{grower.name},hold-120:{steady.name}"
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", faults)
    budget = budget_for(150 * MB)
    wakeup = Wakeup()

    def jobs() -> Iterator[Job | Wakeup]:
        yield job(steady, 128 * MB, 1)
        yield job(grower, 10 * MB, 2)
        yield from until(lambda: budget.statistics().retried_alone >= 1, wakeup, "a stop")
        yield job(late, 1 * MB, 3)  # waits behind the grower, which runs alone
        (steady.parent / f"{steady.name}.release").touch()

    with ProcessExecutor(2, budget=budget) as executor:
        outcomes = list(executor.imap_unordered(jobs()))
        executor_stats = executor.statistics()
    wakeup.close()
    assert [o.job.key for o in outcomes] == [steady.name, grower.name, late.name]
    assert all(o.error is None and o.encoded is not None for o in outcomes)
    retried = outcomes[1].job
    assert retried.alone and retried.cost > 100 * MB  # its measured peak became its estimate
    stats = budget.statistics()
    assert (stats.retried_alone, stats.too_large_alone) == (1, 0)
    assert executor_stats.stopped == 1 and executor_stats.crashed == 0
    # The ceiling held: the tree as sampled never reached the budget.
    assert 0 < stats.peak_measured < budget.total
    assert budget.in_use == 0


@pytest.mark.timeout(180)
def test_a_job_that_cannot_fit_even_alone_fails_as_too_large(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    grower = photos[0]
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", f"grow-400:{grower.name}")
    budget = budget_for(100 * MB)
    jobs = [job(grower, 10 * MB, 1), *(job(p, 5 * MB, i) for i, p in enumerate(photos[1:], 2))]
    with ProcessExecutor(2, budget=budget) as executor:
        outcomes: list[Outcome] = list(executor.imap_unordered(jobs))
    assert sorted(o.job.id for o in outcomes) == [1, 2, 3, 4]  # every job has its outcome
    [failed] = [o for o in outcomes if o.error is not None]
    assert failed.job.key == grower.name and isinstance(failed.error, OverMemoryBudget)
    message = failed.error.message
    assert "\n" not in message and "grew to" in message and "--max-memory" in message
    assert all(o.encoded is not None for o in outcomes if o is not failed)
    stats = budget.statistics()
    assert stats.too_large_alone == 1 and stats.peak_measured < budget.total


@pytest.mark.timeout(180)
def test_a_run_reports_what_the_ceiling_did_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(4):
        save_jpeg(src / f"a{i}.jpg", photo_array(160, 120, seed=i))
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", "grow-600:a2.jpg")
    # What the parent and two idle workers use, and 120 MiB for images.
    max_memory = total_for(120 * MB)
    config = RunConfig(src=src, dest=dest, workers=2, max_memory=max_memory)
    summary = convert_tree(src, dest, config)
    assert summary.found == summary.finished == 4 and summary.converted == 3
    [refused] = summary.not_converted
    assert (refused.key, refused.reason) == ("a2.jpg", "too large")
    assert "grew to" in refused.message and "\n" not in refused.message
    assert not (dest / "a2.webp").exists()
    # Decided by this run's budget, like a refusal from the header: not an attempt.
    assert manifest_rows(dest)["a2.jpg"]["attempts"] == 0
    doc = json.loads((dest / "optimizr-summary.json").read_text())
    memory = doc["memory"]
    assert memory["too_large_alone"] == 1 and memory["jobs_over_estimate"] == 1
    assert 0 < memory["peak_measured_bytes"] < memory["budget_bytes"] == max_memory
    [finding] = [f for f in doc["analysis"] if "more memory than estimated" in f["finding"]]
    assert "neared --max-memory even alone" in finding["finding"]


def measured_worker(tmp_path: Path) -> int:
    """An idle worker's resident size here and now, as a run's budget measures it."""
    budget = MemoryBudget(1 << 30, 1)
    tiny = save_jpeg(tmp_path / "tiny" / "t.jpg", photo_array(16, 16))
    with ProcessExecutor(1, budget=budget) as executor:
        list(executor.imap_unordered([job(tiny, 1 * MB, 1)]))
    return budget.statistics().worker_baseline


def total_fitting_alone(cost: int, worker: int) -> int:
    """A --max-memory at which ``cost`` fits beside one worker of ``worker`` bytes
    but not beside two: half a worker to spare on either side."""
    fixed = MemoryBudget(1 << 29, 1).parent_charge + worker + cost + worker // 2
    return fixed + ceiling_margin(fixed)


@pytest.mark.timeout(180)
def test_an_image_that_fits_only_alone_is_converted_and_one_that_cannot_is_refused(
    tmp_path: Path,
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    save_jpeg(src / "big.jpg", photo_array(2000, 1500, seed=7))
    # Refused from its header: a black image is enough (and quick to make).
    pyvips.Image.black(8000, 6000, bands=3).jpegsave(str(src / "huge.jpg"))
    cost = estimate_peak_bytes(Header("jpeg", 2000, 1500, 3), EncodeOptions())
    max_memory = total_fitting_alone(cost, measured_worker(tmp_path))
    huge_cost = estimate_peak_bytes(Header("jpeg", 8000, 6000, 3), EncodeOptions())
    assert huge_cost > MemoryBudget(max_memory, 1).capacity + 16 * MB  # even alone it cannot
    config = RunConfig(src=src, dest=dest, workers=2, max_memory=max_memory)
    summary = convert_tree(src, dest, config)
    assert summary.found == 2 and summary.converted == 1
    assert (dest / "big.webp").stat().st_size > 0
    [refused] = summary.not_converted
    assert (refused.key, refused.reason) == ("huge.jpg", "too large")
    assert "8000x6000" in refused.message and "even converting alone" in refused.message
    assert "\n" not in refused.message
    memory = json.loads((dest / "optimizr-summary.json").read_text())["memory"]
    # big.jpg ran alone, the other worker retired meanwhile; nothing was stopped.
    assert memory["ran_alone"] == memory["ran_with_workers_retired"] == 1
    assert memory["stopped_and_retried_alone"] == memory["too_large_alone"] == 0
    assert memory["budget_for_images_bytes"] < cost <= memory["budget_alone_bytes"]
    assert 0 < memory["peak_measured_bytes"] < memory["budget_bytes"] == max_memory


@pytest.mark.timeout(180)
def test_a_job_that_fits_only_alone_runs_with_the_other_workers_retired(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    big, small = photos[0], photos[1:]
    # It uses 120 MiB: more than the 100 MiB left for images beside two workers,
    # less than what is left beside its own worker alone; beside the other worker
    # the tree would come within the margin of the ceiling.
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", f"hold-120:{big.name}")
    budget = budget_for(100 * MB)
    assert budget.alone_capacity == 100 * MB + WORKER
    wakeup = Wakeup()
    seen: dict[str, object] = {}

    def grown() -> bool:
        # The tree: at least the parent and 110 MiB of the big job (its worker is
        # 29-66 MiB here, depending on what it imports: not counted).
        return budget.statistics().peak_measured >= PARENT_BASELINE + 110 * MB

    def jobs() -> Iterator[Job | Wakeup]:
        yield job(big, 130 * MB, 1)
        yield job(small[0], 5 * MB, 2)  # it waits: no worker is left beside an alone job
        yield from until(grown, wakeup, "the big job grew to 110 MiB")
        seen["during"] = executor.statistics()
        seen["capacity"] = (budget.capacity, budget.alone_capacity)
        (big.parent / f"{big.name}.release").touch()
        yield from until(lambda: executor.statistics().alive == 2, wakeup, "the pool restored")
        seen["after"] = executor.statistics()
        yield job(small[1], 5 * MB, 3)
        yield job(small[2], 5 * MB, 4)

    with ProcessExecutor(2, budget=budget) as executor:
        outcomes = list(executor.imap_unordered(jobs()))
    wakeup.close()
    assert all(o.error is None and o.encoded is not None for o in outcomes)
    assert [o.job.id for o in outcomes][:2] == [1, 2]  # the small one waited for the big one
    assert outcomes[0].job.alone
    during = seen["during"]
    assert isinstance(during, ExecutorStatistics)
    # While it ran: its worker was the only one alive, and no other job ran.
    assert (during.running, during.alive, during.started) == (1, 1, 1)
    assert (during.alone_runs, during.workers_retired, during.workers_restored) == (1, 1, 0)
    capacity, alone_capacity = seen["capacity"]  # type: ignore[misc]
    assert capacity == alone_capacity  # its capacity counted one worker
    after = seen["after"]
    assert isinstance(after, ExecutorStatistics)
    assert (after.alive, after.workers_restored, after.stopped, after.crashed) == (2, 1, 0, 0)
    stats = budget.statistics()
    assert (stats.ran_alone, stats.retried_alone, stats.too_large_alone) == (1, 0, 0)
    assert budget.in_use == 0
    # The ceiling held without stopping anything: the tree stayed under the budget.
    assert 0 < stats.peak_measured < budget.total - budget.margin


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kept", [40, 0])
def test_a_job_to_run_alone_gets_a_fresh_worker_when_its_own_has_grown(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, kept: int
) -> None:
    first, big = photos[0], photos[1]
    # The first image leaves its worker 40 MiB bigger, as numpy's import and the
    # heap of earlier images did over a long run (45-50 MiB against 29-32 fresh).
    monkeypatch.setenv("OPTIMIZR_TEST_FAULTS", f"keep-{kept}:{first.name}")
    budget = MemoryBudget(1 << 30, 1)
    wakeup = Wakeup()

    def jobs() -> Iterator[Job | Wakeup]:
        yield job(first, 5 * MB, 1)
        yield from until(lambda: executor.statistics().completed == 1, wakeup, "the first done")
        yield dataclasses.replace(job(big, 5 * MB, 2), alone=True)

    with ProcessExecutor(1, budget=budget) as executor:
        outcomes = list(executor.imap_unordered(jobs()))
        stats = executor.statistics()
    wakeup.close()
    assert [o.error for o in outcomes] == [None, None]
    fresh = budget.statistics().fresh_worker
    assert 20 * MB < fresh < 60 * MB  # measured when ready, not after the first image
    # The room alone counts a fresh worker; a grown one is replaced before the job.
    assert budget.alone_capacity == budget.total - budget.margin - budget.parent_charge - fresh
    first_worker, alone_worker = (o.worker for o in outcomes)
    if kept:
        assert stats.workers_refreshed == 1 and alone_worker != first_worker
    else:
        assert stats.workers_refreshed == 0 and alone_worker == first_worker
    assert (stats.crashed, stats.stopped, stats.alive) == (0, 0, 1)
    assert budget.in_use == 0
