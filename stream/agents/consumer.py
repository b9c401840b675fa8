"""The aiokafka group consumer the worker's stages read with, and the rebalance listener
that stops a stage whose handover failed.

The stages (stream/agents/costs.py, spikes.py) read whole fetched batches with
``getmany`` instead of Faust's per-event stream (~70 µs an event before any work,
bench/stream_floor.py), so each owns a consumer in its group, built here with the
worker's group timings.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

from llmtap import topics
from llmtap.config import Settings

log = logging.getLogger(__name__)

Handover = Callable[[list[TopicPartition]], Awaitable[None]]


def group_consumer(settings: Settings, group_id: str) -> AIOKafkaConsumer:
    """A consumer in ``group_id`` that commits only when told, starts a group with no
    offsets at the beginning, and joins and leaves as fast as the worker's settings say
    (Tansu and a small Kafka answer fast)."""
    session_ms = int(settings.stream_session_timeout_s * 1000)
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        rebalance_timeout_ms=session_ms,
        heartbeat_interval_ms=int(settings.stream_heartbeat_interval_s * 1000),
        fetch_max_wait_ms=topics.FETCH_MAX_WAIT_MS,
    )


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """Calls ``revoked`` and ``assigned`` at each rebalance; if one raises, ``crash``.

    aiokafka logs and swallows what a callback raises: a stage that could not hand
    partitions over or take them over cleanly stops instead (`llmtap up` with it).
    """

    def __init__(
        self,
        revoked: Handover,
        assigned: Handover,
        crash: Callable[[BaseException], Awaitable[None]],
    ) -> None:
        self._revoked = revoked
        self._assigned = assigned
        self._crash = crash

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        try:
            await self._revoked(revoked)
        except Exception as exc:
            log.exception("giving partitions up failed")
            await self._crash(exc)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        try:
            await self._assigned(assigned)
        except Exception as exc:
            log.exception("taking partitions over failed")
            await self._crash(exc)
