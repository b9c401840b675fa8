"""Exact replay of the writer's inserts into ``calls`` after a crash.

An insert into ``calls`` fills every materialized view on it too, not atomically: a
store killed mid-insert can leave the rows in ``calls`` and some view without them.
The Kafka offsets were not committed, so the writer reads those messages again; but a
new batch would drop them as stored already (the duplicate check), and the views
would never get them. So before each insert the writer records it (``calls_inserts``:
its offset ranges, its token, the ids it left out), and a writer given partitions
first repeats every recorded insert its consumer group has not committed: it reads the
same ranges, rebuilds the same rows, and makes the insert again with the same token.
"Committed" is what the broker says, or what the writer recorded after its commit
(``calls_commits``): a broker that kept nothing over a restart forgets its commits.
``calls`` drops it; each view's table drops it or, if it lacks it, takes it
(sinks/clickhouse/write.py, sql/migrations/0009_exact_replay.sql).

Only the latest ``LATEST`` records of a group are looked at: a partition has one
writer at a time, which commits after each insert, so an uncommitted one is among the
last its group made before the writer given its partitions looks (a session later,
every other writer of the group inserting meanwhile: with eight writers, the 100 looked
at before had lost it by then, and 900 a minute later). And no further: the tables
remember ten thousand tokens (migration 0020), and a repeat must be within them to be
dropped (a thousand are left for the inserts made while it is repeated).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from llmtap import names, topics
from llmtap.events import utcnow
from llmtap.kafka import Kafka
from sinks.clickhouse.decode import Range, Run, decode_batch, runs_of
from sinks.clickhouse.write import CallsInsert, calls_insert, insert_calls
from sql.store import Store, render

log = logging.getLogger(__name__)

LATEST = 9000
# A broker that answers nothing for this long while a range is read back is slow, not
# empty: the read fails, and the writer tries the repeat again (messages are gone only
# when the broker says so). The writer's group heartbeats meanwhile (llmtap/heartbeats.py).
SILENCE_S = 5.0


def costed_ranges(spans: Mapping[TopicPartition, tuple[int, int]]) -> tuple[Range, ...]:
    """The ranges of the costed topic's partitions among ``spans`` (partition: first
    offset, next offset), in partition order."""
    return tuple(
        (tp.topic, tp.partition, first, next_offset)
        for tp, (first, next_offset) in sorted(spans.items())
        if names.kind(tp.topic) == "costed"
    )


@dataclass(frozen=True)
class Recorded:
    """An insert into ``calls`` as recorded before it was made."""

    token: str
    ranges: tuple[Range, ...]
    left_out: tuple[str, ...]


def record(store: Store, group: str, insert: CallsInsert, ranges: tuple[Range, ...]) -> None:
    """Record an insert before making it."""
    store.insert(
        "calls_inserts",
        [(utcnow(), group, insert.token, list(ranges), list(insert.left_out))],
        ("created", "consumer_group", "token", "ranges", "skipped"),
    )


def record_commits(store: Store, group: str, tokens: Iterable[str]) -> None:
    """Record that recorded inserts' offsets were committed: they need no repeat, even
    once the broker has forgotten the commit (a broker that kept nothing). An insert
    reported lost is recorded so too: nothing more can be done for it."""
    now = utcnow()
    store.insert(
        "calls_commits",
        [(now, group, token) for token in tokens],
        ("committed", "consumer_group", "token"),
    )


class Uncommitted:
    """A writer's recorded inserts (made, or repeated) whose offsets it has not yet
    committed, by token: each is known committed once the group's commits pass the end
    of every range it holds, by the batch that made it or by a later one (a repeated
    insert, or one whose own commit failed, is committed past by the batches after)."""

    def __init__(self) -> None:
        self._ranges: dict[str, tuple[Range, ...]] = {}
        self._committed: dict[TopicPartition, int] = {}

    def add(self, token: str, ranges: tuple[Range, ...]) -> None:
        self._ranges[token] = ranges

    def commit(self, offsets: Mapping[TopicPartition, int]) -> list[str]:
        """The group committed ``offsets`` (partition: next offset): the tokens now
        committed past, no longer held."""
        self._committed.update(offsets)
        done = [
            token
            for token, ranges in self._ranges.items()
            if all(nxt <= self._committed.get(TopicPartition(t, p), -1) for t, p, _, nxt in ranges)
        ]
        for token in done:
            del self._ranges[token]
        return done

    def keep(self, tokens: Iterable[str]) -> None:
        """Hold ``tokens`` again: recording their commit failed (asked again next time)."""
        for token in tokens:
            self._ranges.setdefault(token, ())

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions moved to another writer: what it commits there is its own."""
        gone = set(partitions)
        for tp in gone:
            self._committed.pop(tp, None)
        self._ranges = {
            token: ranges
            for token, ranges in self._ranges.items()
            if not any(TopicPartition(t, p) in gone for t, p, _, _ in ranges)
        }


