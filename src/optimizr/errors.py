"""The one exception tree of optimizr.

Every error the library raises is an :class:`OptimizrError`; each class carries
the process exit code the CLI turns it into. Only ``cli.py`` catches them.

::

    OptimizrError                 exit 1
    ├── UsageError                exit 2    bad option, SRC missing, DEST unusable
    │   └── ManifestDamaged       exit 2    DEST's manifest is unreadable: --rebuild-manifest
    ├── DestBusy                  exit 3    another run holds DEST's lock
    ├── Interrupted               exit 130  stopped by a signal (SIGINT)
    └── ImageError                exit 1    one image could not be converted; the run goes on
        ├── NotAnImage            "not an image"        no known image signature
        ├── UnsupportedImage      "unsupported"         an image, but not one we can decode
        ├── CorruptImage          "corrupt"             the decoder rejected the data
        ├── TruncatedImage        "truncated"           the data ends before the image does
        ├── TooLarge              "too large"           over --max-pixels, or over WebP's limit
        ├── SourceUnreadable      "permission denied" / "unreadable" / "source disappeared"
        ├── SourceChanged         "source changed"      modified or deleted while being converted
        ├── OutsideSource         "outside SRC"         --files-from named a file outside SRC
        ├── OutputConflict        "output conflict"     two sources map to one output
        ├── EncodeFailed          "encode failed"       libwebp refused the image
        ├── VerifyFailed          "verify failed"       --verify: the output did not decode as meant
        ├── WriteFailed           "write failed"        the output could not be written
        │   └── NoSpaceLeft       "no space left"       ... because DEST is full
        └── WorkerCrashed         "worker crashed"      the process converting it died or hung

The image errors that say nothing about the image itself (``TRANSIENT``: the
disk was full, the file could not be read or changed meanwhile) are retried by
the next run on their own; the others mark the image known-bad until
``--retry-failed``.

An ``ImageError`` never stops a run: the pipeline records it against the file
(path and one-line reason) and moves on. Their constructors take one message
string so they pickle across the worker-process boundary unchanged.
"""

from __future__ import annotations


class OptimizrError(Exception):
    """Base of every error optimizr raises."""

    exit_code = 1


class UsageError(OptimizrError):
    """The command was asked for something impossible (bad option, missing SRC)."""

    exit_code = 2


class ManifestDamaged(UsageError):
    """DEST's manifest cannot be read; the run refuses rather than start from zero."""


class DestBusy(OptimizrError):
    """Another run holds DEST's lock."""

    exit_code = 3


class Interrupted(OptimizrError):
    """The run was stopped by a signal before it finished."""

    exit_code = 130


class ImageError(OptimizrError):
    """One image failed; ``reason`` is the short category shown and counted."""

    reason = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason


class NotAnImage(ImageError):
    reason = "not an image"


class UnsupportedImage(ImageError):
    reason = "unsupported"


class CorruptImage(ImageError):
    reason = "corrupt"


class TruncatedImage(ImageError):
    reason = "truncated"


class TooLarge(ImageError):
    reason = "too large"


class SourceUnreadable(ImageError):
    reason = "unreadable"


class PermissionDenied(SourceUnreadable):
    reason = "permission denied"


class SourceDisappeared(SourceUnreadable):
    reason = "source disappeared"


class SourceChanged(ImageError):
    reason = "source changed"


class OutsideSource(ImageError):
    reason = "outside SRC"


class OutputConflict(ImageError):
    reason = "output conflict"


class EncodeFailed(ImageError):
    reason = "encode failed"


class VerifyFailed(ImageError):
    reason = "verify failed"


class WriteFailed(ImageError):
    reason = "write failed"


class NoSpaceLeft(WriteFailed):
    reason = "no space left"


class WorkerCrashed(ImageError):
    reason = "worker crashed"


#: Reasons that say nothing about the image: the next run tries these files again
#: without --retry-failed (after a full disk is cleared, a chmod, a settled edit).
TRANSIENT = frozenset(
    cls.reason
    for cls in (
        SourceUnreadable,
        PermissionDenied,
        SourceDisappeared,
        SourceChanged,
        WriteFailed,
        NoSpaceLeft,
    )
)


__all__ = [
    "TRANSIENT",
    "CorruptImage",
    "DestBusy",
    "EncodeFailed",
    "ImageError",
    "Interrupted",
    "ManifestDamaged",
    "NoSpaceLeft",
    "NotAnImage",
    "OptimizrError",
    "OutputConflict",
    "OutsideSource",
    "PermissionDenied",
    "SourceChanged",
    "SourceDisappeared",
    "SourceUnreadable",
    "TooLarge",
    "TruncatedImage",
    "UnsupportedImage",
    "UsageError",
    "VerifyFailed",
    "WorkerCrashed",
    "WriteFailed",
]
