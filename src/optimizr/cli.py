"""The command line: parse, build one frozen config, make one library call, exit.

Every option of ``convert`` is declared once, in :mod:`optimizr.cli_options`;
from there it reaches the command line, the environment (``OPTIMIZR_QUALITY``),
the config file (``optimizr.toml``) and the frozen config.

Exit codes: 0 every file converted or skipped, or failed only as it had failed
before (known bad: listed, but not new); 1 some file failed for the first time,
or for another reason than before (with --strict: any file failed); 2 usage
error (or a damaged manifest); 3 another run holds DEST; 4 the worker processes
cannot start; 130 interrupted by SIGINT, 143 by SIGTERM; 141 ``urls`` stopped because the
reader of its stdout went away (``| head``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich.console import Console

from optimizr import __version__, decoders
from optimizr.cli_options import (
    CONFIG_NAME,
    ConsoleOptions,
    apply_options,
    build_configs,
    find_config_file,
    load_config_file,
)
from optimizr.config import RunConfig
from optimizr.convert import convert_tree
from optimizr.errors import OptimizrError, UsageError
from optimizr.events import Listeners, ProgressListener, StopToken
from optimizr.filenames import json_safe, printable
from optimizr.heap import keep_heap_compact
from optimizr.libwebp import encoder_info
from optimizr.lock import describe_holder
from optimizr.metrics.logs import LogListener, configure_logging
from optimizr.metrics.progress import TerminalProgress, deletion_lines, summary_table
from optimizr.status import StatusReport, read_status
from optimizr.storage.objectstore import ObjectStorage
from optimizr.storage.urls import is_url
from optimizr.versions import tool_versions

if TYPE_CHECKING:
    from optimizr.metrics.exporter import MetricsExporter

_F = TypeVar("_F", bound=Callable[..., Any])


class _Group(click.Group):
    """click's group, with click's own errors in optimizr's one style.

    click prints ``Usage: ...`` and ``Error: Invalid value ...`` over three lines;
    optimizr's errors are one line, ``optimizr: error: ...`` (or one JSON event
    with --log-format json), with the same exit code 2 for every usage error.
    """

    def main(self, args: Sequence[str] | None = None, *pos: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        kwargs["standalone_mode"] = False
        try:
            code = super().main(argv, *pos, **kwargs)
        except click.exceptions.Abort:
            print_error("aborted", argv)
            sys.exit(130)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.format_message(), err=True)  # plain `optimizr`: the help
            sys.exit(2)
        except click.ClickException as exc:
            message = exc.format_message().replace("\n", "; ")
            print_error(message[:1].lower() + message[1:], argv)
            sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def print_error(message: str, argv: Sequence[str] = (), *, json_logs: bool | None = None) -> None:
    """The one way an error reaches the user: one line on stderr."""
    if json_logs is None:
        json_logs = _wants_json(argv)
    if json_logs:
        event = {"level": "error", "event": "error", "message": message, "exit_code": 2}
        click.echo(json.dumps(json_safe(event), ensure_ascii=False), err=True)
    else:
        click.echo(f"optimizr: error: {printable(message)}", err=True)


def _wants_json(argv: Sequence[str]) -> bool:
    # Parsing failed, so the parsed --log-format is unknown: look for it by hand.
    for index, arg in enumerate(argv):
        if arg == "--log-format=json" or (
            arg == "--log-format" and argv[index + 1 : index + 2] == ["json"]
        ):
            return True
    return os.environ.get("OPTIMIZR_LOG_FORMAT") == "json"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return

    tool = tool_versions()
    click.echo(f"optimizr {__version__}")
    click.echo(f"libvips {tool['libvips']} (pyvips {tool['pyvips']})")
    click.echo(f"libwebp {tool['libwebp']} ({tool['libwebp_origin']})")
    click.echo(f"Python {tool['python']}")
    click.echo(encoder_info().describe())
    click.echo(f"SSIMULACRA 2.1 (--target-score): {tool['ssimulacra2']}")
    click.echo("formats:")
    for kind, entry in decoders.support().items():
        said = f"{entry['library']} {entry.get('version', '')}".rstrip()
        click.echo(f"  {kind:<9} {said if entry['available'] else entry['reason']}")
    ctx.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the versions of optimizr, libvips, libwebp and Python, and exit.",
)
def main() -> None:
    """Convert whole image libraries to WebP."""


def run() -> None:
    """The ``optimizr`` program (its console script, and ``python -m optimizr``).

    glibc's malloc settings are a process's own (see ``heap.py``): the program sets
    them for itself, as each conversion worker does; ``main`` called by a host program
    (or a test) leaves the host's alone. What a coordinator frees is handed back either
    way (``heap.HeapTrimmer``, every run and service)."""
    keep_heap_compact()
    main()


def _read_config_file(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Any:
    # Eager, so it runs before the other options take their defaults: the file's
    # values become click's default_map, below the command line and environment.
    if ctx.resilient_parsing:
        return value
    try:
        path = find_config_file(value)
        if path is not None:
            ctx.default_map = {**(ctx.default_map or {}), **load_config_file(path)}
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    return path


#: --config, for every command that takes the convert options (convert, watch).
config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="OPTIMIZR_CONFIG",
    is_eager=True,
    callback=_read_config_file,
    metavar="PATH",
    help=f"Read option defaults from this TOML file [./{CONFIG_NAME} if it exists].",
)


@main.command(
    epilog="Every option can also be set in the environment (OPTIMIZR_QUALITY=75, "
    f"OPTIMIZR_MAX_MEMORY=2G) or in {CONFIG_NAME} (quality = 75); the command line wins, "
    "then the environment, then the file."
)
# As typed (str, not Path): a trailing slash on DEST says "a folder" for one file.
@click.argument("paths", nargs=-1, required=True, type=click.Path(), metavar="SRC... DEST")
@config_file_option
@apply_options
def convert(paths: tuple[str, ...], config_file: Path | None, **params: Any) -> None:
    """Convert every image under SRC into a mirrored tree of .webp files under DEST.

    SRC may be one file (DEST: a .webp name or a folder), DEST itself (in place,
    with --name append), or several SRCs, each going under DEST/<its name>/."""
    srcs, dest = paths[:-1], paths[-1]
    # A URL stays text (Path would fold its "//"); a path becomes a Path.
    src: Path | tuple[Path, ...] | str
    if len(srcs) == 1:
        src = srcs[0] if is_url(srcs[0]) else Path(srcs[0])
    elif any(is_url(s) for s in srcs):
        src = srcs[0]  # refused by convert_tree, with the reason
        print_error("a SRC that is a URL must be the only SRC", json_logs=False)
        sys.exit(2)
    else:
        src = tuple(Path(s) for s in srcs)
    try:
        config, console = build_configs(
            src, dest if is_url(dest) else Path(dest), params, config_file
        )
    except OptimizrError as exc:
        print_error(str(exc), json_logs=params.get("log_format") == "json")
        sys.exit(exc.exit_code)
    with configure_logging(console.log_format, console.effective_log_level) as logger:
        sys.exit(_convert(logger, config, console, dest))


def _say_missing_decoders(logger: logging.Logger, err: Console, json_logs: bool) -> None:
    """One line per format whose optional decoder is missing, once at start (STYLE 9):
    its files are then skipped as unsupported, each with the same short reason."""
    for kind, entry in decoders.support().items():
        if entry["available"]:
            continue
        line = f"{entry['unsupported']}: {kind} files are skipped as unsupported"
        if json_logs:
            fields = {"format": kind, "reason": entry["reason"]}
            logger.warning("%s", line, extra={"event": "decoder_missing", "fields": fields})
        else:
            err.print(f"optimizr: warning: {line}", markup=False)


def _convert(logger: logging.Logger, config: RunConfig, console: ConsoleOptions, dest: str) -> int:
    """The body of ``convert``; returns the exit code."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    started_at = time.time()
    exporter: MetricsExporter | None = None
    stores: list[ObjectStorage] = []
    json_logs, quiet = console.json_logs, console.effective_log_level in ("warning", "error")
    try:
        stop = StopToken()
        log = LogListener(logger, images=json_logs)
        dry_run = config.dry_run
        # JSON logs own stderr: no live bar, plain lines or table may mix into them.
        progress = TerminalProgress(
            live=False if dry_run or json_logs or quiet else console.live,
            verbose=(console.verbose or dry_run or console.log_level == "debug") and not quiet,
            stream=io.StringIO() if json_logs else None,
            quiet=quiet,
            show_failures=console.effective_log_level != "error",
        )
        listener: ProgressListener = Listeners(progress, log)
        if console.metrics_port is not None or console.metrics_textfile is not None:
            # Imported here: prometheus_client costs ~70 ms, paid only by runs that use it.
            from optimizr.metrics.exporter import MetricsExporter, run_labels

            exporter = MetricsExporter(
                stall_timeout=console.stall_timeout,
                labels=run_labels(config),
                # Read at each scrape: the stores convert_tree builds, as it builds them.
                storage_statistics=lambda: [store.statistics() for store in stores],
                build_info=tool_versions(config.encode.encoder),
            )
            listener = Listeners(progress, log, exporter)

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            stop.request(signum)
            listener.stopping(hard=stop.hard)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            # The server answers from before the run starts until it ends, then frees the port.
            with exporter or contextlib.nullcontext(), progress:
                if exporter is not None and console.metrics_port is not None:
                    url = exporter.serve(console.metrics_host, console.metrics_port)
                    logger.info(
                        "metrics: %s/metrics (and /healthz, /readyz)",
                        url,
                        extra={"event": "metrics", "fields": {"url": url}},
                    )
                _say_missing_decoders(logger, err, json_logs)
                summary = convert_tree(
                    config.src, dest, config, listener=listener, stop=stop, stores=stores
                )
                if exporter is not None:
                    exporter.run_ended()
                    if console.metrics_port is not None and console.metrics_linger > 0:
                        exporter.linger(console.metrics_linger)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    except OptimizrError as exc:
        if json_logs:
            fields = {"message": str(exc), "exit_code": exc.exit_code}
            logger.error("%s", exc, extra={"event": "error", "fields": fields})
        else:
            print_error(str(exc), json_logs=False)
        # A run that could not start is a failed run, for the textfile too.
        problem = _write_textfile(exporter, console.metrics_textfile, exc.exit_code, started_at)
        if problem:
            err.print(f"optimizr: warning: {problem}", markup=False)
        return exc.exit_code

    code = summary.exit_code
    problem = _write_textfile(exporter, console.metrics_textfile, code, started_at)
    if problem:
        summary.warnings.append(problem)
    if config.summary_to_stdout and not dry_run:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    if json_logs:
        log.run_finished(summary, code)
    else:
        if not quiet:
            err.print(summary_table(summary))
            for line in deletion_lines(summary, console.verbose and not dry_run):
                err.print(line, markup=False)
        if console.effective_log_level != "error":
            for warning in summary.warnings:
                err.print(f"optimizr: warning: {printable(warning)}", markup=False)
        if dry_run:
            _print_dry_run(summary)
        elif not quiet and summary.summary_file is not None:
            err.print(f"summary: {printable(str(summary.summary_file))}", markup=False)
    return code


