"""The one exception tree of optimizr.

Every error the library raises is an :class:`OptimizrError`; each class carries
the process exit code the CLI turns it into. Only ``cli.py`` catches them.

::

    OptimizrError                 exit 1
    ├── UsageError                exit 2    bad option, SRC missing, DEST unusable
    │   └── ManifestDamaged       exit 2    DEST's manifest is unreadable: --rebuild-manifest
    ├── DestBusy                  exit 3    another run holds DEST's lock
    ├── WorkerStartFailed         exit 4    worker processes cannot start (interpreter, import)
    ├── ClusterLost               exit 5    --cluster: the Dask scheduler was lost mid-run
    ├── Interrupted               exit 130  stopped by a signal (a run stopped by SIGTERM exits 143)
    └── ImageError                exit 1    one image could not be converted; the run goes on
        ├── NotAnImage            "not an image"        no known image signature           image
        ├── UnsupportedImage      "unsupported"         an image we cannot decode          image
        ├── CorruptImage          "corrupt"             the decoder rejected the data      image
        ├── TruncatedImage        "truncated"           the data ends before the image     image
        ├── TooLarge              "too large"           over --max-pixels or WebP's limit  image
        │   └── OverMemoryBudget  "too large"           needs more than --max-memory       run
        ├── SourceUnreadable      "unreadable"          the file could not be read         transient
        │   ├── PermissionDenied  "permission denied"                                      transient
        │   └── SourceDisappeared "source disappeared"                                     transient
        ├── SourceChanged         "source changed"      modified or deleted meanwhile      transient
        ├── OutsideSource         "outside SRC"         --files-from named a path out of SRC run
        ├── OutputConflict        "output conflict"     two sources map to one output      run
        ├── EncodeFailed          "encode failed"       libwebp refused the image          image
        ├── VerifyFailed          "verify failed"       --verify: output not as meant      image
        ├── WriteFailed           "write failed"        the output could not be written    transient
        │   └── NoSpaceLeft       "no space left"       ... because DEST is full           transient
        └── WorkerCrashed         "worker crashed"      its process died or hung           image
            └── OverWorkerMemory  "worker crashed"      outgrew a Dask worker's memory     run

The last column is each failure's :attr:`ImageError.cause`: what it is evidence
of, and so when a later run decides it again.

* ``image``: it says something about the file's bytes, under the options of the
  fingerprint (``--max-pixels`` and ``--oversize`` are among them). The file is
  known bad, not opened again, until it changes, the options change, or
  ``--retry-failed`` (``--max-attempts`` in all).
* ``transient`` (:data:`TRANSIENT`): it says something about the moment (a full
  disk, a permission, an edit under way). The next run tries the file again on
  its own.
* ``run``: it was decided by this run's settings or by the other files in it
  (the memory budget, from the header alone; two sources claiming one output).
  Every run decides it again, cheaply, from its own settings and files: raising
  ``--max-memory`` or removing the other source is enough.

An ``ImageError`` never stops a run: the pipeline records it against the file
(path and one-line reason) and moves on. Their constructors take one message
string so they pickle across the worker-process boundary unchanged.
"""

from __future__ import annotations

from typing import Literal

#: What a failure is evidence of; see the module docstring.
Cause = Literal["image", "transient", "run"]


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


class ClusterLost(OptimizrError):
    """The Dask scheduler of ``--cluster`` went away during the run.

    Not raised through the run: the images converted until then are committed and
    the summary is exact (the rest stay unconverted, for a re-run to resume from
    the manifest); the summary carries the message and this exit code."""

    exit_code = 5


class WorkerStartFailed(OptimizrError):
    """Worker processes die or stay silent before they are ready for work.

    A fault of the installation or the machine (the interpreter cannot run,
    optimizr or libvips cannot be imported, the process is killed while
    starting), never of an image: the run stops before any image is given to
    a worker, and nothing is recorded against the images.
    """

    exit_code = 4


class Interrupted(OptimizrError):
    """The run was stopped by a signal before it finished."""

    exit_code = 130


class ImageError(OptimizrError):
    """One image failed; ``reason`` is the short category shown and counted,
    ``cause`` what the failure is evidence of (when it is decided again)."""

    reason = "failed"
    cause: Cause = "image"

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


class OverMemoryBudget(TooLarge):
    """Refused from the header: it would need more than --max-memory leaves for one image.
    A fact about this run's budget, not about the image."""

    cause = "run"


class SourceUnreadable(ImageError):
    reason = "unreadable"
    cause = "transient"


class PermissionDenied(SourceUnreadable):
    reason = "permission denied"


class SourceDisappeared(SourceUnreadable):
    reason = "source disappeared"


class SourceChanged(ImageError):
    reason = "source changed"
    cause = "transient"


class OutsideSource(ImageError):
    # Decided by the list the run was given; never recorded in the manifest.
    reason = "outside SRC"
    cause = "run"


class OutputConflict(ImageError):
    """Another source of this run claims the same output: a fact about the other files."""

    reason = "output conflict"
    cause = "run"


class EncodeFailed(ImageError):
    reason = "encode failed"


class VerifyFailed(ImageError):
    reason = "verify failed"


class WriteFailed(ImageError):
    reason = "write failed"
    cause = "transient"


class NoSpaceLeft(WriteFailed):
    reason = "no space left"


class WorkerCrashed(ImageError):
    reason = "worker crashed"


class OverWorkerMemory(WorkerCrashed):
    """--cluster: its conversion grew past what the Dask worker's --memory-limit leaves
    its conversions, and was killed (executors/memory_watch.py). A fact about the
    cluster's workers: bigger ones may convert it."""

    cause = "run"


def _image_errors(cls: type[ImageError] = ImageError) -> list[type[ImageError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_image_errors(sub))
    return found


_BY_NAME = {cls.__name__: cls for cls in _image_errors()}

#: Reasons that say nothing about the image: the next run tries these files again
#: without --retry-failed (after a full disk is cleared, a chmod, a settled edit).
TRANSIENT = frozenset(cls.reason for cls in _BY_NAME.values() if cls.cause == "transient")


def cause_of(error_class: str | None, reason: str | None) -> Cause:
    """The cause of a failure recorded by class name (and reason, for a row whose
    class is unknown, e.g. written by an older version): decided by the class."""
    cls = _BY_NAME.get(error_class or "")
    if cls is not None:
        return cls.cause
    return "transient" if reason in TRANSIENT else "image"


__all__ = [
    "TRANSIENT",
    "Cause",
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
    "OverMemoryBudget",
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
    "WorkerStartFailed",
    "WriteFailed",
    "cause_of",
]
