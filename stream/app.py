"""The stream worker: one process runs the cost stage (responses -> costed, with the
windows and budgets steps; stream/agents/costs.py), the spikes stage (windows ->
alerts; stream/agents/spikes.py) and the Faust app around them (the worker's
lifecycle, and the budgets step's topics and its timer that rolls budget periods)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust

from llmtap.config import Settings
from llmtap.runtime import tune_gc
from llmtap.stopping import unless_stopped
from stream.agents import budgets, windows
from stream.agents.costs import CostStage
from stream.agents.spikes import SpikesStage
from stream.catalog import load_catalog
from stream.detector import Detector
from stream.ledger import Ledger
from stream.transport import StreamApp
from stream.warmup import spike_settle, warmed_detector
from stream.web import WorkerWeb

log = logging.getLogger(__name__)


def ready_file(settings: Settings) -> Path:
    return settings.run_dir / "worker.ready"


def create_app(
    settings: Settings, detector: Detector | None = None
) -> tuple[faust.App, CostStage, SpikesStage]:
    """The Faust app and the stages its worker runs beside it."""
    # Faust makes its datadir (<data_dir>/faust) as the worker starts, but not the
    # directories above it: a data_dir not made yet (no `llmtap up` before, no image
    # that made it) crashed the worker with FileNotFoundError.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = StreamApp(
        settings.kafka.names.worker_app,
        broker=settings.kafka.faust_brokers(),
        broker_client_id=settings.kafka.names.client_id("worker"),
        broker_credentials=settings.kafka.faust_credentials(),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=settings.topic_partitions,
        topic_disable_leader=True,
        producer_linger_ms=2,
        producer_compression_type=settings.kafka.codec,
    )
    stage = CostStage(settings, load_catalog(settings.pricing_file))
    grace = timedelta(seconds=settings.window_grace_s)
    counting = windows.WindowsStep(settings.kafka, settings.window_sizes_s, grace)
    stage.steps.append(counting)
    stage.positions.holding = counting
    if settings.budgets:
        stage.whole = True
        stage.steps.append(
            budgets.BudgetsStep(
                app, Ledger(settings.budgets), settings.kafka, read_up_to=stage.read_up_to
            )
        )
    if detector is None:
        settle = spike_settle(settings)
        detector = Detector(settings.spike_rules, settings.topic_partitions, settle)
    return app, stage, SpikesStage(settings, detector)


class StreamWorker(faust.Worker):
    """A Faust worker running the stages too, and their /metrics and /healthz
    (stream/web.py; none when worker_metrics_port is 0), that leaves a ready file once
    the cost stage has its partitions."""

    def __init__(
        self, app: faust.App, stage: CostStage, spikes: SpikesStage, settings: Settings
    ) -> None:
        # Before the stages: it answers while they start, and serves their last counts
        # until they stopped (services stop in reverse).
        served = [WorkerWeb(settings, stage, spikes)] if settings.worker_metrics_port else []
        # The JSON lines every llmtap process logs (llmtap/logs.py, set up by the CLI),
        # not mode's colored ones, and no terminal spinner.
        super().__init__(
            app,
            *served,
            stage,
            spikes,
            loglevel=settings.log_level,
            quiet=True,
            override_logging=False,
        )
        self.spinner = None
        self._stage = stage
        self._ready = ready_file(settings)
        self._ready.unlink(missing_ok=True)

    def on_init_dependencies(self) -> Iterable[Any]:
        """The app first, then the stages: services stop in reverse, so the cost stage
        finishes its last batch (budget states sent through the app's producer) and
        commits before the app stops."""
        dependencies = list(super().on_init_dependencies())
        return [self.app, *(d for d in dependencies if d is not self.app)]

    async def on_startup_finished(self) -> None:
        """Called by the app as it finishes starting, before the stages start: the
        ready file waits for the cost stage's partitions in a task of its own (the
        spikes stage reads from its group's committed offsets whenever it joins)."""
        await super().on_startup_finished()
        self.add_future(self._ready_once_assigned())

    async def _ready_once_assigned(self) -> None:
        await self._stage.assigned.wait()
        if self.should_stop:  # set as its stop begins, before on_stop removes the file
            return  # a file written now would outlive the worker (a Ctrl-C just after start)
        self._ready.parent.mkdir(parents=True, exist_ok=True)
        self._ready.write_text("ready\n")
        log.info("stream worker ready")

    async def on_stop(self) -> None:
        self._ready.unlink(missing_ok=True)
        await super().on_stop()


def run(settings: Settings) -> None:
    """The worker, until stopped; :class:`Stopped` if SIGTERM or SIGINT comes before
    Faust's worker has handlers of its own (while the spike baselines are read back)."""
    # Warmed with no rules too: the spike alerts still open of rules removed are resolved.
    detector = asyncio.run(unless_stopped(warmed_detector(settings)))
    app, stage, spikes = create_app(settings, detector)
    tune_gc()
    StreamWorker(app, stage, spikes, settings).execute_from_commandline()
