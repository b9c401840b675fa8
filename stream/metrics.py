"""Prometheus metrics of the stream worker, served at /metrics on worker_metrics_port
(stream/web.py).

Read from the counters the stages keep, when scraped: the cost stage handles tens of
thousands of events a second, and nothing on its path calls Prometheus. All are
``llmtap_worker_*``, since the worker started:

- the cost stage's: costed events sent, of them the unpriced (no price known for the
  model), undecodable responses passed over; its windows step's windows published,
  calls counted late (their window had closed) and calls stamped ahead of the worker's
  clock; its budgets step's (with budgets configured) alerts raised, states
  published and calls read after their period rolled;
- the spikes stage's: alerts raised by state, windows ending ahead of the worker's
  clock, undecodable windows passed over;
- per stage, when it last handled a batch of records and when its loop last went
  round (the staleness gauges to alert on).

How far a stage is behind is Kafka's to say: the lag of its consumer group.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from stream.agents.budgets import BudgetsStep
from stream.agents.costs import CostStage
from stream.agents.spikes import SpikesStage
from stream.agents.stage import GroupStage
from stream.agents.windows import WindowsStep

PREFIX = "llmtap_worker_"


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, help_text)
    family.add_metric([], float(value))
    return family


class WorkerCollector(Collector):
    """The worker's stages' counters, read at each scrape."""

    def __init__(self, costs: CostStage, spikes: SpikesStage) -> None:
        self._costs = costs
        self._spikes = spikes
        self._stages: dict[str, GroupStage] = {"costs": costs, "spikes": spikes}

    def collect(self) -> Iterator[Metric]:
        costs, spikes = self._costs, self._spikes
        yield _counter("events_costed", "costed events sent (one per response event)", costs.costed)
        yield _counter(
            "events_unpriced",
            "of the costed events, those whose model has no known price (cost null)",
            costs.unpriced,
        )
        for step in costs.steps:
            if isinstance(step, WindowsStep):
                yield from _windows(step)
            elif isinstance(step, BudgetsStep):
                yield from _budgets(step)
        raised = CounterMetricFamily(
            PREFIX + "spike_alerts", "spike alerts raised, by state", labels=["state"]
        )
        for state, count in spikes.alerts_raised.items():
            raised.add_metric([state], float(count))
        yield raised
        yield _counter(
            "windows_ahead",
            "windows the spikes stage judged ending over 1 s past the worker's clock (a "
            "worker's or an ingress's clock runs ahead)",
            spikes.detector.ahead_windows,
        )
        skipped = CounterMetricFamily(
            PREFIX + "records_skipped",
            "records that could not be decoded, passed over, by stage",
            labels=["stage"],
        )
        last_batch = GaugeMetricFamily(
            PREFIX + "last_batch_timestamp_seconds",
            "unix time the stage last handled a batch of records (0: none yet)",
            labels=["stage"],
        )
        last_poll = GaugeMetricFamily(
            PREFIX + "last_poll_timestamp_seconds",
            "unix time the stage's loop last went round, with records or none (0: not "
            "yet): it stops moving when the stage is stuck",
            labels=["stage"],
        )
        for name, stage in self._stages.items():
            skipped.add_metric([name], float(stage.skipped))
            last_batch.add_metric([name], stage.last_batch_at)
            last_poll.add_metric([name], stage.last_poll_at)
        yield from (skipped, last_batch, last_poll)


def _windows(step: WindowsStep) -> Iterator[Metric]:
    yield _counter("windows_published", "windows published to the windows topic", step.published)
    yield _counter(
        "events_late",
        "calls that came after their window had closed (counted as the next window's "
        "late_events, not in their own)",
        step.late_events,
    )
    yield _counter(
        "events_ahead",
        "calls stamped over 1 s past the worker's clock (an ingress's clock runs ahead)",
        step.ahead_events,
    )


def _budgets(step: BudgetsStep) -> Iterator[Metric]:
    yield _counter("budget_alerts", "budget threshold alerts raised", step.alerts_raised)
    yield _counter(
        "budget_states_published",
        "budget states published to the budgets topic",
        step.states_published,
    )
    yield _counter(
        "budget_states_followed",
        "budget states read from the budgets topic (this worker's own, the store's rebuilds)",
        step.states_followed,
    )
    yield _counter(
        "budget_calls_late",
        "calls counted in no budget period: read after their budget rolled past the "
        "period they ended in",
        step.ledger.late,
    )


def worker_registry(costs: CostStage, spikes: SpikesStage) -> CollectorRegistry:
    """A registry of the worker's metrics (one per worker: tests run several)."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(costs, spikes))
    return registry
