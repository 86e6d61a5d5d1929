"""What ``optimizr watch`` adds to /metrics and answers on /readyz.

The batch run's series (images, bytes, durations, storage requests) come from the
shared :class:`~optimizr.metrics.exporter.MetricsExporter`, fed by every batch's
pipeline; this collector adds the service's own per-source counters and the queue
depth (the consumer lag), read from the service's statistics at scrape time.
Like the exporter, this is the edge: only the CLI uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from optimizr.metrics.exporter import MetricsExporter, Verdict

if TYPE_CHECKING:
    from optimizr.watch import WatchService

#: WatchStatistics fields served as optimizr_watch_events_total{outcome=...}.
_OUTCOMES = (
    "converted",
    "duplicates",
    "skipped",
    "failed",
    "removed",
    "ignored",
    "dead_lettered",
    "retried",
    "acked",
)


class WatchCollector:
    """Per-source counters and queue depth, at scrape time."""

    def __init__(self, service: WatchService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        stats = service.stats
        source = service.source.describe().split()[0]  # "webhook"
        received = CounterMetricFamily(
            "optimizr_watch_messages",
            "Messages received from the event source.",
            labels=["source"],
        )
        received.add_metric([source], stats.messages)
        yield received
        outcomes = CounterMetricFamily(
            "optimizr_watch_events",
            "What became of the events received, by outcome (duplicates: already "
            "converted, nothing written; dead_lettered: unparseable or a poison image).",
            labels=["source", "outcome"],
        )
        for outcome in _OUTCOMES:
            outcomes.add_metric([source, outcome], getattr(stats, outcome))
        yield outcomes
        depth = service.source.depth()
        if depth is not None:
            lag = GaugeMetricFamily(
                "optimizr_watch_queue_depth",
                "Messages waiting in the event source (the consumer lag).",
                labels=["source"],
            )
            lag.add_metric([source], depth)
            yield lag
        refused = service.source.statistics().refused
        door = CounterMetricFamily(
            "optimizr_watch_refused",
            "Messages refused at the door as garbage (4xx), kept as dead letters.",
            labels=["source"],
        )
        door.add_metric([source], refused)
        yield door
        draining = GaugeMetricFamily(
            "optimizr_watch_draining", "1 while the service drains after SIGTERM."
        )
        draining.add_metric([], 1 if service.state in ("draining", "stopped") else 0)
        yield draining


def watch_readiness(service: WatchService) -> Verdict:
    """The service's readiness (see WatchService.readiness) as /readyz answers it."""
    return Verdict(*service.readiness())


class WatchExporter(MetricsExporter):
    """The batch runs' exporter, with the service's counters and its readiness."""

    service: WatchService | None = None

    def attach(self, service: WatchService) -> None:
        self.service = service
        self.registry.register(WatchCollector(service))

    def readiness(self) -> Verdict:
        if self.service is None:
            return Verdict(False, "starting", "the service is starting", {})
        return watch_readiness(self.service)
