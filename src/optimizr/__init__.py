"""optimizr: convert whole image libraries to WebP, correctly and safely.

The library API::

    from optimizr import EncodeOptions, convert_file, convert_tree

    result = convert_file("photo.jpg", "photo.webp", EncodeOptions(quality=75))
    summary = convert_tree("photos/", "webp/", EncodeOptions(max_width=2048))

Per-image problems never raise; they come back in the :class:`Result` or
:class:`RunSummary`. Errors that stop a run are :class:`OptimizrError` subclasses.
"""

from typing import TYPE_CHECKING

from optimizr.config import EncodeOptions, RunConfig, parse_size
from optimizr.errors import (
    CorruptImage,
    DestBusy,
    EncodeFailed,
    ImageError,
    Interrupted,
    ManifestDamaged,
    NoSpaceLeft,
    NotAnImage,
    OptimizrError,
    OutputConflict,
    OutsideSource,
    OverMemoryBudget,
    OverWorkerMemory,
    PermissionDenied,
    SourceChanged,
    SourceDisappeared,
    SourceUnreadable,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
    UsageError,
    VerifyFailed,
    WorkerCrashed,
    WorkerStartFailed,
    WriteFailed,
)

if TYPE_CHECKING:
    from optimizr.convert import convert_file, convert_tree
    from optimizr.encode import Encoded, ImageFacts, encode_webp
    from optimizr.events import StopToken
    from optimizr.output_urls import UrlsConfig, write_output_urls
    from optimizr.results import Result, RunSummary
    from optimizr.status import StatusReport, read_status

# Imported on first use (PEP 562): a worker process imports optimizr.executors.worker,
# and with it this package, and must not pay for the run's machinery (object
# stores, SQLite, the pipeline): an idle worker is 54 MB resident with them.
_LAZY = {
    "convert_file": "optimizr.convert",
    "convert_tree": "optimizr.convert",
    "Encoded": "optimizr.encode",
    "ImageFacts": "optimizr.encode",
    "encode_webp": "optimizr.encode",
    "StopToken": "optimizr.events",
    "UrlsConfig": "optimizr.output_urls",
    "write_output_urls": "optimizr.output_urls",
    "Result": "optimizr.results",
    "RunSummary": "optimizr.results",
    "StatusReport": "optimizr.status",
    "read_status": "optimizr.status",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'optimizr' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "CorruptImage",
    "DestBusy",
    "EncodeFailed",
    "EncodeOptions",
    "Encoded",
    "ImageError",
    "ImageFacts",
    "Interrupted",
    "ManifestDamaged",
    "NoSpaceLeft",
    "NotAnImage",
    "OptimizrError",
    "OutputConflict",
    "OutsideSource",
    "OverMemoryBudget",
    "OverWorkerMemory",
    "PermissionDenied",
    "Result",
    "RunConfig",
    "RunSummary",
    "SourceChanged",
    "SourceDisappeared",
    "SourceUnreadable",
    "StatusReport",
    "StopToken",
    "TooLarge",
    "TruncatedImage",
    "UnsupportedImage",
    "UrlsConfig",
    "UsageError",
    "VerifyFailed",
    "WorkerCrashed",
    "WorkerStartFailed",
    "WriteFailed",
    "__version__",
    "convert_file",
    "convert_tree",
    "encode_webp",
    "parse_size",
    "read_status",
    "write_output_urls",
]
