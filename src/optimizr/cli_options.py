"""The option table of ``optimizr convert``: each option declared once, here.

One :class:`Opt` gives everything an option is: its flags, help, type and
default, and the field of the frozen config it fills. From that one
declaration come the click option (``--max-memory``), its environment
variable (``OPTIMIZR_MAX_MEMORY``), its key in the config file
(``max-memory = "2G"`` in ``optimizr.toml``) and the field of
:class:`~optimizr.config.EncodeOptions`, :class:`~optimizr.config.RunConfig`
or :class:`ConsoleOptions` (the settings of the terminal edge itself) that
receives it. Precedence, as click applies it: the command line, then the
environment, then the config file, then the default.

Like ``cli.py`` this is the edge of the program: the core never imports it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import click

from optimizr.config import (
    DEFAULT_MAX_PIXELS,
    PRESETS,
    QUALITY_LEVELS,
    EncodeOptions,
    RunConfig,
    parse_metrics_label,
    parse_size,
)
from optimizr.errors import UsageError

Target = Literal["encode", "run", "console"]

ENV_PREFIX = "OPTIMIZR_"
CONFIG_NAME = "optimizr.toml"


@dataclass(frozen=True)
class Opt:
    """One option of ``optimizr convert``."""

    #: click's declarations, long name first: ("--quality", "-q"), ("--progress/--no-progress",).
    flags: tuple[str, ...]
    #: The field it fills in the frozen config named by ``target``.
    field: str
    target: Target
    help: str
    default: Any = None
    type: Any = None
    is_flag: bool = False
    multiple: bool = False
    metavar: str | None = None
    show_default: bool = True
    #: Turns what was given (text from the command line, the environment or the
    #: file) into the config's value, e.g. "2G" -> 2147483648.
    parse: Callable[[Any], Any] | None = None

    @property
    def name(self) -> str:
        """The long name without dashes: ``max-memory``; also the config file's key."""
        return self.flags[0].split("/")[0].removeprefix("--")

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")

    def click_option(self) -> Callable[[Any], Any]:
        kwargs: dict[str, Any] = {
            "help": self.help,
            "envvar": self.envvar,
            "show_envvar": False,  # said once in the help's epilog, not on every line
            "multiple": self.multiple,
        }
        if self.is_flag:
            kwargs["is_flag"] = True
            kwargs["default"] = bool(self.default)
        else:
            kwargs["default"] = self.default
            kwargs["show_default"] = self.show_default and self.default is not None
            if self.type is not None:
                kwargs["type"] = self.type
            if self.metavar is not None:
                kwargs["metavar"] = self.metavar
        if "/" in self.flags[0]:  # --progress/--no-progress: None unless given
            kwargs.pop("is_flag", None)
            kwargs["default"] = self.default
        return click.option(*self.flags, self.field, **kwargs)


_ALWAYS = click.IntRange(0)


class QualityType(click.ParamType[Any, Any]):
    """``--quality``: 0-100, or a level of :data:`~optimizr.config.QUALITY_LEVELS`."""

    name = "0-100|" + "|".join(QUALITY_LEVELS)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.strip().lower() in QUALITY_LEVELS:
            return value.strip().lower()
        try:
            return click.IntRange(0, 100).convert(value, param, ctx)
        except click.BadParameter as exc:
            levels = ", ".join(QUALITY_LEVELS)
            self.fail(f"{exc.message.rstrip('.')} (or a level: {levels})", param, ctx)


