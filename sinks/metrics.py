"""Prometheus metrics of the store process, served at /metrics on the API port.

Read from the counters the ClickHouse writer and the webhook workers keep, when
scraped: nothing is counted twice, and nothing on the write path waits on Prometheus.

The writer's: ``llmtap_store_*`` (rows and batches written, failed writes, inserts
repeated at a takeover or lost, dead letters, and when a batch was last written: alert
on it going stale). The webhook dispatcher's: ``llmtap_webhook_*`` (alerts read, HTTP
attempts and finished deliveries by endpoint and outcome, each endpoint's queue, and
whether a 410 disabled it). The API's: ``llmtap_api_*`` (requests in flight, and
refused for too many of one key's).

Kafka consumer lag is the broker's to tell (consumer groups ``<namespace>-sink`` and
``<namespace>-webhooks``): a Kafka exporter or the managed Kafka's metrics read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sinks.clickhouse.writer import ClickHouseWriter
from sinks.webhooks.dispatcher import WebhookDispatcher
from sql.admission import Admission

_WRITER_COUNTERS = {
    "rows_written": "call rows inserted into calls",
    "batches_written": "batches written to ClickHouse",
    "write_failures": "ClickHouse writes that failed (each retried until it succeeds)",
    "inserts_repeated": "recorded, uncommitted inserts made again when partitions were taken over",
    "inserts_lost": "recorded inserts that could not be made again: their messages were gone",
    "batches_given_up": "batches given up unwritten: their partitions were taken away and "
    "the wait for them ran out (read again by the partitions' next owner)",
    "dead_letters": "messages that could not be decoded, kept in the dead_letters table",
}


class StoreCollector(Collector):
    """The writer's and the webhook workers' counters, read at each scrape (each given
    as a getter: they are made when the app starts)."""

    def __init__(
        self,
        writer: Callable[[], ClickHouseWriter | None],
        dispatcher: Callable[[], WebhookDispatcher | None],
        admission: Callable[[], Admission | None] = lambda: None,
    ) -> None:
        self._writer = writer
        self._dispatcher = dispatcher
        self._admission = admission

    def collect(self) -> Iterator[Metric]:
        writer = self._writer()
        if writer is not None:
            for name, help_text in _WRITER_COUNTERS.items():
                family = CounterMetricFamily(f"llmtap_store_{name}", help_text)
                family.add_metric([], float(getattr(writer, name)))
                yield family
            last = GaugeMetricFamily(
                "llmtap_store_last_write_timestamp_seconds",
                "Unix time a batch was last written to ClickHouse (0: none yet)",
            )
            last.add_metric([], writer.last_written_at or 0.0)
            yield last
        dispatcher = self._dispatcher()
        if dispatcher is not None:
            yield from _webhooks(dispatcher)
        admission = self._admission()
        if admission is not None:
            refused = CounterMetricFamily(
                "llmtap_api_requests_refused",
                "API, SQL and dashboard requests refused with a 429: their key had "
                "api_requests_per_key in flight",
            )
            refused.add_metric([], float(admission.refused))
            in_flight = GaugeMetricFamily(
                "llmtap_api_requests_in_flight", "API, SQL and dashboard requests being answered"
            )
            in_flight.add_metric([], float(admission.total_in_flight))
            yield from (refused, in_flight)


def _webhooks(dispatcher: WebhookDispatcher) -> Iterator[Metric]:
    read = CounterMetricFamily("llmtap_webhook_alerts_read", "alerts read from Kafka")
    read.add_metric([], float(dispatcher.alerts_read))
    yield read
    attempts = CounterMetricFamily(
        "llmtap_webhook_attempts",
        "webhook HTTP attempts, by result",
        labels=["endpoint", "outcome"],
    )
    finished = CounterMetricFamily(
        "llmtap_webhook_deliveries",
        "webhook deliveries finished, by outcome",
        labels=["endpoint", "outcome"],
    )
    queued = GaugeMetricFamily(
        "llmtap_webhook_queued",
        "deliveries waiting in the endpoint's in-memory queue (not those only in ClickHouse)",
        labels=["endpoint"],
    )
    disabled = GaugeMetricFamily(
        "llmtap_webhook_endpoint_disabled",
        "1 while the endpoint sends nothing: its receiver answered 410 Gone",
        labels=["endpoint"],
    )
    for name, worker in dispatcher.workers.items():
        for outcome, count in worker.attempts.items():
            attempts.add_metric([name, outcome], float(count))
        for outcome, count in worker.outcomes.items():
            finished.add_metric([name, outcome], float(count))
        queued.add_metric([name], float(worker.queued))
        disabled.add_metric([name], float(bool(worker.disabled)))
    yield from (attempts, finished, queued, disabled)


def store_registry(
    writer: Callable[[], ClickHouseWriter | None],
    dispatcher: Callable[[], WebhookDispatcher | None],
    admission: Callable[[], Admission | None] = lambda: None,
) -> CollectorRegistry:
    """A registry of the store's metrics (one per app: tests make several)."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(writer, dispatcher, admission))
    return registry
