"""The command line: parse, build one frozen config, make one library call, exit.

Exit codes: 0 every file converted or skipped; 1 some failed; 2 usage error
(or a damaged manifest); 3 another run holds DEST; 130 interrupted by SIGINT,
143 by SIGTERM.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from optimizr import __version__
from optimizr.config import DEFAULT_MAX_PIXELS, PRESETS, EncodeOptions, RunConfig, parse_size
from optimizr.convert import convert_tree
from optimizr.errors import OptimizrError
from optimizr.events import Listeners, ProgressListener, StopToken
from optimizr.lock import describe_holder
from optimizr.metrics.logs import LogListener, configure_logging
from optimizr.metrics.progress import TerminalProgress, deletion_lines, summary_table
from optimizr.status import StatusReport, read_status

if TYPE_CHECKING:
    from optimizr.metrics.exporter import MetricsExporter


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="optimizr")
def main() -> None:
    """Convert whole image libraries to WebP."""


#: Options about what DEST holds besides new outputs; each is the RunConfig field
#: of the same name, passed through whole.
_DEST_OPTIONS = (
    click.option(
        "--if-exists",
        type=click.Choice(["skip", "overwrite"]),
        default="skip",
        show_default=True,
        help="A file in DEST that optimizr did not write, where an output goes: "
        "keep it and skip the source, or overwrite it.",
    ),
    click.option(
        "--delete",
        is_flag=True,
        help="Remove the outputs optimizr wrote for sources that are gone (as rsync --delete; "
        "with --dry-run: list them).",
    ),
    click.option(
        "--copy-unconverted",
        is_flag=True,
        help="Copy the files not converted (larger than source, small saving, already "
        "webp, unsupported, not an image) into DEST as they are; failed ones are not.",
    ),
    click.option(
        "--min-saving",
        type=click.FloatRange(0, 100, max_open=True),
        default=0.0,
        metavar="PERCENT",
        help="Keep no WebP that saves less than PERCENT of its source (skipped: small saving).",
    ),
    click.option(
        "--reencode-webp",
        is_flag=True,
        help="Re-encode WebP sources too (by default they are kept as they are: already webp).",
    ),
)


def _dest_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_DEST_OPTIONS):
        command = option(command)
    return command


@main.command()
@click.argument("src", type=click.Path(path_type=Path, file_okay=False))
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@_dest_options
@click.option(
    "-q",
    "--quality",
    type=click.IntRange(0, 100),
    default=80,
    show_default=True,
    help="Lossy quality (libwebp -q).",
)
@click.option(
    "--effort",
    type=click.IntRange(0, 6),
    default=4,
    show_default=True,
    help="CPU effort: 0 fastest, 6 smallest files (libwebp -m).",
)
@click.option("--lossless", is_flag=True, help="Lossless WebP.")
@click.option(
    "--near-lossless",
    type=click.IntRange(0, 100),
    default=None,
    metavar="N",
    help="Near-lossless preprocessing level, 0 (most) to 100 (off); implies lossless.",
)
@click.option(
    "--alpha-quality",
    type=click.IntRange(0, 100),
    default=100,
    show_default=True,
    help="Quality of the alpha plane.",
)
@click.option("--smart-subsample", is_flag=True, help="Sharper chroma subsampling (slower).")
@click.option(
    "--preset",
    type=click.Choice(PRESETS),
    default="default",
    show_default=True,
    help="libwebp content preset.",
)
@click.option(
    "--max-width",
    type=click.IntRange(1),
    default=None,
    help="Shrink wider images to this width (aspect kept, never enlarged).",
)
@click.option(
    "--max-height",
    type=click.IntRange(1),
    default=None,
    help="Shrink taller images to this height (aspect kept, never enlarged).",
)
@click.option(
    "--metadata",
    type=click.Choice(["none", "icc", "all"]),
    default="icc",
    show_default=True,
    help="What to keep: icc keeps only the colour profile (EXIF/GPS/XMP dropped).",
)
@click.option(
    "--srgb", is_flag=True, help="Convert to sRGB instead of keeping a wide-gamut colour profile."
)
@click.option(
    "--oversize",
    type=click.Choice(["fail", "fit"]),
    default="fail",
    show_default=True,
    help="Images over WebP's 16383 px limit: fail, or fit (downscale to fit).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=DEFAULT_MAX_PIXELS,
    show_default=True,
    help="Refuse larger images (decompression bombs) from the header.",
)
@click.option(
    "--if-larger",
    type=click.Choice(["skip", "write"]),
    default="skip",
    show_default=True,
    help="When the WebP is bigger than the source: skip or write.",
)
@click.option(
    "--name",
    "name_mode",
    type=click.Choice(["replace", "append", "auto"]),
    default="replace",
    show_default=True,
    help="photo.jpg -> photo.webp (replace) or photo.jpg.webp (append); auto: replace, "
    "but append for sources of one folder that would share a name.",
)
@click.option(
    "--include",
    multiple=True,
    metavar="GLOB",
    help="Only files matching (name, or path if it has a /). Repeatable.",
)
@click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Skip files and folders matching. Repeatable."
)
@click.option("--follow-symlinks", is_flag=True, help="Follow symbolic links (loops are cut).")
@click.option("--dry-run", is_flag=True, help="List what would be converted; write nothing.")
@click.option("--force", is_flag=True, help="Ignore the manifest: convert even what is up to date.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Try again the images earlier runs found bad (corrupt, crashed the codec...).",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="With --retry-failed: give up on an image after this many attempts in all.",
)
@click.option(
    "--verify",
    is_flag=True,
    help="Decode each output before committing it; a mismatch is a failure.",
)
@click.option(
    "--rebuild-manifest",
    is_flag=True,
    help="Set a damaged manifest aside and rebuild it from the outputs in DEST.",
)
@click.option(
    "-j",
    "--workers",
    type=click.IntRange(0),
    default=0,
    help="Worker processes (default: the CPUs this process may use).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds per image before its worker is killed.",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    help="Ceiling on the memory of all processes, e.g. 512M, 2G "
    "[default: half of the available memory, cgroup limit included].",
)
@click.option(
    "--max-tasks-per-worker",
    type=click.IntRange(1),
    default=200,
    show_default=True,
    help="Replace each worker process after this many images.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="After Ctrl-C or SIGTERM, seconds in-flight images may take to finish.",
)
@click.option(
    "--lookahead",
    type=click.IntRange(0),
    default=4,
    show_default=True,
    help="Files per worker the walk may run ahead; the largest of them starts first "
    "(0: strictly in walk order).",
)
@click.option(
    "--summary",
    "summary_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where to write the JSON summary [DEST/optimizr-summary.json].",
)
@click.option("-v", "--verbose", is_flag=True, help="One line per file.")
@click.option(
    "--progress/--no-progress",
    "live",
    default=None,
    help="Force the live progress bar on or off (default: on for a terminal).",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="During the run, serve Prometheus /metrics, /healthz and /readyz on this port "
    "(0: any free port).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Address the --metrics-port server listens on (0.0.0.0: every interface).",
)
@click.option(
    "--metrics-textfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="PATH",
    help="At the end of the run, write the final metrics here, atomically "
    "(node_exporter textfile collector format, name it *.prom).",
)
@click.option(
    "--metrics-linger",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="After the run, keep serving the final metrics this long (Ctrl-C ends it sooner).",
)
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="/healthz answers 503 when no image finished for this long while work is pending.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line on stderr (an event per image and per "
    "milestone) instead of the progress display and table.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log events shown (failed images are warnings).",
)
def convert(src: Path, dest: Path, log_format: str, log_level: str, **options: Any) -> None:
    """Convert every image under SRC into a mirrored tree of .webp files under DEST."""
    with configure_logging("json" if log_format == "json" else "text", log_level) as logger:
        sys.exit(_convert(logger, log_format == "json", src, dest, **options))


def _convert(
    logger: logging.Logger,
    json_logs: bool,
    src: Path,
    dest: Path,
    *,
    quality: int,
    effort: int,
    lossless: bool,
    near_lossless: int | None,
    alpha_quality: int,
    smart_subsample: bool,
    preset: Any,
    max_width: int | None,
    max_height: int | None,
    metadata: Any,
    srgb: bool,
    oversize: Any,
    max_pixels: int,
    if_larger: Any,
    name_mode: Any,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    follow_symlinks: bool,
    dry_run: bool,
    force: bool,
    retry_failed: bool,
    max_attempts: int,
    verify: bool,
    rebuild_manifest: bool,
    workers: int,
    timeout: float,
    max_memory: str | None,
    max_tasks_per_worker: int,
    grace: float,
    lookahead: int,
    summary_path: Path | None,
    verbose: bool,
    live: bool | None,
    metrics_port: int | None,
    metrics_host: str,
    metrics_textfile: Path | None,
    metrics_linger: float,
    stall_timeout: float,
    **dest_options: Any,
) -> int:
    """The body of ``convert``; returns the exit code."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        config = RunConfig(
            src=src,
            dest=dest,
            encode=EncodeOptions(
                quality=quality,
                effort=effort,
                lossless=lossless,
                near_lossless=near_lossless,
                alpha_quality=alpha_quality,
                smart_subsample=smart_subsample,
                preset=preset,
                max_width=max_width,
                max_height=max_height,
                metadata=metadata,
                srgb=srgb,
                oversize=oversize,
                max_pixels=max_pixels,
            ),
            workers=workers,
            include=include,
            exclude=exclude,
            follow_symlinks=follow_symlinks,
            name=name_mode,
            if_larger=if_larger,
            dry_run=dry_run,
            force=force,
            retry_failed=retry_failed,
            max_attempts=max_attempts,
            verify=verify,
            rebuild_manifest=rebuild_manifest,
            summary_path=summary_path,
            timeout=timeout,
            max_memory=parse_size(max_memory) if max_memory else None,
            max_tasks_per_worker=max_tasks_per_worker,
            grace=grace,
            lookahead_per_worker=lookahead,
            **dest_options,
        )
        stop = StopToken()
        log = LogListener(logger, images=json_logs)
        # JSON logs own stderr: no live bar, plain lines or table may mix into them.
        progress = TerminalProgress(
            live=False if dry_run or json_logs else live,
            verbose=verbose or dry_run,
            stream=io.StringIO() if json_logs else None,
        )
        listener: ProgressListener = Listeners(progress, log)
        exporter: MetricsExporter | None = None
        if metrics_port is not None or metrics_textfile is not None:
            # Imported here: prometheus_client costs ~70 ms, paid only by runs that use it.
            from optimizr.metrics.exporter import MetricsExporter

            exporter = MetricsExporter(stall_timeout=stall_timeout)
            listener = Listeners(progress, log, exporter)
        received: list[int] = []

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            stop.request()
            listener.stopping(hard=stop.hard)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            # The server answers from before the run starts until it ends, then frees the port.
            with exporter or contextlib.nullcontext(), progress:
                if exporter is not None and metrics_port is not None:
                    url = exporter.serve(metrics_host, metrics_port)
                    logger.info(
                        "metrics: %s/metrics (and /healthz, /readyz)",
                        url,
                        extra={"event": "metrics", "fields": {"url": url}},
                    )
                summary = convert_tree(src, dest, config, listener=listener, stop=stop)
                if exporter is not None:
                    exporter.run_ended()
                    if metrics_port is not None and metrics_linger > 0:
                        exporter.linger(metrics_linger)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    except OptimizrError as exc:
        if json_logs:
            fields = {"message": str(exc), "exit_code": exc.exit_code}
            logger.error("%s", exc, extra={"event": "error", "fields": fields})
        else:
            err.print(f"optimizr: error: {exc}", markup=False)
        return exc.exit_code

    if exporter is not None and metrics_textfile is not None:
        try:
            exporter.write_textfile(metrics_textfile)
        except OSError as exc:
            summary.warnings.append(f"could not write {metrics_textfile}: {exc.strerror or exc}")
    code = summary.exit_code
    if summary.interrupted and received and received[0] == signal.SIGTERM:
        code = 143
    if json_logs:
        log.run_finished(summary, code)
    else:
        err.print(summary_table(summary))
        for line in deletion_lines(summary, verbose or dry_run):
            err.print(line, markup=False)
        for warning in summary.warnings:
            err.print(f"optimizr: warning: {warning}", markup=False)
        if not dry_run:
            err.print(f"summary: {config.effective_summary_path}", markup=False)
    return code