#: Every option of ``optimizr convert``, in the order ``--help`` lists them.
OPTIONS: tuple[Opt, ...] = (
    # -- how each image is encoded (EncodeOptions: part of the options fingerprint)
    Opt(("--quality", "-q"), "quality", "encode",
        "Lossy quality (libwebp -q), or a level each image is searched for: auto "
        "(--target-score 75), high (80), visually-lossless (85).",
        80, QualityType(), metavar="N|LEVEL"),
    Opt(("--target-score",), "target_score", "encode",
        "Per image the smallest output whose SSIMULACRA 2 score is at least S "
        "(lossy quality searched, or lossless when smaller).",
        None, click.FloatRange(0, 100, min_open=True), metavar="S"),
    Opt(("--min-quality",), "min_quality", "encode",
        "Lowest quality --target-score may choose.", 50, click.IntRange(0, 100)),
    Opt(("--max-quality",), "max_quality", "encode",
        "Highest quality --target-score may choose.", 95, click.IntRange(0, 100)),
    Opt(("--effort",), "effort", "encode",
        "CPU effort: 0 fastest, 6 smallest files (libwebp -m).", 4, click.IntRange(0, 6)),
    Opt(("--lossless",), "lossless", "encode", "Lossless WebP.", False, is_flag=True),
    Opt(("--near-lossless",), "near_lossless", "encode",
        "Near-lossless preprocessing level, 0 (most) to 100 (off); implies lossless.",
        None, click.IntRange(0, 100), metavar="N"),
    Opt(("--alpha-quality",), "alpha_quality", "encode", "Quality of the alpha plane.",
        100, click.IntRange(0, 100)),
    Opt(("--smart-subsample",), "smart_subsample", "encode",
        "Sharper chroma subsampling (slower).", False, is_flag=True),
    Opt(("--preset",), "preset", "encode", "libwebp content preset.", "default",
        click.Choice(PRESETS)),
    Opt(("--max-width",), "max_width", "encode",
        "Shrink wider images to this width (aspect kept, never enlarged).",
        None, click.IntRange(1)),
    Opt(("--max-height",), "max_height", "encode",
        "Shrink taller images to this height (aspect kept, never enlarged).",
        None, click.IntRange(1)),
    Opt(("--metadata",), "metadata", "encode",
        "What to keep: icc keeps only the colour profile (EXIF/GPS/XMP dropped).",
        "icc", click.Choice(["none", "icc", "all"])),
    Opt(("--srgb",), "srgb", "encode",
        "Convert to sRGB instead of keeping a wide-gamut colour profile.", False, is_flag=True),
    Opt(("--oversize",), "oversize", "encode",
        "Images over WebP's 16383 px limit: fail, or fit (downscale to fit).",
        "fail", click.Choice(["fail", "fit"])),
    Opt(("--max-pixels",), "max_pixels", "encode",
        "Refuse larger images (decompression bombs) from the header.",
        DEFAULT_MAX_PIXELS, click.IntRange(1)),
    Opt(("--pages",), "pages", "encode",
        "Multi-page TIFF: the first page (with a warning), or all (name.p2.webp, ...).",
        "first", click.Choice(["first", "all"])),
    Opt(("--strict-decode",), "strict_decode", "encode",
        "Fail a JPEG with damaged compressed data (libjpeg's corrupt-data warnings) "
        "instead of converting it with the damage recorded.", False, is_flag=True),
    Opt(("--encoder",), "encoder", "encode",
        "libwebp (optimizr's binding of Pillow's -O3 build), libvips (webpsave, slower), "
        "or auto: libwebp when it loads. Same bytes either way.",
        "auto", click.Choice(["auto", "libwebp", "libvips"])),
    Opt(("--target-size",), "target_size", "encode",
        "Each output at most SIZE (e.g. 200K, binary units), at the best lossy quality "
        "that fits, instead of --quality.", None, str, metavar="SIZE",
        parse=lambda text: parse_size(str(text))),
    # -- what the run does with outputs and sources (RunConfig)
    Opt(("--if-larger",), "if_larger", "run",
        "When the WebP is bigger than the source: skip or write.",
        "skip", click.Choice(["skip", "write"])),
    Opt(("--min-saving",), "min_saving", "run",
        "Keep no WebP that saves less than PERCENT of its source (skipped: small saving).",
        0.0, click.FloatRange(0, 100, max_open=True), metavar="PERCENT"),
    Opt(("--reencode-webp",), "reencode_webp", "run",
        "Re-encode WebP sources too (by default they are kept as they are: already webp).",
        False, is_flag=True),
    Opt(("--name",), "name", "run",
        "photo.jpg -> photo.webp (replace) or photo.jpg.webp (append); auto: replace, "
        "but append for sources of one folder that would share a name.",
        "replace", click.Choice(["replace", "append", "auto"])),
    Opt(("--if-exists",), "if_exists", "run",
        "A file in DEST that optimizr did not write, where an output goes: "
        "keep it and skip the source, or overwrite it.",
        "skip", click.Choice(["skip", "overwrite"])),
    Opt(("--copy-unconverted",), "copy_unconverted", "run",
        "Copy the files not converted (larger than source, small saving, already webp, "
        "unsupported, not an image) into DEST as they are; failed ones are not.",
        False, is_flag=True),
    Opt(("--delete",), "delete", "run",
        "Remove the outputs optimizr wrote for sources that are gone (as rsync --delete; "
        "with --dry-run: list them).", False, is_flag=True),
    Opt(("--include",), "include", "run",
        "Only files matching (name, or path if it has a /). Repeatable.",
        (), multiple=True, metavar="GLOB", show_default=False),
    Opt(("--exclude",), "exclude", "run", "Skip files and folders matching. Repeatable.",
        (), multiple=True, metavar="GLOB", show_default=False),
    Opt(("--follow-symlinks",), "follow_symlinks", "run",
        "Follow symbolic links (loops are cut).", False, is_flag=True),
    Opt(("--files-from",), "files_from", "run",
        "Convert only the files FILE names (one a line, relative to SRC; '-': stdin).",
        None, click.Path(path_type=Path, dir_okay=False, allow_dash=True), metavar="FILE"),
    Opt(("--null", "-0"), "files_from_nul", "run",
        "--files-from names end with NUL (find -print0), not a newline.", False, is_flag=True),
    Opt(("--preserve-mtime",), "preserve_mtime", "run",
        "Give each output its source's modification time.", False, is_flag=True),
    Opt(("--dry-run",), "dry_run", "run",
        "List on stdout what would be converted; write nothing.", False, is_flag=True),
    Opt(("--force",), "force", "run",
        "Ignore the manifest: convert even what is up to date.", False, is_flag=True),
    Opt(("--retry-failed",), "retry_failed", "run",
        "Try again the images earlier runs found bad (corrupt, crashed the codec...).",
        False, is_flag=True),
    Opt(("--max-attempts",), "max_attempts", "run",
        "With --retry-failed: give up on an image after this many attempts in all.",
        3, click.IntRange(1)),
    Opt(("--strict",), "strict", "run",
        "Exit 1 when any file failed, known-bad ones included (default: only new failures).",
        False, is_flag=True),
    Opt(("--verify",), "verify", "run",
        "Decode each output before committing it; a mismatch is a failure.",
        False, is_flag=True),
    Opt(("--rebuild-manifest",), "rebuild_manifest", "run",
        "Set a damaged manifest aside and rebuild it from the outputs in DEST.",
        False, is_flag=True),
    Opt(("--workers", "-j"), "workers", "run",
        "Worker processes; 0: all the CPUs this process may use (affinity, cgroup quota).",
        0, _ALWAYS),
    Opt(("--cluster",), "cluster", "run",
        "Convert on a Dask cluster: tcp://HOST:PORT of its scheduler, or local[:N] for "
        "N one-thread workers here (N: --workers); needs optimizr[cluster].",
        None, str, metavar="ADDRESS"),
    Opt(("--timeout",), "timeout", "run", "Seconds per image before its worker is killed.",
        300.0, click.FloatRange(min=0, min_open=True)),
    Opt(("--max-memory",), "max_memory", "run",
        "Ceiling on the memory of all processes, e.g. 512M, 2G "
        "[default: half of the available memory, cgroup limit included].",
        None, str, metavar="SIZE", parse=lambda text: parse_size(str(text))),
    Opt(("--max-tasks-per-worker",), "max_tasks_per_worker", "run",
        "Replace each worker process after this many images.", 200, click.IntRange(1)),
    Opt(("--grace",), "grace", "run",
        "After Ctrl-C or SIGTERM, seconds in-flight images may take to finish.",
        60.0, click.FloatRange(min=0)),
    Opt(("--lookahead",), "lookahead_per_worker", "run",
        "Files per worker the walk may run ahead; the largest of them starts first "
        "(0: strictly in walk order).", 4, _ALWAYS),
    Opt(("--summary",), "summary_path", "run",
        "Where to write the JSON summary ('-': stdout) [DEST/optimizr-summary.json].",
        None, click.Path(path_type=Path, dir_okay=False, allow_dash=True), metavar="PATH"),
    # -- object stores: SRC or DEST given as s3://, gs://, az:// (file:// too)
    Opt(("--endpoint-url",), "endpoint_url", "run",
        "S3-compatible endpoint (SeaweedFS, MinIO, Ceph, R2...) [AWS_ENDPOINT_URL, else AWS].",
        None, str, metavar="URL"),
    Opt(("--region",), "region", "run",
        "Region of the bucket [AWS_REGION / AWS_DEFAULT_REGION].", None, str),
    Opt(("--profile",), "profile", "run",
        "Shared AWS profile of static keys in ~/.aws/credentials or config [AWS_PROFILE].",
        None, str),
    Opt(("--s3-path-style/--no-s3-path-style",), "s3_path_style", "run",
        "Path-style S3 requests (host/bucket/key), as most S3-compatible servers want.",
        False),
    Opt(("--io-concurrency",), "io_concurrency", "run",
        "Object-store requests in flight at once (0: 8 per worker, see the README).",
        0, _ALWAYS, metavar="N"),
    Opt(("--cache-control",), "cache_control", "run",
        "Cache-Control header set on every output written to an object store.",
        None, str, metavar="VALUE"),
    Opt(("--spool-above",), "spool_above", "run",
        "Sources on an object store larger than this are fetched into a temporary file "
        "rather than memory (0: all).",
        "64M", str, metavar="SIZE", parse=lambda text: parse_size(str(text))),
    Opt(("--state-dir",), "state_dir", "run",
        "Where a remote DEST's manifest is kept on this machine "
        "[~/.cache/optimizr/dests/<DEST>].",
        None, click.Path(path_type=Path, file_okay=False), metavar="DIR"),
    Opt(("--checkpoint-interval",), "checkpoint_interval", "run",
        "Seconds between uploads of the manifest to a remote DEST's .optimizr/.",
        60.0, click.FloatRange(min=0, min_open=True), metavar="SECONDS"),
    # -- the terminal edge (ConsoleOptions): how the run is shown, never what it writes
    Opt(("--verbose", "-v"), "verbose", "console", "One line per file.", False, is_flag=True),
    Opt(("--quiet", "-Q"), "quiet", "console",
        "Only failures, warnings and errors: no progress display, no table.",
        False, is_flag=True),
    Opt(("--progress/--no-progress",), "live", "console",
        "Force the live progress display on or off (default: on for a terminal).", None),
    Opt(("--metrics-port",), "metrics_port", "console",
        "During the run, serve Prometheus /metrics, /healthz and /readyz on this port "
        "(0: any free port).", None, click.IntRange(0, 65535), metavar="PORT"),
    Opt(("--metrics-host",), "metrics_host", "console",
        "Address the --metrics-port server listens on (0.0.0.0: every interface).",
        "127.0.0.1", metavar="HOST"),
    Opt(("--metrics-textfile",), "metrics_textfile", "console",
        "At the end of the run, write the final metrics here, atomically "
        "(node_exporter textfile collector format, name it *.prom).",
        None, click.Path(path_type=Path, dir_okay=False), metavar="PATH"),
    Opt(("--metrics-label",), "metrics_labels", "run",
        "A label for every series of --metrics-textfile (besides dest=DEST). Repeatable.",
        (), multiple=True, metavar="KEY=VALUE", show_default=False,
        parse=lambda texts: tuple(parse_metrics_label(str(text)) for text in texts)),
    Opt(("--otlp-endpoint",), "otlp_endpoint", "run",
        "Send OpenTelemetry traces (a span per run, image and phase) over OTLP/HTTP to "
        "this collector, e.g. http://localhost:4318 [OTEL_EXPORTER_OTLP_ENDPOINT].",
        None, str, metavar="URL"),
    Opt(("--metrics-linger",), "metrics_linger", "console",
        "After the run, keep serving the final metrics this long (Ctrl-C ends it sooner).",
        0.0, click.FloatRange(min=0), metavar="SECONDS"),
    Opt(("--stall-timeout",), "stall_timeout", "console",
        "/healthz answers 503 when no image finished for this long while work is pending.",
        300.0, click.FloatRange(min=0, min_open=True), metavar="SECONDS"),
    Opt(("--log-format",), "log_format", "console",
        "json: one JSON object per line on stderr (an event per image and per milestone) "
        "instead of the progress display and table.", "text", click.Choice(["text", "json"])),
    Opt(("--log-level",), "log_level", "console",
        "Least severe events shown: debug adds milestones and a line per file, warning "
        "shows only failures and warnings, error only errors.",
        "info", click.Choice(["debug", "info", "warning", "error"])),
)  # fmt: skip


