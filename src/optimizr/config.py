"""Frozen configuration objects, built once (by the CLI or a caller) and passed down whole.

``EncodeOptions`` is everything that shapes one output image; it is plain data
(picklable, hashable) so it can cross into a worker process or, later, a Dask task.
``RunConfig`` is everything about a whole run.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from optimizr.errors import UsageError

#: WebP stores width and height in 14 bits: 16383 is the largest either may be.
WEBP_MAX_DIMENSION = 16383

#: sharp's default ``limitInputPixels`` (0x3FFF * 0x3FFF): the largest image WebP can hold.
DEFAULT_MAX_PIXELS = 268_402_689

Metadata = Literal["none", "icc", "all"]
Oversize = Literal["fail", "fit"]
IfLarger = Literal["skip", "write"]
NameMode = Literal["replace", "append", "auto"]
IfExists = Literal["skip", "overwrite"]
Preset = Literal["default", "picture", "photo", "drawing", "icon", "text"]
Pages = Literal["first", "all"]
Encoder = Literal["auto", "libwebp", "libvips"]

PRESETS: tuple[str, ...] = ("default", "picture", "photo", "drawing", "icon", "text")

#: The summary a run writes at the top of DEST (unless --summary says elsewhere).
SUMMARY_NAME = "optimizr-summary.json"


@dataclass(frozen=True)
class EncodeOptions:
    """How one image is turned into WebP. Every field maps to one libwebp/libvips knob."""

    quality: int = 80
    effort: int = 4
    lossless: bool = False
    near_lossless: int | None = None
    alpha_quality: int = 100
    smart_subsample: bool = False
    preset: Preset = "default"
    max_width: int | None = None
    max_height: int | None = None
    metadata: Metadata = "icc"
    srgb: bool = False
    oversize: Oversize = "fail"
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: A multi-page TIFF: its first page (with a warning), or every page as its own
    #: output (``scan.webp``, ``scan.p2.webp``, ...).
    pages: Pages = "first"
    #: Who encodes: libwebp through optimizr's binding (Pillow's -O3 build), libvips'
    #: webpsave (pyvips-binary's -Os build, ~1.24x the CPU), or auto: the binding
    #: when it loads. Both write the same bytes, so it is not in the fingerprint.
    encoder: Encoder = "auto"
    #: A JPEG with damaged compressed data (libjpeg's corrupt-data warnings) fails
    #: rather than converts with the damage recorded (issue 13).
    strict_decode: bool = False
    #: --target-size: each output at most this many bytes, at the best lossy quality
    #: that fits (size_target.py); --quality is then only where the search starts.
    target_size: int | None = None
    #: Per image, the smallest output whose SSIMULACRA 2 score against the decoded
    #: source is at least this (issue 14; ``--quality auto`` and the named levels
    #: set it): ``quality`` is then only the lossless effort. None: fixed quality.
    target_score: float | None = None
    #: The range that search may choose from.
    min_quality: int = 50
    max_quality: int = 95

    def __post_init__(self) -> None:
        _check_range("--quality", self.quality, 0, 100)
        _check_target_score(self)
        _check_range("--effort", self.effort, 0, 6)
        _check_range("--alpha-quality", self.alpha_quality, 0, 100)
        if self.near_lossless is not None:
            _check_range("--near-lossless", self.near_lossless, 0, 100)
        for name, value in (("--max-width", self.max_width), ("--max-height", self.max_height)):
            if value is not None:
                _check_range(name, value, 1, 1 << 30)
        if self.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, not {self.max_pixels}")
        if self.preset not in PRESETS:
            raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {self.preset!r}")
        if self.metadata not in ("none", "icc", "all"):
            raise UsageError(f"--metadata must be none, icc or all, not {self.metadata!r}")
        if self.oversize not in ("fail", "fit"):
            raise UsageError(f"--oversize must be fail or fit, not {self.oversize!r}")
        if self.encoder not in ("auto", "libwebp", "libvips"):
            raise UsageError(f"--encoder must be auto, libwebp or libvips, not {self.encoder!r}")
        if self.pages not in ("first", "all"):
            raise UsageError(f"--pages must be first or all, not {self.pages!r}")
        if self.target_size is not None:
            _check_target_size(self)

    def shrink_box(self, width: int, height: int) -> tuple[int, int] | None:
        """The box an upright ``width`` x ``height`` image must shrink into, or None
        when it is kept at its own size (never enlarged)."""
        box_w = self.max_width or width
        box_h = self.max_height or height
        if self.oversize == "fit":
            box_w, box_h = min(box_w, WEBP_MAX_DIMENSION), min(box_h, WEBP_MAX_DIMENSION)
        if width <= box_w and height <= box_h:
            return None
        return box_w, box_h


_CLUSTER_ADDRESS = re.compile(r"^(tcp|tls)://[^/\s]+:\d+$|^local(:[1-9]\d*)?$")


def check_cluster_address(address: str) -> None:
    """--cluster takes ``tcp://host:port`` (``tls://`` too), ``local`` or ``local:N``."""
    if not _CLUSTER_ADDRESS.match(address):
        raise UsageError(
            f"--cluster must be tcp://HOST:PORT (a Dask scheduler), local or local:N, "
            f"not {address!r}"
        )


