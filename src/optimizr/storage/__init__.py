"""Storage backends behind one small interface (see ``base.py``)."""

from optimizr.storage.base import (
    DirectoryListing,
    FileStat,
    SourceEntry,
    Storage,
    WalkOptions,
    WalkStatistics,
)
from optimizr.storage.local import LocalStorage
from optimizr.storage.memory import MemoryStorage

__all__ = [
    "DirectoryListing",
    "FileStat",
    "LocalStorage",
    "MemoryStorage",
    "SourceEntry",
    "Storage",
    "WalkOptions",
    "WalkStatistics",
]
