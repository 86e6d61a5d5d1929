"""``optimizr report DEST --history``: every run DEST keeps, drawn as one page.

The runs come from ``DEST/.optimizr/runs/`` (see :mod:`optimizr.history`): a
table with one row per run, newest first, the totals over them, and two charts
over time: the files each run converted, skipped and failed, and the bytes saved
summed run after run. Like the one-run report it embeds plotly.js and fetches
nothing, and reads every document tolerantly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optimizr.history import did_work, load_history
from optimizr.report import chart_section, html_page, html_table, write_page
from optimizr.report_charts import (
    Chart,
    as_dict,
    as_number,
    as_text,
    esc,
    fmt_bytes,
    fmt_count,
    fmt_seconds,
    plotly_objects,
)

Run = Mapping[str, Any]


def write_history_report(dest: Path, out_path: Path) -> int:
    """Draw DEST's kept runs into ``out_path`` (atomically); return how many.
    Raises UsageError when DEST keeps no summary at all."""
    runs = [doc for _, doc in load_history(dest)]
    write_page(out_path, render_history(str(dest), runs))
    return len(runs)


def render_history(dest: str, runs: Sequence[Run]) -> str:
    """The page for ``runs`` (summary documents, oldest first). Pure."""
    charts = [
        chart_section("runs", "Files each run", _files_chart(runs)),
        chart_section("saved", "Bytes saved over time", _saved_chart(runs)),
    ]
    return html_page(
        f"optimizr history: {dest}", [_header(dest, runs)], charts, [_runs_table(runs)]
    )


def _files(run: Run) -> dict[str, Any]:
    return as_dict(run.get("files"))


def _number(run: Run, section: str, key: str) -> float:
    return as_number(as_dict(run.get(section)).get(key)) or 0.0


def _new_failures(run: Run) -> float:
    return max(0.0, _number(run, "files", "failed") - _number(run, "files", "known_failed"))


def _header(dest: str, runs: Sequence[Run]) -> str:
    worked = sum(1 for run in runs if did_work(run))
    first, last = as_text(runs[0].get("started_at")), as_text(runs[-1].get("started_at"))
    cards = [
        ("runs kept", fmt_count(len(runs))),
        ("runs that did work", fmt_count(worked)),
        ("converted", fmt_count(sum(_number(r, "files", "converted") for r in runs))),
        ("failed (new)", fmt_count(sum(_new_failures(r) for r in runs))),
        ("bytes before", fmt_bytes(sum(_number(r, "bytes", "in") for r in runs))),
        ("bytes after", fmt_bytes(sum(_number(r, "bytes", "out") for r in runs))),
        ("bytes saved", fmt_bytes(sum(_number(r, "bytes", "saved") for r in runs))),
        ("time", fmt_seconds(sum(as_number(r.get("seconds")) or 0.0 for r in runs))),
    ]
    lines = [
        "<header>",
        "<h1>optimizr history</h1>",
        f'<p class="meta">{esc(dest)} · runs from {esc(first)} to {esc(last)} · totals over '
        "the runs kept (a file converted again by a later run counts again)</p>",
        '<dl class="headline">',
        *(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in cards),
        "</dl>",
        "</header>",
    ]
    return "\n".join(lines)


def _runs_table(runs: Sequence[Run]) -> str:
    rows = []
    for run in reversed(runs):
        files = _files(run)
        code = as_text(run.get("exit_code")) + (" (interrupted)" if run.get("interrupted") else "")
        rows.append(
            [
                esc(run.get("started_at")),
                esc(fmt_seconds(run.get("seconds"))),
                esc(fmt_count(files.get("found"))),
                esc(fmt_count(files.get("converted"))),
                esc(fmt_count(files.get("skipped"))),
                esc(fmt_count(files.get("failed"))),
                esc(fmt_count(files.get("known_failed"))),
                esc(fmt_bytes(as_dict(run.get("bytes")).get("saved"))),
                esc(code),
                "yes" if did_work(run) else "no",
            ]
        )
    headers = [
        ("started (UTC)", "path"), ("time", "num"), ("found", "num"), ("converted", "num"),
        ("skipped", "num"), ("failed", "num"), ("of them known", "num"), ("saved", "num"),
        ("exit code", "num"), ("did work", "reason"),
    ]  # fmt: skip
    table = html_table(headers, rows)
    caption = (
        '<p class="caption">Newest first. A run did work when it converted something or '
        "failed something not already known bad.</p>"
    )
    return f'<section id="history">\n<h2>Runs</h2>\n{caption}\n{table}\n</section>'


def _times(runs: Sequence[Run]) -> list[str]:
    """One distinct, escaped label per run (plotly merges equal categories, and two
    runs may start within the same second)."""
    labels: list[str] = []
    for run in runs:
        run_id = as_dict(run.get("manifest")).get("run_id")
        label = f"#{run_id} " if run_id is not None else ""
        label = esc(label + as_text(run.get("started_at")))
        same = sum(1 for seen in labels if seen == label or seen.startswith(label + " ("))
        labels.append(f"{label} ({same + 1})" if same else label)
    return labels


def _files_chart(runs: Sequence[Run]) -> Chart:
    go = plotly_objects()
    series = [
        ("converted", "#2f7ed8", [_number(r, "files", "converted") for r in runs]),
        ("skipped", "#8c96a8", [_number(r, "files", "skipped") for r in runs]),
        ("failed", "#d9534f", [_number(r, "files", "failed") for r in runs]),
    ]
    figure = go.Figure(
        [
            go.Bar(
                name=name,
                x=_times(runs),
                y=values,
                marker_color=colour,
                hovertemplate=f"%{{y:,}} {name}<extra>%{{x}}</extra>",
            )
            for name, colour, values in series
        ]  # fmt: skip
    )
    figure.update_layout(barmode="stack", yaxis_title="files")
    figure.update_xaxes(type="category", title="run started (UTC)")
    return figure, "What each kept run did with the files it found, oldest first."


def _saved_chart(runs: Sequence[Run]) -> Chart:
    go = plotly_objects()
    total, points = 0.0, []
    for run in runs:
        total += _number(run, "bytes", "saved")
        points.append(total / 1e6)
    figure = go.Figure(
        [
            go.Scatter(
                x=_times(runs),
                y=points,
                mode="lines+markers",
                name="saved",
                line={"color": "#2f7ed8"},
                hovertemplate="%{y:,.1f} MB saved by then<extra>%{x}</extra>",
            )
        ]  # fmt: skip
    )
    figure.update_layout(yaxis_title="MB saved, summed over the runs so far")
    figure.update_xaxes(type="category", title="run started (UTC)")
    return figure, "Bytes saved by the kept runs, added up run after run."