@dataclass(frozen=True)
class ConsoleOptions:
    """How a run is shown and watched (the CLI's own settings), frozen like the rest."""

    verbose: bool = False
    quiet: bool = False
    live: bool | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_textfile: Path | None = None
    metrics_linger: float = 0.0
    stall_timeout: float = 300.0
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"
    config_file: Path | None = None

    @property
    def json_logs(self) -> bool:
        return self.log_format == "json"

    @property
    def effective_log_level(self) -> str:
        # -Q is --log-level warning: failures (warnings) and errors only.
        return "warning" if self.quiet and self.log_level in ("debug", "info") else self.log_level


def apply_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate ``command`` with every option of the table (``--help`` lists them in order)."""
    for opt in reversed(OPTIONS):
        command = opt.click_option()(command)
    return command


def build_configs(
    src: Path | tuple[Path, ...] | str,
    dest: Path | str,
    params: Mapping[str, Any],
    config_file: Path | None = None,
) -> tuple[RunConfig, ConsoleOptions]:
    """The frozen configs from click's parsed values (any of the four sources)."""
    values: dict[Target, dict[str, Any]] = {"encode": {}, "run": {}, "console": {}}
    for opt in OPTIONS:
        value = params[opt.field]
        if opt.multiple:
            value = tuple(value)
        if value is not None and opt.parse is not None:
            value = opt.parse(value)
        values[opt.target][opt.field] = value
    _apply_quality_level(values["encode"])
    encode = EncodeOptions(**values["encode"])
    run = RunConfig(src=src, dest=dest, encode=encode, **values["run"])
    console = ConsoleOptions(**values["console"], config_file=config_file)
    return run, console


