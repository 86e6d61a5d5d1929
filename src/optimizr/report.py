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

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optimizr.atomic import atomic_write
from optimizr.errors import UsageError
from optimizr.report_charts import (
    Chart,
    as_dict,
    as_list,
    as_number,
    as_text,
    esc,
    fmt_bytes,
    fmt_count,
    fmt_figure,
    fmt_seconds,
    formats_chart,
    latency_chart,
    memory_chart,
    sizes_chart,
    throughput_chart,
)

SCHEMA_PREFIX = "optimizr-summary/"
#: Rows of the failures table; the rest are counted (DEST/.optimizr/failed.jsonl has them all).
MAX_TABLE_ROWS = 500

_PLOT_CONFIG = {"displaylogo": False, "responsive": True}

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
        chart_section("sizes", "Size before and after", sizes_chart(summary)),
        chart_section("formats", "Saving by input format", formats_chart(summary)),
        chart_section("latency", "Time per image", latency_chart(summary)),
        chart_section("memory", "Memory over time", memory_chart(summary)),
        chart_section("throughput", "Throughput over time", throughput_chart(summary)),
    ]
    tables = [
        *_search_section(summary),
        *_size_target_section(summary),
        _failures_section(summary),
        _paths_section(summary, "largest_savings", "Largest savings", "saved"),
        *_larger_sections(summary),
    ]
    title = f"optimizr report: {as_text(summary.get('src'))} to {as_text(summary.get('dest'))}"
    return html_page(title, [_header(summary), _analysis_section(summary)], charts, tables)


def html_page(title: str, top: list[str], charts: list[str], bottom: list[str]) -> str:
    """The page around already rendered sections: ``charts`` in the two-column grid
    between ``top`` and ``bottom``; plotly.js embedded only when a chart needs it."""
    scripts = f"<script>{_PROBE_JS}</script>"
    if any('class="chart"' in s for s in charts):
        from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

        # "<\/" is "</" inside a JS string; it keeps the HTML parser inside the script.
        scripts += "\n<script>" + str(get_plotlyjs()).replace("</", "<\\/") + "</script>"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            '<head>\n<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{esc(title)}</title>",
            f"<style>{_CSS}</style>",
            scripts,
            "</head>",
            "<body>",
            *top,
            '<div class="charts">',
            *charts,
            "</div>",
            *bottom,
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
    write_page(out_path, page)


