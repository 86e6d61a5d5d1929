"""optimizr: convert whole image libraries to WebP, correctly and safely.

The library API::

    from optimizr import EncodeOptions, convert_file, convert_tree

    result = convert_file("photo.jpg", "photo.webp", EncodeOptions(quality=75))
    summary = convert_tree("photos/", "webp/", EncodeOptions(max_width=2048))

Per-image problems never raise; they come back in the :class:`Result` or
:class:`RunSummary`. Errors that stop a run are :class:`OptimizrError` subclasses.
"""

from optimizr.config import EncodeOptions, RunConfig, parse_size
from optimizr.encode import Encoded, ImageFacts, encode_webp
from optimizr.errors import (
    CorruptImage,
    EncodeFailed,
    ImageError,
    Interrupted,
    NotAnImage,
    OptimizrError,
    OutputConflict,
    PermissionDenied,
    SourceUnreadable,
    TooLarge,
    TruncatedImage,
    UnsupportedImage,
    UsageError,
    WorkerCrashed,
)
from optimizr.pipeline import StopToken, convert_file, convert_tree
from optimizr.results import Result, RunSummary

__version__ = "0.1.0"

__all__ = [
    "CorruptImage",
    "EncodeFailed",
    "EncodeOptions",
    "Encoded",
    "ImageError",
    "ImageFacts",
    "Interrupted",
    "NotAnImage",
    "OptimizrError",
    "OutputConflict",
    "PermissionDenied",
    "Result",
    "RunConfig",
    "RunSummary",
    "SourceUnreadable",
    "StopToken",
    "TooLarge",
    "TruncatedImage",
    "UnsupportedImage",
    "UsageError",
    "WorkerCrashed",
    "__version__",
    "convert_file",
    "convert_tree",
    "encode_webp",
    "parse_size",
]
