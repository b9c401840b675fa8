"""The webhook dispatcher: alerts from Kafka into ClickHouse, then out to endpoints.

1. decode: bytes -> Alert, or a dead letter (kept in ``dead_letters``): an alert that
   does not validate, or whose numbers do not fit their columns, never blocks the rest;
2. store: each alert once in ``alerts`` (insert-if-absent on its id), and for each
   endpoint whose filters match it, a ``pending`` row in ``webhook_deliveries`` unless
   that delivery is recorded already (a replayed or duplicated alert adds nothing);
3. hand each new delivery to its endpoint's worker (never blocks; see worker.py);
4. commit the offsets, only after step 2 is durable.

Restarts: a delivery recorded without a final outcome (pending, or retrying) is resumed
by its endpoint's worker when the dispatcher is given its alert's partition, counting
the attempts already made, unless its sending began more than its endpoint's
``max_age_s`` ago (then dead-lettered unsent: worker.py). Deliveries of an endpoint no
longer configured are said once at start, per endpoint (one WARNING), and left unsent.
Each delivery is recorded with that partition, and only its owner sends it (worker.py):
with several store processes, each sends its partitions'.
Delivery is at least once: an attempt sent but not yet recorded when the process stops
(or gives its partition up) is sent again, with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from pydantic import ValidationError

from llmtap.config import Settings
from llmtap.config_sections import WebhookEndpoint
from llmtap.events import Alert, utcnow
from sinks.clickhouse.decode import DeadLetter
from sinks.consumer import consume_forever, sink_consumer
from sinks.webhooks import records
from sinks.webhooks.records import Job
from sinks.webhooks.worker import EndpointWorker, Owned
from sql.store import Store

log = logging.getLogger(__name__)

MAX_BATCH = 500


def matches(endpoint: WebhookEndpoint, alert: Alert) -> bool:
    """Whether an endpoint's filters (empty = all) let this alert through."""
    return (
        (not endpoint.alert_types or alert.alert_type in endpoint.alert_types)
        and (not endpoint.rules or alert.rule in endpoint.rules)
        and (not endpoint.dimensions or alert.dimension in endpoint.dimensions)
        and (not endpoint.values or alert.value in endpoint.values)
        and (not endpoint.tenants or alert.tenant in endpoint.tenants)
    )


@dataclass
class Decoded:
    alerts: list[Alert] = field(default_factory=list)
    letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # to commit
    partitions: dict[uuid.UUID, int] = field(default_factory=dict)  # alert id: read from


def decode(batch: list[ConsumerRecord[bytes, bytes]]) -> Decoded:
    decoded = Decoded()
    alerts, letters, offsets = decoded.alerts, decoded.letters, decoded.offsets
    for record in batch:
        offsets[TopicPartition(record.topic, record.partition)] = record.offset + 1
        raw = record.value or b""
        try:
            alert = Alert.model_validate_json(raw)
            error = records.out_of_range(alert)
        except ValidationError as exc:
            error = str(exc)
        if error:
            letters.append(
                DeadLetter(utcnow(), record.topic, record.partition, record.offset, raw, error)
            )
        else:
            alerts.append(alert)
            decoded.partitions.setdefault(alert.event_id, record.partition)
    return decoded


class _Handover(ConsumerRebalanceListener):  # type: ignore[misc]
    """Keeps :class:`Owned` to the alerts partitions the group gives this dispatcher.
    aiokafka waits for both before the rebalance goes on: losing partitions, every
    worker has stopped sending their deliveries before another process is given them."""

    def __init__(self, owned: Owned, workers: list[EndpointWorker]) -> None:
        self._owned = owned
        self._workers = workers

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.own(self._owned.partitions - {tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # Also what a consumer made again (consume_forever) is given: its first join
        # revokes nothing, so what the last one held and this one is not given goes here.
        await self.own(frozenset(tp.partition for tp in assigned))
        for worker in self._workers:
            worker.reassigned()

    async def own(self, partitions: frozenset[int]) -> None:
        """Own ``partitions`` only: every worker stops sending the others' deliveries."""
        self._owned.partitions = partitions
        await asyncio.gather(*(worker.revoke() for worker in self._workers))


class WebhookDispatcher:
    def __init__(self, settings: Settings, store: Store, group_id: str | None = None) -> None:
        self._settings = settings
        self._store = store
        self._group_id = group_id or settings.kafka.names.webhook_group
        allow = settings.webhook_allow_private
        self.owned = Owned()  # the alerts partitions this dispatcher is given
        self.workers = {
            e.name: EndpointWorker(e, store, allow_private=allow, owned=self.owned)
            for e in settings.webhooks
        }
        self.handover = _Handover(self.owned, list(self.workers.values()))
        self.alerts_read = 0
        self.redelivering = asyncio.Lock()  # `llmtap alerts redeliver`s, one at a time

    def _consumer(self) -> AIOKafkaConsumer:
        kafka = self._settings.kafka
        return sink_consumer(
            kafka.names.alerts, kafka, self._group_id, "store-webhooks", listener=self.handover
        )

    async def run(self) -> None:
        """Consume until cancelled (reconnecting if the broker goes away); workers alongside."""
        await self._warn_of_orphans()
        tasks = [
            asyncio.create_task(w.run(), name=f"webhook-{name}") for name, w in self.workers.items()
        ]
        try:
            await consume_forever(self._consumer, self._consume, "webhook dispatcher")
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _warn_of_orphans(self) -> None:
        """One WARNING per endpoint not configured that has unfinished deliveries: no
        worker sends them."""
        try:
            orphans = await asyncio.to_thread(records.orphaned, self._store, list(self.workers))
        except Exception as exc:  # a warning only: no reason not to start
            log.warning("counting deliveries of endpoints not configured failed (%s)", exc)
            return
        for name, count in orphans.items():
            log.warning(
                "webhook %s: not configured (renamed or removed), %d unfinished deliveries "
                "of it stay unsent; configure it again under that name to send those begun "
                "less than its max_age_s ago (a day by default), the older are dead-lettered",
                name,
                count,
            )

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        try:
            await self._consume_batches(consumer)
        finally:
            # The consumer stops (the broker went away, or the dispatcher does): aiokafka
            # revokes nothing then, but the group gives its partitions to others.
            await self.handover.own(frozenset())

    async def _consume_batches(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            fetched = await consumer.getmany(timeout_ms=1000, max_records=MAX_BATCH)
            batch = [r for partition in fetched.values() for r in partition]
            if not batch:
                continue
            decoded = decode(batch)
            alerts, partitions = decoded.alerts, decoded.partitions
            wanted = [(e.name, a) for a in alerts for e in self._settings.webhooks if matches(e, a)]
            stored = await records.durably(
                "storing alerts",
                records.store_batch,
                self._store,
                alerts,
                wanted,
                decoded.letters,
                partitions,
            )
            self.alerts_read += len(alerts)
            for name, alert in stored.new:  # each partition's in the order read
                self.workers[name].offer(Job(alert, partition=partitions[alert.event_id]))
            for name, alert_id in stored.unfinished:
                if name in self.workers:
                    self.workers[name].resume(alert_id)
            # Only the partitions still held: committing one a rebalance took meanwhile
            # is refused (IllegalStateError), which would tear the consumer down.
            held = consumer.assignment()
            offsets = {tp: o for tp, o in decoded.offsets.items() if tp in held}
            try:
                if offsets:
                    await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                # Another dispatcher owns these partitions now; it re-reads them, and the
                # stored rows keep it from storing anything twice. Their deliveries are
                # its to send: this one's workers dropped them when they were revoked.
                log.warning("commit after storing alerts failed (%s)", exc)
