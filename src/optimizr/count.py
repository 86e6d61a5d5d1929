"""Counting SRC ahead of the work, so that progress has a total and an ETA early.

The pipeline's own walk cannot give one: it is throttled on purpose (the
executor pulls jobs only as workers free up, ``--lookahead``), so on a real
library it reaches the last directory only near the end of the run, and until
then the display could only say ``153 of 180+``. The count is a second walk of
the source storage with the same :class:`WalkOptions` (include, exclude, prune,
follow-symlinks), on a thread of its own, that only adds up files and bytes:
it holds one directory's listing at a time and nothing per file.

It is an estimate. Files may appear or vanish while the run goes, so the
pipeline's walk stays the authority: once it has finished, its figure is the
total (see :attr:`RunSnapshot.total <optimizr.events.RunSnapshot.total>`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from optimizr.storage.base import DirectoryListing, Storage, WalkOptions


@dataclass(frozen=True)
class CountStatistics:
    #: Files (and unreadable places) the walk listed so far, as the pipeline counts them.
    files: int
    bytes: int
    #: The whole tree was counted: ``files`` and ``bytes`` are the totals.
    done: bool
    seconds: float
    #: Why the count stopped short, if a listing failed (the pipeline's walk reports it).
    error: str = ""


class TreeCounter:
    """A listing-only walk on a daemon thread. ``stop()`` ends it at the next
    directory; so does ``cancelled()`` turning true (a stop was asked for, or the
    pipeline's own walk finished and the count has nothing left to tell)."""

    def __init__(
        self,
        storage: Storage,
        options: WalkOptions,
        *,
        cancelled: Callable[[], bool] = lambda: False,
        keep: Callable[[DirectoryListing], DirectoryListing] | None = None,
    ) -> None:
        self.storage = storage
        self.options = options
        self.cancelled = cancelled
        #: Takes out of each listing what the pipeline will not take as sources
        #: (optimizr's own outputs, in place); called on the counting thread.
        self.keep = keep
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._files = 0
        self._bytes = 0
        self._done = False
        self._error = ""
        self._started = 0.0
        self._ended: float | None = None
        self._thread = threading.Thread(target=self._run, name="optimizr-count", daemon=True)

    def start(self) -> TreeCounter:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Ask the count to end and wait a little for it. A listing stuck in the
        kernel (a dead network share) cannot be interrupted; the thread is a
        daemon, so it never keeps the process alive."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def statistics(self) -> CountStatistics:
        with self._lock:
            end = self._ended if self._ended is not None else time.monotonic()
            seconds = end - self._started if self._started else 0.0
            return CountStatistics(self._files, self._bytes, self._done, seconds, self._error)

    def _run(self) -> None:
        walk = self.storage.walk(self.options)
        try:
            for listing in walk:
                if self._stop.is_set() or self.cancelled():
                    return
                if self.keep is not None:
                    listing = self.keep(listing)
                size = sum(entry.size for entry in listing.entries)
                with self._lock:
                    self._files += len(listing.entries)
                    self._bytes += size
            with self._lock:
                self._done = True
        except OSError as exc:
            # SRC vanished or its root cannot be listed: the pipeline's walk
            # meets the same problem and reports it; the total stays unknown.
            with self._lock:
                self._error = exc.strerror or str(exc)
        finally:
            with self._lock:
                self._ended = time.monotonic()
