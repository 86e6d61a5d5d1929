"""``optimizr report``: a run's summary.json drawn as one self-contained HTML page.

The page embeds plotly.js itself and fetches nothing (no CDN, no fonts): it opens
from a file, offline, years later. Every figure on it comes from the summary. A
section whose data the summary lacks (an older writer, a run too short for a
timeline, no failures) says so in words rather than drawing an empty chart.
Every string from the summary is escaped, for HTML and for plotly's own
HTML-like labels alike: paths can hold ``<``, ``&`` and quotes.

plotly is imported only while rendering, so ``optimizr convert`` never loads it.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

from optimizr.atomic import atomic_write
from optimizr.errors import UsageError
from optimizr.metrics.progress import human_bytes

SCHEMA_PREFIX = "optimizr-summary/"
#: Rows of the failures table; the rest are counted (DEST/.optimizr/failed.jsonl has them all).
MAX_TABLE_ROWS = 500
#: Rates need at least this many timeline intervals to be worth a chart.
MIN_INTERVALS = 3

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}
_COLOURS = {"before": "#8c96a8", "after": "#2f7ed8", "line": "#2f7ed8", "line2": "#e8743b"}

# Lets anyone (tests/test_report.py does) check the page after it loads: errors and
# failed loads go to data-page-errors, fetched resources to data-resources (a
# self-contained page has none), and each chart div records how many plotly SVG
# roots and traces it drew. Runs first, so errors while plotly.js loads count too.
_PROBE_JS = """
(function () {
  var root = document.documentElement, errors = [];
  function note(message) {
    errors.push(String(message));
    root.setAttribute("data-page-errors", JSON.stringify(errors));
  }
  root.setAttribute("data-page-errors", "[]");
  window.addEventListener("error", function (event) {
    var t = event.target, url = t && t !== window && (t.src || t.href);
    note(url ? "failed to load " + url : event.message);
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    note("unhandled rejection: " + event.reason);
  });
  var consoleError = console.error;
  console.error = function () {
    note(Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  window.optimizrRecord = function () {
    var charts = document.querySelectorAll(".chart"), drawn = 0;
    charts.forEach(function (chart) {
      var svgs = chart.querySelectorAll(".main-svg").length;
      var traces = chart.querySelectorAll("g.trace").length;
      chart.setAttribute("data-main-svg", svgs);
      chart.setAttribute("data-traces", traces);
      if (svgs > 0 && traces > 0) drawn += 1;
    });
    root.setAttribute("data-charts", charts.length);
    root.setAttribute("data-charts-drawn", drawn);
    var names = performance.getEntriesByType("resource").map(function (e) { return e.name; });
    root.setAttribute("data-resources", JSON.stringify(names));
  };
  window.addEventListener("load", window.optimizrRecord);
})();
"""

# Two fixed chart columns, not auto-fit: each chart is drawn while the page is still
# being parsed, so its column must have its final width already (plotly re-sizes on
# window resizes only).
_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d2433; margin: 0 auto;
       max-width: 1180px; padding: 24px; }
h1 { font-size: 1.5em; margin: 0 0 4px; } h2 { font-size: 1.2em; margin: 0 0 6px; }
section { margin: 28px 0; } .charts section { margin: 0; min-width: 0; }
.charts { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr));
          gap: 28px 32px; margin: 28px 0; }
@media (max-width: 1000px) { .charts { grid-template-columns: minmax(0, 1fr); } }
.meta, .caption { color: #5b6577; margin: 2px 0; }
.headline { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
            gap: 10px; margin: 16px 0; }
.headline div { background: #f3f5f9; border-radius: 8px; padding: 10px 12px; }
.headline dt { color: #5b6577; font-size: .85em; } .headline dd { margin: 0; font-size: 1.3em; }
.empty { background: #f7f7f2; border-left: 4px solid #c9c4a3; padding: 10px 14px; }
.banner { background: #fdecea; border-left: 4px solid #d9534f; padding: 10px 14px; }
table { border-collapse: collapse; width: 100%; font-size: .92em; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid #e3e6ec;
         vertical-align: top; } td.path { font-family: ui-monospace, monospace;
         word-break: break-all; } td.num, th.num { text-align: right; white-space: nowrap; }
.rule { color: #5b6577; font-family: ui-monospace, monospace; font-size: .85em; }
"""


def render_report(summary: Mapping[str, Any]) -> str:
    """The HTML page for one summary.json document (already parsed). Pure."""
    schema = summary.get("schema") if isinstance(summary, Mapping) else None
    if not isinstance(schema, str) or not schema.startswith(SCHEMA_PREFIX):
        raise UsageError(f"not an optimizr summary (no {SCHEMA_PREFIX}N schema)")
    charts = [
        _chart_section("sizes", "Size before and after", _sizes_chart(summary)),
        _chart_section("formats", "Saving by input format", _formats_chart(summary)),
        _chart_section("latency", "Time per image", _latency_chart(summary)),
        _chart_section("memory", "Memory over time", _memory_chart(summary)),
        _chart_section("throughput", "Throughput over time", _throughput_chart(summary)),
    ]
    tables = [
        _failures_section(summary),
        _paths_section(summary, "largest_savings", "Largest savings", "saved"),
        _paths_section(summary, "grew", "Outputs larger than their source", None),
    ]
    scripts = f"<script>{_PROBE_JS}</script>"
    if any('class="chart"' in s for s in charts):
        from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

        # "<\/" is "</" inside a JS string; it keeps the HTML parser inside the script.
        scripts += "\n<script>" + str(get_plotlyjs()).replace("</", "<\\/") + "</script>"
    title = f"optimizr report: {_text(summary.get('src'))} to {_text(summary.get('dest'))}"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head>\n<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>{_CSS}</style>",
            scripts,
            "</head>",
            "<body>",
            _header(summary),
            _analysis_section(summary),
            '<div class="charts">',
            *charts,
            "</div>",
            *tables,
            "</body>",
            "</html>",
            "",
        ]
    )


