"""Result records: what happened to one file, and to a whole run.

These are plain data, built by the pipeline and read by every exporter
(summary.json, the progress display, the exit code).
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from optimizr.decoders.damaged_jpeg import DAMAGE_WARNING
from optimizr.encode import ImageFacts
from optimizr.filenames import json_safe, name_fields
from optimizr.metrics.stats import LogHistogram, Timeline, TopN
from optimizr.quality_search import SearchTally

Status = Literal["converted", "skipped", "failed"]

# Skip reasons. "up to date" is counted but not listed in the summary: on a
# re-run it is the normal case for nearly every file.
UP_TO_DATE = "up to date"
LARGER_THAN_SOURCE = "larger than source"
#: The WebP would save less than --min-saving.
SMALL_SAVING = "small saving"
#: A WebP source, kept as it is (without --reencode-webp).
ALREADY_WEBP = "already webp"
NOT_AN_IMAGE = "not an image"
UNSUPPORTED = "unsupported"
DRY_RUN = "dry run"
#: A file optimizr did not write is where the output would go (--if-exists skip).
OUTPUT_EXISTS = "output exists"

#: Manifest rows only: the source is gone and --delete was not given, so its
#: output stays in DEST; the row keeps it known as optimizr's.
SOURCE_DELETED = "source deleted"

#: Files skipped for these reasons are copied as they are by --copy-unconverted:
#: converting would not help, yet a web deploy needs them. Failures are not
#: copied: a broken or unreadable file is not what the site should serve.
COPYABLE = frozenset({LARGER_THAN_SOURCE, SMALL_SAVING, ALREADY_WEBP, UNSUPPORTED, NOT_AN_IMAGE})


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
    #: Seconds the parent spent writing the output into place.
    write_seconds: float = 0.0
    #: Things the user should know about an image, one line each ("multi-page: 3
    #: pages, only the first was converted ...", or what libvips said while
    #: converting it: "VIPS: read gave 100 warnings").
    warnings: tuple[str, ...] = ()
    #: Of ``bytes_out``: the outputs of pages 2, 3, ... of a multi-page source.
    more_pages_bytes: int = 0
    #: What became of DEST for a file not converted ("copied as is", "not
    #: copied: ..."); shown with the message but not stored in the manifest.
    note: str = ""
    #: Bytes copied as they are into DEST at ``output`` (--copy-unconverted).
    copied: int | None = None

    @property
    def detail(self) -> str:
        """The message, with the note."""
        if self.note:
            return f"{self.message}; {self.note}" if self.message else self.note
        return self.message

    def line(self) -> str:
        """The one line a person reads: path and reason."""
        detail = self.detail
        if self.reason and detail.startswith(self.reason + ": "):
            detail = detail[len(self.reason) + 2 :]
        text = f"{self.key}: {self.reason}" if self.reason else self.key
        return f"{text} ({detail})" if detail and detail != self.reason else text


@dataclass
class OutputStatistics:
    """What the run did to files in DEST besides writing new outputs."""

    #: Outputs optimizr wrote earlier for a source that now has another (a
    #: --name change, or --name auto after a sibling arrived) or none.
    stale_removed: int = 0
    #: Files optimizr had not written, replaced by an output (--if-exists overwrite).
    overwritten: int = 0
    #: Files optimizr had not written, left in place (--if-exists skip): the
    #: "output exists" skips and the copies not made for that reason.
    kept: int = 0
    #: Files not converted, copied as they are (--copy-unconverted), and their bytes.
    copied: int = 0
    copied_bytes: int = 0
    #: Outputs (and copies) of sources that are gone, removed (--delete) or, in a
    #: dry run, that would be; the first LISTED of their paths.
    deleted: int = 0
    would_delete: int = 0
    deleted_paths: list[str] = field(default_factory=list)
    #: Outputs of sources that are gone, left in DEST without --delete.
    sources_gone: int = 0

    LISTED: ClassVar[int] = 1000

    def note_deleted(self, path: str, *, dry_run: bool) -> None:
        if dry_run:
            self.would_delete += 1
        else:
            self.deleted += 1
        if len(self.deleted_paths) < self.LISTED:
            self.deleted_paths.append(path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCHEMA = "optimizr-summary/2"

# A closed set, so that a tree of oddly named files cannot create endless
# format labels (summary keys, Prometheus series): anything else is "other".
_EXTENSION_FORMATS = {
    "jpg": "jpeg", "jpeg": "jpeg", "jpe": "jpeg", "jfif": "jpeg", "png": "png",
    "apng": "apng", "gif": "gif", "webp": "webp", "tif": "tiff", "tiff": "tiff",
    "bmp": "bmp", "dib": "bmp", "heic": "heic", "heif": "heic", "avif": "avif",
    "ico": "ico", "cur": "cur", "tga": "tga", "icb": "tga", "vda": "tga", "vst": "tga",
    "qoi": "qoi", "ppm": "pnm", "pgm": "pnm", "pbm": "pnm", "pnm": "pnm", "pam": "pnm",
    "pfm": "pnm", "pcx": "pcx", "jp2": "jpeg2000", "j2k": "jpeg2000", "j2c": "jpeg2000",
    "jpf": "jpeg2000", "jpx": "jpeg2000", "psd": "psd", "dds": "dds", "sgi": "sgi",
    "rgb": "sgi", "rgba": "sgi", "bw": "sgi",
}  # fmt: skip


def input_format(result: Result) -> str:
    """The format the decoder found, else what the name says, else "other"."""
    if result.facts is not None:
        return result.facts.format
    name = result.key.rpartition("/")[2]
    suffix = name.rpartition(".")[2].lower() if "." in name else ""
    return _EXTENSION_FORMATS.get(suffix, "other")


@dataclass
class RunSummary:
    """Figures for a whole run; ``to_dict`` is the summary.json document.

    Everything here is bounded: counters, log histograms, a top ten and a
    timeline that thins itself out; only the files not converted are listed.
    """

    src: str
    dest: str
    started_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    #: Files the walk listed (entries it could not read included), set by the
    #: pipeline as it walks: after an interrupted run, more than were finished.
    found: int = 0
    #: The walk reached the end of SRC (else ``found`` counts only what it listed).
    walk_complete: bool = False
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    #: Of the failed: images an earlier run found bad, not tried again (--retry-failed).
    known_failed: int = 0
    #: Of the failed: files that had not failed for the same reason before this run.
    new_failed: int = 0
    #: --strict: every failure fails the run, not only the new ones.
    strict: bool = False
    bytes_in: int = 0  # of converted files
    bytes_out: int = 0  # of the outputs written
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    by_format: dict[str, Counter[str]] = field(default_factory=dict)
    #: --dry-run: the files a real run would convert, and their bytes. Not "skipped":
    #: nothing was decided about them but that they need work.
    would_convert: int = 0
    would_convert_bytes: int = 0
    #: Images converted with a warning, by its kind (the words before its first colon).
    warned_by_kind: Counter[str] = field(default_factory=Counter)
    #: JPEGs converted despite damaged compressed data (their warning says how much).
    converted_with_damage: int = 0
    #: --target-size: images that met it, that could not (kept at their smallest,
    #: with a warning), and the encodes of whole images it took.
    target_size: Counter[str] = field(default_factory=Counter)
    #: Files not converted (failed, or skipped for any reason but "up to date").
    not_converted: list[Result] = field(default_factory=list)
    interrupted: bool = False
    #: --cluster: why the run ended early, its scheduler lost (exit 5); None: it was not.
    cluster_lost: str | None = None
    #: The signal that stopped the run (None: not stopped, or stopped by a caller).
    stop_signal: int | None = None
    workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    codec_seconds: float = 0.0
    codec_cpu_seconds: float = 0.0
    pixels: int = 0
    #: Per converted image: worker seconds, and input and output sizes.
    latency: LogHistogram = field(default_factory=lambda: LogHistogram(1e-4, 1e4))
    sizes_in: LogHistogram = field(default_factory=lambda: LogHistogram(10, 1e11, 10))
    sizes_out: LogHistogram = field(default_factory=lambda: LogHistogram(10, 1e11, 10))
    phases: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            ("read", "decode", "import", "encode", "mux", "write"), 0.0
        )
    )
    largest_savings: TopN = field(default_factory=TopN)
    #: Outputs written at least as large as their source (only --if-larger write
    #: writes those), and how many in all: the list keeps the ten that grew most.
    grew: TopN = field(default_factory=TopN)
    written_larger: int = 0
    #: Files whose WebP would have been larger, so none was written (--if-larger skip).
    skipped_larger: TopN = field(default_factory=TopN)
    timeline: Timeline = field(default_factory=Timeline)
    #: Filled in at the end of a run by the components that measured them.
    tool: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    cpu: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    #: Object stores: the transfers' figures, each store's requests and retries, and
    #: the manifest's checkpoints to a remote DEST (empty for a local run).
    storage: dict[str, Any] = field(default_factory=dict)
    #: Problems with the run itself (not with one file), one line each.
    warnings: list[str] = field(default_factory=list)
    #: Files in SRC passed over as optimizr's own (outputs in place, summaries):
    #: not sources, so not in ``found``.
    own_outputs: int = 0
    #: Where the summary document was written, once it was (None: nowhere).
    summary_file: Path | None = None
    outputs: OutputStatistics = field(default_factory=OutputStatistics)
    #: --target-score: what the searches chose (issue 14).
    quality_search: SearchTally = field(default_factory=SearchTally)

    def record(self, result: Result) -> None:
        # Converted images, not messages: libvips often says several things about
        # one file, and a failed one is counted as failed.
        if result.status == "converted":
            for kind in dict.fromkeys(w.partition(":")[0] for w in result.warnings):
                self.warned_by_kind[kind] += 1
            if any(w.startswith(DAMAGE_WARNING) for w in result.warnings):
                self.converted_with_damage += 1
        if result.facts is not None and result.facts.target_met is not None:
            # Converted ones: an unreachable target's smallest output that is larger
            # than its source is skipped as "larger than source", without facts.
            self.target_size["met" if result.facts.target_met else "unreachable"] += 1
            self.target_size["encodes"] += result.facts.target_encodes
            self.target_size["rate_controlled"] += result.facts.target_quality is None
        if result.reason != UP_TO_DATE:
            counts = self.by_format.setdefault(input_format(result), Counter())
            counts[result.status] += 1
        if result.status == "converted":
            self.converted += 1
            self.bytes_in += result.bytes_in
            self.bytes_out += result.bytes_out
            counts["bytes_in"] += result.bytes_in
            counts["bytes_out"] += result.bytes_out
            self.sizes_in.add(result.bytes_in)
            self.sizes_out.add(result.bytes_out)
            saved = result.bytes_in - result.bytes_out
            entry = {"path": result.key, "bytes_in": result.bytes_in,
                     "bytes_out": result.bytes_out}  # fmt: skip
            if saved > 0:
                self.largest_savings.offer(saved, {**entry, "saved": saved})
            else:
                self.written_larger += 1
                self.grew.offer(-saved, entry)
            self.phases["write"] += result.write_seconds
            facts = result.facts
            if facts is not None:
                self.codec_seconds += facts.seconds
                self.codec_cpu_seconds += facts.cpu_seconds
                self.pixels += facts.width_in * facts.height_in * facts.frames
                self.latency.add(facts.seconds)
                self.phases["read"] += facts.read_seconds
                self.phases["decode"] += facts.decode_seconds
                self.phases["encode"] += facts.encode_seconds
                self.phases["import"] += facts.import_seconds
                self.phases["mux"] += facts.mux_seconds
                self.quality_search.add(
                    facts.chosen, facts.chosen_quality, facts.score, facts.probes, result.warnings
                )
            self.timeline.sample(self.finished, self.bytes_in, self.bytes_out)
            return
        if result.reason == DRY_RUN:
            self.would_convert += 1
            self.would_convert_bytes += result.bytes_in
            return
        if result.status == "skipped":
            self.skipped += 1
            self.skipped_by_reason[result.reason or "skipped"] += 1
            if result.reason == LARGER_THAN_SOURCE and result.bytes_out:
                entry = {"path": result.key, "bytes_in": result.bytes_in,
                         "bytes_out": result.bytes_out}  # fmt: skip
                self.skipped_larger.offer(result.bytes_out - result.bytes_in, entry)
            if result.reason != UP_TO_DATE:
                self.not_converted.append(result)
        else:
            self.failed += 1
            self.failed_by_reason[result.reason or "failed"] += 1
            self.not_converted.append(result)
        self.timeline.sample(self.finished, self.bytes_in, self.bytes_out)

    @property
    def finished(self) -> int:
        """Files whose result is known: converted, skipped or failed (or, in a dry
        run, found to need converting)."""
        return self.converted + self.skipped + self.failed + self.would_convert

    @property
    def remaining(self) -> int:
        """Files found but not finished: an interrupted run leaves them to the next one."""
        return max(0, self.found - self.finished)

    @property
    def seconds(self) -> float:
        return max(0.0, (self.finished_at or time.time()) - self.started_at)

    @property
    def saved_bytes(self) -> int:
        return self.bytes_in - self.bytes_out

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            # The shell's convention, 128 + the signal: what `kill` callers expect.
            return 143 if self.stop_signal == signal.SIGTERM else 130
        if self.cluster_lost is not None:
            from optimizr.errors import ClusterLost

            return ClusterLost.exit_code
        # Known-bad files stay listed, but only a failure new in this run makes
        # it fail: a scheduled job is not red for ever over one corrupt file.
        return 1 if (self.failed if self.strict else self.new_failed) else 0

    def to_dict(self) -> dict[str, Any]:
        from optimizr.metrics.analysis import analyse

        seconds = self.seconds
        # The final point, once: a second to_dict() (the CLI printing --summary -
        # after the history kept its copy) must give the same document.
        final = [self.finished, self.bytes_in, self.bytes_out]
        points = self.timeline.points
        if not points or points[-1][1:] != final:
            self.timeline.sample(*final, force=True)
        per_second = (lambda n: round(n / seconds, 3)) if seconds else (lambda n: 0)
        doc: dict[str, Any] = {
            "schema": SCHEMA,
            "tool": self.tool,
            **name_fields(self.src, "src"),
            **name_fields(self.dest, "dest"),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at) if self.finished_at else None,
            "seconds": round(seconds, 3),
            "interrupted": self.interrupted,
            "cluster_lost": self.cluster_lost,
            "exit_code": self.exit_code,
            "workers": self.workers,
            "options": self.options,
            "files": {
                "found": self.found,
                "converted": self.converted,
                "skipped": self.skipped,
                "failed": self.failed,
                "known_failed": self.known_failed,
                "own_outputs": self.own_outputs,
                "would_convert": self.would_convert,
                "would_convert_bytes": self.would_convert_bytes,
                "warned_by_kind": dict(sorted(self.warned_by_kind.items())),
                "converted_with_damage": self.converted_with_damage,
                "target_size": {
                    key: self.target_size[key]
                    for key in ("met", "unreachable", "encodes", "rate_controlled")
                },
                "new_failed": self.new_failed,
                "remaining": self.remaining,
                "walk_complete": self.walk_complete,
                "written_larger": self.written_larger,
                "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
                "failed_by_reason": dict(sorted(self.failed_by_reason.items())),
                "by_format": {
                    fmt: {
                        key: counts[key]
                        for key in ("converted", "skipped", "failed", "bytes_in", "bytes_out")
                    }
                    for fmt, counts in sorted(self.by_format.items())
                },
            },
            "bytes": {
                "in": self.bytes_in,
                "out": self.bytes_out,
                "saved": self.saved_bytes,
                "saving_ratio": round(self.saved_bytes / self.bytes_in, 4) if self.bytes_in else 0,
            },
            "latency_seconds": self.latency.summary(),
            "phases_seconds": {
                phase: round(self.phases[phase], 3)
                for phase in ("read", "decode", "import", "encode", "mux", "write")
            },
            "throughput": {
                "files_per_second": per_second(self.finished),
                "images_per_second": per_second(self.converted),
                "mb_per_second": per_second(self.bytes_in / 1e6),
                "megapixels_per_second": per_second(self.pixels / 1e6),
            },
            "histograms": {
                "latency_seconds": {"buckets": self.latency.buckets()},
                "bytes_in": {"buckets": self.sizes_in.buckets()},
                "bytes_out": {"buckets": self.sizes_out.buckets()},
            },
            "timeline": self.timeline.points,
            "memory": self.memory,
            "cpu": self.cpu,
            "executor": self.executor,
            "manifest": self.manifest,
            "storage": self.storage,
            "failures_by_reason": self._failure_groups(),
            "largest_savings": [_named(item) for item in self.largest_savings.items()],
            "grew": [_named(item) for item in self.grew.items()],
            "skipped_larger": [_named(item) for item in self.skipped_larger.items()],
            "not_converted": [
                {
                    **name_fields(r.key),
                    "status": r.status,
                    "reason": r.reason,
                    "message": r.detail,
                    **(
                        name_fields(r.output, "output")
                        if r.copied is not None and r.output
                        else {"output": None}
                    ),
                }  # fmt: skip
                for r in self.not_converted
            ],
            "outputs": self.outputs.to_dict(),
            "quality_search": self.quality_search.to_dict(),
            "warnings": self.warnings,
        }
        doc["analysis"] = analyse(doc)
        # JSON text must be valid Unicode: names were given both forms above,
        # and any other string (a message naming a file) has its odd bytes escaped.
        result: dict[str, Any] = json_safe(doc)
        return result

    def _failure_groups(self, examples: int = 5) -> list[dict[str, Any]]:
        groups: dict[str, dict[str, Any]] = {}
        for r in self.not_converted:
            if r.status != "failed":
                continue
            reason = r.reason or "failed"
            group = groups.setdefault(reason, {"reason": reason, "count": 0, "examples": []})
            group["count"] += 1
            if len(group["examples"]) < examples:
                group["examples"].append({**name_fields(r.key), "message": r.message})
        return sorted(groups.values(), key=lambda g: (-g["count"], g["reason"]))


def _named(item: dict[str, Any]) -> dict[str, Any]:
    """A top-N entry, its "path" given in JSON form (with "path_bytes" if need be)."""
    return {**name_fields(item["path"]), **{k: v for k, v in item.items() if k != "path"}}


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def options_dict(obj: Any) -> dict[str, Any]:
    return {
        k: (str(v) if not isinstance(v, int | float | str | bool | None) else v)
        for k, v in asdict(obj).items()
    }