def _apply_quality_level(encode: dict[str, Any]) -> None:
    """``--quality auto`` (a level's name) is ``--target-score`` of that level."""
    level = encode.get("quality")
    if not isinstance(level, str):
        return
    if encode.get("target_score") is not None:
        raise UsageError(
            f"--quality {level} is a target score: give it or --target-score, not both"
        )
    encode["target_score"] = QUALITY_LEVELS[level]
    encode["quality"] = EncodeOptions.quality  # the lossless effort, as without a level


# -- the config file -------------------------------------------------------------------------


def find_config_file(explicit: Path | None, cwd: Path | None = None) -> Path | None:
    """--config (or $OPTIMIZR_CONFIG) if given, else ./optimizr.toml if it exists."""
    if explicit is not None:
        if not explicit.exists() or explicit.is_dir():  # /dev/null: no file at all
            raise UsageError(f"config file {explicit} does not exist")
        return explicit
    candidate = (cwd or Path.cwd()) / CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_config_file(path: Path) -> dict[str, Any]:
    """The file's values as click's ``default_map`` for ``convert``: {param name: value}.

    Keys are the long option names (``max-memory``; ``max_memory`` is accepted
    too), at the top level or under a ``[convert]`` table. A key that names no
    option is an error, not silence: a typo must not quietly do nothing.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    section = data.pop("convert", {})
    if not isinstance(section, dict):
        raise UsageError(f"config file {path}: [convert] must be a table")
    by_name = {opt.name: opt for opt in OPTIONS}
    defaults: dict[str, Any] = {}
    for key, value in [*data.items(), *section.items()]:
        opt = by_name.get(key.replace("_", "-"))
        if opt is None:
            raise UsageError(f"config file {path}: unknown option {key!r}")
        if opt.multiple and isinstance(value, str):
            value = [value]
        elif opt.type is str and isinstance(value, int | float):
            value = str(value)  # max-memory = 2147483648
        defaults[opt.field] = value
    return defaults


def undeclared_fields() -> dict[str, set[str]]:
    """Fields of the frozen configs that no option fills: every one should be declared
    here (src and dest are the arguments; encode and config_file are built)."""
    declared = {opt.field for opt in OPTIONS}
    known = {"src", "dest", "encode", "config_file"}
    return {
        cls.__name__: {f.name for f in fields(cls)} - declared - known
        for cls in (EncodeOptions, RunConfig, ConsoleOptions)
    }
