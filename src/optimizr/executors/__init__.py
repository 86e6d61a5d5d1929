"""Where per-image jobs run (see ``base.py``)."""

from typing import TYPE_CHECKING

from optimizr.executors.base import Executor, ExecutorStatistics, Job, Outcome

if TYPE_CHECKING:
    from optimizr.executors.inline import InlineExecutor
    from optimizr.executors.local import ProcessExecutor

# On first use: a worker process imports optimizr.executors.worker, not the pool.
_LAZY = {
    "InlineExecutor": "optimizr.executors.inline",
    "ProcessExecutor": "optimizr.executors.local",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'optimizr.executors' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["Executor", "ExecutorStatistics", "InlineExecutor", "Job", "Outcome", "ProcessExecutor"]
