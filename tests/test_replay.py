"""An insert into ``calls`` cut short (``calls`` has the rows, a view does not) is
repeated exactly: by the writer retrying it, and by a writer that takes over from a
crashed one before its commit. Real broker (Tansu), real store (chDB).

A view made to fail on demand cuts an insert short: a test-only materialized view on
``calls`` into a table with a CHECK constraint the test's calls break, dropped later.
ClickHouse stores the ``calls`` part and then fails in the view, exactly as when a
view's disk fails or the store is killed between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from llmtap import topics
from llmtap.config import Settings
from llmtap.events import Attribution, CostedEvent, utcnow
from llmtap.kafka import Kafka
from llmtap.names import Names
from sinks.clickhouse import replay
from sinks.clickhouse.decode import Batch, Range, Run, decode_batch, runs_of
from sinks.clickhouse.write import calls_insert, insert_calls, prepare_calls
from sinks.clickhouse.writer import ClickHouseWriter, HandoverFailed
from sql.store import Store
from tests import sample
from tests.conftest import Broker, start_broker

FEATURE = "cut-short"


def call() -> CostedEvent:
    who = Attribution(tenant="acme", team="search", feature=FEATURE, properties={"plan": "pro"})
    event = sample.response(attribution=who)
    return sample.costed(event, sample.cost("0.000025", "0.00005"))


def arm_trap(store: Store) -> None:
    """From now on every insert into ``calls`` of a call with FEATURE fails in a view,
    after ``calls`` took it."""
    store.command(
        "CREATE TABLE trap (feature String, CONSTRAINT armed CHECK feature != 'cut-short') "
        "ENGINE = MergeTree ORDER BY feature "
        "SETTINGS non_replicated_deduplication_window = 1000"
    )
    store.command("CREATE MATERIALIZED VIEW trap_mv TO trap AS SELECT feature FROM calls")


def disarm_trap(store: Store) -> None:
    store.command("ALTER TABLE trap DROP CONSTRAINT armed")


def view_tables(store: Store) -> list[str]:
    """The table each materialized view on ``calls`` writes to."""
    views = store.rows(
        "SELECT dependencies_table AS views FROM system.tables "
        "WHERE database = currentDatabase() AND name = 'calls'"
    )[0]["views"]
    tables = []
    for view in views:
        query = described(store, view, "create_table_query")
        match = re.search(r"\bTO (?:\w+\.)?(\w+)", query)
        assert match, query
        tables.append(match.group(1))
    return sorted(tables)


def described(store: Store, table: str, column: str) -> str:
    """One of the table's ``system.tables`` columns."""
    row = store.rows(
        f"SELECT {column} AS value FROM system.tables "
        "WHERE database = currentDatabase() AND name = {table:String}",
        {"table": table},
    )
    return str(row[0]["value"])


def rollup_requests(store: Store) -> dict[str, int]:
    """The calls each rollup counts (each call has one property, so the property rollup
    counts each once too)."""
    counts = {}
    for table in view_tables(store):
        if table != "trap":
            total = store.rows(f"SELECT sum(requests) AS n FROM {table}")
            counts[table] = int(total[0]["n"] or 0)
    return counts


def calls(store: Store) -> int:
    return int(store.command("SELECT count() FROM calls"))


def test_every_view_on_calls_writes_to_a_table_that_remembers_tokens(store: Store) -> None:
    """A repeated insert is dropped only by a table with a deduplication window: one
    without would count the repeat twice (sql/migrations/0009_exact_replay.sql)."""
    tables = view_tables(store)
    assert len(tables) == 9
    for table in ["calls", *tables]:
        engine = described(store, table, "engine_full")
        window = re.search(r"non_replicated_deduplication_window = (\d+)", engine)
        # a repeat of the oldest insert looked at is dropped, with inserts made meanwhile
        assert window and int(window.group(1)) >= replay.LATEST + 1000, table


def test_an_insert_cut_short_and_repeated_fills_every_view_once(store: Store) -> None:
    arm_trap(store)
    batch = Batch(events=[call() for _ in range(30)])
    insert = prepare_calls(store, batch)
    with pytest.raises(Exception, match="armed"):
        insert_calls(store, insert)
    assert calls(store) == 30  # cut short: `calls` has the rows...
    assert set(rollup_requests(store).values()) != {30}  # ...and some view does not
    # Deciding the insert again would leave every row out (all "stored already"):
    assert prepare_calls(store, batch).rows == 0

    disarm_trap(store)
    insert_calls(store, insert)  # the writer's retry: the same insert
    expected = dict.fromkeys(rollup_requests(store), 30)
    assert calls(store) == 30
    assert rollup_requests(store) == expected
    assert int(store.command("SELECT count() FROM trap")) == 30

    insert_calls(store, insert)  # and once more: nothing changes
    assert calls(store) == 30
    assert rollup_requests(store) == expected