def write_page(out_path: Path, page: str) -> None:
    try:
        atomic_write(out_path, page.encode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot write {out_path}: {exc.strerror or exc}") from exc


# --- header, findings and tables ---


def _header(summary: Mapping[str, Any]) -> str:
    files, size = as_dict(summary.get("files")), as_dict(summary.get("bytes"))
    rate, tool = as_dict(summary.get("throughput")), as_dict(summary.get("tool"))
    ratio = as_number(size.get("saving_ratio"))
    cards = [
        ("files found", fmt_count(files.get("found"))),
        ("converted", fmt_count(files.get("converted"))),
        ("skipped", fmt_count(files.get("skipped"))),
        ("failed", fmt_count(files.get("failed"))),
        ("bytes before", fmt_bytes(size.get("in"))),
        ("bytes after", fmt_bytes(size.get("out"))),
        ("bytes saved", fmt_bytes(size.get("saved"))),
        ("saving", "n/a" if ratio is None else f"{ratio:.1%}"),
        ("time", fmt_seconds(summary.get("seconds"))),
    ]
    for key, unit in [
        ("files_per_second", "files/s"),
        ("images_per_second", "images/s"),
        ("mb_per_second", "MB/s"),
        ("megapixels_per_second", "megapixels/s"),
    ]:
        if (n := as_number(rate.get(key))) is not None:
            cards.append((f"throughput, {unit}", f"{n:,.1f}"))
    version = " ".join(as_text(tool.get(k)) for k in ("name", "version") if tool.get(k))
    meta = [
        f"{esc(summary.get('src'))} → {esc(summary.get('dest'))}",
        f"started {esc(summary.get('started_at'))}, finished {esc(summary.get('finished_at'))}",
        f"{fmt_count(summary.get('workers'))} workers, exit code {esc(summary.get('exit_code'))}",
    ]
    if version:
        meta.append(esc(version))
    if tool.get("encoder"):
        # Two runs' speeds compare only with the same encoder behind them.
        meta.append(f"encoder {esc(tool.get('encoder'))}, libwebp {esc(tool.get('libwebp'))}")
    lines = [
        "<header>",
        "<h1>optimizr report</h1>",
        f'<p class="meta">{" · ".join(meta)}</p>',
    ]
    if summary.get("interrupted"):
        lines.append('<p class="banner">The run was interrupted: these figures are partial.</p>')
    lines.append('<dl class="headline">')
    lines += [f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in cards]
    lines.append("</dl>")
    for key, label in [("skipped_by_reason", "skipped"), ("failed_by_reason", "failed")]:
        reasons = as_dict(files.get(key))
        if reasons:
            parts = ", ".join(f"{fmt_count(n)} {esc(r)}" for r, n in reasons.items())
            lines.append(f'<p class="meta">{label}: {parts}</p>')
    if as_number(files.get("known_failed")):
        lines.append(
            f'<p class="meta">of the failed, {fmt_count(files.get("known_failed"))} were found bad '
            "by an earlier run and not tried again (--retry-failed)</p>"
        )
    phases = as_dict(summary.get("phases_seconds"))
    if phases:
        parts = " · ".join(f"{esc(k)} {fmt_seconds(v)}" for k, v in phases.items())
        lines.append(f'<p class="meta">time in each phase, summed over images: {parts}</p>')
    warnings = [w for w in as_list(summary.get("warnings")) if w]
    if warnings:
        lines.append('<ul class="banner">')
        lines += [f"<li>{esc(w)}</li>" for w in warnings]
        lines.append("</ul>")
    lines.append("</header>")
    return "\n".join(lines)


def _analysis_section(summary: Mapping[str, Any]) -> str:
    if "analysis" not in summary:
        return ""  # written before the analysis existed: nothing to say about it
    items = []
    for finding in as_list(summary.get("analysis")):
        finding = as_dict(finding)
        figures = ", ".join(
            f"{esc(k)}: {esc(fmt_figure(v))}" for k, v in as_dict(finding.get("figures")).items()
        )
        items.append(
            f'<li>{esc(finding.get("finding"))} <span class="rule">{esc(finding.get("rule"))}'
            + (f" · {figures}" if figures else "")
            + "</span></li>"
        )
    body = f"<ul>{''.join(items)}</ul>" if items else '<p class="empty">No findings.</p>'
    return f'<section id="analysis">\n<h2>Findings</h2>\n{body}\n</section>'


def html_table(headers: list[tuple[str, str]], rows: list[list[str]]) -> str:
    """``headers`` are (label, css class); cells in ``rows`` are already escaped."""
    head = "".join(f'<th class="{cls}">{esc(label)}</th>' for label, cls in headers)
    cells = [
        "".join(
            f'<td class="{cls}">{cell}</td>' for (_, cls), cell in zip(headers, row, strict=True)
        )
        for row in rows
    ]
    body = "\n".join(f"<tr>{row}</tr>" for row in cells)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"


_RANKS = ("min", "p10", "p50", "p90", "max")


def _search_section(summary: Mapping[str, Any]) -> list[str]:
    """--target-score (issue 14): the distributions of what the searches chose."""
    search = as_dict(summary.get("quality_search"))
    images = as_number(search.get("images")) or 0
    if not images:
        return []
    headers = [("", ""), *((name, "num") for name in _RANKS)]
    rows = []
    for key, label in (
        ("chosen_quality", "lossy quality"),
        ("score", "score"),
        ("probes", "encodes"),
    ):
        ranks = as_dict(as_dict(search.get(key)).get("percentiles"))
        rows.append([esc(label), *(esc(ranks.get(name, "-")) for name in _RANKS)])
    counts = ", ".join(
        f"{as_number(search.get(key)) or 0} {label}"
        for key, label in (
            ("lossless", "lossless"),
            ("near_lossless", "near-lossless"),
            ("unreachable", "below the target (at --max-quality)"),
        )
    )
    note = f"<p>{images} images searched: {esc(counts)}.</p>\n"
    table = html_table(headers, rows)
    return [f'<section id="quality_search">\n<h2>Quality search</h2>\n{note}{table}\n</section>']


def _size_target_section(summary: Mapping[str, Any]) -> list[str]:
    """--target-size (issue 14): how many met it, how many could not, what it cost."""
    sized = as_dict(as_dict(summary.get("files")).get("target_size"))
    met = int(as_number(sized.get("met")) or 0)
    unreachable = int(as_number(sized.get("unreachable")) or 0)
    if not met and not unreachable:
        return []
    encodes = as_number(sized.get("encodes")) or 0
    rows = [
        [esc("met"), esc(met)],
        [esc("unreachable (smallest file kept, over the target)"), esc(unreachable)],
        [esc("encodes per image"), esc(f"{encodes / (met + unreachable):.2f}")],
    ]
    table = html_table([("", ""), ("images", "num")], rows)
    return [f'<section id="target_size">\n<h2>Size target</h2>\n{table}\n</section>']


def _failures_section(summary: Mapping[str, Any]) -> str:
    failed_count = as_number(as_dict(summary.get("files")).get("failed")) or 0
    rows = [
        [esc(r.get("path")), esc(r.get("reason")), esc(r.get("message"))]
        for r in map(as_dict, as_list(summary.get("not_converted")))
        if r.get("status") == "failed"
    ]
    note = ""
    if not rows:  # a writer that lists no files may still give examples per reason
        for group in map(as_dict, as_list(summary.get("failures_by_reason"))):
            rows += [
                [esc(ex.get("path")), esc(group.get("reason")), esc(ex.get("message"))]
                for ex in map(as_dict, as_list(group.get("examples")))
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
    table = html_table([("path", "path"), ("reason", "reason"), ("message", "message")], rows)
    return f'<section id="failures">\n<h2>Failures</h2>\n{note}{table}\n</section>'


def _paths_section(
    summary: Mapping[str, Any],
    key: str,
    title: str,
    saved: str | None,
    items: list[Any] | None = None,
    after: str = "after",
    caption: str = "",
) -> str:
    if key not in summary and items is None:
        return ""
    rows = []
    for item in map(as_dict, as_list(summary.get(key)) if items is None else items):
        cells = [
            esc(item.get("path")),
            fmt_bytes(item.get("bytes_in")),
            fmt_bytes(item.get("bytes_out")),
        ]
        rows.append(cells + ([fmt_bytes(item.get(saved))] if saved else []))
    if not rows:
        return f'<section id="{key}">\n<h2>{title}</h2>\n<p class="empty">None.</p>\n</section>'
    headers = [("path", "path"), ("before", "num"), (after, "num")]
    table = html_table(headers + ([("saved", "num")] if saved else []), rows)
    note = f'<p class="caption">{caption}</p>\n' if caption else ""
    return f'<section id="{key}">\n<h2>{title}</h2>\n{note}{table}\n</section>'


def _larger_sections(summary: Mapping[str, Any]) -> list[str]:
    """Outputs written larger than their source, and files kept as they were because
    their WebP would have been larger: two different things, in two tables."""
    grew, skipped = summary.get("grew"), summary.get("skipped_larger")
    if grew is None and skipped is None:
        return []
    if skipped is None:
        # Written before the two were told apart, ``grew`` held both; the run's
        # --if-larger says which: under skip no output larger than its source is written.
        writes = as_dict(summary.get("options")).get("if_larger") == "write"
        grew, skipped = (grew, []) if writes else ([], grew)
    return [
        _paths_section(summary, "grew", "Outputs larger than their source", None,
                       as_list(grew), caption="Written anyway (--if-larger write)."),
        _paths_section(summary, "skipped_larger", "Not converted: the WebP would be larger",
                       None, as_list(skipped), after="WebP would be",
                       caption="No output written; the source stays the smaller file "
                       "(--if-larger skip)."),
    ]  # fmt: skip


def chart_section(name: str, title: str, chart: Chart) -> str:
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