def _write_textfile(
    exporter: MetricsExporter | None, path: Path | None, code: int, started_at: float
) -> str | None:
    """Write --metrics-textfile with the run's exit code; the problem, if it could not."""
    if exporter is None or path is None:
        return None
    try:
        exporter.write_textfile(
            path, exit_code=code, started_at=started_at, finished_at=time.time()
        )
    except OSError as exc:
        return f"could not write {path}: {exc.strerror or exc}"
    return None


def _print_dry_run(summary: Any) -> None:
    """What a dry run found, on stdout where a pipe can take it; the table is on stderr."""
    from optimizr.metrics.progress import human_bytes

    click.echo(
        f"would convert {summary.would_convert:,} files "
        f"({human_bytes(summary.would_convert_bytes)})"
    )
    for line in deletion_lines(summary, True):  # --delete: what it would remove
        click.echo(line)


@main.command(
    epilog="The convert options work as for convert (environment and optimizr.toml too). "
    "GET /healthz, /readyz and /metrics are served on the --events port of a webhook, "
    "and on --metrics-port with a broker."
)
@click.argument("src", metavar="SRC")
@click.argument("dest", metavar="DEST")
@click.option(
    "--events",
    "events_url",
    required=True,
    metavar="URL",
    envvar="OPTIMIZR_EVENTS",
    help="Where events come from: http://127.0.0.1:PORT/ listens for bucket notification "
    "webhooks (S3 Records JSON as MinIO and Ceph send, SeaweedFS's filer webhook); "
    "nats://HOST:4222/STREAM/CONSUMER, redis://HOST:6379/STREAM?group=GROUP or "
    "sqs://QUEUE consume a broker.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Convert what is queued, then exit (for cron and tests) instead of running on.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Messages taken per batch; 0: the workers' window (--workers x --lookahead), "
    "at least what the broker hands out in one request (SQS: 10).",
)
@click.option(
    "--retry-delay",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds before a message that failed for a passing reason (or an image not yet "
    "tried --max-attempts times) is delivered again.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds a received message stays hidden from other consumers, extended every "
    "half of it while its images convert; 0: --timeout plus 60. An SQS queue keeps its "
    "own VisibilityTimeout.",
)
@click.option(
    "--consumer",
    default="",
    metavar="NAME",
    help="This replica's consumer name in a Redis group [HOST-PID], and, with a bucket "
    "DEST, the name of its manifest snapshot there [HOST and a hash of --state-dir].",
)
@config_file_option
@apply_options
def watch(
    src: str,
    dest: str,
    events_url: str,
    once: bool,
    batch: int,
    retry_delay: float,
    lease: float,
    consumer: str,
    config_file: Path | None,
    **params: Any,
) -> None:
    """Convert images into DEST as bucket events about SRC arrive: a long-running service.

    SRC is a bucket URL (s3://bucket/prefix) or a folder the events' keys are
    relative to; DEST a folder or a bucket URL, which several replicas of the
    service may write at once (each with its own --state-dir). Each event is
    converted with a batch run's guarantees (manifest, atomic and conditional
    writes, memory budget); a duplicate is a no-op.
    SIGTERM drains: the images in flight finish (at most --grace), exit 0."""
    from optimizr.watch import WatchConfig

    try:
        config, console = build_configs(
            src if is_url(src) else Path(src),
            dest if is_url(dest) else Path(dest),
            params,
            config_file,
        )
        watch_config = WatchConfig(
            events=events_url,
            run=config,
            once=once,
            batch=batch,
            retry_delay=retry_delay,
            lease=lease,
            consumer=consumer,
        )
    except OptimizrError as exc:
        print_error(str(exc), json_logs=params.get("log_format") == "json")
        sys.exit(exc.exit_code)
    with configure_logging(console.log_format, console.effective_log_level) as logger:
        sys.exit(_watch(logger, watch_config, console))


def _watch(logger: logging.Logger, config: Any, console: ConsoleOptions) -> int:
    """The body of ``watch``; returns the exit code."""
    from optimizr.metrics.exporter import run_labels
    from optimizr.metrics.watch import WatchExporter
    from optimizr.watch import ImagesOnly, WatchService
    from optimizr.watch_setup import run_watch

    exporter = WatchExporter(
        stall_timeout=console.stall_timeout,
        labels=run_labels(config.run),
        build_info=tool_versions(config.run.encode.encoder),
    )
    listener = Listeners(ImagesOnly(LogListener(logger, images=True)), exporter)
    previous: dict[int, Any] = {}

    def answer(service: WatchService) -> Callable[[str], tuple[int, str, bytes]]:
        exporter.attach(service)
        if console.metrics_port is not None:  # also there, as for convert
            exporter.serve(console.metrics_host, console.metrics_port)
        return exporter.answer

    def started(service: WatchService) -> None:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            service.request_stop(signum)

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
        # A webhook serves health and metrics on its own port; with a broker they are
        # on --metrics-port, as for convert (exporter.url; None without it).
        health = service.url or exporter.url
        logger.info(
            "watching: events %s %s (/healthz, /readyz, /metrics: %s), converting %s into %s",
            "to" if service.url else "from",
            service.url or service.source.describe(),
            health or "not served, see --metrics-port",
            service.src.describe(),
            service.dest_root,
            extra={
                "event": "watching",
                "fields": {
                    "url": service.url,
                    "source": service.source.describe(),
                    "health": health,
                },
            },
        )

    try:
        _say_missing_decoders(logger, Console(stderr=True), console.json_logs)
        with exporter:
            stats = run_watch(config, listener=listener, answer=answer, on_started=started)
    except OptimizrError as exc:
        if console.json_logs:
            fields = {"message": str(exc), "exit_code": exc.exit_code}
            logger.error("%s", exc, extra={"event": "error", "fields": fields})
        else:
            print_error(str(exc), json_logs=False)
        return exc.exit_code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    fields = stats.to_dict()
    text = ", ".join(
        f"{k} {fields[k]}"
        for k in ("messages", "converted", "duplicates", "failed", "dead_lettered")
    )
    logger.info("watch stopped: %s", text, extra={"event": "watch stopped", "fields": fields})
    # A drain after SIGTERM is how a service ends: exit 0, as Kubernetes expects.
    return 0


def _store_connection_options(command: _F) -> _F:
    """How to reach an S3-compatible store, and where its local state is, for the
    commands that read a remote DEST (status, urls).

    Kept apart (and few) on purpose: they join the shared option table with
    convert's object-storage options."""
    command = click.option(
        "--s3-path-style",
        is_flag=True,
        help="Path-style S3 requests (host/bucket/key), as SeaweedFS and MinIO want.",
    )(command)
    command = click.option("--region", default=None, help="S3 region [AWS_REGION].")(command)
    command = click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        default=None,
        help="The local state folder of a remote DEST, as given to convert "
        "[under ~/.cache/optimizr, by DEST URL].",
    )(command)
    return click.option(
        "--endpoint-url",
        metavar="URL",
        default=None,
        help="S3 endpoint of an S3-compatible service [AWS_ENDPOINT_URL, else AWS].",
    )(command)


