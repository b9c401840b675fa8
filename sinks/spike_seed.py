"""The spike alerts open in ClickHouse, published again when the store starts.

A restarted stream worker learns which spikes the receivers were told are firing from
the alerts topic (stream/warmup.py, stream/reconcile.py), and resolves those nothing
judges any more. The embedded broker forgets everything when it stops: so the store,
the one process that can read ClickHouse in embedded mode, publishes the open ones
(each firing alert with no resolve after it, per rule and series) before the worker
starts (`llmtap up` starts it once the store is ready). Published again, an alert has
its id: the store and the webhooks take it once, as they take a replayed one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from llmtap import topics
from llmtap.events import Alert
from llmtap.kafka import Kafka
from sql.store import Store, render

log = logging.getLogger(__name__)


def open_spikes(store: Store) -> list[Alert]:
    """The spike alerts open (as published: each row's payload); one that no longer
    validates (a payload of an older llmtap) is logged and left out."""
    alerts = []
    for row in store.rows(render("spikes_open"), {"alert_type": "spike"}):
        try:
            alerts.append(Alert.model_validate_json(row["payload"]))
        except ValueError as exc:
            log.error("an open spike alert could not be read back: %s", exc)
    return alerts


async def publish_open(kafka: Kafka, alerts: Sequence[Alert]) -> bool:
    """Publish ``alerts`` again on the alerts topic; whether all were published."""
    producer = AIOKafkaProducer(**kafka.producer_options("store-spikes"), request_timeout_ms=10_000)
    try:
        await producer.start()
        for alert in alerts:
            await producer.send_and_wait(
                kafka.names.alerts, alert.model_dump_json().encode(), key=topics.alert_key(alert)
            )
    except KafkaError as exc:
        log.error("could not publish the open spike alerts again: %s", exc)
        return False
    finally:
        await producer.stop()
    return True


async def publish_open_until_sent(
    kafka: Kafka, alerts: Sequence[Alert], backoff: float = 1.0, max_backoff: float = 30.0
) -> None:
    """:func:`publish_open` again, with backoff, until published (the broker was down
    when the store started)."""
    while not await publish_open(kafka, alerts):
        log.info("publishing the open spike alerts again in %.0fs", backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
