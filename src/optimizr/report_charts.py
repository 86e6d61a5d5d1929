"""The charts of ``optimizr report``: plotly figures drawn from a summary.json.

Each chart function returns ``(figure, caption)``, or ``(None, why there is no
chart)`` when the summary lacks the data. The summary is read tolerantly: a
missing or mistyped section means "no data", never an exception. The tolerant
readers (``as_dict``, ``as_number``...) and formatters (``fmt_bytes``...) serve the
page in ``report.py`` too.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

from optimizr.filenames import printable
from optimizr.metrics.progress import human_bytes

_COLOURS = {"before": "#8c96a8", "after": "#2f7ed8", "line": "#2f7ed8", "line2": "#e8743b"}
#: Rates need at least this many timeline intervals to be worth a chart.
MIN_INTERVALS = 3

# --- reading the summary tolerantly: a missing or mistyped section means "no data" ---


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def as_text(value: Any) -> str:
    return "" if value is None else str(value)


def esc(value: Any) -> str:
    """For HTML, and with the control characters a file name may hold made visible
    (a page shows "\\x1b" where a terminal would have obeyed it)."""
    return html.escape(printable(as_text(value)), quote=True)


def fmt_count(value: Any) -> str:
    n = as_number(value)
    return "n/a" if n is None else f"{n:,.0f}"


def fmt_bytes(value: Any) -> str:
    n = as_number(value)
    return "n/a" if n is None else human_bytes(n)


def fmt_seconds(value: Any) -> str:
    s = as_number(value)
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s * 1000:.3g} ms"
    if s < 120:
        return f"{s:,.1f} s"
    minutes, sec = divmod(round(s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"


def fmt_figure(value: Any) -> str:
    n = as_number(value)
    if n is None:
        return as_text(value)
    return f"{n:,.0f}" if n.is_integer() else f"{n:,.4g}"


# --- charts: each returns (figure, caption) or (None, why there is no chart) ---

Chart = tuple[Any, str]


def _buckets(histogram: Any) -> dict[float, float]:
    """{upper bound: count} of a histogram's ``buckets``; an unbounded last one is inf."""
    out: dict[float, float] = {}
    for row in as_list(as_dict(histogram).get("buckets")):
        if isinstance(row, list) and len(row) == 2 and (count := as_number(row[1])) is not None:
            bound = as_number(row[0])
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


def plotly_objects() -> Any:
    import plotly.graph_objects as go  # type: ignore[import-untyped]

    return go


def _histogram_bars(histograms: dict[str, dict[float, float]], unit: str, noun: str) -> Any:
    go = plotly_objects()
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


def sizes_chart(summary: Mapping[str, Any]) -> Chart:
    histograms = as_dict(summary.get("histograms"))
    before, after = _buckets(histograms.get("bytes_in")), _buckets(histograms.get("bytes_out"))
    if not before and not after:
        return None, "This summary has no file-size histogram (bytes_in, bytes_out)."
    figure = _histogram_bars({"before": before, "after (WebP)": after}, "B", "files")
    caption = "How many files fall in each size bucket, before and after conversion."
    return figure, caption


def formats_chart(summary: Mapping[str, Any]) -> Chart:
    go = plotly_objects()
    by_format = as_dict(as_dict(summary.get("files")).get("by_format"))
    rows = []
    for fmt, figures in by_format.items():
        figures = as_dict(figures)
        bytes_in, bytes_out = (
            as_number(figures.get("bytes_in")),
            as_number(figures.get("bytes_out")),
        )
        if bytes_in and bytes_out is not None:
            rows.append((esc(fmt), bytes_in, bytes_out, figures))
    if not rows:
        return None, "This summary has no bytes converted by input format (files.by_format)."
    rows.sort(key=lambda row: -row[1])
    names = [row[0] for row in rows]
    counts = [
        [fmt_count(f.get("converted")), fmt_count(f.get("skipped")), fmt_count(f.get("failed"))]
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


def latency_chart(summary: Mapping[str, Any]) -> Chart:
    latency = _buckets(as_dict(summary.get("histograms")).get("latency_seconds"))
    if not latency:
        return None, "This summary has no per-image latency histogram."
    figure = _histogram_bars({"images": latency}, "s", "images")
    figure.update_layout(showlegend=False)
    figure.update_traces(marker_color=_COLOURS["after"])
    stats = as_dict(summary.get("latency_seconds"))
    parts = [f"{k} {fmt_seconds(stats.get(k))}" for k in ("mean", "p50", "p95", "p99", "max")]
    caption = "How long each image took (its latency), in log-spaced buckets."
    if stats:
        caption += f" {fmt_count(stats.get('count'))} images: " + ", ".join(parts) + "."
    return figure, caption


def _points(value: Any, width: int) -> list[list[float]]:
    """Rows of a timeline with ``width`` numbers each, in time order; others dropped."""
    rows = []
    for row in as_list(value):
        if isinstance(row, list) and len(row) >= width:
            numbers = [as_number(v) for v in row[:width]]
            if all(n is not None for n in numbers):
                rows.append([n for n in numbers if n is not None])
    # By time only, stably: two samples may share a (rounded) time.
    return sorted(rows, key=lambda row: row[0])


def memory_chart(summary: Mapping[str, Any]) -> Chart:
    go = plotly_objects()
    memory = as_dict(summary.get("memory"))
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
    budget = as_number(memory.get("budget_bytes"))
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
    caption += f" Peak {fmt_bytes(memory.get('peak_rss_bytes'))}; budget {fmt_bytes(budget)}."
    return figure, caption


def throughput_chart(summary: Mapping[str, Any]) -> Chart:
    go = plotly_objects()
    points = _points(summary.get("timeline"), 3)
    if points and points[0][0] > 0:
        # The timeline is cumulative from the start, where nothing was done yet.
        points.insert(0, [0.0] + [0.0] * (len(points[0]) - 1))
    intervals = [(a, b) for a, b in pairwise(points) if b[0] > a[0]]
    if len(intervals) < MIN_INTERVALS:
        return None, (
            f"This summary's progress timeline has {len(intervals)} interval(s): too few for"
            " a chart (it samples at most every 0.1 s, so the run was too short, or the"
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
