"""Run jobs in the calling process, one at a time: no isolation, no start-up cost."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from optimizr.executors.base import Executor, ExecutorStatistics, Job, Outcome, Wakeup
from optimizr.executors.codec_messages import CodecMessages
from optimizr.executors.worker import convert_job


class InlineExecutor(Executor):
    workers = 1

    def __init__(self) -> None:
        self._stopping = False
        self._started = 0

    def imap_unordered(self, jobs: Iterable[Job | Wakeup]) -> Iterator[Outcome]:
        with CodecMessages() as messages:
            for job in jobs:
                if self._stopping:
                    return
                if isinstance(job, Wakeup):
                    job.wait(0.25)  # nothing else to do here but wait for a fetch
                    continue
                self._started += 1
                encoded, error, warnings = convert_job(job, messages)
                yield Outcome(job, encoded, error, "inline", warnings)

    def stop_accepting(self) -> None:
        self._stopping = True

    abort = stop_accepting

    def statistics(self) -> ExecutorStatistics:
        return ExecutorStatistics(1, self._started, self._started, 0, 0, 0, alive=1)