@dataclass(frozen=True)
class RunConfig:
    """One ``convert`` run: where from, where to, and how."""

    #: One SRC (a folder, or one file), or several (see ``sources``); a str is the
    #: URL of an object store prefix (s3://, gs://, az://, file://).
    src: Path | tuple[Path, ...] | str
    #: A folder, or (a str) the URL of an object store prefix.
    dest: Path | str
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    workers: int = 0  # 0 = the CPUs this process may use
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    follow_symlinks: bool = False
    #: Give each output the modification time of its source (as rsync -t, cwebp-based
    #: deploy scripts and CDNs that sort by mtime expect).
    preserve_mtime: bool = False
    name: NameMode = "replace"
    if_larger: IfLarger = "skip"
    dry_run: bool = False
    force: bool = False
    #: Where the JSON summary goes; ``-`` is standard output.
    summary_path: Path | None = None
    #: How far the walk may run ahead of the workers, in files per worker. The
    #: largest image in this window starts first; 0 turns that off (plain FIFO).
    lookahead_per_worker: int = 4
    #: Seconds one image may take before its worker is killed (a hung codec).
    timeout: float = 300.0
    #: Ceiling on the resident memory of the whole process tree; None: half of
    #: the memory available to the process (cgroup limit included).
    max_memory: int | None = None
    #: Replace a worker after this many images, so heap fragmentation cannot build up.
    max_tasks_per_worker: int | None = 200
    #: After the first SIGINT/SIGTERM, how long in-flight images may take to finish.
    grace: float = 60.0
    #: Try again the images an earlier run found bad (corrupt, crashed the codec...).
    retry_failed: bool = False
    #: ... but give up on an image after this many attempts in all.
    max_attempts: int = 3
    #: Decode every output before it is committed; a mismatch is a failure.
    verify: bool = False
    #: Set a damaged manifest aside and rebuild it from the outputs on disk.
    rebuild_manifest: bool = False
    #: Convert only the files this list names (relative to SRC, one folder) instead
    #: of walking SRC; ``-`` reads the list from standard input.
    files_from: Path | None = None
    #: The list's names end with NUL (``find -print0``), not with a newline.
    files_from_nul: bool = False
    #: A file in DEST where an output goes that optimizr did not write (no
    #: manifest row names it): keep it and skip the source, or replace it.
    if_exists: IfExists = "skip"
    #: Remove the outputs (and copies) optimizr wrote for sources that are gone.
    delete: bool = False
    #: Copy the files that are not converted (larger than source, small saving,
    #: already WebP, unsupported, not an image) into DEST as they are.
    copy_unconverted: bool = False
    #: Keep no WebP that saves less than this percentage of its source.
    min_saving: float = 0.0
    #: Re-encode WebP sources; without it they are kept as they are ("already webp").
    reencode_webp: bool = False
    #: Exit 1 for any failed file; by default only for failures new in this run,
    #: so that known-bad files do not fail every scheduled run for ever.
    strict: bool = False
    #: Labels put on every series of the --metrics-textfile, as (name, value) pairs,
    #: besides ``dest`` (which a pair named ``dest`` replaces).
    metrics_labels: tuple[tuple[str, str], ...] = ()
    #: Export traces over OTLP/HTTP to this collector (a base URL, as the standard
    #: OTEL_EXPORTER_OTLP_ENDPOINT, which is used when this is None): tracing.py.
    otlp_endpoint: str | None = None
    # -- object stores (see storage/objectstore.py StoreOptions) ----------------------
    #: An S3-compatible endpoint (SeaweedFS, MinIO, Ceph, R2...); None: AWS_ENDPOINT_URL or AWS.
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    #: Path-style requests (http://host/bucket/key), which most S3-compatible servers want.
    s3_path_style: bool = False
    #: Requests to object stores in flight at once; 0: chosen from the workers
    #: (transfers.default_io_concurrency).
    io_concurrency: int = 0
    #: Cache-Control set on every output written to an object store.
    cache_control: str | None = None
    #: Where a remote DEST's manifest lives on this machine (dest_state.local_state_root).
    state_dir: Path | None = None
    #: Seconds between uploads of the manifest's snapshot to a remote DEST.
    checkpoint_interval: float = 60.0
    #: A source on an object store larger than this is fetched into a spool file
    #: (read by the worker as a local file would be) instead of into memory.
    spool_above: int = 64 << 20
    #: --cluster: the Dask scheduler the images are converted on (``tcp://host:port``),
    #: or ``local`` / ``local:N`` for a LocalCluster of N one-thread workers here;
    #: None: this machine's process pool.
    cluster: str | None = None

    @property
    def remote(self) -> bool:
        """Is SRC or DEST an object store?"""
        return isinstance(self.src, str) or isinstance(self.dest, str)

    def __post_init__(self) -> None:
        if not self.sources:
            raise UsageError("convert needs a SRC and a DEST")
        if self.files_from_nul and self.files_from is None:
            raise UsageError("-0/--null says how --files-from separates names: give --files-from")
        if self.workers < 0:
            raise UsageError(f"--workers must be 0 (auto) or more, not {self.workers}")
        if self.cluster is not None:
            check_cluster_address(self.cluster)
        if self.name not in ("replace", "append", "auto"):
            raise UsageError(f"--name must be replace, append or auto, not {self.name!r}")
        if self.if_exists not in ("skip", "overwrite"):
            raise UsageError(f"--if-exists must be skip or overwrite, not {self.if_exists!r}")
        if self.if_larger not in ("skip", "write"):
            raise UsageError(f"--if-larger must be skip or write, not {self.if_larger!r}")
        if not 0 <= self.min_saving < 100:
            raise UsageError(f"--min-saving must be 0 or more and under 100, not {self.min_saving}")
        if self.min_saving and self.if_larger == "write":
            raise UsageError("--min-saving cannot be used with --if-larger write (which keeps all)")
        if self.timeout <= 0:
            raise UsageError(f"--timeout must be positive, not {self.timeout}")
        if self.max_memory is not None and self.max_memory < 64 << 20:
            raise UsageError(f"--max-memory must be at least 64M, not {self.max_memory:,} bytes")
        if self.max_tasks_per_worker is not None and self.max_tasks_per_worker < 1:
            raise UsageError("--max-tasks-per-worker must be at least 1")
        if self.max_attempts < 1:
            raise UsageError(f"--max-attempts must be at least 1, not {self.max_attempts}")
        if self.grace < 0:
            raise UsageError(f"--grace must not be negative, not {self.grace}")
        if self.io_concurrency < 0:
            raise UsageError(
                f"--io-concurrency must be 0 (auto) or more, not {self.io_concurrency}"
            )
        if self.spool_above < 0:
            raise UsageError(f"--spool-above must not be negative, not {self.spool_above}")
        if self.checkpoint_interval <= 0:
            raise UsageError(
                f"--checkpoint-interval must be positive, not {self.checkpoint_interval}"
            )
        if self.cache_control is not None and not _HEADER_VALUE_RE.fullmatch(self.cache_control):
            raise UsageError(
                f"--cache-control {self.cache_control!r}: not a valid header value "
                "(printable ASCII, no line breaks)"
            )
        if self.otlp_endpoint is not None and not _HTTP_URL_RE.match(self.otlp_endpoint):
            raise UsageError(
                f"--otlp-endpoint {self.otlp_endpoint!r}: not an http:// or https:// URL"
            )
        if not isinstance(self.strict, bool):
            raise UsageError(f"strict must be True or False, not {self.strict!r}")
        seen: set[str] = set()
        for name, _ in self.metrics_labels:
            if not _LABEL_NAME_RE.match(name) or name.startswith("__"):
                raise UsageError(
                    f"--metrics-label: {name!r} is not a valid label name "
                    "(letters, digits and _, not starting with a digit or __)"
                )
            if name in METRIC_LABELS_IN_USE:
                raise UsageError(
                    f"--metrics-label: {name!r} is already a label of optimizr's metrics"
                )
            if name in seen:
                raise UsageError(f"--metrics-label: {name!r} is given twice")
            seen.add(name)

    @property
    def sources(self) -> tuple[Path | str, ...]:
        return self.src if isinstance(self.src, tuple) else (self.src,)

    @property
    def effective_workers(self) -> int:
        return self.workers or available_cpus()

    @property
    def effective_summary_path(self) -> Path:
        """The local summary (for a remote DEST see convert: it goes to DEST too)."""
        if self.summary_path is not None:
            return self.summary_path
        assert isinstance(self.dest, Path), "a remote DEST's summary is placed by convert"
        return self.dest / SUMMARY_NAME

    @property
    def summary_to_stdout(self) -> bool:
        return self.summary_path is not None and str(self.summary_path) == "-"


