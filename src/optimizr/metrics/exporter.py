"""Prometheus metrics and health checks for a run: ``/metrics``, ``/healthz``, ``/readyz``.

Counters and the per-image histogram are fed by the pipeline's ``finished``
calls; every gauge is read from the run's :class:`~optimizr.pipeline.RunSnapshot`
when Prometheus scrapes, and the object-store request figures from the stores'
:class:`~optimizr.storage.requests.StorageStatistics` (``storage_statistics``),
so a scrape always shows the state at that instant and nothing runs on a timer.
The exporter has its own registry: two runs in one process (tests, a library
user) never share or clash over metrics.

This is the edge of the program: only the CLI uses it, the core never does.
"""

from __future__ import annotations

import json
import math
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from optimizr.atomic import atomic_write
from optimizr.errors import UsageError
from optimizr.results import Result, input_format
from optimizr.storage.requests import CAUSES

if TYPE_CHECKING:
    from optimizr.config import RunConfig
    from optimizr.events import RunSnapshot
    from optimizr.storage.requests import StorageStatistics

#: Seconds one image may take, from thumbnails to 100 MP scans near --timeout.
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class Verdict:
    """One health or readiness answer: the HTTP status and a small JSON body."""

    ok: bool
    status: str
    reason: str
    figures: dict[str, Any]

    @property
    def http_status(self) -> int:
        return 200 if self.ok else 503

    def body(self) -> bytes:
        doc = {"status": self.status, "reason": self.reason, **self.figures}
        return json.dumps(doc).encode() + b"\n"


def health(snapshot: RunSnapshot | None, stall_timeout: float, now: float) -> Verdict:
    """Alive and making progress, unless no image finished for ``stall_timeout``
    seconds while some are running or queued. ``now`` is time.monotonic()."""
    if snapshot is None:
        return Verdict(True, "ok", "the run is starting", {"stall_timeout": stall_timeout})
    idle = max(0.0, now - snapshot.last_progress)
    pending = snapshot.running + snapshot.queued
    figures = {
        "seconds_since_progress": round(idle, 3),
        "stall_timeout": stall_timeout,
        "running": snapshot.running,
        "queued": snapshot.queued,
        "finished": snapshot.finished,
    }
    if snapshot.workers_connected == 0:
        # A cluster with no worker converts nothing, however long it waits.
        reason = "no Dask worker is connected to the scheduler"
        return Verdict(False, "no workers", reason, {**figures, "workers_connected": 0})
    if pending and idle > stall_timeout:
        reason = f"no image finished for {idle:.0f} s with {pending} running or queued"
        return Verdict(False, "stalled", reason, figures)
    reason = "making progress" if pending else "idle: nothing running or queued"
    return Verdict(True, "ok", reason, figures)


def readiness(snapshot: RunSnapshot | None, draining: bool = False) -> Verdict:
    """Ready once a worker is up (or something finished); not while draining."""
    if snapshot is None:
        return Verdict(False, "starting", "the run has not started", {})
    draining = draining or snapshot.draining
    figures = {
        "workers": snapshot.workers,
        "workers_alive": snapshot.workers_alive,
        "finished": snapshot.finished,
        "draining": draining,
    }
    if draining:
        return Verdict(False, "draining", "stopping: finishing the images in flight", figures)
    if snapshot.workers_alive > 0 or snapshot.finished > 0:
        return Verdict(True, "ready", "workers are up", figures)
    return Verdict(False, "starting", "no worker is up yet", figures)


@dataclass(frozen=True)
class ExporterStatistics:
    #: Where the server listens (``http://host:port``), None when not serving.
    url: str | None
    scrapes: int
    health_checks: int
    #: /healthz answers that were 503 (stalled).
    unhealthy: int
    readiness_checks: int
    #: /readyz answers that were 503 (starting or draining).
    not_ready: int
    #: Requests for any other path (404).
    not_found: int