@main.command()
@click.argument("dest", type=click.Path(path_type=Path, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON document.")
def status(dest: Path, as_json: bool) -> None:
    """What DEST's manifest says: counts, failures by reason, bytes saved, lock."""
    try:
        report = read_status(dest)
    except OptimizrError as exc:
        Console(stderr=True, highlight=False, soft_wrap=True).print(
            f"optimizr: error: {exc}", markup=False
        )
        sys.exit(exc.exit_code)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_status(report))


def format_status(report: StatusReport) -> str:
    lines = [f"DEST      {report.dest}", f"manifest  {report.manifest}"]
    if report.lock_holder is not None:
        lines.append(f"running   yes ({describe_holder(report.lock_holder)})")
    else:
        lines.append("running   no")
    if report.last_run:
        run = report.last_run
        ended = (
            "still running or killed"
            if run["finished_at"] is None
            else (f"exit {run['exit_code']}")
        )
        lines.append(f"last run  #{run['id']} ({ended})")
    counts = report.by_status
    lines.append(
        f"files     {report.total:,}: {counts['done']:,} done, {counts['failed']:,} failed, "
        f"{counts['skipped']:,} skipped"
    )
    if report.bytes_in:
        ratio = report.saved / report.bytes_in
        lines.append(
            f"bytes     {report.bytes_in:,} in, {report.bytes_out:,} out, "
            f"{report.saved:,} saved ({ratio:.1%})"
        )
    for reason, count in report.skipped_by_reason.items():
        lines.append(f"skipped   {count:>8,}  {reason}")
    for group in report.failures:
        example = f"{group.example}: {group.message}" if group.message else group.example
        lines.append(f"failed    {group.count:>8,}  {group.reason}  e.g. {example}")
    return "\n".join(lines)


@main.command()
@click.argument("summary", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where to write the HTML page [report.html beside SUMMARY].",
)
def report(summary: Path, output: Path | None) -> None:
    """Draw SUMMARY (a run's optimizr-summary.json) as one self-contained HTML page."""
    # Imported here, like plotly inside it: `optimizr convert` should not load either.
    from optimizr.report import write_report

    out = output or summary.with_name("report.html")
    try:
        write_report(summary, out)
    except OptimizrError as exc:
        click.echo(f"optimizr: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(f"report: {out}", err=True)
