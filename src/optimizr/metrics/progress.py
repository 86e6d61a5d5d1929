"""What a person watching the terminal sees: a live bar on a TTY, periodic
plain lines otherwise, one line per failed file, and the final table.

This is the edge of the program: only the CLI uses it, the core never does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from optimizr.results import Result, RunSummary

if TYPE_CHECKING:
    from optimizr.events import RunSnapshot


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n} B"


class _StatsColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        f = task.fields
        elapsed = task.elapsed or 0.0
        rate = f["bytes_in"] / 1e6 / elapsed if elapsed > 0 else 0.0
        text = f"{human_bytes(f['bytes_in'])} -> {human_bytes(f['bytes_out'])}  {rate:.1f} MB/s"
        style = "red" if f["failed"] else ""
        text += f"  {f['failed']} failed" if f["failed"] else ""
        text += f"  {f['memory']}" if f.get("memory") else ""
        return Text(text, style=style)


class TerminalProgress:
    """Implements the pipeline's ``ProgressListener``."""

    def __init__(
        self,
        *,
        live: bool | None = None,
        verbose: bool = False,
        interval: float = 5.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal if live is None else live
        self.verbose = verbose
        #: Without a live bar: seconds between plain progress lines.
        self.interval = interval
        self.found_total = 0
        self.walk_complete = False
        self.done = 0
        self.failed = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._t0 = time.monotonic()
        self._last_line = time.monotonic()
        self._snapshot: Callable[[], RunSnapshot] | None = None
        self._progress: Progress | None = None
        self._task: int | None = None

    # context management starts/stops the live display
    def __enter__(self) -> TerminalProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.fields[found]}"),
                _StatsColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "converting", total=None, found="0+", bytes_in=0, bytes_out=0, failed=0, memory=""
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    # -- ProgressListener ------------------------------------------------------------

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        self._snapshot = snapshot

    def found(self, count: int) -> None:
        self.found_total += count
        self._refresh()

    def walk_done(self, total: int) -> None:
        self.walk_complete = True
        self.found_total = total
        self._refresh()

    def finished(self, result: Result) -> None:
        self.done += 1
        if result.status == "converted":
            self.bytes_in += result.bytes_in
            self.bytes_out += result.bytes_out
        elif result.status == "failed":
            self.failed += 1
            self._print(f"[red]FAILED[/red] {_escape(result.line())}")
        if self.verbose and result.status != "failed":
            self._print(_verbose_line(result))
        self._refresh()

    def stopping(self, hard: bool) -> None:
        if hard:
            self._print("[yellow]aborting: in-flight images are abandoned[/yellow]")
        else:
            self._print(
                "[yellow]stopping: finishing the images in flight "
                "(press Ctrl-C again to abort)[/yellow]"
            )
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description="stopping")  # type: ignore[arg-type]

    # -- output ------------------------------------------------------------------

    def _print(self, markup: str) -> None:
        if self._progress is not None:
            self._progress.console.print(markup)
        else:
            self.console.print(markup)

    def _refresh(self) -> None:
        if self._progress is not None and self._task is not None:
            found = f"{self.found_total:,}" + ("" if self.walk_complete else "+")
            self._progress.update(
                self._task,  # type: ignore[arg-type]
                completed=self.done,
                total=self.found_total if self.walk_complete else None,
                found=found,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                failed=self.failed,
                memory=self._memory(),
            )
            return
        now = time.monotonic()
        if not self.done or now - self._last_line < self.interval:
            return
        self._last_line = now
        of = f"{self.found_total:,}" + ("" if self.walk_complete else "+")
        elapsed = now - self._t0
        rate = self.bytes_in / 1e6 / elapsed if elapsed else 0.0
        parts = [
            f"{self.done:,} of {of} files" + ("" if self.walk_complete else " (still walking)"),
            f"{human_bytes(self.bytes_in)} -> {human_bytes(self.bytes_out)}",
            f"{rate:.1f} MB/s",
            f"ETA {self._eta(elapsed)}",
            f"{self.failed} failed",
        ]
        memory = self._memory()
        if memory:
            parts.append(memory)
        self.console.print(", ".join(parts))

    def _eta(self, elapsed: float) -> str:
        if not self.walk_complete or not self.done or elapsed <= 0:
            return "?"
        left = (self.found_total - self.done) / (self.done / elapsed)
        minutes, seconds = divmod(int(left + 0.5), 60)
        return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"

    def _memory(self) -> str:
        if self._snapshot is None:
            return ""
        snap = self._snapshot()
        if not snap.budget_total:
            return ""
        return (
            f"memory budget {snap.budget_in_use / 2**20:,.0f} of "
            f"{snap.budget_total / 2**20:,.0f} MiB in use"
        )


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


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
    table.add_row("files found", f"{summary.found:,}")
    table.add_row("converted", f"{summary.converted:,}")
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
