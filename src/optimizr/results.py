"""Result records: what happened to one file, and to a whole run.

These are plain data, built by the pipeline and read by every exporter
(summary.json, the progress display, the exit code).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from optimizr.encode import ImageFacts

Status = Literal["converted", "skipped", "failed"]

# Skip reasons. "up to date" is counted but not listed in the summary: on a
# re-run it is the normal case for nearly every file.
UP_TO_DATE = "up to date"
LARGER_THAN_SOURCE = "larger than source"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED = "unsupported"
DRY_RUN = "dry run"


@dataclass(frozen=True)
class Result:
    """What happened to one source file."""

    key: str  # path relative to SRC, POSIX separators
    status: Status
    reason: str | None = None  # short category: "truncated", "up to date", ...
    message: str = ""  # one line of detail
    output: str | None = None  # path relative to DEST, when one was written
    bytes_in: int = 0
    bytes_out: int = 0
    facts: ImageFacts | None = None
    #: The ImageError subclass behind a failure, for the manifest and failed.jsonl.
    error_class: str | None = None

    def line(self) -> str:
        """The one line a person reads: path and reason."""
        detail = self.message
        if self.reason and detail.startswith(self.reason + ": "):
            detail = detail[len(self.reason) + 2 :]
        text = f"{self.key}: {self.reason}" if self.reason else self.key
        return f"{text} ({detail})" if detail and detail != self.reason else text


@dataclass
class RunSummary:
    """Figures for a whole run; ``to_dict`` is the summary.json document."""

    src: str
    dest: str
    started_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    found: int = 0
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    #: Of the failed: images an earlier run found bad, not tried again (--retry-failed).
    known_failed: int = 0
    bytes_in: int = 0  # of converted files
    bytes_out: int = 0  # of the outputs written
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    #: Files not converted (failed, or skipped for any reason but "up to date").
    not_converted: list[Result] = field(default_factory=list)
    interrupted: bool = False
    workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    codec_seconds: float = 0.0
    codec_cpu_seconds: float = 0.0
    pixels: int = 0
    #: Filled in at the end of a run by the components that measured them.
    memory: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    #: Problems with the run itself (not with one file), one line each.
    warnings: list[str] = field(default_factory=list)

    def record(self, result: Result) -> None:
        self.found += 1
        if result.status == "converted":
            self.converted += 1
            self.bytes_in += result.bytes_in
            self.bytes_out += result.bytes_out
            if result.facts is not None:
                self.codec_seconds += result.facts.seconds
                self.codec_cpu_seconds += result.facts.cpu_seconds
                frame_pixels = result.facts.width_in * result.facts.height_in
                self.pixels += frame_pixels * result.facts.frames
            return
        if result.status == "skipped":
            self.skipped += 1
            self.skipped_by_reason[result.reason or "skipped"] += 1
            if result.reason != UP_TO_DATE:
                self.not_converted.append(result)
        else:
            self.failed += 1
            self.failed_by_reason[result.reason or "failed"] += 1
            self.not_converted.append(result)

    @property
    def seconds(self) -> float:
        return max(0.0, (self.finished_at or time.time()) - self.started_at)

    @property
    def saved_bytes(self) -> int:
        return self.bytes_in - self.bytes_out

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        seconds = self.seconds
        return {
            "schema": "optimizr-summary/1",
            "src": self.src,
            "dest": self.dest,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at) if self.finished_at else None,
            "seconds": round(seconds, 3),
            "interrupted": self.interrupted,
            "exit_code": self.exit_code,
            "workers": self.workers,
            "options": self.options,
            "files": {
                "found": self.found,
                "converted": self.converted,
                "skipped": self.skipped,
                "failed": self.failed,
                "known_failed": self.known_failed,
                "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
                "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
            },
            "bytes": {
                "in": self.bytes_in,
                "out": self.bytes_out,
                "saved": self.saved_bytes,
                "saving_ratio": round(self.saved_bytes / self.bytes_in, 4) if self.bytes_in else 0,
            },
            "throughput": {
                "files_per_second": round(self.converted / seconds, 3) if seconds else 0,
                "mb_per_second": round(self.bytes_in / 1e6 / seconds, 3) if seconds else 0,
                "megapixels_per_second": round(self.pixels / 1e6 / seconds, 3) if seconds else 0,
            },
            "memory": self.memory,
            "cpu": self.cpu,
            "executor": self.executor,
            "manifest": self.manifest,
            "warnings": self.warnings,
            "not_converted": [
                {"path": r.key, "status": r.status, "reason": r.reason, "message": r.message}
                for r in self.not_converted
            ],
        }


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def options_dict(obj: Any) -> dict[str, Any]:
    return {
        k: (str(v) if not isinstance(v, int | float | str | bool | None) else v)
        for k, v in asdict(obj).items()
    }
