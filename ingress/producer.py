"""The ingress's Kafka producer: connected, with llmtap's topics made, and stopped
within a bound (:class:`ingress.publisher.EventPublisher` sends through it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)

from llmtap import topics
from llmtap.kafka import Kafka

log = logging.getLogger(__name__)

# How long a flight gathers events before it is sent. Each flight costs the ingress
# a produce request and a batch per partition of each topic, whatever it holds: a
# process publishing two events a call at 500 calls/s used ~215 us of CPU a call with
# 20 ms flights, ~165 with 50 and ~145 with 100 (alternating runs; bench/NOTES.md, proxy
# overhead). Events reach Kafka up to that much later; nothing waits on them (budgets
# hold a settled cost until a published state counts it).
LINGER_MS = 50
CLOSE_TIMEOUT_S = 5.0  # for the producer to stop

# What making the topics raises while the broker is starting or away: asked again at
# the next connection. Anything else is a refusal, and events go on without them.
_NOT_YET = (
    topics.TopicsNotYet,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    OSError,
    TimeoutError,
)


async def connect(
    kafka: Kafka, request_timeout_ms: int, topic_partitions: int | None, topic_replicas: int
) -> AIOKafkaProducer | None:
    """A started producer, once the topics are made (:func:`topics_made`); None when
    the broker cannot be reached or is not ready yet (asked again later)."""
    producer = AIOKafkaProducer(
        **kafka.producer_options("ingress"),
        # Events are not on any call's path: let batches fill (bench/ingress_latency.py:
        # at 2 ms, batches of 2-4 events cost ~300 µs of CPU per call).
        linger_ms=LINGER_MS,
        max_batch_size=1 << 20,
        acks="all",
        request_timeout_ms=request_timeout_ms,
    )
    try:
        await producer.start()
    except (KafkaError, OSError) as exc:
        log.warning("broker not reachable at %s: %s", kafka.bootstrap, exc)
        await producer.stop()
        return None
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise
    try:
        made = await topics_made(kafka, topic_partitions, topic_replicas)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise
    if not made:
        await producer.stop()
        return None
    log.info("connected to broker at %s", kafka.bootstrap)
    return producer


async def topics_made(kafka: Kafka, partitions: int | None, replicas: int) -> bool:
    """Make llmtap's topics that are missing, as the worker and the store do: an
    ingress started beside them (compose starts all three at once) would otherwise
    have its first events make their topics through the broker's auto-creation, with
    the broker's defaults: the compacted reservations topic not compacted, every
    topic without ``topic_replication_factor``. False: the broker is not ready (asked
    again, as a connection is). A broker that refuses to make them (an ACL: topics
    an operator makes) is said, and the events go on to it. ``partitions`` None:
    topics are left to the worker and the store."""
    if partitions is None:
        return True
    try:
        await topics.ensure_topics(kafka, partitions, replicas)
    except _NOT_YET as exc:  # still starting, or away again: asked again
        log.warning("broker at %s not ready for llmtap: %r", kafka.bootstrap, exc)
        return False
    except Exception as exc:  # refused (ACLs, a Kafka-compatible service without
        # CreateTopics): topics are an operator's to make, events go on all the same
        log.error("cannot make llmtap's topics (%r); events are sent all the same", exc)
    return True


async def disconnect(producer: AIOKafkaProducer) -> None:
    """Stop the producer, settling what it has in flight, within ``CLOSE_TIMEOUT_S``."""
    try:
        await asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S)
    except (TimeoutError, KafkaError, OSError) as exc:
        log.warning("producer did not stop cleanly: %r", exc)
