"""Progress a user can plan with: a total known early (the count pass), a display
refreshed on a timer that fits 80 columns, and the run's progress for `status`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import photo_array, save_jpeg
from optimizr import RunConfig
from optimizr.count import TreeCounter
from optimizr.events import RunSnapshot
from optimizr.executors import InlineExecutor
from optimizr.pipeline import Pipeline
from optimizr.results import Result
from optimizr.storage.base import DirectoryListing, SourceEntry, WalkOptions
from optimizr.storage.local import LocalStorage
from optimizr.storage.memory import MemoryStorage


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll for a state the test needs, not for time to pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


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
