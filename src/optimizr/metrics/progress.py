"""What a person watching the terminal sees: a live display on a TTY, periodic
plain lines otherwise, one line per failed file, and the final table.

Both are drawn from the run's :class:`~optimizr.events.RunSnapshot`, on a timer
(the live display 4 times a second, plain lines every ``interval`` seconds), not
when an image finishes: a run busy with two large images is still moving, and
says so (``2 running``). The total comes from the count pass as soon as it is
known, and from the pipeline's own walk once that has finished.

This is the edge of the program: only the CLI uses it, the core never does.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.markup import escape as escape_markup
from rich.table import Table
from rich.text import Text

from optimizr.filenames import printable
from optimizr.results import DRY_RUN, Result, RunSummary

if TYPE_CHECKING:
    from optimizr.events import RunSnapshot

#: Live redraws a second: often enough to look alive, rarely enough to cost
#: nothing (each asks the run for one snapshot).
LIVE_REFRESH_PER_SECOND = 4
#: Seconds of history the rate, and so the ETA, is measured over.
RATE_WINDOW = 30.0
#: The live bar's width: it takes what the figures leave of the line, within these.
BAR_MIN, BAR_MAX = 10, 40


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


def clock_text(seconds: float) -> str:
    """``1:02``, ``1:02:03``; hours are not folded into days (``27:01:01``)."""
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


class Throughput:
    """Source bytes finished per second, over the last ``window`` seconds.

    The ETA is reckoned in bytes, not files: a library mixes 20 KB icons with
    40 MB scans, and the work an image costs (read, decode, encode) grows with
    its size, so "1 MB of 4 MB left" predicts the time left far better than
    "2 of 4 files left". Over a window rather than since the start, because a
    re-run races through up-to-date files first and then slows to the speed of
    real conversion; the estimate should follow. When nothing finished within
    the window (one huge image), the whole run's mean stands in: the ETA grows
    while the run is stuck instead of vanishing.
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        self.window = window
        # Bounded by the window times the refresh rate, never by the tree.
        self._samples: deque[tuple[float, float]] = deque()
        self._first: tuple[float, float] | None = None

    def add(self, when: float, value: float) -> None:
        if self._first is None:
            self._first = (when, value)
        self._samples.append((when, value))
        # Keep one sample at or before the window's start, to measure from.
        while len(self._samples) >= 2 and self._samples[1][0] <= when - self.window:
            self._samples.popleft()

    def per_second(self) -> float | None:
        if not self._samples or self._first is None:
            return None
        now, value = self._samples[-1]
        for since, then in (self._samples[0], self._first):
            if value > then and now > since:
                return (value - then) / (now - since)
        return None


@dataclass(frozen=True)
class ProgressView:
    """What one refresh shows, worked out once for both the live and the plain form."""

    label: str
    done: int
    found: int
    #: None while neither the count nor the walk has finished.
    total: int | None
    running: int
    queued: int
    failed: int
    bytes_in: int
    bytes_out: int
    rate: float | None  # source bytes finished per second
    elapsed: float
    eta: float | None  # seconds
    memory: str

    @property
    def of(self) -> str:
        return (
            f"{self.done:,} of {self.total:,}"
            if self.total is not None
            else (f"{self.done:,} of {self.found:,}+")
        )

    @property
    def fraction(self) -> float | None:
        if self.total is None:
            return None
        return min(1.0, self.done / self.total) if self.total else 1.0

    @property
    def percent(self) -> str:
        fraction = self.fraction
        return "counting" if fraction is None else f"{fraction:.0%}"

    @property
    def eta_text(self) -> str:
        return "ETA ?" if self.eta is None else f"ETA {clock_text(self.eta)}"

    @property
    def rate_text(self) -> str:
        return f"{human_bytes(self.rate or 0.0)}/s"


