"""Storage backends behind one small interface (see ``base.py``)."""

from optimizr.storage.base import (
    STATE_DIR,
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
    "STATE_DIR",
    "DirectoryListing",
    "FileStat",
    "LocalStorage",
    "MemoryStorage",
    "SourceEntry",
    "Storage",
    "WalkOptions",
    "WalkStatistics",
]
