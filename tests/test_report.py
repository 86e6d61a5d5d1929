"""optimizr report: the page drawn from a real run's summary, opened in headless Chromium.

The browser checks read what Chromium itself saw: the DOM after plotly drew
(``--dump-dom``), its console (``--enable-logging``) and every network request
it made (``--log-net-log``). The page's own probe script adds what only the page
knows: errors, fetched resources, and the SVG roots and traces in each chart.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from conftest import age, photo_array, save_jpeg, save_png
from optimizr.cli import main
from optimizr.report import render_report


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, which `make chromium` installs (`make test` runs it first)."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: `make test` installs it (`make chromium`)")
        pytest.skip(
            "chromium is not installed and could not be: `make chromium` installs Debian's "
            "package, as root (`make test` runs it first)"
        )
    return path


#: Fails: not an image, under an image's name. Quotes, <, & and > must all come out literally.
BAD_NAME = 'bad <&> "name".jpg'
#: Converts fine.
ODD_NAME = "odd <&> name.png"
#: A finding with markup in it, added to every summary complete() fills in.
FINDING = "One image <b>dominated</b> the tail & more"
SECTIONS = ["sizes", "formats", "latency", "memory", "throughput"]


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A real conversion of a small tree with two failures; its summary path and document."""
    root = tmp_path_factory.mktemp("report")
    src, dest = root / "src", root / "dest"
    sizes = [(320, 240), (640, 480), (1024, 768), (200, 150), (800, 600), (1600, 1200)]
    for i, (w, h) in enumerate(sizes):
        save_jpeg(src / "photos" / f"p{i}.jpg", photo_array(w, h, seed=i))
    save_png(src / "art" / ODD_NAME, photo_array(300, 200, seed=9))
    good = (src / "photos" / "p2.jpg").read_bytes()
    (src / "broken").mkdir()
    (src / "broken" / "truncated.jpg").write_bytes(good[:200])
    (src / BAD_NAME).write_bytes(b"this is not an image at all")
    result = invoke("convert", src, dest, "-j", "2", "--no-progress")
    assert result.exit_code == 1, result.output  # the two broken files
    path = dest / "optimizr-summary.json"
    return path, json.loads(path.read_text())


@dataclass
class Page:
    """What the parsed page holds: root attributes, sections and the failures table."""

    root: dict[str, str] = field(default_factory=dict)
    charts: dict[str, dict[str, str]] = field(default_factory=dict)
    empty: set[str] = field(default_factory=set)
    failure_paths: list[str] = field(default_factory=list)
    text: str = ""


class _PageParser(HTMLParser):
    # Void elements, and those plotly's SVG closes itself (<path/>): no end tag to match.
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page = Page()
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.section: str | None = None
        self.in_path_cell = False
        self.cell = ""
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "html":
            self.page.root = a
        if tag == "section":
            self.section = a.get("id")
        if tag == "div" and "chart" in classes and self.section:
            self.page.charts[self.section] = a
        if tag == "p" and "empty" in classes and self.section:
            self.page.empty.add(self.section)
        if tag == "td" and "path" in classes and self.section == "failures":
            self.in_path_cell, self.cell = True, ""
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in self.VOID:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self.in_path_cell:
            self.page.failure_paths.append(self.cell)
            self.in_path_cell = False
        if tag == "section":
            self.section = None
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.in_path_cell:
            self.cell += data
        if self.stack and self.stack[-1] not in ("script", "style"):
            self.texts.append(data)


def parse(html_text: str, *, well_formed: bool = True) -> Page:
    parser = _PageParser()
    parser.feed(html_text)
    parser.close()
    if well_formed:
        # The page as written: one document, every element closed where it was opened.
        assert html_text.startswith("<!DOCTYPE html>\n")
        assert parser.problems == [] and parser.stack == []
    parser.page.text = " ".join(" ".join(parser.texts).split())
    return parser.page


@dataclass
class BrowserView:
    page: Page
    console: list[str]  # console lines Chromium logged (every level; the page logs nothing)
    requests: list[str]  # URLs the page asked the network for
    errors: list[str]  # what the page's probe caught: errors, failed loads
    resources: list[str]  # what the page's probe saw fetched (Resource Timing)