def view_of(snap: RunSnapshot, *, label: str, elapsed: float, rate: float | None) -> ProgressView:
    total, total_bytes = snap.total, snap.total_bytes
    eta: float | None = None
    if total is not None and snap.finished >= total:
        eta = 0.0
    elif total_bytes is not None and rate:
        eta = max(0.0, total_bytes - snap.finished_bytes) / rate
    memory = ""
    if snap.budget_total:
        memory = f"memory {snap.budget_in_use / 2**20:,.0f} of {snap.budget_total / 2**20:,.0f} MiB"
    return ProgressView(
        label=label,
        done=snap.finished,
        found=snap.found,
        total=total,
        running=snap.running,
        queued=snap.queued,
        failed=snap.failed,
        bytes_in=snap.bytes_in,
        bytes_out=snap.bytes_out,
        rate=rate,
        elapsed=elapsed,
        eta=eta,
        memory=memory,
    )


def live_lines(view: ProgressView, width: int) -> list[Text]:
    """The live display in lines of at most ``width`` cells: the bar takes what
    the figures leave of the first line, figures that do not fit move to the next
    line whole, so that a terminal never wraps one in two."""
    label = Text(view.label, style="bold")
    head = [
        Text(view.percent),
        Text(f"{view.of} files"),
        Text(f"elapsed {clock_text(view.elapsed)}"),
    ]
    rest = [
        Text(view.eta_text),
        Text(f"{human_bytes(view.bytes_in)} -> {human_bytes(view.bytes_out)}"),
        Text(view.rate_text),
        Text(f"{view.running:,} running, {view.queued:,} queued"),
    ]
    if view.failed:
        rest.append(Text(f"{view.failed:,} failed", style="red"))
    if view.memory:
        rest.append(Text(view.memory))
    # ETA belongs on the first line too, if it fits there beside a bar.
    head.append(rest.pop(0))
    while head and width - _width(label, *head) - 1 < BAR_MIN:
        rest.insert(0, head.pop())
    room = width - _width(label, *head) - 1
    if room < BAR_MIN:
        return _pack([label, *rest], width)
    first = Text.assemble(label, " ", _bar(view.fraction, min(BAR_MAX, room)))
    for part in head:
        first.append("  ")
        first.append_text(part)
    return [first, *_pack(rest, width)]


def plain_line(view: ProgressView) -> str:
    """The same figures as one log line, for a terminal that is not one (cron, CI)."""
    parts = [
        f"{view.of} files ({view.percent})",
        f"{view.running:,} running, {view.queued:,} queued",
        f"{human_bytes(view.bytes_in)} -> {human_bytes(view.bytes_out)}",
        view.rate_text,
        f"{view.failed:,} failed",
    ]
    if view.memory:
        parts.append(view.memory)
    parts += [f"elapsed {clock_text(view.elapsed)}", view.eta_text]
    return ", ".join(parts)


def _width(*parts: Text) -> int:
    """Cells taken by parts set two spaces apart (the first needs none)."""
    return sum(part.cell_len for part in parts) + 2 * max(0, len(parts) - 1)


def _pack(parts: list[Text], width: int) -> list[Text]:
    lines: list[Text] = []
    line: Text | None = None
    for part in parts:
        if part.cell_len > width:
            part = part.copy()
            part.truncate(width, overflow="ellipsis")
        if line is not None and line.cell_len + 2 + part.cell_len <= width:
            line.append("  ")
            line.append_text(part)
        else:
            line = part.copy()
            lines.append(line)
    return lines


def _bar(fraction: float | None, width: int) -> Text:
    if fraction is None:
        return Text("━" * width, style="bar.back")
    filled = int(fraction * width + 0.5)
    return Text.assemble(("━" * filled, "bar.complete"), ("━" * (width - filled), "bar.back"))