@main.command()
@click.argument("dest")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON document.")
@_store_connection_options
def status(
    dest: str,
    as_json: bool,
    state_dir: Path | None,
    endpoint_url: str | None,
    region: str | None,
    s3_path_style: bool,
) -> None:
    """What DEST's manifest says: counts, failures by reason, bytes saved, lock.

    DEST may be an object-store URL: its local state folder is read, or else the
    manifest's snapshot in DEST/.optimizr/."""
    try:
        if is_url(dest):
            from optimizr.dest_state import remote_status
            from optimizr.storage.objectstore import StoreOptions

            options = StoreOptions(
                endpoint_url=endpoint_url, region=region, s3_path_style=s3_path_style
            )
            report = remote_status(dest, state_dir, options)
        else:
            report = read_status(Path(dest))
    except OptimizrError as exc:
        print_error(str(exc), json_logs=False)
        sys.exit(exc.exit_code)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_status(report))


@main.command()
@click.argument("dest", metavar="DEST")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    default="csv",
    show_default=True,
    help="CSV (source,output,bytes,url) or one JSON object a line.",
)
@click.option(
    "--expires",
    metavar="DURATION",
    default=None,
    help="Validity of pre-signed URLs: 90s, 15m, 12h, 7d (at most 7d) [7d].",
)
@click.option(
    "--base-url",
    metavar="URL",
    default=None,
    help="Public URLs: this base plus each output's key relative to DEST, not signed URLs.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the list to this file (atomically) instead of stdout.",
)
@_store_connection_options
def urls(
    dest: str,
    fmt: str,
    expires: str | None,
    base_url: str | None,
    output: Path | None,
    state_dir: Path | None,
    endpoint_url: str | None,
    region: str | None,
    s3_path_style: bool,
) -> None:
    """List every converted output in DEST with a URL: pre-signed, public, or file://.

    Reads DEST's manifest (a remote DEST's local one, else its uploaded snapshot);
    writes one line per output to stdout or --output."""
    from optimizr.output_urls import UrlsConfig, parse_duration, write_output_urls
    from optimizr.storage.objectstore import StoreOptions

    try:
        config = UrlsConfig(
            dest=dest,
            format="jsonl" if fmt == "jsonl" else "csv",
            expires=None if expires is None else parse_duration(expires),
            base_url=base_url,
            output=output,
            state_dir=state_dir,
            store=StoreOptions(
                endpoint_url=endpoint_url, region=region, s3_path_style=s3_path_style
            ),
        )
        stats = write_output_urls(config, sys.stdout.buffer)
    except OptimizrError as exc:
        print_error(str(exc), json_logs=False)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # `optimizr urls ... | head`: the reader has what it wanted. Quietly, and
        # with stdout pointed away so that the interpreter's final flush stays quiet.
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    kind = {"signed": "pre-signed URLs", "base-url": "URLs under --base-url"}.get(
        stats.url_kind, "file:// URIs"
    )
    where = f" to {printable(str(output))}" if output is not None else ""
    click.echo(
        f"urls: {stats.outputs:,} outputs of {stats.rows:,} sources ({stats.bytes:,} bytes, "
        f"{kind}){where}, from {printable(stats.manifest)}",
        err=True,
    )