def write_report(summary_path: Path | str, out_path: Path | str) -> None:
    """Read ``summary_path`` (summary.json) and write the page to ``out_path`` atomically."""
    summary_path, out_path = Path(summary_path), Path(out_path)
    try:
        text = summary_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {summary_path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{summary_path} is not a summary: not UTF-8 text") from exc
    try:
        summary = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{summary_path} is not JSON: {exc}") from exc
    if not isinstance(summary, dict):
        raise UsageError(f"{summary_path} is not an optimizr summary (not a JSON object)")
    try:
        page = render_report(summary)
    except UsageError as exc:
        raise UsageError(f"{summary_path}: {exc}") from exc
    try:
        atomic_write(out_path, page.encode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot write {out_path}: {exc.strerror or exc}") from exc


# --- reading the summary tolerantly: a missing or mistyped section means "no data" ---


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _e(value: Any) -> str:
    return html.escape(_text(value), quote=True)


def _count(value: Any) -> str:
    n = _num(value)
    return "n/a" if n is None else f"{n:,.0f}"


def _bytes(value: Any) -> str:
    n = _num(value)
    return "n/a" if n is None else human_bytes(n)


def _seconds(value: Any) -> str:
    s = _num(value)
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 120:
        return f"{s:,.1f} s"
    minutes, sec = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def _figure_value(value: Any) -> str:
    n = _num(value)
    if n is None:
        return _text(value)
    return f"{n:,.0f}" if n.is_integer() else f"{n:,.4g}"


# --- header, findings and tables ---


def _header(summary: Mapping[str, Any]) -> str:
    files, size = _dict(summary.get("files")), _dict(summary.get("bytes"))
    rate, tool = _dict(summary.get("throughput")), _dict(summary.get("tool"))
    ratio = _num(size.get("saving_ratio"))
    cards = [
        ("files found", _count(files.get("found"))),
        ("converted", _count(files.get("converted"))),
        ("skipped", _count(files.get("skipped"))),
        ("failed", _count(files.get("failed"))),
        ("bytes before", _bytes(size.get("in"))),
        ("bytes after", _bytes(size.get("out"))),
        ("bytes saved", _bytes(size.get("saved"))),
        ("saving", "n/a" if ratio is None else f"{ratio:.1%}"),
        ("time", _seconds(summary.get("seconds"))),
    ]
    for key, unit in [
        ("files_per_second", "files/s"),
        ("images_per_second", "images/s"),
        ("mb_per_second", "MB/s"),
        ("megapixels_per_second", "megapixels/s"),
    ]:
        if (n := _num(rate.get(key))) is not None:
            cards.append((f"throughput, {unit}", f"{n:,.1f}"))
    version = " ".join(_text(tool.get(k)) for k in ("name", "version") if tool.get(k))
    meta = [
        f"{_e(summary.get('src'))} → {_e(summary.get('dest'))}",
        f"started {_e(summary.get('started_at'))}, finished {_e(summary.get('finished_at'))}",
        f"{_count(summary.get('workers'))} workers, exit code {_e(summary.get('exit_code'))}",
    ]
    if version:
        meta.append(_e(version))
    lines = [
        "<header>",
        "<h1>optimizr report</h1>",
        f'<p class="meta">{" · ".join(meta)}</p>',
    ]
    if summary.get("interrupted"):
        lines.append('<p class="banner">The run was interrupted: these figures are partial.</p>')
    lines.append('<dl class="headline">')
    lines += [f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in cards]
    lines.append("</dl>")
    for key, label in [("skipped_by_reason", "skipped"), ("failed_by_reason", "failed")]:
        reasons = _dict(files.get(key))
        if reasons:
            parts = ", ".join(f"{_count(n)} {_e(r)}" for r, n in reasons.items())
            lines.append(f'<p class="meta">{label}: {parts}</p>')
    if _num(files.get("known_failed")):
        lines.append(
            f'<p class="meta">of the failed, {_count(files.get("known_failed"))} were found bad '
            "by an earlier run and not tried again (--retry-failed)</p>"
        )
    phases = _dict(summary.get("phases_seconds"))
    if phases:
        parts = " · ".join(f"{_e(k)} {_seconds(v)}" for k, v in phases.items())
        lines.append(f'<p class="meta">time in each phase, summed over images: {parts}</p>')
    warnings = [w for w in _list(summary.get("warnings")) if w]
    if warnings:
        lines.append('<ul class="banner">')
        lines += [f"<li>{_e(w)}</li>" for w in warnings]
        lines.append("</ul>")
    lines.append("</header>")
    return "\n".join(lines)


def _analysis_section(summary: Mapping[str, Any]) -> str:
    if "analysis" not in summary:
        return ""  # written before the analysis existed: nothing to say about it
    items = []
    for finding in _list(summary.get("analysis")):
        finding = _dict(finding)
        figures = ", ".join(
            f"{_e(k)}: {_e(_figure_value(v))}" for k, v in _dict(finding.get("figures")).items()
        )
        items.append(
            f'<li>{_e(finding.get("finding"))} <span class="rule">{_e(finding.get("rule"))}'
            + (f" · {figures}" if figures else "")
            + "</span></li>"
        )
    body = f"<ul>{''.join(items)}</ul>" if items else '<p class="empty">No findings.</p>'
    return f'<section id="analysis">\n<h2>Findings</h2>\n{body}\n</section>'


def _table(headers: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """``headers`` are (label, css class); cells in ``rows`` are already escaped."""
    head = "".join(f'<th class="{cls}">{_e(label)}</th>' for label, cls in headers)
    cells = [
        "".join(
            f'<td class="{cls}">{cell}</td>' for (_, cls), cell in zip(headers, row, strict=True)
        )
        for row in rows
    ]
    body = "\n".join(f"<tr>{row}</tr>" for row in cells)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


def _failures_section(summary: Mapping[str, Any]) -> str:
    failed_count = _num(_dict(summary.get("files")).get("failed")) or 0
    rows = [
        [_e(r.get("path")), _e(r.get("reason")), _e(r.get("message"))]
        for r in map(_dict, _list(summary.get("not_converted")))
        if r.get("status") == "failed"
    ]
    note = ""
    if not rows:  # a writer that lists no files may still give examples per reason
        for group in map(_dict, _list(summary.get("failures_by_reason"))):
            rows += [
                [_e(ex.get("path")), _e(group.get("reason")), _e(ex.get("message"))]
                for ex in map(_dict, _list(group.get("examples")))
            ]
        if rows:
            note = '<p class="caption">Examples of each reason; the summary lists no more.</p>'
    if not rows:
        text = (
            "No file failed."
            if not failed_count
            else f"{failed_count:,.0f} files failed, but this summary does not list them."
        )
        return (
            f'<section id="failures">\n<h2>Failures</h2>\n<p class="empty">{text}</p>\n</section>'
        )
    if len(rows) > MAX_TABLE_ROWS:
        more = len(rows) - MAX_TABLE_ROWS
        note += (
            f'<p class="caption">The first {MAX_TABLE_ROWS:,} of {len(rows):,}; '
            f"{more:,} more in DEST/.optimizr/failed.jsonl.</p>"
        )
        rows = rows[:MAX_TABLE_ROWS]
    table = _table([("path", "path"), ("reason", "reason"), ("message", "message")], rows)
    return f'<section id="failures">\n<h2>Failures</h2>\n{note}{table}\n</section>'


def _paths_section(summary: Mapping[str, Any], key: str, title: str, saved: str | None) -> str:
    if key not in summary:
        return ""
    rows = []
    for item in map(_dict, _list(summary.get(key))):
        cells = [_e(item.get("path")), _bytes(item.get("bytes_in")), _bytes(item.get("bytes_out"))]
        rows.append(cells + ([_bytes(item.get(saved))] if saved else []))
    if not rows:
        return f'<section id="{key}">\n<h2>{title}</h2>\n<p class="empty">None.</p>\n</section>'
    headers = [("path", "path"), ("before", "num"), ("after", "num")]
    table = _table(headers + ([("saved", "num")] if saved else []), rows)
    return f'<section id="{key}">\n<h2>{title}</h2>\n{table}\n</section>'


# --- charts: each returns (figure, caption) or (None, why there is no chart) ---

Chart = tuple[Any, str]


def _chart_section(name: str, title: str, chart: Chart) -> str:
    figure, text = chart
    if figure is None:
        body = f'<p class="empty">{text}</p>'
    else:
        figure.update_layout(
            template="plotly_white",
            margin={"l": 60, "r": 30, "t": 30, "b": 60},
            legend={"orientation": "h", "y": 1.1},
            font={"family": "system-ui, sans-serif"},
        )
        div = figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"chart-{name}",
            config=_PLOT_CONFIG,
            default_height="340px",
            post_script="window.optimizrRecord();",
        )
        body = f'<p class="caption">{text}</p>\n<div class="chart" data-chart="{name}">{div}</div>'
    return f'<section id="{name}">\n<h2>{title}</h2>\n{body}\n</section>'


def _buckets(histogram: Any) -> dict[float, float]:
    """{upper bound: count} of a histogram's ``buckets``; an unbounded last one is inf."""
    out: dict[float, float] = {}
    for row in _list(_dict(histogram).get("buckets")):
        if isinstance(row, list) and len(row) == 2 and (count := _num(row[1])) is not None:
            bound = _num(row[0])
            out[math.inf if bound is None else bound] = count
    return out


def _log_grid(bounds: list[float]) -> list[float]:
    """``bounds`` with the buckets between them put back: the writer lists only the
    non-empty ones, and a bar chart that skipped the empty ones would bend the shape.

    Log-spaced bounds sit ``1/n`` decade apart for some whole ``n`` (20 today), read
    off the bounds themselves: the smallest ``n`` that puts every listed bound on one
    grid. The last bucket, a catch-all whose bound is the maximum seen, may lie off
    it; then the grid is read from the others and nothing is added next to it."""
    finite = sorted(b for b in bounds if math.isfinite(b))
    if len(finite) < 3 or finite[0] <= 0:
        return sorted(bounds)  # too few to tell a grid from a catch-all
    diffs = [math.log10(b / a) for a, b in pairwise(finite)]
    per_decade = _grid(diffs) or _grid(diffs[:-1])
    out = finite[:1]
    for (low, high), diff in zip(pairwise(finite), diffs, strict=True):
        k = round(diff * per_decade)
        if per_decade and abs(diff * per_decade - k) < 1e-3 and len(out) + k < 1000:
            out += [low * 10 ** (i / per_decade) for i in range(1, k)]
        out.append(high)
    return out + [b for b in bounds if not math.isfinite(b)]


def _grid(diffs: list[float]) -> int:
    """The fewest buckets a decade that the log10 steps ``diffs`` are whole multiples
    of (bounds are rounded to 6 digits: 1e-3 of a step is far above that error)."""
    for per_decade in range(1, 101):
        if all(abs(d * per_decade - round(d * per_decade)) < 1e-3 for d in diffs):
            return per_decade
    return 0


def _bucket_labels(bounds: list[float], unit: str) -> list[str]:
    for digits in (3, 6):
        labels = [("≤ " + _scaled(b, unit, digits)) if math.isfinite(b) else "more" for b in bounds]
        if len(set(labels)) == len(labels):
            break
    return labels


def _scaled(value: float, unit: str, digits: int) -> str:
    if unit == "s":
        return f"{value * 1000:.{digits}g} ms" if value < 1 else f"{value:.{digits}g} s"
    for prefix in ("", "K", "M", "G", "T"):
        if value < 1000 or prefix == "T":
            return f"{value:.{digits}g} {prefix}B"
        value /= 1000
    raise AssertionError("unreachable")


def _go() -> Any:
    import plotly.graph_objects as go  # type: ignore[import-untyped]

    return go


def _histogram_bars(histograms: dict[str, dict[float, float]], unit: str, noun: str) -> Any:
    go = _go()
    bounds = _log_grid(sorted({b for h in histograms.values() for b in h}))
    labels = _bucket_labels(bounds, unit)
    figure = go.Figure(
        [
            go.Bar(
                name=name,
                x=labels,
                y=[counts.get(b, 0) for b in bounds],
                marker_color=_COLOURS.get(name.split()[0], _COLOURS["after"]),
                hovertemplate=f"%{{y:,}} {noun} %{{x}}<extra>%{{fullData.name}}</extra>",
            )
            for name, counts in histograms.items()
        ]
    )
    figure.update_layout(barmode="group", bargap=0.15, yaxis_title=noun)
    figure.update_xaxes(type="category", title="bucket (upper bound, log-spaced)")
    return figure


def _sizes_chart(summary: Mapping[str, Any]) -> Chart:
    histograms = _dict(summary.get("histograms"))
    before, after = _buckets(histograms.get("bytes_in")), _buckets(histograms.get("bytes_out"))
    if not before and not after:
        return None, "This summary has no file-size histogram (bytes_in, bytes_out)."
    figure = _histogram_bars({"before": before, "after (WebP)": after}, "B", "files")
    caption = "How many files fall in each size bucket, before and after conversion."
    return figure, caption


def _formats_chart(summary: Mapping[str, Any]) -> Chart:
    go = _go()
    by_format = _dict(_dict(summary.get("files")).get("by_format"))
    rows = []
    for fmt, figures in by_format.items():
        figures = _dict(figures)
        bytes_in, bytes_out = _num(figures.get("bytes_in")), _num(figures.get("bytes_out"))
        if bytes_in and bytes_out is not None:
            rows.append((_e(fmt), bytes_in, bytes_out, figures))
    if not rows:
        return None, "This summary has no bytes converted by input format (files.by_format)."
    rows.sort(key=lambda row: -row[1])
    names = [row[0] for row in rows]
    counts = [
        [_count(f.get("converted")), _count(f.get("skipped")), _count(f.get("failed"))]
        for *_, f in rows
    ]
    saving = [f"−{(i - o) / i:.0%}" if i > o else f"+{(o - i) / i:.0%}" for _, i, o, _ in rows]
    hover = "%{x}: %{y:.2f} MB<br>converted %{customdata[0]}, skipped %{customdata[1]}, "
    hover += "failed %{customdata[2]}<extra>%{fullData.name}</extra>"
    figure = go.Figure(
        [
            go.Bar(
                name="before",
                x=names,
                y=[r[1] / 1e6 for r in rows],
                customdata=counts,
                marker_color=_COLOURS["before"],
                hovertemplate=hover,
            ),
            go.Bar(
                name="after (WebP)",
                x=names,
                y=[r[2] / 1e6 for r in rows],
                customdata=counts,
                marker_color=_COLOURS["after"],
                hovertemplate=hover,
                text=saving,
                textposition="outside",
                cliponaxis=False,
            ),
        ]
    )
    figure.update_layout(barmode="group", yaxis_title="MB")
    figure.update_xaxes(type="category", title="input format")
    caption = "Bytes converted, before and after, by input format; labels give the change."
    return figure, caption


def _latency_chart(summary: Mapping[str, Any]) -> Chart:
    latency = _buckets(_dict(summary.get("histograms")).get("latency_seconds"))
    if not latency:
        return None, "This summary has no per-image latency histogram."
    figure = _histogram_bars({"images": latency}, "s", "images")
    figure.update_layout(showlegend=False)
    figure.update_traces(marker_color=_COLOURS["after"])
    stats = _dict(summary.get("latency_seconds"))
    parts = [f"{k} {_seconds(stats.get(k))}" for k in ("mean", "p50", "p95", "p99", "max")]
    caption = "How long each image took (its latency), in log-spaced buckets."
    if stats:
        caption += f" {_count(stats.get('count'))} images: " + ", ".join(parts) + "."
    return figure, caption


def _points(value: Any, width: int) -> list[list[float]]:
    """Rows of a timeline with ``width`` numbers each, in time order; others dropped."""
    rows = []
    for row in _list(value):
        if isinstance(row, list) and len(row) >= width:
            numbers = [_num(v) for v in row[:width]]
            if all(n is not None for n in numbers):
                rows.append([n for n in numbers if n is not None])
    # By time only, stably: two samples may share a (rounded) time.
    return sorted(rows, key=lambda row: row[0])


def _memory_chart(summary: Mapping[str, Any]) -> Chart:
    go = _go()
    memory = _dict(summary.get("memory"))
    points = _points(memory.get("timeline"), 2)
    if len(points) < 2:
        return None, (
            f"This summary has {len(points)} memory sample(s): too few for a timeline"
            " (the run was too short, or the summary predates memory sampling)."
        )
    rss = [p[1] / 1e6 for p in points]
    figure = go.Figure(
        go.Scatter(
            x=[p[0] for p in points],
            y=rss,
            mode="lines",
            name="resident memory",
            line={"color": _COLOURS["line"]},
            fill="tozeroy",
            hovertemplate="%{x:.1f} s: %{y:,.1f} MB<extra></extra>",
        )
    )
    figure.update_layout(xaxis_title="seconds since start", yaxis_title="MB", showlegend=False)
    budget = _num(memory.get("budget_bytes"))
    # Drawn only when it is within reach of the curve: a 12 GB budget above a 150 MB
    # run would flatten the curve into the axis. The caption gives it either way.
    if budget and budget / 1e6 <= 3 * max(rss):
        figure.add_hline(
            y=budget / 1e6,
            line_dash="dash",
            line_color=_COLOURS["line2"],
            annotation_text="budget",
            annotation_position="top left",
        )
    caption = "Resident memory of optimizr and its workers together."
    caption += f" Peak {_bytes(memory.get('peak_rss_bytes'))}; budget {_bytes(budget)}."
    return figure, caption


def _throughput_chart(summary: Mapping[str, Any]) -> Chart:
    go = _go()
    points = _points(summary.get("timeline"), 3)
    if points and points[0][0] > 0:
        # The timeline is cumulative from the start, where nothing was done yet.
        points.insert(0, [0.0] + [0.0] * (len(points[0]) - 1))
    intervals = [(a, b) for a, b in pairwise(points) if b[0] > a[0]]
    if len(intervals) < MIN_INTERVALS:
        return None, (
            f"This summary's progress timeline has {len(intervals)} interval(s): too few for"
            " a chart (it samples about once a second, so the run was too short, or the"
            " summary predates the timeline)."
        )
    starts = [a[0] for a, _ in intervals] + [intervals[-1][1][0]]
    images = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in intervals]
    mbs = [(b[2] - a[2]) / 1e6 / (b[0] - a[0]) for a, b in intervals]
    figure = go.Figure(
        [
            go.Scatter(
                x=starts,
                y=mbs + mbs[-1:],
                name="MB/s (input)",
                line_shape="hv",
                line={"color": _COLOURS["line"]},
                hovertemplate="from %{x:.1f} s: %{y:,.2f} MB/s<extra></extra>",
            ),
            go.Scatter(
                x=starts,
                y=images + images[-1:],
                name="files/s",
                line_shape="hv",
                yaxis="y2",
                line={"color": _COLOURS["line2"]},
                hovertemplate="from %{x:.1f} s: %{y:,.2f} files/s<extra></extra>",
            ),
        ]
    )
    figure.update_layout(
        xaxis_title="seconds since start",
        yaxis={"title": {"text": "MB/s"}, "rangemode": "tozero"},
        yaxis2={
            "title": {"text": "files/s"},
            "overlaying": "y",
            "side": "right",
            "rangemode": "tozero",
            "showgrid": False,
        },
    )
    caption = (
        "Rates over each interval of the progress timeline: MB/s of source bytes converted,"
        " and files done (converted, skipped or failed) a second."
    )
    return figure, caption