class TerminalProgress:
    """Implements the pipeline's ``ProgressListener``; itself the live display's renderable."""

    def __init__(
        self,
        *,
        live: bool | None = None,
        verbose: bool = False,
        interval: float = 5.0,
        stream: IO[str] | None = None,
        console: Console | None = None,
        clock: Callable[[], float] = time.monotonic,
        quiet: bool = False,
        show_failures: bool = True,
        out: IO[str] | None = None,
    ) -> None:
        self.console = console or Console(
            file=stream or sys.stderr, highlight=False, soft_wrap=True
        )
        #: -Q / --log-level warning: no live display and no progress lines.
        self.quiet = quiet
        #: --log-level error: not even the FAILED lines.
        self.show_failures = show_failures
        #: Where a dry run lists what it would convert: stdout, for a pipe.
        self.out = out
        self.live = False if quiet else (self.console.is_terminal if live is None else live)
        self.verbose = verbose
        #: Without a live display: seconds between plain progress lines.
        self.interval = interval
        self.clock = clock
        self.label = "converting"
        self._t0 = clock()
        self._rate = Throughput()
        self._snapshot: Callable[[], RunSnapshot] | None = None
        self._live: Live | None = None
        self._ticker: threading.Thread | None = None
        self._closed = threading.Event()
        # The plain lines come from the ticker's thread, the file lines from the
        # pipeline's: one at a time, so that they never interleave mid-line.
        # Reentrant: a signal handler (Ctrl-C: "stopping") prints from the main
        # thread, which may be inside a print of its own at that moment.
        self._print_lock = threading.RLock()

    # context management starts/stops the live display or the plain-line ticker
    def __enter__(self) -> TerminalProgress:
        if self.live:
            self._live = Live(
                self,
                console=self.console,
                refresh_per_second=LIVE_REFRESH_PER_SECOND,
                transient=False,
            )
            self._live.start()
        elif self.interval > 0 and not self.quiet:
            self._ticker = threading.Thread(
                target=self._tick_every_interval, name="optimizr-progress", daemon=True
            )
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        if self._live is not None:
            self._live.stop()
        if self._ticker is not None:
            self._ticker.join()

    # -- ProgressListener ------------------------------------------------------------

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        self._snapshot = snapshot
        self._t0 = self.clock()
        self._rate = Throughput()
        self._rate.add(self._t0, 0)

    def found(self, count: int) -> None:
        """Nothing to do: the display reads the run's snapshot when it redraws."""

    def walk_done(self, total: int) -> None:
        """Nothing to do: the snapshot says so."""

    def finished(self, result: Result) -> None:
        if result.status == "failed" and self.show_failures:
            self._print(f"[red]FAILED[/red] {_escape(result.line())}")
        # A failed image's FAILED line already says what the decoder said; its
        # codec messages stay on its JSON event only.
        if self.show_failures and result.status != "failed":
            for warning in result.warnings:
                self._print(f"[yellow]WARNING[/yellow] {_escape(result.key)}: {_escape(warning)}")
        if result.reason == DRY_RUN:
            print(_dry_run_line(result), file=self.out or sys.stdout, flush=True)
        elif self.verbose and result.status != "failed":
            self._print(_verbose_line(result))

    def stopping(self, hard: bool) -> None:
        if self.quiet and self.show_failures is False:
            return
        if hard:
            self.label = "aborting"
            self._print("[yellow]aborting: in-flight images are abandoned[/yellow]")
        else:
            self.label = "stopping"
            self._print(
                "[yellow]stopping: finishing the images in flight "
                "(press Ctrl-C again to abort)[/yellow]"
            )

    # -- drawing -----------------------------------------------------------------

    def view(self) -> ProgressView | None:
        """The figures as of now; None before the run has started."""
        if self._snapshot is None:
            return None
        snap = self._snapshot()
        now = self.clock()
        self._rate.add(now, snap.finished_bytes)
        return view_of(snap, label=self.label, elapsed=now - self._t0, rate=self._rate.per_second())

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        view = self.view()
        if view is not None:
            for line in live_lines(view, options.max_width):
                line.no_wrap = True
                yield line

    def plain_line(self) -> str:
        view = self.view()
        return "" if view is None else plain_line(view)

    def tick(self) -> None:
        """One plain progress line, now."""
        line = self.plain_line()
        if line:
            with self._print_lock:
                self.console.print(line, markup=False, highlight=False)

    def _tick_every_interval(self) -> None:
        while not self._closed.wait(self.interval):
            self.tick()

    def _print(self, markup: str) -> None:
        # With a live display, its console prints above the display.
        with self._print_lock:
            self.console.print(markup)


def _escape(text: str) -> str:
    """A name (or a line naming one) for rich markup: what a terminal would obey
    escaped (filenames.printable), then what rich would read as markup."""
    return escape_markup(printable(text))


def _dry_run_line(result: Result) -> str:
    key, output = printable(result.key), printable(result.output or "")
    return f"would convert {key} -> {output} ({human_bytes(result.bytes_in)})"


