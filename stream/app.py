"""The Faust app: one worker process runs every stream agent."""

from __future__ import annotations

import logging
from pathlib import Path

import faust

from llmtap import topics
from llmtap.config import Settings
from stream.agents import costs
from stream.pricing import load_catalog

log = logging.getLogger(__name__)


def ready_file(settings: Settings) -> Path:
    return settings.run_dir / "worker.ready"


def create_app(settings: Settings) -> faust.App:
    brokers = [f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")]
    session_ms = settings.stream_session_timeout_s
    app = faust.App(
        topics.STREAM_GROUP,
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
    costs.register(app, load_catalog(settings.pricing_file))
    return app


class StreamWorker(faust.Worker):
    """A Faust worker that leaves a ready file once its partitions are assigned."""

    def __init__(self, app: faust.App, settings: Settings) -> None:
        super().__init__(app, loglevel=settings.log_level, quiet=True)
        self._ready = ready_file(settings)
        self._ready.unlink(missing_ok=True)

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        self._ready.parent.mkdir(parents=True, exist_ok=True)
        self._ready.write_text("ready\n")
        log.info("stream worker ready")

    async def on_stop(self) -> None:
        self._ready.unlink(missing_ok=True)
        await super().on_stop()


def run(settings: Settings) -> None:
    StreamWorker(create_app(settings), settings).execute_from_commandline()