def open_in_chromium(chromium: str, page: Path, workdir: Path) -> BrowserView:
    """Load ``page`` in headless Chromium until it is idle, and read what happened."""
    workdir.mkdir(parents=True, exist_ok=True)
    netlog = workdir / "netlog.json"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        # Without these, Chromium calls Google on its own; those calls are not the page's.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={workdir / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--log-net-log={netlog}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        page.as_uri(),
    ]
    # A hang guard only: at a load of 45 on 2 cores Chromium took over 180 s to load a page.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = [line for line in proc.stderr.splitlines() if re.search(r":CONSOLE[(:]", line)]
    parsed = parse(proc.stdout, well_formed=False)
    root = parsed.root
    return BrowserView(
        page=parsed,
        console=console,
        requests=page_requests(netlog),
        errors=json.loads(root.get("data-page-errors", '["probe did not run"]')),
        resources=json.loads(root.get("data-resources", '["probe did not run"]')),
    )


def page_requests(netlog: Path) -> list[str]:
    """URLs of the requests the page made, from Chromium's network log.

    The browser's own requests (clock checks, component updates) carry the initiator
    "not an origin"; a page's carry its origin, "null" for a file:// page."""
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start_job and "url" in params:
            by_page = params.get("initiator") != "not an origin"
            if by_page or "file://" in str(params.get("network_isolation_key")):
                urls.append(params["url"])
    return urls


def assert_clean(view: BrowserView) -> None:
    assert view.console == []
    assert view.errors == []
    assert view.requests == []
    assert view.resources == []


def assert_self_contained(html_text: str) -> None:
    external = re.findall(
        r"<(?:script|link|img|iframe|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//",
        html_text,
        flags=re.IGNORECASE,
    )
    assert external == []
    assert "@import" not in html_text and "url(http" not in html_text


def plot_data(html_text: str, name: str) -> list[dict[str, Any]]:
    """The traces the page hands plotly for chart ``name``, as plotly will draw them."""
    marker = f'Plotly.newPlot(                        "chart-{name}",                        '
    start = html_text.index(marker) + len(marker)
    data, _ = json.JSONDecoder().raw_decode(html_text, start)
    assert isinstance(data, list)
    return data


def log_bounds(low: float, *indexes: int) -> list[float]:
    """Upper bounds as the summary writer's LogHistogram lists them (20 a decade)."""
    return [float(f"{low * 10 ** (i / 20):.6g}") for i in indexes]