def format_status(report: StatusReport) -> str:
    # Paths and messages are shown escaped: a name may hold what a terminal obeys.
    lines = [f"DEST      {printable(report.dest)}", f"manifest  {printable(report.manifest)}"]
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
    progress = report.progress
    if progress is not None:
        left = (
            "total not known yet (still counting)"
            if progress.total is None or progress.remaining is None
            else f"remaining {progress.remaining:,} of {progress.total:,}"
        )
        lines.append(f"progress  {progress.processed:,} processed this run, {left}")
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
        lines.append(f"failed    {group.count:>8,}  {group.reason}  e.g. {printable(example)}")
    if report.watch is not None:
        lines.extend(_watch_lines(report.watch))
    return "\n".join(lines)


def _watch_lines(watch: dict[str, Any]) -> list[str]:
    """The ``optimizr watch`` service of DEST: its state, queue and counters."""
    dead = watch.get("dead_letters", 0)
    waiting = watch.get("waiting", 0)
    lines = [
        f"service   watching {printable(str(watch.get('events', '?')))} "
        f"({watch.get('state', 'unknown')})",
        f"queue     {'?' if waiting is None else f'{waiting:,}'} waiting, {dead:,} dead letter"
        + ("s" if dead != 1 else ""),
    ]
    source = watch.get("source_statistics")
    if isinstance(source, dict) and not str(watch.get("events", "")).startswith("http://"):
        # A broker's own figures, as the service last saw them.
        lines.append(
            f"broker    {'connected' if source.get('connected') else 'DISCONNECTED'}, "
            + ", ".join(
                f"{int(source.get(k, 0)):,} {k.replace('_', '-')}"
                for k in ("received", "acked", "redelivered", "extended", "dead_lettered")
            )
            + f", {int(source.get('connection_errors', 0)):,} connection errors"
        )
    if watch.get("last_dead_letter"):
        lines.append(f"dead      e.g. {printable(str(watch['last_dead_letter']))}")
    counters = watch.get("counters")
    if isinstance(counters, dict):
        said = ", ".join(
            f"{counters.get(k, 0):,} {k.replace('_', '-')}"
            for k in ("converted", "duplicates", "failed", "dead_lettered", "ignored")
        )
        lines.append(f"events    {said}")
    return lines