class _SnapshotCollector:
    """Gauges computed from the run's snapshot at scrape time."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        snapshot = self.exporter.snapshot()
        if snapshot is None:
            return
        idle = max(0.0, self.exporter.clock() - snapshot.last_progress)
        gauges: list[tuple[str, str, float]] = [
            ("optimizr_files_found", "Files the walk has found so far.", snapshot.found),
            ("optimizr_walk_done", "1 once the walk of SRC is complete.", snapshot.walk_done),
            ("optimizr_images_in_flight", "Images a worker is converting now.", snapshot.running),
            ("optimizr_images_queued", "Images planned, waiting for a worker or memory.",
             snapshot.queued),
            ("optimizr_workers", "Worker processes the run uses.", snapshot.workers),
            ("optimizr_workers_alive", "Worker processes alive now.", snapshot.workers_alive),
            ("optimizr_memory_budget_bytes", "The memory budget (--max-memory).",
             snapshot.budget_total),
            ("optimizr_memory_budget_in_use_bytes", "Bytes the images in flight are charged.",
             snapshot.budget_in_use),
            ("optimizr_draining", "1 after a stop was asked for (SIGINT, SIGTERM).",
             snapshot.draining or self.exporter.draining),
            ("optimizr_seconds_since_progress", "Seconds since the last image finished.", idle),
            ("optimizr_run_finished", "1 once the run has ended (the figures are final).",
             self.exporter.run_finished),
        ]  # fmt: skip
        for name, documentation, value in gauges:
            yield GaugeMetricFamily(name, documentation, value=float(value))
        yield CounterMetricFamily(
            "optimizr_worker_restarts",
            "Worker processes replaced (after a crash, a timeout or --max-tasks-per-worker).",
            value=snapshot.worker_restarts,
        )


class _StorageCollector:
    """Object-store requests, retries, failures and latencies, read from the stores'
    statistics at scrape time (none at all when the run uses no object store)."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterator[Metric]:
        provider = self.exporter.storage_statistics
        stores = list(provider()) if provider is not None else []
        if not stores:
            return
        requests = CounterMetricFamily(
            "optimizr_storage_requests",
            "Object-store request attempts (a retry is one more), by store and operation.",
            labels=["store", "op"],
        )
        retries = CounterMetricFamily(
            "optimizr_storage_retries",
            "Object-store requests retried, by store, operation and cause (throttled, "
            "server_error, connection, timeout).",
            labels=["store", "op", "cause"],
        )
        failures = CounterMetricFamily(
            "optimizr_storage_failures",
            "Object-store calls that ended in an error (after their retries), by store "
            "and operation; a missing key or a lost precondition is an answer, not one.",
            labels=["store", "op"],
        )
        seconds = HistogramMetricFamily(
            "optimizr_storage_request_seconds",
            "Seconds per object-store request attempt, by store and operation.",
            labels=["store", "op"],
        )
        for stats in stores:
            for op, count in sorted(stats.requests.items()):
                requests.add_metric([stats.store, op], count)
                # Every cause of every operation seen, zeros too: rate() needs the series
                # to exist before the first retry.
                causes = stats.retries.get(op, {})
                for cause in CAUSES:
                    retries.add_metric([stats.store, op, cause], causes.get(cause, 0))
                failures.add_metric([stats.store, op], stats.failures.get(op, 0))
            for op, histogram in sorted(stats.latency.items()):
                buckets = [(_le(bound), n) for bound, n in histogram.cumulative()]
                seconds.add_metric([stats.store, op], buckets, histogram.sum)
        yield from (requests, retries, failures, seconds)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes one: 0.005, 1.0, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class _BatchJobCollector:
    """The exporter's metrics with the run's labels added, and the batch-job gauges."""

    def __init__(
        self,
        exporter: MetricsExporter,
        exit_code: int,
        started_at: float,
        finished_at: float,
        success: float | None,
    ) -> None:
        self.exporter = exporter
        self.job = [
            ("optimizr_last_run_timestamp_seconds", "When the last run ended (Unix time).",
             finished_at),
            ("optimizr_last_run_duration_seconds", "Wall seconds the last run took.",
             max(0.0, finished_at - started_at)),
            ("optimizr_last_exit_code", "Exit code of the last run (0 success, 1 some files "
             "failed, 2 usage error, 3 DEST busy, 4 workers could not start, 130 or 143 "
             "interrupted).", exit_code),
        ]  # fmt: skip
        if success is not None:
            self.job.append(
                (
                    "optimizr_last_success_timestamp_seconds",
                    "When the last run that exited 0 ended (Unix time); failed runs keep it.",
                    success,
                )
            )

    def collect(self) -> Iterator[Metric]:
        labels = self.exporter.labels
        for family in self.exporter.registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(
                    sample.name, {**labels, **sample.labels}, sample.value, sample.timestamp
                )
            yield labelled
        for name, documentation, value in self.job:
            gauge = GaugeMetricFamily(name, documentation, labels=list(labels))
            gauge.add_metric(list(labels.values()), float(value))
            yield gauge


def _last_success(text: str, labels: Mapping[str, str]) -> float | None:
    """The last success time a textfile holds for exactly these labels, if any."""
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "optimizr_last_success_timestamp_seconds"
                    and sample.labels == dict(labels)
                    and math.isfinite(sample.value)
                ):
                    return float(sample.value)
    except ValueError:  # not the text format: written by something else
        return None
    return None


