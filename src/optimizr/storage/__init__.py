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
from optimizr.storage.objectstore import ObjectStorage, StoreOptions, probe, storage_for
from optimizr.storage.requests import StorageStatistics
from optimizr.storage.urls import Location, parse_location

__all__ = [
    "STATE_DIR",
    "DirectoryListing",
    "FileStat",
    "Location",
    "LocalStorage",
    "MemoryStorage",
    "ObjectStorage",
    "SourceEntry",
    "Storage",
    "StorageStatistics",
    "StoreOptions",
    "WalkOptions",
    "WalkStatistics",
    "parse_location",
    "probe",
    "storage_for",
]
