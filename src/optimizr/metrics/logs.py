"""Logs: one event per image and per run milestone, as text or as JSON lines.

JSON logs are for machines (grep, jq, a log shipper): every line is one JSON
object, nothing else is ever written to the stream, and every image event
carries path, status, bytes in and out, milliseconds and the error if any.
Like the progress display this is the edge of the program: only the CLI uses it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, Literal

from optimizr.filenames import json_safe, name_fields, printable
from optimizr.results import Result, RunSummary

if TYPE_CHECKING:
    from optimizr.events import RunSnapshot

LogFormat = Literal["text", "json"]
LOGGER = "optimizr"

#: Fields of an image event, in the order they are written.
IMAGE_FIELDS = (
    "path", "status", "reason", "bytes_in", "bytes_out", "ms", "error", "output", "warnings",
)  # fmt: skip


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "message"),
        }
        fields = getattr(record, "fields", None)
        if fields is None:  # a library's record, or a plain one
            data["logger"] = record.name
        data["message"] = record.getMessage()
        data.update(fields or {})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        # A name that is not UTF-8 would be a lone surrogate: not text a reader takes.
        return json.dumps(json_safe(data), ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        # One event, one line, whatever the file names in it hold.
        return f"{record.levelname.lower()}: {printable(record.getMessage())}"


@contextlib.contextmanager
def configure_logging(
    log_format: LogFormat, level: str, stream: IO[str] | None = None
) -> Iterator[logging.Logger]:
    """Route optimizr's logs, and any library's (pyvips), to one stream in one
    format, for the duration of a command; the previous setup comes back after."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root, vips = logging.getLogger(), logging.getLogger("pyvips")
    saved = root.level, vips.level
    root.addHandler(handler)
    root.setLevel(level.upper())
    # libvips warnings about individual files are already in each failure's
    # message; repeated on the log they would only be noise.
    vips.setLevel(logging.ERROR)
    try:
        yield logging.getLogger(LOGGER)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        vips.setLevel(saved[1])


class LogListener:
    """A ProgressListener that logs: each image (INFO; failures at WARNING) and
    the run's milestones. In text format the image lines are left to the
    progress display (-v), so only milestones and warnings are logged."""

    def __init__(self, logger: logging.Logger, *, images: bool) -> None:
        self.logger = logger
        self.images = images
        # On a terminal the progress display already says this much.
        self.milestones = logging.INFO if images else logging.DEBUG

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        self._event(self.milestones, "run started", "run started", {})

    def found(self, count: int) -> None:
        pass

    def walk_done(self, total: int) -> None:
        self._event(self.milestones, "walk done", f"walk done: {total:,} files", {"found": total})

    def stopping(self, hard: bool) -> None:
        what = "aborting" if hard else "stopping"
        self._event(logging.WARNING, what, what, {})

    def finished(self, result: Result) -> None:
        if not self.images:
            return
        level = logging.WARNING if result.status == "failed" or result.warnings else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        fields = image_fields(result)
        self._event(level, "image", result.line(), fields)

    def run_finished(self, summary: RunSummary, exit_code: int) -> None:
        fields = {
            "found": summary.found,
            "converted": summary.converted,
            "skipped": summary.skipped,
            "failed": summary.failed,
            "bytes_in": summary.bytes_in,
            "bytes_out": summary.bytes_out,
            "seconds": round(summary.seconds, 3),
            "exit_code": exit_code,
        }
        text = ", ".join(f"{k} {v}" for k, v in fields.items())
        self._event(logging.INFO, "run finished", f"run finished: {text}", fields)
        for warning in summary.warnings:
            self._event(logging.WARNING, "warning", warning, {"message": warning})

    def _event(self, level: int, event: str, message: str, fields: dict[str, Any]) -> None:
        self.logger.log(level, "%s", message, extra={"event": event, "fields": fields})


def image_fields(result: Result) -> dict[str, Any]:
    """The JSON object of one image event."""
    ms = round(result.facts.seconds * 1000, 1) if result.facts is not None else None
    error = None
    if result.status == "failed":
        error = {"class": result.error_class, "reason": result.reason, "message": result.message}
    return {
        **name_fields(result.key),  # and "path_bytes" when the name is not UTF-8
        "status": result.status,
        "reason": result.reason,
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "ms": ms,
        "error": error,
        **(name_fields(result.output, "output") if result.output else {"output": None}),
        "warnings": list(result.warnings),
        **_search_fields(result),
    }


def _search_fields(result: Result) -> dict[str, Any]:
    """--target-score: what the search chose for the image (issue 14)."""
    facts = result.facts
    if facts is None or facts.chosen is None:
        return {}
    return {"chosen": facts.chosen, "score": facts.score, "probes": facts.probes}
