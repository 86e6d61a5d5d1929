"""What ``optimizr watch`` adds to /metrics and answers on /readyz.

The batch run's series (images, bytes, durations, storage requests) come from the
shared :class:`~optimizr.metrics.exporter.MetricsExporter`, fed by every batch's
pipeline; this collector adds the service's own per-source counters, the queue depth
(the consumer lag) and the event source's own figures (BrokerStatistics: received,
redelivered, dead-lettered, connected...), read at scrape time.
Like the exporter, this is the edge: only the CLI uses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from optimizr.metrics.exporter import MetricsExporter, Verdict
from optimizr.watch import source_label

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

#: BrokerStatistics fields served as optimizr_watch_source_messages_total{kind=...}.
_SOURCE_COUNTS = (
    "received",
    "acked",
    "naked",
    "termed",
    "extended",
    "redelivered",
    "dead_lettered",
    "settle_failures",
)


class WatchCollector:
    """Per-source counters and queue depth, at scrape time."""

    def __init__(self, service: WatchService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        stats = service.stats
        source = source_label(service.config.events)  # webhook, nats, redis, sqs
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
        figures = service.source.statistics()
        if figures.lag is not None:
            lag = GaugeMetricFamily(
                "optimizr_watch_queue_depth",
                "Messages waiting in the event source (the consumer lag).",
                labels=["source"],
            )
            lag.add_metric([source], figures.lag)
            yield lag
        counted = CounterMetricFamily(
            "optimizr_watch_source_messages",
            "What the event source counted itself, by kind (received: deliveries, "
            "redeliveries included; redelivered: a consumer died, a nak, a lease ran out; "
            "dead_lettered: by the broker after max_deliver; settle_failures: an ack, nak, "
            "term or extend that did not reach the broker).",
            labels=["source", "kind"],
        )
        for kind in _SOURCE_COUNTS:
            counted.add_metric([source, kind], getattr(figures, kind))
        yield counted
        lost = CounterMetricFamily(
            "optimizr_watch_source_connection_errors",
            "Times the connection to the event source was lost.",
            labels=["source"],
        )
        lost.add_metric([source], figures.connection_errors)
        yield lost
        connected = GaugeMetricFamily(
            "optimizr_watch_source_connected",
            "1 while the event source can be reached (/readyz is 503 while it is 0).",
            labels=["source"],
        )
        connected.add_metric([source], 1 if figures.connected else 0)
        yield connected
        refused = getattr(figures, "refused", None)  # the webhook's door only
        if refused is not None:
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