def complete(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with every optional section filled in: made-up figures where the
    writer does not (yet) give them, its own where it does."""
    full = copy.deepcopy(summary)
    full["schema"] = "optimizr-summary/2"
    histograms = full.setdefault("histograms", {})
    kb = log_bounds(1000, 25, 26, 28, 31, 40)
    histograms.setdefault(
        "bytes_in", {"buckets": [[b, n] for b, n in zip(kb, [1, 2, 1, 3, 1], strict=True)]}
    )
    kb_out = log_bounds(1000, 14, 15, 18, 20)
    histograms.setdefault(
        "bytes_out", {"buckets": [[b, n] for b, n in zip(kb_out, [2, 3, 2, 1], strict=True)]}
    )
    ms = log_bounds(0.01, 10, 11, 12, 15)
    histograms.setdefault(
        "latency_seconds", {"buckets": [[b, n] for b, n in zip(ms, [2, 3, 1, 1], strict=True)]}
    )
    full.setdefault("latency_seconds", {"count": 7, "mean": 0.12, "p50": 0.11, "p95": 0.3,
                                        "p99": 0.3, "max": 0.28})  # fmt: skip
    files = full.setdefault("files", {})
    files.setdefault("by_format", {
        "jpeg": {"converted": 6, "skipped": 0, "failed": 2, "bytes_in": 812_000,
                 "bytes_out": 201_000},
        "png": {"converted": 1, "skipped": 0, "failed": 0, "bytes_in": 110_000,
                "bytes_out": 85_000},
        "gif": {"converted": 0, "skipped": 1, "failed": 0, "bytes_in": 0, "bytes_out": 0},
    })  # fmt: skip
    if len(full.get("timeline") or []) < 4:
        full["timeline"] = [[1.0, 2, 300_000, 90_000], [2.0, 5, 700_000, 200_000],
                            [3.2, 7, 922_000, 286_000]]  # fmt: skip
    memory = full.setdefault("memory", {})
    if len(memory.get("timeline") or []) < 2:
        memory["timeline"] = [[0.5, 80_000_000], [1.0, 150_000_000], [1.5, 120_000_000]]
    full.setdefault("analysis", []).append(
        {"rule": "tail", "finding": FINDING, "figures": {"share": 0.4, "path": BAD_NAME}}
    )
    full.setdefault(
        "largest_savings", [{"path": ODD_NAME, "bytes_in": 9, "bytes_out": 4, "saved": 5}]
    )
    full.setdefault("grew", [])
    return full


def failed_paths(summary: dict[str, Any]) -> list[str]:
    return [r["path"] for r in summary["not_converted"] if r["status"] == "failed"]


# --- the command ---


def test_report_writes_the_page_beside_the_summary(run: tuple[Path, dict[str, Any]]) -> None:
    path, _ = run
    result = invoke("report", path)
    assert result.exit_code == 0, result.output
    page = path.with_name("report.html")
    assert page.is_file() and f"report: {page}" in result.stderr
    assert [p for p in path.parent.glob(".*optimizr-tmp")] == []


def test_report_output_option(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    path, _ = run
    out = tmp_path / "deeper" / "r.html"
    result = invoke("report", path, "-o", out)
    assert result.exit_code == 0, result.output
    parse(out.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "not an optimizr summary"),
        ('{"schema": "something-else/1"}', "not an optimizr summary"),
    ],
)
def test_bad_summary_is_one_line_and_exit_2(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    result = invoke("report", path, "-o", tmp_path / "r.html")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("optimizr: error: ") and message in lines[0]
    assert not (tmp_path / "r.html").exists()


def test_convert_does_not_load_plotly() -> None:
    code = "import sys, optimizr.cli, optimizr.report; print('plotly' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- a DEST folder: its latest run that did work, or its whole history ---


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """A DEST with three kept runs: a conversion (3 converted, 1 failed) and two re-runs
    that found everything up to date (the failure known); the documents, oldest first."""
    root = tmp_path_factory.mktemp("history")
    src, dest = root / "src", root / "dest"
    for i in range(3):
        save_jpeg(src / f"p{i}.jpg", photo_array(200 + 40 * i, 150, seed=i))
    (src / "cut.jpg").write_bytes((src / "p0.jpg").read_bytes()[:300])
    age(src)  # written just now: a re-run would not trust them as unchanged
    for run in range(3):
        result = invoke("convert", src, dest, "-j", "1", "--no-progress")
        # The truncated file fails the first run; after that it is known bad, not new.
        assert result.exit_code == (1 if run == 0 else 0), result.output
    docs = [json.loads(p.read_text()) for p in sorted((dest / ".optimizr/runs").iterdir())]
    assert [d["files"]["converted"] for d in docs] == [3, 0, 0]
    return dest, docs


def test_report_of_dest_draws_its_last_run_that_did_work(
    history: tuple[Path, list[dict[str, Any]]],
) -> None:
    dest, docs = history
    latest = json.loads((dest / "optimizr-summary.json").read_text())
    assert latest == docs[-1] and latest["files"]["converted"] == 0
    result = invoke("report", dest)
    assert result.exit_code == 0, result.output
    page = (dest / "report.html").read_text(encoding="utf-8")
    # The page of the conversion, not of the re-run that replaced optimizr-summary.json.
    assert page == render_report(docs[0]) != render_report(latest)
    [kept] = [p for p in (dest / ".optimizr/runs").iterdir() if p.name.endswith("-work.json")]
    assert f"report: {dest / 'report.html'} ({kept}, the latest run that converted" in (
        result.stderr
    )


def test_report_of_dest_without_a_history_draws_its_summary(
    history: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    # A DEST written before runs were kept has only optimizr-summary.json.
    dest = tmp_path / "old"
    dest.mkdir()
    shutil.copy(history[0] / "optimizr-summary.json", dest)
    result = invoke("report", dest, "-o", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == render_report(history[1][-1])


@pytest.mark.parametrize("flag", ["--history", "--all"])
def test_report_history_draws_every_kept_run(
    history: tuple[Path, list[dict[str, Any]]], tmp_path: Path, flag: str
) -> None:
    dest, docs = history
    out = tmp_path / "history.html"
    result = invoke("report", dest, flag, "-o", out)
    assert result.exit_code == 0, result.output
    assert f"report: {out} (3 runs)" in result.stderr
    html_text = out.read_text(encoding="utf-8")
    page = parse(html_text)
    assert_self_contained(html_text)
    assert sorted(page.charts) == ["runs", "saved"]
    converted, skipped, failed = plot_data(html_text, "runs")
    assert converted["y"] == [d["files"]["converted"] for d in docs] == [3, 0, 0]
    assert failed["y"] == [d["files"]["failed"] for d in docs] == [1, 1, 1]
    assert skipped["y"] == [d["files"]["skipped"] for d in docs]
    assert len(set(converted["x"])) == 3  # one bar per run, even within one second
    [saved] = plot_data(html_text, "saved")
    assert saved["y"][-1] == pytest.approx(sum(d["bytes"]["saved"] for d in docs) / 1e6)
    table = html_text[html_text.index('<section id="history">') :]
    assert table.count("<tr>") == 1 + 3  # the heading and a row per run
    assert "runs that did work</dt><dd>1<" in html_text
    # The default place is DEST/report-history.html.
    assert invoke("report", dest, flag).exit_code == 0
    assert (dest / "report-history.html").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--history"], "--history draws the runs DEST keeps"),
        ([], "no run summary here"),
    ],
)
def test_report_of_a_folder_without_runs_or_history_of_a_file_is_one_line(
    history: tuple[Path, list[dict[str, Any]]], tmp_path: Path, args: list[str], message: str
) -> None:
    if args:
        target = history[0] / "optimizr-summary.json"
    else:
        target = tmp_path / "empty"
        target.mkdir()
    result = invoke("report", target, *args, "-o", tmp_path / "r.html")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("optimizr: error: ") and message in lines[0]
    assert not (tmp_path / "r.html").exists()


# --- the page, without a browser ---


def test_strings_from_the_summary_are_escaped(run: tuple[Path, dict[str, Any]]) -> None:
    _, summary = run
    assert BAD_NAME in failed_paths(summary)
    html_text = render_report(complete(summary))
    assert BAD_NAME not in html_text and "<b>dominated" not in html_text
    assert "bad &lt;&amp;&gt; &quot;name&quot;.jpg" in html_text
    page = parse(html_text)
    assert BAD_NAME in page.failure_paths
    assert FINDING in page.text


def test_sections_without_data_say_so() -> None:
    html_text = render_report({"schema": "optimizr-summary/2"})
    page = parse(html_text)
    assert page.charts == {}
    assert page.empty == {*SECTIONS, "failures"}
    assert "No file failed." in page.text
    assert "plotly" not in html_text.lower()  # no chart, no plotly.js to embed


@pytest.mark.parametrize(
    ("indexes", "counts", "expected"),
    [
        # On one grid of 20 a decade, the last bucket included: every gap filled.
        ([3, 4, 6, 9], [2, 1, 3, 4], [2, 1, 0, 3, 0, 0, 4]),
        # Sparse: only every other bucket can be told apart; those are filled.
        ([4, 10, 16], [1, 2, 3], [1, 0, 0, 2, 0, 0, 3]),
    ],
)
def test_empty_buckets_between_listed_ones_are_drawn_at_zero(
    indexes: list[int], counts: list[int], expected: list[int]
) -> None:
    # The writer lists only non-empty buckets; a chart that skipped the rest would bend
    # the distribution.
    buckets = [[b, n] for b, n in zip(log_bounds(0.01, *indexes), counts, strict=True)]
    summary = {
        "schema": "optimizr-summary/2",
        "histograms": {"latency_seconds": {"buckets": buckets}},
    }
    (trace,) = plot_data(render_report(summary), "latency")
    assert trace["y"] == expected
    assert len(set(trace["x"])) == len(trace["x"])


def test_catch_all_bucket_off_the_grid() -> None:
    # The last bucket's bound is the maximum seen: placed last, nothing added beside it.
    buckets = [[b, 1] for b in log_bounds(0.01, 3, 4, 6)] + [[0.2345, 5]]
    summary = {
        "schema": "optimizr-summary/2",
        "histograms": {"latency_seconds": {"buckets": buckets}},
    }
    (trace,) = plot_data(render_report(summary), "latency")
    assert trace["y"] == [1, 1, 0, 1, 5]
    assert trace["x"][0] == "≤ 14.1 ms" and trace["x"][-1] == "≤ 234 ms"


def section(html_text: str, name: str) -> str:
    start = html_text.index(f'<section id="{name}">')
    return html_text[start : html_text.index("</section>", start)]


WRITTEN = {"path": "written-bigger.png", "bytes_in": 100, "bytes_out": 150}
KEPT = {"path": "kept-as-is.png", "bytes_in": 100, "bytes_out": 180}


@pytest.mark.parametrize(
    ("summary", "grew", "skipped"),
    [
        ({"grew": [WRITTEN], "skipped_larger": [KEPT]}, [WRITTEN], [KEPT]),
        ({"grew": [], "skipped_larger": [KEPT]}, [], [KEPT]),
        # Older summaries put both in grew; the run's --if-larger says which they were.
        ({"grew": [KEPT], "options": {"if_larger": "skip"}}, [], [KEPT]),
        ({"grew": [WRITTEN], "options": {"if_larger": "write"}}, [WRITTEN], []),
    ],
)
def test_outputs_that_grew_are_not_confused_with_files_not_written(
    summary: dict[str, Any], grew: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> None:
    html_text = render_report({"schema": "optimizr-summary/2", **summary})
    parse(html_text)
    for name, expected in [("grew", grew), ("skipped_larger", skipped)]:
        text = section(html_text, name)
        for item in (WRITTEN, KEPT):
            assert (item["path"] in text) == (item in expected), (name, item["path"])
        assert ("None." in text) == (not expected)


def test_failed_files_without_a_list_are_counted() -> None:
    page = parse(render_report({"schema": "optimizr-summary/2", "files": {"failed": 3}}))
    assert "3 files failed, but this summary does not list them." in page.text


def test_figures_come_from_the_summary(run: tuple[Path, dict[str, Any]]) -> None:
    summary = complete(run[1])
    html_text = render_report(summary)
    assert_self_contained(html_text)
    histograms = summary["histograms"]
    sizes = plot_data(html_text, "sizes")
    for trace, key in zip(sizes, ["bytes_in", "bytes_out"], strict=True):
        assert sum(trace["y"]) == sum(n for _, n in histograms[key]["buckets"])
    latency = plot_data(html_text, "latency")
    assert sum(latency[0]["y"]) == sum(n for _, n in histograms["latency_seconds"]["buckets"])
    before, after = plot_data(html_text, "formats")
    by_format = {k: v for k, v in summary["files"]["by_format"].items() if v["bytes_in"]}
    assert before["x"] == sorted(by_format, key=lambda k: -by_format[k]["bytes_in"])
    assert before["y"] == [by_format[k]["bytes_in"] / 1e6 for k in before["x"]]
    assert after["y"] == [by_format[k]["bytes_out"] / 1e6 for k in after["x"]]
    mbs, images = plot_data(html_text, "throughput")
    timeline = [[0, 0, 0, 0], *summary["timeline"]] if summary["timeline"][0][0] else []
    timeline = timeline or summary["timeline"]
    for trace, column, scale in [(mbs, 2, 1e6), (images, 1, 1)]:
        rates = [(b[column] - a[column]) / scale / (b[0] - a[0]) for a, b in pairwise(timeline)]
        assert all(math.isclose(x, y) for x, y in zip(trace["y"][:-1], rates, strict=True))
    memory = plot_data(html_text, "memory")
    drawn = sorted(zip(memory[0]["x"], memory[0]["y"], strict=True))
    assert drawn == sorted((t, rss / 1e6) for t, rss in summary["memory"]["timeline"])


# --- the page, in a browser ---


def test_page_from_a_real_run_in_chromium(
    chromium: str, run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, summary = run
    out = tmp_path / "report.html"
    assert invoke("report", path, "-o", out).exit_code == 0
    html_text = out.read_text(encoding="utf-8")
    parse(html_text)
    assert_self_contained(html_text)
    view = open_in_chromium(chromium, out, tmp_path / "chromium")
    assert_clean(view)
    page = view.page
    # Every chart on the page drew its SVG and its traces; every other section says why not.
    assert page.charts, "the real run's memory timeline at least is drawable"
    assert page.root["data-charts"] == page.root["data-charts-drawn"] == str(len(page.charts))
    for name, chart in page.charts.items():
        assert int(chart["data-main-svg"]) >= 1 and int(chart["data-traces"]) >= 1, name
    for name in SECTIONS:
        assert (name in page.charts) != (name in page.empty), name
    if len(summary.get("memory", {}).get("timeline", [])) >= 2:
        assert "memory" in page.charts
    # The browser shows each failed path exactly as it is on disk.
    assert sorted(page.failure_paths) == sorted(failed_paths(summary))
    assert BAD_NAME in page.failure_paths
    assert f"{summary['files']['found']:,}" in page.text


def test_every_chart_draws_in_chromium(
    chromium: str, run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    summary = complete(run[1])
    out = tmp_path / "report.html"
    out.write_text(render_report(summary), encoding="utf-8")
    view = open_in_chromium(chromium, out, tmp_path / "chromium")
    assert_clean(view)
    page = view.page
    assert sorted(page.charts) == sorted(SECTIONS)
    assert page.root["data-charts-drawn"] == str(len(SECTIONS))
    for name, chart in page.charts.items():
        assert int(chart["data-main-svg"]) >= 1 and int(chart["data-traces"]) >= 1, name
    assert FINDING in page.text


def test_history_page_draws_in_chromium(
    chromium: str, history: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    out = tmp_path / "history.html"
    assert invoke("report", history[0], "--history", "-o", out).exit_code == 0
    view = open_in_chromium(chromium, out, tmp_path / "chromium")
    assert_clean(view)
    assert sorted(view.page.charts) == ["runs", "saved"]
    assert view.page.root["data-charts-drawn"] == "2"
    for name, chart in view.page.charts.items():
        assert int(chart["data-main-svg"]) >= 1 and int(chart["data-traces"]) >= 1, name


def test_empty_page_is_clean_in_chromium(chromium: str, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text(render_report({"schema": "optimizr-summary/2"}), encoding="utf-8")
    view = open_in_chromium(chromium, out, tmp_path / "chromium")
    assert_clean(view)
    assert view.page.root["data-charts"] == "0"


def test_the_browser_checks_catch_errors_and_fetches(
    chromium: str, run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The checks above are not vacuous: a page that fetches and errs fails them."""
    html_text = render_report(run[1])
    spoiled = html_text.replace(
        "</head>",
        '<script src="http://127.0.0.1:9/missing.js"></script>\n'
        '<script>console.error("spoiled"); undefinedFunction();</script>\n</head>',
    )
    out = tmp_path / "report.html"
    out.write_text(spoiled, encoding="utf-8")
    view = open_in_chromium(chromium, out, tmp_path / "chromium")
    assert any("spoiled" in line for line in view.console)
    assert any("undefinedFunction" in line for line in view.console)
    assert "http://127.0.0.1:9/missing.js" in view.requests
    assert (
        "spoiled" in view.errors and "failed to load http://127.0.0.1:9/missing.js" in view.errors
    )
    assert any("undefinedFunction" in e for e in view.errors)
    with pytest.raises(AssertionError):
        assert_self_contained(spoiled)