@main.command()
@click.argument("source", metavar="DEST|SUMMARY", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Where to write the HTML page [report.html (report-history.html with --history) "
    "in DEST, or beside SUMMARY].",
)
@click.option(
    "--history",
    "--all",
    "history",
    is_flag=True,
    help="Draw every run DEST keeps (DEST/.optimizr/runs/): a table of runs and totals over time.",
)
def report(source: Path, output: Path | None, history: bool) -> None:
    """Draw a run's summary as one self-contained HTML page.

    DEST (a folder): its latest run that converted or failed something. SUMMARY: that
    summary file (an optimizr-summary.json, or one kept in DEST/.optimizr/runs/).
    """
    # Imported here, like plotly inside it: `optimizr convert` should not load either.
    from optimizr.history import latest_summary
    from optimizr.report import write_report
    from optimizr.report_history import write_history_report

    folder = source.is_dir()
    try:
        if history:
            if not folder:
                raise UsageError(f"--history draws the runs DEST keeps: {source} is not a folder")
            out = output or source / "report-history.html"
            count = write_history_report(source, out)
            drawn = f"{count} run" + ("s" if count != 1 else "")
        else:
            summary, why = latest_summary(source) if folder else (source, "")
            out = output or (source / "report.html" if folder else summary.with_name("report.html"))
            write_report(summary, out)
            drawn = f"{summary}, {why}" if folder else ""
    except OptimizrError as exc:
        print_error(str(exc), json_logs=False)
        sys.exit(exc.exit_code)
    click.echo(
        f"report: {printable(str(out))}" + (f" ({printable(drawn)})" if drawn else ""), err=True
    )
