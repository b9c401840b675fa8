"""The stream worker: one process runs the cost stage (responses -> costed, with the
windows and budgets steps; stream/agents/costs.py) and the Faust app around it (the
spikes agent, and the timers that close windows and roll budget periods)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
from pydantic import ValidationError

from llmtap import topics
from llmtap.config import Settings
from llmtap.events import BudgetState
from llmtap.runtime import tune_gc
from stream.agents import budgets, spikes, windows
from stream.agents.costs import CostStage
from stream.budgets import Ledger
from stream.detector import Detector
from stream.pricing import load_catalog
from stream.transport import StreamApp
from stream.warmup import spike_settle, warmed_detector

log = logging.getLogger(__name__)


def ready_file(settings: Settings) -> Path:
    return settings.run_dir / "worker.ready"


def create_app(
    settings: Settings, ledger: Ledger | None = None, detector: Detector | None = None
) -> tuple[faust.App, CostStage]:
    """The Faust app and the cost stage its worker runs beside it."""
    brokers = [f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")]
    session_ms = settings.stream_session_timeout_s
    app = StreamApp(
        topics.SPIKES_GROUP,
        broker=brokers,
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        # Tansu (and a small Kafka) answer fast: short timeouts make a worker join
        # its group in a few seconds instead of the ~30 s the defaults take.
        broker_session_timeout=session_ms,
        broker_heartbeat_interval=settings.stream_heartbeat_interval_s,
        broker_rebalance_timeout=session_ms,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        producer_linger_ms=2,
    )
    stage = CostStage(settings, load_catalog(settings.pricing_file))
    grace = timedelta(seconds=settings.window_grace_s)
    counting = windows.WindowsStep(settings.kafka_bootstrap, settings.window_sizes_s, grace)
    stage.steps.append(counting)
    stage.positions.holding = counting
    if settings.budgets:
        stage.steps.append(
            budgets.BudgetsStep(app, ledger if ledger is not None else Ledger(settings.budgets))
        )
    if detector is None:
        settle = spike_settle(settings)
        detector = Detector(settings.spike_rules, settings.topic_partitions, settle)
    # Registered without rules too (it judges nothing then): the app's consumer needs a
    # topic to follow.
    spikes.register(app, detector)
    return app, stage


async def load_budget_states(settings: Settings) -> Ledger:
    """A ledger seeded with the budgets topic's latest states (the worker's own earlier
    output, or the store's rebuild from ClickHouse), read before any event is counted."""
    ledger = Ledger(settings.budgets)
    for raw in await topics.read_all(settings.kafka_bootstrap, topics.BUDGETS):
        try:
            ledger.seed(BudgetState.model_validate_json(raw))
        except ValidationError as exc:
            log.error("unreadable budget state skipped: %s", exc.errors()[:1])
    return ledger


class StreamWorker(faust.Worker):
    """A Faust worker running the cost stage too, that leaves a ready file once both
    have their partitions."""

    def __init__(self, app: faust.App, stage: CostStage, settings: Settings) -> None:
        super().__init__(app, stage, loglevel=settings.log_level, quiet=True)
        self._stage = stage
        self._ready = ready_file(settings)
        self._ready.unlink(missing_ok=True)

    def on_init_dependencies(self) -> Iterable[Any]:
        """The app first, then the cost stage: services stop in reverse, so the stage
        finishes its last batch (budget states sent through the app's producer) and
        commits before the app stops."""
        dependencies = list(super().on_init_dependencies())
        return [self.app, *(d for d in dependencies if d is not self.app)]

    async def on_startup_finished(self) -> None:
        """Called by the app as it finishes starting, before the stage starts: the
        ready file waits for the stage's partitions in a task of its own."""
        await super().on_startup_finished()
        self.add_future(self._ready_once_assigned())

    async def _ready_once_assigned(self) -> None:
        await self._stage.assigned.wait()
        self._ready.parent.mkdir(parents=True, exist_ok=True)
        self._ready.write_text("ready\n")
        log.info("stream worker ready")

    async def on_stop(self) -> None:
        self._ready.unlink(missing_ok=True)
        await super().on_stop()


def run(settings: Settings) -> None:
    ledger = asyncio.run(load_budget_states(settings)) if settings.budgets else None
    detector = asyncio.run(warmed_detector(settings)) if settings.spike_rules else None
    app, stage = create_app(settings, ledger, detector)
    tune_gc()
    StreamWorker(app, stage, settings).execute_from_commandline()
