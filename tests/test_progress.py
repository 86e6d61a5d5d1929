"""Progress a user can plan with: a total known early (the count pass), a display
refreshed on a timer that fits 80 columns, and the run's progress for `status`."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import Result as CliResult
from rich.console import Console

from conftest import photo_array, save_jpeg
from optimizr import RunConfig
from optimizr.count import TreeCounter
from optimizr.events import RunSnapshot
from optimizr.executors import InlineExecutor
from optimizr.lock import RunLock
from optimizr.manifest import Manifest, state_dir
from optimizr.metrics.progress import TerminalProgress, Throughput, clock_text
from optimizr.pipeline import Pipeline
from optimizr.results import Result
from optimizr.status import read_status
from optimizr.storage.base import DirectoryListing, SourceEntry, WalkOptions
from optimizr.storage.local import LocalStorage
from optimizr.storage.memory import MemoryStorage


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll for a state the test needs, not for time to pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def snapshot(**changes: object) -> RunSnapshot:
    base = RunSnapshot(
        found=0, walk_done=False, finished=0, converted=0, skipped=0, failed=0,
        bytes_in=0, bytes_out=0, running=0, queued=0, workers=2, workers_alive=2,
        worker_restarts=0, budget_total=0, budget_in_use=0, draining=False,
        last_progress=0.0,
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def render(progress: TerminalProgress, width: int = 80) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, legacy_windows=False).print(progress)
    return out.getvalue().splitlines()


# -- the count pass ---------------------------------------------------------------------------


def test_the_count_sees_what_the_walk_sees_with_the_same_options(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for i, name in enumerate(["a/1.jpg", "a/2.png", "b/c/3.jpg", "skip/4.jpg", "raw/5.jpg"]):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(b"x" * (100 + i))
    (src / "notes.txt").write_bytes(b"hello")
    (src / "link").symlink_to(src / "b")
    options = WalkOptions(exclude=("*.txt", "raw/**"), prune=("skip",), follow_symlinks=True)
    storage = LocalStorage(src)
    walked = [e for listing in storage.walk(options) for e in listing.entries]

    counter = TreeCounter(LocalStorage(src), options).start()
    wait_for(lambda: counter.statistics().done)
    count = counter.statistics()
    assert (count.files, count.bytes) == (len(walked), sum(e.size for e in walked))
    assert count.files == 4  # a/1, a/2, b/c/3 and link/c/3; not the excluded, pruned or text
    assert not counter.running


class EndlessStorage(MemoryStorage):
    """A tree that never ends: the count must still stop when asked."""

    def walk(self, options: WalkOptions) -> Iterator[DirectoryListing]:
        n = 0
        while True:
            n += 1
            yield DirectoryListing(f"d{n}", (SourceEntry(f"d{n}/a.jpg", 10, 0),))


def test_the_count_stops_promptly_when_the_run_ends() -> None:
    counter = TreeCounter(EndlessStorage(), WalkOptions()).start()
    wait_for(lambda: counter.statistics().files > 1000)
    counter.stop()
    assert not counter.running
    stopped_at = counter.statistics()
    assert not stopped_at.done and stopped_at.bytes == 10 * stopped_at.files


def test_the_count_stops_when_the_run_is_interrupted() -> None:
    interrupted = threading.Event()
    counter = TreeCounter(EndlessStorage(), WalkOptions(), cancelled=interrupted.is_set).start()
    wait_for(lambda: counter.statistics().files > 10)
    interrupted.set()
    wait_for(lambda: not counter.running)
    assert not counter.statistics().done


def test_the_total_is_known_long_before_the_throttled_walk_ends(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(20):
        save_jpeg(src / f"d{i:02}" / "a.jpg", photo_array(32, 24, seed=i))
    tree_bytes = sum(p.stat().st_size for p in src.rglob("*.jpg"))
    seen: list[RunSnapshot] = []

    class Watcher:
        """At the first image finished: wait for the count, add a file the count
        cannot have seen, and remember what the run knew then."""

        snap: Callable[[], RunSnapshot]

        def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
            self.snap = snapshot

        def found(self, count: int) -> None: ...
        def walk_done(self, total: int) -> None: ...
        def stopping(self, hard: bool) -> None: ...

        def finished(self, result: Result) -> None:
            if not seen:
                wait_for(lambda: self.snap().count_done)
                seen.append(self.snap())
                save_jpeg(src / "d19" / "late.jpg", photo_array(32, 24, seed=99))

    config = RunConfig(src=src, dest=dest)
    pipeline = Pipeline(config, LocalStorage(src), LocalStorage(dest), InlineExecutor(),
                        listener=Watcher())  # fmt: skip
    summary = pipeline.run()
    [early] = seen
    assert not early.walk_done and early.found < 20
    assert early.total == 20 and early.counted == 20
    assert early.total_bytes == tree_bytes
    # The pipeline's own walk stays the authority: the file added meanwhile counts.
    final = pipeline.snapshot()
    assert summary.found == 21 and final.walk_done and final.total == 21
    assert final.finished_bytes == final.total_bytes == final.found_bytes
    assert pipeline.counter is not None and not pipeline.counter.running


# -- the display ------------------------------------------------------------------------------


def test_the_live_display_fits_80_columns_even_with_long_numbers() -> None:
    clock = FakeClock()
    progress = TerminalProgress(live=False, stream=io.StringIO(), clock=clock)
    state = snapshot(
        found=9_876_543, finished=1_234_567, failed=123_456, bytes_in=987_654_321_098,
        bytes_out=123_456_789_012, finished_bytes=987_654_321_098, running=64, queued=1_024,
        counted=12_345_678, counted_bytes=12_345_678_901_234, count_done=True,
        budget_total=64 * 2**30, budget_in_use=12 * 2**30,
    )  # fmt: skip
    progress.started(lambda: state)
    clock.now += 3 * 3600 + 125
    for width in (80, 60):
        lines = render(progress, width)
        assert lines and max(len(line) for line in lines) <= width, lines
        text = "\n".join(lines)
        # Nothing is cut in two by a wrap: every figure stands whole on one line.
        for part in ("1,234,567 of 12,345,678", "10%", "64 running, 1,024 queued",
                     "123,456 failed", "elapsed 3:02:05", "ETA "):  # fmt: skip
            assert part in text, (part, lines)
    assert "━" in render(progress, 80)[0]  # the bar takes the room that is left


def test_the_display_refreshes_from_the_run_itself_not_only_when_an_image_finishes() -> None:
    """It showed `0/7, 0 B` for 6 s while two images were converting."""
    clock = FakeClock()
    progress = TerminalProgress(live=False, stream=io.StringIO(), clock=clock)
    state = snapshot(found=7, walk_done=True, running=2, queued=5)
    progress.started(lambda: state)
    first = "\n".join(render(progress))
    assert "0 of 7" in first and "2 running, 5 queued" in first
    # No listener event at all: the next refresh reads the run again.
    state = replace(state, finished=3, running=2, queued=2, finished_bytes=3000)
    clock.now += 6
    second = "\n".join(render(progress))
    assert "3 of 7" in second and "43%" in second and "2 running, 2 queued" in second
    assert "elapsed 0:06" in second


def test_the_live_display_is_redrawn_on_a_timer() -> None:
    stream = io.StringIO()
    console = Console(file=stream, width=80, force_terminal=True, color_system=None)
    progress = TerminalProgress(live=True, console=console)
    state = snapshot(found=7, walk_done=True, running=2, queued=5)
    progress.started(lambda: state)
    with progress:
        wait_for(lambda: "0 of 7" in stream.getvalue())
        state = replace(state, finished=1, running=1)  # no event: the timer redraws
        wait_for(lambda: "1 of 7" in stream.getvalue())


def test_eta_and_elapsed_are_labelled_and_the_eta_follows_the_bytes() -> None:
    clock = FakeClock()
    progress = TerminalProgress(live=False, stream=io.StringIO(), clock=clock)
    state = snapshot(found=4, walk_done=True, found_bytes=4_000_000)
    progress.started(lambda: state)
    assert "ETA ?" in progress.plain_line()  # nothing finished: no rate to go by
    # One small file and one large one: 3 MB of 4 MB done in 30 s, 1 MB left.
    clock.now += 30
    state = replace(state, finished=2, finished_bytes=3_000_000)
    line = progress.plain_line()
    assert "2 of 4 files (50%)" in line
    assert "elapsed 0:30" in line and "ETA 0:10" in line, line


def test_throughput_is_measured_over_a_window_and_a_stall_does_not_erase_it() -> None:
    rate = Throughput(window=30.0)
    assert rate.per_second() is None
    rate.add(0.0, 0)
    rate.add(10.0, 1000)
    assert rate.per_second() == pytest.approx(100.0)
    # Nothing finishes for 90 s (one huge image): no progress within the window,
    # so the whole run's mean stands in, instead of no estimate at all.
    for t in range(20, 101, 10):
        rate.add(float(t), 1000)
    assert rate.per_second() == pytest.approx(1000 / 100)
    # Then work resumes: only the last 30 s count.
    rate.add(110.0, 2000)
    assert rate.per_second() == pytest.approx(1000 / 30)


def test_clock_text() -> None:
    assert [clock_text(s) for s in (0, 62, 3599.6, 3600 * 27 + 61)] == [
        "0:00", "1:02", "1:00:00", "27:01:01"
    ]  # fmt: skip


def test_plain_lines_without_a_terminal_come_on_a_timer() -> None:
    stream = io.StringIO()
    progress = TerminalProgress(live=False, interval=0.01, stream=stream)
    state = snapshot(found=5, running=2, queued=3, counted=9, count_done=True)
    progress.started(lambda: state)
    with progress:
        wait_for(lambda: stream.getvalue().count("\n") >= 2)  # with no event at all
        progress.finished(Result("f2.jpg", "failed", "corrupt", "bad data"))
    lines = stream.getvalue().splitlines()
    assert "FAILED f2.jpg: corrupt (bad data)" in lines
    line = next(line for line in lines if not line.startswith("FAILED"))
    assert line.startswith("0 of 9 files (0%), 2 running, 3 queued, "), line
    assert "elapsed " in line and ", ETA ?" in line


def test_plain_line_while_the_total_is_not_known() -> None:
    progress = TerminalProgress(live=False, stream=io.StringIO())
    progress.started(lambda: snapshot(found=180, finished=153, failed=2))
    line = progress.plain_line()
    assert line.startswith("153 of 180+ files (counting), 0 running, 0 queued, "), line
    assert ", 2 failed, " in line and "ETA ?" in line


class InterruptedStream(io.StringIO):
    """A stream during whose first write Ctrl-C arrives: the handler prints too."""

    progress: TerminalProgress

    def write(self, text: str) -> int:
        if not hasattr(self, "interrupted"):
            self.interrupted = True
            self.progress.stopping(hard=False)
        return super().write(text)


@pytest.mark.timeout(30)
def test_a_signal_arriving_while_a_line_is_printed_prints_too() -> None:
    """The second SIGINT of test_second_sigint_aborts_without_partial_files hung the run:
    its handler waited for a print lock the interrupted print held."""
    stream = InterruptedStream()
    progress = TerminalProgress(live=False, interval=0, stream=stream)
    stream.progress = progress
    progress.finished(Result("f2.jpg", "failed", "corrupt", "bad data"))
    text = stream.getvalue()
    assert "stopping: finishing the images in flight" in text and "FAILED f2.jpg" in text


# -- status during a run ----------------------------------------------------------------------


def test_progress_is_published_in_the_manifest_for_status(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with RunLock(state_dir(dest)):
        manifest = Manifest.open(dest)
        manifest.begin_run(RunConfig(src=tmp_path, dest=dest), "fp")
        manifest.note_progress(3, None)
        manifest.flush()
        live = read_status(dest)
        assert live.progress is not None and live.progress.processed == 3
        assert live.progress.total is None and live.progress.remaining is None
        manifest.note_progress(4, 10)
        manifest.flush()
        live = read_status(dest)
        assert live.progress is not None and live.progress.remaining == 6
        assert live.to_dict()["progress"] == {
            "run_id": manifest.run_id, "processed": 4, "total": 10, "remaining": 6,
            "updated_at": live.progress.updated_at,
        }  # fmt: skip
        manifest.finish_run(10, 10, 0, 0, 0)
        manifest.close()
    # Once the run is over, its progress is history, not a live figure.
    assert read_status(dest).progress is None


@pytest.mark.timeout(180)
def test_status_shows_how_many_remain_while_a_run_is_going(
    tmp_path: Path, cli: Callable[..., CliResult]
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for i in range(24):
        save_jpeg(src / f"d{i % 3}" / f"img{i:03}.jpg", photo_array(1200, 900, seed=i))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "optimizr", "convert", str(src), str(dest),
               "--no-progress", "-j", "1", "--effort", "6"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        reports: list[dict[str, object]] = []

        def reports_remaining() -> bool:
            if not (state_dir(dest) / "manifest.sqlite").exists():
                return False
            result = cli("status", dest, "--json")
            assert result.exit_code == 0, result.output
            doc = json.loads(result.output)
            progress = doc["progress"]
            if doc["running"] and progress and progress["remaining"] is not None:
                # Counted after status was read: every file it called processed has
                # its output in place by now (the output is renamed before its row).
                doc["outputs_after"] = len(list(dest.rglob("*.webp")))
                reports.append(doc)
            return bool(reports)

        wait_for(reports_remaining, timeout=150)
        progress = reports[0]["progress"]
        assert isinstance(progress, dict)
        assert progress["total"] == 24 and 1 <= progress["processed"] < 24
        assert progress["remaining"] == 24 - progress["processed"]
        # Processed means finished, not merely found by the walk.
        assert progress["processed"] <= reports[0]["outputs_after"]
        text = cli("status", dest).output
        assert re.search(r"^progress  \d+ processed this run, remaining \d+ of 24$", text, re.M)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
