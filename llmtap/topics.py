"""Kafka topic names and partition keys.

| topic             | value          | key          | written by | read by            |
|-------------------|----------------|--------------|------------|--------------------|
| llmtap.requests   | RequestEvent   | request_id   | ingress    | stream (budgets)   |
| llmtap.responses  | ResponseEvent  | request_id   | ingress    | stream (costs)     |
| llmtap.costed     | CostedEvent    | request_id   | stream     | sinks (ClickHouse) |
| llmtap.alerts     | Alert          | alert id     | stream     | sinks (webhooks)   |

Consumer groups: ``llmtap-stream`` (the Faust worker), ``llmtap-sink`` (the writer),
``llmtap-webhooks`` (alert delivery).

Keying by ``request_id`` keeps both events of one call, and every replay of them, on
one partition: the stage that owns that partition sees duplicates and can drop them.
"""

from __future__ import annotations

import logging
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

REQUESTS = "llmtap.requests"
RESPONSES = "llmtap.responses"
COSTED = "llmtap.costed"
ALERTS = "llmtap.alerts"

ALL = (REQUESTS, RESPONSES, COSTED, ALERTS)

# Consumer groups. Faust's group id is its app id.
STREAM_GROUP = "llmtap-stream"
SINK_GROUP = "llmtap-sink"
WEBHOOK_GROUP = "llmtap-webhooks"

log = logging.getLogger(__name__)


def partition_key(request_id: uuid.UUID) -> bytes:
    return str(request_id).encode()


async def ensure_topics(bootstrap: str, partitions: int) -> None:
    """Create llmtap's topics if they do not exist yet (idempotent)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in ALL if name not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(name, num_partitions=partitions, replication_factor=1)
                        for name in missing
                    ]
                )
            except TopicAlreadyExistsError:
                pass  # another process won the race
            log.info("created topics %s with %d partitions", missing, partitions)
    finally:
        await admin.close()


async def lag(bootstrap: str, group_id: str, topic: str) -> int:
    """Messages on ``topic`` not yet committed by consumer group ``group_id``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5_000)
    await admin.start()
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        ends = await consumer.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group_id, partitions=tps)
        return sum(
            end - max(0, committed[tp].offset if tp in committed else 0) for tp, end in ends.items()
        )
    finally:
        await consumer.stop()
        await admin.close()