def latest(store: Store, group: str) -> list[Recorded]:
    """The group's latest recorded inserts not recorded as committed, oldest first."""
    rows = store.rows(render("calls_inserts_latest"), {"consumer_group": group, "latest": LATEST})
    return [
        Recorded(
            r["token"],
            tuple(
                (x["topic"], int(x["partition"]), int(x["first"]), int(x["next"]))
                for x in r["ranges"]  # named tuples come back as dicts
            ),
            tuple(str(i) for i in r["skipped"]),
        )
        for r in reversed(rows)
    ]


def uncommitted(
    recorded: Iterable[Recorded],
    committed: Mapping[TopicPartition, int],
    assigned: set[TopicPartition],
) -> list[Recorded]:
    """The recorded inserts on ``assigned`` partitions with offsets beyond what the
    group has committed there (-1 or missing: nothing committed)."""
    return [
        r
        for r in recorded
        if any(TopicPartition(t, p) in assigned for t, p, _, _ in r.ranges)
        and any(nxt > committed.get(TopicPartition(t, p), -1) for t, p, _, nxt in r.ranges)
    ]


async def committed_offsets(
    kafka: Kafka, group: str, partitions: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    admin = AIOKafkaAdminClient(**kafka.client_options("admin"), request_timeout_ms=10_000)
    await admin.start()
    try:
        found = await admin.list_consumer_group_offsets(group, partitions=list(partitions))
        return {tp: meta.offset for tp, meta in found.items()}
    finally:
        await admin.close()


async def read_ranges(kafka: Kafka, ranges: Iterable[Range]) -> list[Run] | None:
    """The messages in ``ranges`` (no consumer group), as runs in the order the writer
    reads them (:class:`sinks.clickhouse.decode.Run`); None
    if the broker says some are not there any more. A broker silent for ``SILENCE_S``
    raises TimeoutError: its messages may all be there."""
    spans = {TopicPartition(t, p): (first, nxt) for t, p, first, nxt in ranges}
    found, complete = await topics.read_spans(
        kafka, spans, idle_ms=int(SILENCE_S * 1000), patient=True
    )
    if not complete:
        return None
    return runs_of((r.topic, r.partition, r.offset, r.value or b"") for r in found)


def rebuilt(recorded: Recorded, runs: list[Run]) -> CallsInsert | None:
    """The recorded insert made again from its messages; None if they give other rows
    (the broker lost them and its offsets now hold other messages)."""
    insert = calls_insert(decode_batch(runs).calls, recorded.left_out)
    return insert if insert.token == recorded.token else None


async def repeat_uncommitted(
    store: Store, kafka: Kafka, group: str, assigned: set[TopicPartition]
) -> tuple[list[Recorded], int]:
    """Repeat the group's uncommitted recorded inserts on ``assigned`` partitions;
    return those repeated and how many could not be (their messages gone)."""
    recorded = await asyncio.to_thread(latest, store, group)
    if not recorded:
        return [], 0
    partitions = {TopicPartition(t, p) for r in recorded for t, p, _, _ in r.ranges}
    committed = await committed_offsets(kafka, group, partitions)
    repeated: list[Recorded] = []
    lost: list[str] = []
    for r in uncommitted(recorded, committed, assigned):
        runs = await read_ranges(kafka, r.ranges)
        insert = rebuilt(r, runs) if runs is not None else None
        if insert is None:
            lost.append(r.token)
            log.error(
                "an insert into calls (token %s, offsets %s) cannot be repeated: its "
                "messages are gone from the broker; if it was cut short, a rollup may "
                "lack its rows",
                r.token,
                r.ranges,
            )
            continue
        await asyncio.to_thread(insert_calls, store, insert)
        repeated.append(r)
    if lost:  # reported once: recorded as done with, so no later start reports it again
        await asyncio.to_thread(record_commits, store, group, lost)
    if repeated:
        log.warning("repeated %d uncommitted inserts into calls", len(repeated))
    return repeated, len(lost)