#: An OTLP/HTTP collector's URL: http(s)://host[:port][/path].
_HTTP_URL_RE = re.compile(r"^https?://[^\s/?#]+(/\S*)?$")

#: What an HTTP header value may hold (visible ASCII and spaces).
_HEADER_VALUE_RE = re.compile(r"[\x20-\x7e]+")

#: Prometheus label names (its data model: ``[a-zA-Z_][a-zA-Z0-9_]*``; ``__`` is reserved).
_LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
#: Labels optimizr's own series carry (``le``: histogram buckets); a run label of the
#: same name would collide with them.
METRIC_LABELS_IN_USE = frozenset({"status", "format", "le", "quantile"})


def parse_metrics_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (as ``--metrics-label`` takes it) as a (name, value) pair."""
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise UsageError(f"--metrics-label takes KEY=VALUE, not {text!r}")
    return name, value


def _check_target_size(options: EncodeOptions) -> None:
    assert options.target_size is not None
    if options.target_size < 1:
        raise UsageError(f"--target-size must be positive, not {options.target_size}")
    # A size target picks a lossy quality; lossless has no quality to trade for bytes.
    # (--target-score, which picks a quality for a score, excludes it as well.)
    if options.lossless or options.near_lossless is not None:
        which = "--lossless" if options.lossless else "--near-lossless"
        raise UsageError(f"--target-size chooses a lossy quality: it cannot be used with {which}")
    if options.target_score is not None:
        raise UsageError(
            "--target-size and --target-score (or a --quality level) each choose the quality: "
            "give one of them"
        )


#: ``--quality`` names for SSIMULACRA 2 targets (README: "Quality auto-tuning").
QUALITY_LEVELS: dict[str, float] = {
    "auto": 75.0,
    "high": 80.0,
    "visually-lossless": 85.0,
}


def _check_target_score(options: EncodeOptions) -> None:
    _check_range("--min-quality", options.min_quality, 0, 100)
    _check_range("--max-quality", options.max_quality, 0, 100)
    if options.min_quality > options.max_quality:
        raise UsageError(
            f"--min-quality {options.min_quality} is above --max-quality {options.max_quality}"
        )
    score = options.target_score
    if score is None:
        return
    if not 0 < score <= 100:
        raise UsageError(f"--target-score must be above 0 and at most 100, not {score}")
    if options.lossless or options.near_lossless is not None:
        raise UsageError(
            "--target-score chooses lossy or lossless per image: "
            "do not give --lossless or --near-lossless with it"
        )
    if options.encoder == "libvips":
        raise UsageError("--target-score encodes through libwebp's binding, not --encoder libvips")


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, not {value}")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Parse a byte size such as ``512M``, ``2G``, ``1.5GiB`` or ``1000`` (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(f"not a size: {text!r} (expected e.g. 512M, 2G, 1048576)")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def available_cpus() -> int:
    """CPUs this process may really use: affinity mask, then the cgroup v2/v1 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota + 0.5)))
    return max(1, cpus)


def _cgroup_cpu_quota() -> float | None:
    # cgroup v2: "max 100000" or "150000 100000"; v1: cfs_quota_us = -1 when unlimited.
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