async def produce(bootstrap: str, events: list[CostedEvent]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for event in events:
            await producer.send(
                Names().costed, event.model_dump_json().encode(), key=str(uuid.uuid4()).encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a readiness condition for up to 30 s."""
    try:
        async with asyncio.timeout(30):
            while not predicate():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within 30 s: {what}") from None


@contextlib.asynccontextmanager
async def running(writer: ClickHouseWriter) -> AsyncIterator[ClickHouseWriter]:
    task = asyncio.create_task(writer.run())
    try:
        yield writer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_writer_repeats_the_insert_its_crashed_predecessor_cut_short(store: Store) -> None:
    """The first writer's insert is cut short and it dies before committing; calls go
    on meanwhile. Its successor, given the partitions, repeats that insert (the same
    rows, from the recorded offset ranges), then reads on: every view counts every
    call once. Reading on alone would drop the cut-short rows as stored already.
    (A broker of its own: what it leaves on the topics is no other test's business.)"""
    async with start_broker() as broker:
        await cut_short_then_taken_over(broker, store)


async def cut_short(bootstrap: str, settings: Settings, store: Store) -> None:
    """40 calls, whose writer's insert is cut short (the trap left armed) before it dies
    without committing."""
    arm_trap(store)
    await produce(bootstrap, [call() for _ in range(40)])
    first = ClickHouseWriter(settings, store)
    async with running(first):
        await until(lambda: first.write_failures >= 1, "an insert cut short")


async def cut_short_then_taken_over(broker: Broker, store: Store) -> None:
    settings = Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3)
    await cut_short(broker.bootstrap, settings, store)
    assert calls(store) == 40
    assert set(rollup_requests(store).values()) != {40}

    later_calls = [call() for _ in range(25)]
    await produce(broker.bootstrap, later_calls)  # its successor's batch differs
    disarm_trap(store)
    second = ClickHouseWriter(settings, store)
    async with running(second):
        await until(lambda: calls(store) == 65, "every call stored")
        written = second.batches_written
        await produce(broker.bootstrap, [call()])
        await until(lambda: second.batches_written > written and calls(store) == 66, "one more")
        # The repeated insert is committed past by the batches after it, and recorded so:
        # a broker that forgot every commit would find nothing to repeat or count lost.
        group = settings.kafka.names.sink_group
        await until(lambda: not replay.latest(store, group), "every insert's commit recorded")
    assert rollup_requests(store) == dict.fromkeys(rollup_requests(store), 66)
    assert second.inserts_repeated == 1 and second.inserts_lost == 0
    assert int(store.command("SELECT uniqExact(event_id) FROM calls")) == 66


STOP_S = 5.0  # a stopping writer is gone within this (its process has 15 s: supervisor.py)


def repeat_failures(caplog: pytest.LogCaptureFixture) -> int:
    """How many times a writer's repeat of uncommitted inserts has failed so far."""
    return sum("repeating uncommitted inserts failed" in r.getMessage() for r in caplog.records)


async def test_a_stop_ends_a_repeat_the_store_keeps_failing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The successor of a writer whose insert was cut short is stopped while its repeat
    of that insert keeps failing (the view still failing): it stops at once, committing
    nothing past the insert, and the next writer repeats it; every view counts every
    call once. aiokafka's stop waits for the assignment callback, which retried for as
    long as the store failed: the stop hung (SIGTERM, Ctrl-C) until the process was
    killed."""
    async with start_broker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3)
        await cut_short(broker.bootstrap, settings, store)

        second = asyncio.create_task(ClickHouseWriter(settings, store).run())
        try:
            await until(lambda: repeat_failures(caplog) >= 1, "the repeat failing")
            second.cancel()
            done, _ = await asyncio.wait({second}, timeout=STOP_S)
            assert done, f"the writer still stopping after {STOP_S:.0f} s"
        finally:
            disarm_trap(store)  # else a hung stop never ends
            second.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await second

        third = ClickHouseWriter(settings, store)
        async with running(third):
            await until(lambda: third.inserts_repeated == 1, "the insert repeated")
    assert calls(store) == 40
    assert rollup_requests(store) == dict.fromkeys(rollup_requests(store), 40)
    assert third.inserts_lost == 0


class Bug(Exception):
    """A bug in the writer's own code."""


class BuggyUncommitted(replay.Uncommitted):
    """The writer's book of uncommitted inserts, with a bug: adding one raises."""

    def add(self, token: str, ranges: tuple[Range, ...]) -> None:
        raise Bug("a bug in taking partitions over")


async def test_a_takeover_that_raises_fails_the_writer(store: Store) -> None:
    """The successor of a writer whose insert was cut short repeats it, and then a bug
    raises in its assignment callback: the writer fails (its run raises, and the store
    process exits to be started again: tests/test_store_process.py). aiokafka logged it
    and went on, the partitions given still paused: the writer lived on, reading
    nothing, for good."""
    async with start_broker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3)
        await cut_short(broker.bootstrap, settings, store)
        disarm_trap(store)

        second = ClickHouseWriter(settings, store)
        second._uncommitted = BuggyUncommitted()
        task = asyncio.create_task(second.run())
        done, _ = await asyncio.wait({task}, timeout=30)
        task.cancel()
        (ended,) = await asyncio.gather(task, return_exceptions=True)
        assert done, "the writer still running 30 s after its takeover raised"
        assert isinstance(ended, HandoverFailed), ended
        assert "taking partitions over" in str(ended) and isinstance(ended.__cause__, Bug)
    assert rollup_requests(store) == dict.fromkeys(rollup_requests(store), 40)  # repeated


STALL_S = 4.0  # the broker answers nothing for this long


def stalling_reader(pid: int) -> Callable[[Kafka], AIOKafkaConsumer]:
    """llmtap.topics' reader (a consumer of no group), whose first fetch finds the
    broker (process ``pid``) stalled for STALL_S: a broker slow to answer, as under a
    long pause, a leader moving or a loaded disk."""
    reader = topics._reader
    stalled: list[int] = []

    def make(kafka: Kafka) -> AIOKafkaConsumer:
        consumer = reader(kafka)
        fetch = consumer.getmany

        async def getmany(*partitions: TopicPartition, **kwargs: Any) -> Any:
            if not stalled:
                stalled.append(pid)
                os.kill(pid, signal.SIGSTOP)
                asyncio.get_running_loop().call_later(STALL_S, os.kill, pid, signal.SIGCONT)
            return await fetch(*partitions, **kwargs)

        consumer.getmany = getmany
        return consumer

    return make


async def test_a_broker_slow_to_answer_the_repeat_does_not_make_its_insert_lost(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the takeover above, the broker stalling just as the successor reads back the
    insert cut short: the successor waits for the broker and repeats it, and every view
    counts every call. A read that took a silence of 2 s for the end of the messages
    counted the insert lost and read on; the rollups never got its rows."""
    async with start_broker() as broker:
        monkeypatch.setattr(topics, "_reader", stalling_reader(broker.process.pid))
        await cut_short_then_taken_over(broker, store)


async def test_an_insert_whose_messages_are_gone_is_counted_not_guessed(
    broker: Broker, store: Store
) -> None:
    """A recorded insert whose offsets the broker no longer has (a broker that kept
    nothing over a restart) cannot be repeated: counted as lost once, nothing inserted."""
    events = Batch(events=[call() for _ in range(3)])
    insert = prepare_calls(store, events)
    replay.record(store, "a-group", insert, ((Names().costed, 0, 1000, 1003),))
    assigned = {TopicPartition(Names().costed, 0)}
    redone = await replay.repeat_uncommitted(store, Kafka(broker.bootstrap), "a-group", assigned)
    assert redone == ([], 1)
    assert calls(store) == 0
    # Reported once: at every later start it was reported lost again, for ever.
    again = await replay.repeat_uncommitted(store, Kafka(broker.bootstrap), "a-group", assigned)
    assert again == ([], 0)


async def test_inserts_committed_before_the_broker_forgot_them_are_not_lost(
    store: Store,
) -> None:
    """The embedded broker keeps nothing over a restart, commits included. A writer
    started on a fresh broker, with the store of one that wrote and committed, finds
    the recorded inserts, the broker knowing none of their commits: they were
    committed (calls_commits says so), not lost; nothing is repeated or reported."""
    async with start_broker() as broker:
        await produce(broker.bootstrap, [call() for _ in range(12)])
        first = ClickHouseWriter(Settings(kafka_bootstrap=broker.bootstrap), store)
        async with running(first):
            await until(
                lambda: calls(store) == 12 and commits(store) == inserts(store), "committed"
            )
    assert replay.latest(store, Settings().kafka.names.sink_group) == []  # all committed
    async with start_broker() as fresh:
        await produce(fresh.bootstrap, [call()])
        second = ClickHouseWriter(Settings(kafka_bootstrap=fresh.bootstrap), store)
        async with running(second):
            await until(lambda: calls(store) == 13, "the new call stored")
    assert (second.inserts_repeated, second.inserts_lost) == (0, 0)


def commits(store: Store) -> int:
    return int(store.command("SELECT count() FROM calls_commits"))


def inserts(store: Store) -> int:
    return int(store.command("SELECT count() FROM calls_inserts"))


def test_an_insert_cut_short_is_found_behind_other_writers_inserts(store: Store) -> None:
    """A crashed writer's insert is repeated by the writer given its partitions once the
    group notices (a session later): meanwhile every other writer of the group goes on
    inserting. Only the group's 100 newest records were read, so with eight writers (a
    few batches a second each) the cut-short one had dropped out of them, never
    repeated: a rollup lacked its rows for good; 900 were, a minute later. As many are
    read as the tables' deduplication windows let a repeat be dropped, less a margin."""
    group, costed = "eight-writers", Names().costed
    start = utcnow() - timedelta(minutes=5)
    cut: tuple[Any, ...] = (start, group, "cut", [(costed, 0, 100, 200)], [])
    others: list[tuple[Any, ...]] = [  # seven writers' inserts, each on partitions of its own
        (start + (i + 1) * MILLISECOND, group, f"other-{i}", [(costed, 1 + i % 7, i, i + 1)], [])
        for i in range(3000)
    ]
    store.insert("calls_inserts", [cut, *others], RECORD_COLUMNS)
    found = replay.latest(store, group)
    assert [r.token for r in found][:1] == ["cut"]  # oldest first
    partition_0 = {TopicPartition(costed, 0)}
    assert replay.uncommitted(found, {TopicPartition(costed, 0): 100}, partition_0) == found[:1]
    assert replay.latest(store, "another-group") == []


RECORD_COLUMNS = ("created", "consumer_group", "token", "ranges", "skipped")
MILLISECOND = timedelta(milliseconds=1)


def test_uncommitted_inserts_are_those_past_the_groups_commit_on_its_partitions() -> None:
    a, b = TopicPartition(Names().costed, 0), TopicPartition(Names().costed, 1)
    done = replay.Recorded("t1", ((Names().costed, 0, 0, 10),), ())
    cut = replay.Recorded("t2", ((Names().costed, 0, 10, 20), (Names().costed, 1, 0, 5)), ())
    elsewhere = replay.Recorded("t3", ((Names().costed, 1, 5, 9),), ())
    recorded = [done, cut, elsewhere]
    assert replay.uncommitted(recorded, {a: 10, b: 5}, {a}) == [cut]
    assert replay.uncommitted(recorded, {a: 20, b: 9}, {a, b}) == []
    assert replay.uncommitted(recorded, {}, {b}) == [cut, elsewhere]  # nothing committed


def test_costed_ranges_are_the_costed_partitions_spans_in_order() -> None:
    spans = {
        TopicPartition(Names().costed, 1): (5, 8),
        TopicPartition(Names().windows, 0): (3, 4),
        TopicPartition(Names().costed, 0): (2, 3),
    }
    assert replay.costed_ranges(spans) == ((Names().costed, 0, 2, 3), (Names().costed, 1, 5, 8))


def test_an_insert_is_known_committed_once_commits_pass_every_range_it_holds() -> None:
    a, b = TopicPartition("costed", 0), TopicPartition("costed", 1)
    held = replay.Uncommitted()
    held.add("t1", (("costed", 0, 0, 10), ("costed", 1, 0, 5)))
    held.add("t2", (("costed", 0, 10, 20),))
    assert held.commit({a: 10}) == []  # t1's partition 1 not yet
    assert held.commit({b: 5}) == ["t1"]  # the commits so far pass both its ranges
    assert held.commit({a: 15}) == []
    held.keep(["t0"])  # its record failed: asked again at the next commit
    assert held.commit({a: 20}) == ["t2", "t0"]
    held.add("t3", (("costed", 1, 5, 9),))
    held.forget([b])  # moved to another writer: its commits are its own
    assert held.commit({b: 100}) == []


def test_an_insert_rebuilt_from_messages_not_its_own_is_not_repeated() -> None:
    """A broker that lost its log gives the recorded offsets to other messages: the
    insert rebuilt from them has other rows, and is not made under the recorded token."""
    topic = Names().costed

    def runs(events: list[CostedEvent]) -> list[Run]:
        raw = [e.model_dump_json().encode() for e in events]
        return runs_of((topic, 0, offset, value) for offset, value in enumerate(raw))

    mine = [call(), call()]
    insert = calls_insert(decode_batch(runs(mine)).calls, ())
    recorded = replay.Recorded(insert.token, ((topic, 0, 0, 2),), ())
    again = replay.rebuilt(recorded, runs(mine))
    assert again is not None and again.token == insert.token and again.rows == 2
    assert replay.rebuilt(recorded, runs([call(), call()])) is None
