"""Prometheus metrics of the ingress, served at /metrics (prometheus-client)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from ingress.publisher import EventPublisher
from llmtap import wire

M = TypeVar("M", bound=MetricWrapperBase)

log = logging.getLogger(__name__)

# The model label comes from the call (a client may name any model, and a provider
# answer with any name): a model a provider answered no call of yet, and past this many
# distinct models any other, count as OTHER_MODEL,
# so a client sending made-up names cannot grow the process's series without end.
# A company's models, its fine-tunes and local ones included, are far fewer.
MAX_MODEL_LABELS = 500
OTHER_MODEL = "_other"

# Latency of LLM calls spans milliseconds to minutes.
_CALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# What the proxy itself adds: tens of microseconds to milliseconds.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)

# Event counters the publisher keeps, exported as they are.
_PUBLISHER_COUNTERS = {
    "published": "events delivered to Kafka",
    "spooled": "events written to the on-disk spool while the broker was away",
    "replayed": "events replayed from the spool",
    "dropped": (
        "events lost: the memory queue or the spool was full, Kafka refused one for good, "
        "or one could not be encoded"
    ),
}


class _PublisherCollector(Collector):
    def __init__(self, publisher: EventPublisher) -> None:
        self._publisher = publisher

    def collect(self) -> Iterator[Metric]:
        for name, help_text in _PUBLISHER_COUNTERS.items():
            if hasattr(self._publisher, name):
                family = CounterMetricFamily(f"llmtap_events_{name}", help_text)
                family.add_metric([], float(getattr(self._publisher, name)))
                yield family
        backlog = GaugeMetricFamily("llmtap_events_backlog", "events waiting in memory")
        backlog.add_metric([], float(self._publisher.backlog))
        yield backlog
        spool = GaugeMetricFamily("llmtap_spool_bytes", "bytes of events in the on-disk spool")
        spool.add_metric([], float(self._publisher.spool_bytes))
        yield spool
        unreadable = GaugeMetricFamily(
            "llmtap_spool_unreadable_segments",
            "spool segments whose last read failed: left on disk, passed over, tried again",
        )
        unreadable.add_metric([], float(self._publisher.spool_unreadable))
        yield unreadable
        limit = GaugeMetricFamily(
            "llmtap_spool_limit_bytes", "spool_max_bytes: past it, new events are dropped"
        )
        limit.add_metric([], float(self._publisher.spool_max_bytes))
        yield limit
        connected = GaugeMetricFamily("llmtap_broker_connected", "1 when the producer is up")
        connected.add_metric([], 1.0 if self._publisher.connected else 0.0)
        yield connected


# A call's ends that are llmtap's answer, the provider not asked: rejections, by reason
# (the event's error class: invalid_key, budget_exceeded, rate_limited...), not calls
# whose latency the histograms measure.
REJECTED = frozenset({"bad_request", "refused", "budget_exceeded", "rate_limited"})


class IngressMetrics:
    """One registry per app, so several apps (tests) never share counters."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llmtap_requests",
            "Calls through the proxy, by how they ended",
            ["endpoint", "provider", "model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llmtap_request_duration_seconds",
            "Whole call, as the client saw it",
            ["endpoint", "provider"],
            buckets=_CALL_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "llmtap_time_to_first_token_seconds",
            "Streamed calls: from the call's arrival to the stream's first event",
            ["endpoint", "provider"],
            buckets=_CALL_BUCKETS,
            registry=self.registry,
        )
        self.overhead = Histogram(
            "llmtap_proxy_overhead_seconds",
            "Time spent in the proxy itself, not waiting on the provider",
            ["endpoint"],
            buckets=_OVERHEAD_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "llmtap_rejections",
            "Calls refused before reaching a provider, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.resends = Counter(
            "llmtap_upstream_resends",
            "Calls sent once more on a fresh connection: the provider had closed the "
            "kept-alive one they were sent on before answering (the keep-alive race)",
            ["provider"],
            registry=self.registry,
        )
        self.registry.register(_PublisherCollector(publisher))
        # Labelled children by (metric, *labels): as many as the metrics hold themselves.
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}
        self._models: set[str] = set()  # the model labels given, at most MAX_MODEL_LABELS
        self._models_capped = False

    def observe(self, event: wire.Response) -> None:
        model = self._model_label(event.model, event.status == "ok")
        self._child(self.requests, event.endpoint, event.provider, model, event.status).inc()
        if event.status in REJECTED:
            self._child(self.rejections, event.error_class or event.status).inc()
            return
        self._child(self.latency, event.endpoint, event.provider).observe(event.latency_ms / 1000)
        self._child(self.overhead, event.endpoint).observe(event.proxy_overhead_ms / 1000)
        if event.ttft_ms is not None:
            self._child(self.ttft, event.endpoint, event.provider).observe(event.ttft_ms / 1000)

    def resent(self, provider: str) -> None:
        self._child(self.resends, provider).inc()

    def _model_label(self, model: str, answered: bool) -> str:
        """The model's own label, if it has one or gets one: only a call a provider
        answered gives a model its label (made-up names, refused, take none of the
        MAX_MODEL_LABELS from the models deployed after them)."""
        if model in self._models:
            return model
        if not answered:
            return OTHER_MODEL
        if len(self._models) < MAX_MODEL_LABELS:
            self._models.add(model)
            return model
        if not self._models_capped:
            self._models_capped = True
            log.warning(
                "calls have named %d models: llmtap_requests_total counts calls of any "
                "other model as model=%s (first: %.100r)",
                MAX_MODEL_LABELS,
                OTHER_MODEL,
                model,
            )
        return OTHER_MODEL

    def _child(self, metric: M, *labels: str) -> M:
        """``metric.labels(*labels)``, remembered: the lookup costs more than the update."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return cast(M, child)

    def render(self) -> bytes:
        return generate_latest(self.registry)
