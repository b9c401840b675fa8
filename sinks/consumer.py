"""What every sink's Kafka side shares: an explicit-commit consumer, run until cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from llmtap.kafka import Kafka

log = logging.getLogger(__name__)

RECONNECT_S = 1.0


def sink_consumer(
    topic: str | list[str],
    kafka: Kafka,
    group_id: str,
    client: str,
    max_poll_records: int | None = None,
    listener: ConsumerRebalanceListener | None = None,
) -> AIOKafkaConsumer:
    """A consumer (of one topic or several) whose offsets the sink commits itself, after
    its work is durable; ``listener`` hears of the partitions it is given and loses."""
    consumer = AIOKafkaConsumer(
        **kafka.consumer_options(client),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_poll_records,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        # A member repeating inserts a crash cut short, heartbeating meanwhile
        # (llmtap/heartbeats.py), cannot rejoin before that is done: a rebalance waits
        # for it as long as Kafka's Java client would, not the session's 10 s.
        rebalance_timeout_ms=300_000,
        max_poll_interval_ms=3_600_000,  # a long ClickHouse outage must not evict the sink
    )
    consumer.subscribe([topic] if isinstance(topic, str) else topic, listener=listener)
    return consumer


async def consume_forever(
    make: Callable[[], AIOKafkaConsumer],
    consume: Callable[[AIOKafkaConsumer], Awaitable[None]],
    what: str,
    closing: Callable[[], None] = lambda: None,
) -> None:
    """Run ``consume`` on a fresh, started consumer until cancelled; when the broker goes
    away, start over (uncommitted messages are read again). ``closing`` is called as
    each consumer is about to stop: aiokafka's stop waits for a rebalance callback under
    way, which must end then."""
    while True:
        consumer = make()
        try:
            await consumer.start()
            log.info("%s consuming", what)
            await consume(consumer)
        except KafkaError as exc:
            log.warning("%s lost the broker (%s); reconnecting", what, exc)
            await asyncio.sleep(RECONNECT_S)
        finally:
            closing()
            await consumer.stop()
