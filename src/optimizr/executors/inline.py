"""Run jobs in the calling process, one at a time: no isolation, no start-up cost."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from optimizr.encode import encode_webp
from optimizr.errors import ImageError
from optimizr.executors.base import Executor, ExecutorStatistics, Job, Outcome
from optimizr.verify import verify_webp


class InlineExecutor(Executor):
    workers = 1

    def __init__(self) -> None:
        self._stopping = False
        self._started = 0

    def imap_unordered(self, jobs: Iterable[Job]) -> Iterator[Outcome]:
        for job in jobs:
            if self._stopping:
                return
            self._started += 1
            try:
                encoded = encode_webp(job.source, job.options)
                if job.verify:
                    verify_webp(encoded)
            except ImageError as exc:
                yield Outcome(job, None, exc, "inline")
            else:
                yield Outcome(job, encoded, None, "inline")

    def stop_accepting(self) -> None:
        self._stopping = True

    abort = stop_accepting

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics(1, self._started, self._started, 0, 0, 0, alive=1)