def _verbose_line(result: Result) -> str:
    if result.status == "converted":
        return (
            f"converted {_escape(result.key)} -> {_escape(result.output or '')} "
            f"({human_bytes(result.bytes_in)} -> {human_bytes(result.bytes_out)})"
        )
    return f"skipped {_escape(result.line())}"


def deletion_lines(summary: RunSummary, listed: bool) -> list[str]:
    """One line per output removed by --delete (or that a dry run would remove)."""
    outputs = summary.outputs
    if not listed or not outputs.deleted_paths:
        return []
    verb = "would delete" if outputs.would_delete else "deleted"
    lines = [f"{verb} {path}" for path in outputs.deleted_paths]
    more = outputs.deleted + outputs.would_delete - len(outputs.deleted_paths)
    if more > 0:
        lines.append(f"... and {more:,} more")
    return lines


def summary_table(summary: RunSummary) -> Table:
    seconds = summary.seconds
    saving = summary.saved_bytes / summary.bytes_in if summary.bytes_in else 0.0
    table = Table(
        title="optimizr" + (" (interrupted)" if summary.interrupted else ""), show_header=False
    )
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    walk = "" if summary.walk_complete else " (walk not finished)"
    table.add_row("files found", f"{summary.found:,}{walk}")
    if summary.interrupted:
        more = "" if summary.walk_complete else " + any not yet found"
        table.add_row("not done (interrupted)", f"{summary.remaining:,}{more}")
    if summary.would_convert:
        table.add_row(
            "would convert",
            f"{summary.would_convert:,} ({human_bytes(summary.would_convert_bytes)})",
        )
    table.add_row("converted", f"{summary.converted:,}")
    if summary.warned_by_kind:
        warned = ", ".join(f"{n:,} {kind}" for kind, n in sorted(summary.warned_by_kind.items()))
        table.add_row("  with warnings", warned)
    skipped = ", ".join(f"{n:,} {r}" for r, n in sorted(summary.skipped_by_reason.items()))
    table.add_row("skipped", f"{summary.skipped:,}" + (f" ({skipped})" if skipped else ""))
    failed = ", ".join(f"{n:,} {r}" for r, n in sorted(summary.failed_by_reason.items()))
    table.add_row("failed", f"{summary.failed:,}" + (f" ({failed})" if failed else ""))
    if summary.known_failed:
        table.add_row(
            "  of which known bad", f"{summary.known_failed:,} (not retried: --retry-failed)"
        )
    outputs = summary.outputs
    if outputs.stale_removed:
        table.add_row(
            "old outputs removed", f"{outputs.stale_removed:,} (no longer their source's output)"
        )
    if outputs.copied:
        table.add_row(
            "copied as is",
            f"{outputs.copied:,} ({human_bytes(outputs.copied_bytes)}, not converted)",
        )
    if outputs.kept:
        table.add_row(
            "left in place", f"{outputs.kept:,} (files optimizr did not write: --if-exists)"
        )
    if outputs.deleted:
        table.add_row("deleted", f"{outputs.deleted:,} (outputs whose source is gone: --delete)")
    if outputs.would_delete:
        table.add_row("would delete", f"{outputs.would_delete:,} (outputs whose source is gone)")
    if outputs.sources_gone:
        table.add_row(
            "sources gone", f"{outputs.sources_gone:,} outputs kept (--delete removes them)"
        )
    if outputs.overwritten:
        table.add_row(
            "overwritten", f"{outputs.overwritten:,} (files optimizr had not written: --if-exists)"
        )
    table.add_row("bytes before", human_bytes(summary.bytes_in))
    table.add_row("bytes after", human_bytes(summary.bytes_out))
    table.add_row("saving", f"{human_bytes(summary.saved_bytes)} ({saving:.1%})")
    table.add_row("time", f"{seconds:.1f} s")
    if seconds > 0:
        table.add_row(
            "throughput",
            f"{summary.converted / seconds:.1f} files/s, "
            f"{summary.bytes_in / 1e6 / seconds:.1f} MB/s, "
            f"{summary.pixels / 1e6 / seconds:.1f} MP/s",
        )
    return table