def run_labels(config: RunConfig) -> dict[str, str]:
    """The labels a run's textfile series carry: ``dest`` (the absolute DEST), then
    ``--metrics-label`` pairs (one named ``dest`` replaces it)."""
    dest = config.dest if isinstance(config.dest, str) else str(config.dest.resolve())
    return {"dest": dest, **dict(config.metrics_labels)}


class MetricsExporter:
    """Implements the pipeline's ``ProgressListener`` and serves what it learns.

    ::

        exporter = MetricsExporter(stall_timeout=300, labels=run_labels(config))
        started = time.time()
        with exporter:
            url = exporter.serve("127.0.0.1", 9464)
            summary = convert_tree(src, dest, config, listener=exporter)
        exporter.write_textfile(
            Path("optimizr.prom"), exit_code=summary.exit_code,
            started_at=started, finished_at=time.time(),
        )

    ``labels`` go on every series of the textfile (not of ``/metrics``, whose
    scrape configuration names the target).

    ``storage_statistics``: called at each scrape (and for the textfile), it returns
    the statistics of the run's object stores (``[s.statistics() for s in stores]``);
    None, or an empty list, serves no storage metrics.
    """

    def __init__(
        self,
        *,
        stall_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        labels: Mapping[str, str] | None = None,
        storage_statistics: Callable[[], Sequence[StorageStatistics]] | None = None,
        build_info: Mapping[str, str] | None = None,
    ) -> None:
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.labels = dict(labels or {})
        self.storage_statistics = storage_statistics
        self.draining = False
        self.registry = CollectorRegistry()
        self._images = Counter(
            "optimizr_images",
            "Files finished, by status and input format.",
            ["status", "format"],
            registry=self.registry,
        )
        # The summary's figures: bytes of converted images only.
        self._bytes_in = Counter(
            "optimizr_bytes_in", "Bytes of the sources converted.", registry=self.registry
        )
        self._bytes_out = Counter(
            "optimizr_bytes_out", "Bytes of the WebP files written.", registry=self.registry
        )
        self._seconds = Histogram(
            "optimizr_image_seconds",
            "Seconds to convert one image (decode, resize, encode), converted images.",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        # --target-score (issue 14): what the searches chose and what they cost.
        self._searched = Counter(
            "optimizr_quality_search_images",
            "Converted images whose output the --target-score search chose, by kind "
            "(lossy, lossless, near_lossless).",
            ["kind"],
            registry=self.registry,
        )
        self._probes = Histogram(
            "optimizr_quality_search_probes",
            "Encodes per searched image (lossy probes and lossless candidates).",
            buckets=(1, 2, 3, 4, 5, 6, 7, 8),
            registry=self.registry,
        )
        # --target-size (issue 14): images whose size target was met or not.
        self._sized = Counter(
            "optimizr_target_size_images",
            "Converted images with --target-size, by outcome (met, unreachable: the "
            "smallest file found was kept, over the target).",
            ["outcome"],
            registry=self.registry,
        )
        if build_info:
            # optimizr_build_info{version=...,libvips=...,encoder=...,libwebp=...} 1: the
            # figures of two runs compare only when these match.
            Info(
                "optimizr_build",
                "Versions of optimizr and its libraries, and the WebP encoder in use.",
                registry=self.registry,
            ).info(dict(build_info))
        self.registry.register(_SnapshotCollector(self))
        self.registry.register(_StorageCollector(self))
        self._snapshot: Callable[[], RunSnapshot] | None = None
        self.run_finished = False
        self._linger_cancelled = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("scrapes", "health_checks", "unhealthy", "readiness_checks", "not_ready", "not_found"),
            0,
        )

    # -- ProgressListener ----------------------------------------------------------

    def started(self, snapshot: Callable[[], RunSnapshot]) -> None:
        self._snapshot = snapshot

    def found(self, count: int) -> None:
        pass  # the snapshot has the figure at scrape time

    def finished(self, result: Result) -> None:
        self._images.labels(status=result.status, format=input_format(result)).inc()
        if result.status != "converted":
            return
        self._bytes_in.inc(result.bytes_in)
        self._bytes_out.inc(result.bytes_out)
        if result.facts is not None:
            self._seconds.observe(result.facts.seconds)
            chosen = result.facts.chosen
            if chosen is not None:
                kind = "lossy" if chosen.startswith("q") else chosen.split()[0].replace("-", "_")
                self._searched.labels(kind=kind).inc()
                self._probes.observe(result.facts.probes)
            if result.facts.target_met is not None:
                outcome = "met" if result.facts.target_met else "unreachable"
                self._sized.labels(outcome=outcome).inc()

    def walk_done(self, total: int) -> None:
        pass

    def stopping(self, hard: bool) -> None:
        self.draining = True
        self._linger_cancelled.set()

    def run_ended(self) -> None:
        """The run is over: the figures served from now on are final."""
        self.run_finished = True

    def linger(self, seconds: float) -> None:
        """Keep serving the final figures for up to ``seconds``, so that a
        scraper can collect them; a signal (``stopping``) ends the wait early."""
        self._linger_cancelled.clear()
        self._linger_cancelled.wait(seconds)

    # -- what is served --------------------------------------------------------------

    def snapshot(self) -> RunSnapshot | None:
        return self._snapshot() if self._snapshot is not None else None

    def health(self) -> Verdict:
        return health(self.snapshot(), self.stall_timeout, self.clock())

    def readiness(self) -> Verdict:
        return readiness(self.snapshot(), self.draining)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)

    def render_textfile(
        self, *, exit_code: int, started_at: float, finished_at: float, previous: str = ""
    ) -> bytes:
        """The metrics for node_exporter's textfile collector, as a batch job reports
        itself: every series with the run's labels, plus the last run's end time,
        duration and exit code, and the end time of the last run that succeeded (exit
        0): this run's, else the one ``previous`` (the file's old text) holds under
        the same labels, else none at all. Times are Unix seconds."""
        success = finished_at if exit_code == 0 else _last_success(previous, self.labels)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_BatchJobCollector(self, exit_code, started_at, finished_at, success))
        return generate_latest(registry)

    def write_textfile(
        self, path: Path, *, exit_code: int, started_at: float, finished_at: float
    ) -> None:
        """Write :meth:`render_textfile` atomically (the collector must never read half
        a file), keeping the last success time the file held. Raises OSError."""
        try:
            previous = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            previous = ""  # no file yet (or not ours): no earlier success to keep
        data = self.render_textfile(
            exit_code=exit_code, started_at=started_at, finished_at=finished_at, previous=previous
        )
        atomic_write(path, data)

    def answer(self, path: str) -> tuple[int, str, bytes]:
        """HTTP status, content type and body for a GET of ``path`` (a HEAD: all but the body)."""
        route = urlsplit(path).path.rstrip("/") or "/"
        if route == "/metrics":
            self._count("scrapes")
            return 200, CONTENT_TYPE_LATEST, self.render()
        if route in ("/healthz", "/readyz"):
            healthz = route == "/healthz"
            verdict = self.health() if healthz else self.readiness()
            self._count("health_checks" if healthz else "readiness_checks")
            if not verdict.ok:
                self._count("unhealthy" if healthz else "not_ready")
            return verdict.http_status, "application/json", verdict.body()
        self._count("not_found")
        return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz, /readyz\n"

    # -- serving -------------------------------------------------------------------

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start answering on ``host:port`` (port 0: any free one) in a daemon thread;
        return the base URL. Raises UsageError when the address cannot be used."""
        if self._server is not None:
            raise RuntimeError("already serving")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            server = QuietHTTPServer((host, port), partial(_Handler, self), family)
        except OSError as exc:
            message = f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
            raise UsageError(message) from None
        netloc = f"[{host}]" if family == socket.AF_INET6 else host
        self._url = f"http://{netloc}:{server.server_port}"
        self._server = server
        # serve_forever notices shutdown() only between polls: a short interval keeps
        # the end of a run from waiting up to the default half second.
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name="optimizr-metrics", daemon=True
        )
        self._thread.start()
        return self._url

    @property
    def url(self) -> str | None:
        return self._url

    def close(self) -> None:
        """Stop serving and release the port; safe to call more than once."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._url = None

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> ExporterStatistics:
        with self._lock:
            counts = dict(self._counts)
        return ExporterStatistics(
            url=self._url,
            scrapes=counts["scrapes"],
            health_checks=counts["health_checks"],
            unhealthy=counts["unhealthy"],
            readiness_checks=counts["readiness_checks"],
            not_ready=counts["not_ready"],
            not_found=counts["not_found"],
        )

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


class QuietHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that binds without a reverse DNS lookup (also
    the webhook of ``optimizr watch``)."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: Callable[..., BaseHTTPRequestHandler],
        family: socket.AddressFamily,
    ) -> None:
        self.address_family = family
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host up with getfqdn(), a reverse DNS
        # query that can hang for seconds on a box without DNS; the name is unused.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server_version = "optimizr"

    def __init__(self, exporter: MetricsExporter, *args: Any, **kwargs: Any) -> None:
        self.exporter = exporter
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        # Uptime probes and load balancers check with HEAD; BaseHTTPRequestHandler
        # answers 501 to any method without a do_ handler (issue 10, item 11).
        self._respond(with_body=False)

    def _respond(self, *, with_body: bool) -> None:
        status, content_type, body = self.exporter.answer(self.path)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        # The GET body's length, as RFC 9110 (9.3.2) asks of a HEAD answer.
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would bury the run's own output on stderr
