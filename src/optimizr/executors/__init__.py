"""Where per-image jobs run (see ``base.py``)."""

from optimizr.executors.base import Executor, ExecutorStatistics, Job, Outcome
from optimizr.executors.inline import InlineExecutor
from optimizr.executors.local import ProcessExecutor

__all__ = ["Executor", "ExecutorStatistics", "InlineExecutor", "Job", "Outcome", "ProcessExecutor"]
