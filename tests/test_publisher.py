"""Never lose an event, never slow a call: the spool on disk, and the publisher on Tansu.

The outage tests run their own Tansu, stopped and started again on the same port. It
keeps topics in memory only: events delivered before it stops are read before it
stops, and after a restart the topics are created again (``ensure_topics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import generate_latest
from pydantic import BaseModel

from ingress import publisher as publisher_module
from ingress.flight import APPEND_SLICE, FLIGHT_TURNS, append_slice
from ingress.metrics import IngressMetrics
from ingress.publisher import MAX_BATCH, EventPublisher
from ingress.spool import Record, Segment, Spool, SpoolBusy, decode, encode
from llmtap import topics
from llmtap.kafka import Kafka
from llmtap.names import Names
from llmtap.supervisor import broker_argv
from tests.conftest import Broker
from tests.fake_provider import free_port
from tests.prometheus import sample
from tests.tls import tansu_behind_front

TOPIC = Names().requests
KEY = b"one-key-one-partition"  # so order holds on a many-partition topic too


class Ping(BaseModel):
    event_id: uuid.UUID
    seq: int


def pings(start: int, count: int) -> list[Ping]:
    return [Ping(event_id=uuid.uuid4(), seq=seq) for seq in range(start, start + count)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def record(seq: int, size: int = 10) -> Record:
    return Record(f"topic-{seq % 3}", f"key-{seq}".encode(), bytes([seq % 256]) * size)


# -- the spool on its own ---------------------------------------------------------------


def test_spool_append_iterate_ack_round_trip(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    records = [record(i) for i in range(5)]
    assert spool.append(records) == 0
    assert list(spool) == records
    assert spool.size == sum(len(encode(r)) for r in records)
    segment = spool.oldest()
    assert segment is not None and segment.records == records
    spool.ack(segment.number)
    assert spool.empty and spool.size == 0 and spool.oldest() is None
    assert segment_files(tmp_path) == []  # the acked segment's file is gone
    with pytest.raises(SpoolBusy):  # one owner at a time
        Spool(tmp_path, max_bytes=1 << 20)
    spool.close()
    assert list(Spool(tmp_path, max_bytes=1 << 20)) == []  # and the segment stays gone


def test_spool_keeps_order_across_segments_and_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    records = [record(i, size=i + 1) for i in range(60)]  # none empty: a tombstone
    for start in range(0, 40, 7):
        assert spool.append(records[start : min(start + 7, 40)]) == 0
    assert spool.segments > 3
    spool.close()
    reopened = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    assert reopened.append(records[40:]) == 0  # after a restart, behind the old ones
    assert list(reopened) == records
    drained: list[Record] = []
    while (segment := reopened.oldest()) is not None:
        drained += segment.records
        reopened.ack(segment.number)
    assert drained == records


def test_spool_opens_past_a_file_not_its_own(tmp_path: Path) -> None:
    """A stray file named like a segment but for its digits ("²³.seg": str.isdigit
    takes them, int() does not) is left alone; opening the spool raised ValueError."""
    (tmp_path / "²³.seg").write_bytes(b"not a segment")
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.append([record(1)]) == 0
    assert list(spool) == [record(1)]
    assert (tmp_path / "²³.seg").read_bytes() == b"not a segment"


def test_spool_skips_a_torn_tail_and_keeps_what_precedes_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    records = [record(i, size=50) for i in range(10)]
    assert spool.append(records[:6]) == 0
    assert spool.append(records[6:]) == 0
    spool.close()
    (segment_file,) = segment_files(tmp_path)
    with segment_file.open("r+b") as file:  # a crash in the middle of the last record
        file.truncate(segment_file.stat().st_size - 20)
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    assert list(reopened) == records[:9]
    more = [record(i) for i in range(100, 103)]
    assert reopened.append(more) == 0  # a new segment: never written after torn bytes
    assert list(reopened) == records[:9] + more


_DISK_FULL = """
import resource, signal, sys
from pathlib import Path
from ingress.spool import Record, Spool, encode
records = [Record("topic", b"key-%d" % i, b"v" * 100) for i in range(10)]
spool = Spool(Path(sys.argv[1]), max_bytes=1 << 20)
assert spool.append(records[:2]) == 0
# The disk fills 3.5 records further on: the next write is cut short there, then fails
# (EFBIG past RLIMIT_FSIZE, as ENOSPC past the disk's end).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
full_at = spool.size + len(encode(records[2])) * 7 // 2
resource.setrlimit(resource.RLIMIT_FSIZE, (full_at, resource.RLIM_INFINITY))
refused = spool.append(records[2:])
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
assert spool.append(records[2:]) == 0  # room again: the refused batch, spooled anew
spool.close()
print(refused)
"""


def test_a_batch_refused_for_a_full_disk_leaves_none_of_it_spooled(tmp_path: Path) -> None:
    """A write cut short by a full disk: the batch is refused (it waits in memory, and
    is spooled again), and none of it stays in the segment. The part written stayed
    (cutting it off flushed the buffered rest first, which failed again): its whole
    records were replayed, and then again with the batch: twice."""
    repo = Path(__file__).resolve().parents[1]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join((str(repo), os.environ.get("PYTHONPATH", "")))
    }
    child = subprocess.run(
        [sys.executable, "-c", _DISK_FULL, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["8"]  # the whole batch refused
    reopened = Spool(tmp_path, max_bytes=1 << 20)
    keys = [r.key for r in reopened]
    assert keys == [b"key-%d" % i for i in range(10)]  # each once, in order


def test_spool_refuses_past_its_byte_limit_and_never_evicts(tmp_path: Path) -> None:
    records = [record(i) for i in range(10)]
    limit = sum(len(encode(r)) for r in records[:4])
    spool = Spool(tmp_path, max_bytes=limit)
    assert spool.append(records[:3]) == 0
    assert spool.append(records[3:]) == 6  # the 4th fits, the 6 after it are refused
    assert spool.append(records[:1]) == 1  # full: anything new is refused
    assert list(spool) == records[:4] and spool.size == limit  # the old ones stay
    segment = spool.oldest()
    assert segment is not None
    spool.ack(segment.number)
    assert spool.append(records[4:]) == 2  # room again: as many as fit, in order
    assert list(spool) == records[4:8]


def test_a_reserved_place_keeps_its_turn(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1 << 20)
    first, in_flight, after = [record(i) for i in range(3)], [record(7)], [record(8)]
    assert spool.append(first) == 0
    place = spool.reserve()
    assert spool.append(after) == 0
    assert spool.fill(place, in_flight) == 0
    assert list(spool) == first + in_flight + after


def test_a_segment_s_note_leaves_out_what_was_delivered_and_only_that(tmp_path: Path) -> None:
    """``mark`` notes how much of a segment was delivered: a later open leaves it out.
    A note that cannot be right is ignored (the segment replayed whole), and one whose
    segment is gone (an ack cut short) is deleted at open, never applied to a segment
    numbered the same later."""
    records = [record(i) for i in range(10)]
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.append(records) == 0
    segment = spool.oldest()
    assert segment is not None and segment.records == records
    spool.mark(segment.number, 4)
    spool.close()
    spool = Spool(tmp_path, max_bytes=1 << 20)
    again = spool.oldest()
    assert again is not None and (again.records, again.delivered) == (records[4:], 4)
    (tmp_path / f"{again.number:020d}.done").write_text("11\n")  # more than it holds
    assert spool.oldest() == Segment(again.number, records)
    spool.mark(again.number, 4)
    spool.close()
    spool = Spool(tmp_path, max_bytes=1 << 20)
    spool.ack(again.number)
    spool.close()
    (tmp_path / f"{again.number:020d}.done").write_text("4\n")  # left by an ack cut short
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert not (tmp_path / f"{again.number:020d}.done").exists()
    spool.close()


def test_a_segment_deleted_from_outside_is_forgotten_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment whose file is deleted from outside llmtap (also one set aside as
    unreadable before) can never be read: ``oldest`` forgets it, logs at ERROR once
    with its path that its events are lost, and goes on to the next. It was set aside
    as unreadable and read again, with an ERROR, every minute for ever."""
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1)  # a segment per append
    batches = [[record(i)] for i in range(3)]
    for batch in batches:
        assert spool.append(batch) == 0
    gone, was_unreadable, kept = segment_files(tmp_path)
    spool.mark(1, 0)  # a note beside it, to be deleted with it
    gone.unlink()
    was_unreadable.rename(tmp_path / "aside")  # a directory in its place: unreadable
    was_unreadable.mkdir()
    with pytest.raises(OSError):
        spool.oldest()
    assert spool.unreadable == 1 and spool.segments == 2
    assert f"{gone} is gone" in caplog.text and "lost" in caplog.text
    assert not (tmp_path / f"{1:020d}.done").exists()
    was_unreadable.rmdir()  # then deleted too
    spool.read_again()
    caplog.clear()
    segment = spool.oldest()
    assert segment is not None and segment.records == batches[2]
    assert spool.unreadable == 0 and spool.segments == 1
    assert spool.size == kept.stat().st_size
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [str(was_unreadable) in r.getMessage() for r in errors] == [True]
    spool.ack(segment.number)
    caplog.clear()
    assert spool.oldest() is None and spool.empty and caplog.records == []


# -- the publisher, on real brokers -----------------------------------------------------


def publisher(bootstrap: str, spool_dir: Path, **options: int) -> EventPublisher:
    settings: dict[str, int] = {
        "queue_size": 10_000,
        "spool_max_bytes": 1 << 30,
        "request_timeout_ms": 2_000,
    }
    return EventPublisher(Kafka(bootstrap), spool_dir=spool_dir, **(settings | options))


def publish_all(target: EventPublisher, events: list[Ping]) -> None:
    for event in events:
        target.publish(TOPIC, KEY, event.model_dump_json().encode())


async def wait_for(predicate: Callable[[], bool], seconds: float = 30) -> None:
    """Poll a readiness condition."""
    async with asyncio.timeout(seconds):
        while not predicate():
            await asyncio.sleep(0.05)


async def start_tansu(bootstrap: str) -> asyncio.subprocess.Process:
    """Our own Tansu (memory only), ready once llmtap's topics exist on it."""
    process = await asyncio.create_subprocess_exec(
        *broker_argv(bootstrap),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30):
            while True:
                assert process.returncode is None, "tansu exited"
                try:
                    await topics.ensure_topics(Kafka(bootstrap), 1)
                    return process
                except Exception:  # not listening yet
                    await asyncio.sleep(0.1)
    except BaseException:
        await stop_tansu(process)
        raise


async def stop_tansu(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        await process.wait()


@contextlib.asynccontextmanager
async def running(target: EventPublisher) -> AsyncIterator[EventPublisher]:
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


async def read_topic(bootstrap: str) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on TOPIC, start to end: each partition's in order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=5_000
    )
    await consumer.start()
    try:
        tps = [TopicPartition(TOPIC, p) for p in sorted(consumer.partitions_for_topic(TOPIC) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        records: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(30):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for messages in (await consumer.getmany(*tps, timeout_ms=500)).values():
                    records += messages
        return records
    finally:
        await consumer.stop()


def ours(record: ConsumerRecord[bytes, bytes], ids: set[uuid.UUID]) -> Ping | None:
    """The record's event, if it is one of ``ids``."""
    try:
        ping = Ping.model_validate_json(record.value or b"")
    except ValueError:
        return None
    return ping if ping.event_id in ids else None


async def read_all(bootstrap: str, ids: set[uuid.UUID]) -> list[Ping]:
    """Every event of ours on TOPIC, start to end, in order (one key: one partition)."""
    return [ping for record in await read_topic(bootstrap) if (ping := ours(record, ids))]


def assert_exactly_once_in_order(got: list[Ping], sent: list[Ping]) -> None:
    assert len(got) == len(sent)
    assert len({p.event_id for p in got}) == len(sent)
    assert got == sent


async def spooled_events(spool_dir: Path) -> list[Ping]:
    """What a spool holds, read from its files (the publisher owns the Spool itself)."""

    def read() -> list[Ping]:
        return [
            Ping.model_validate_json(record.value or b"")
            for path in segment_files(spool_dir)
            for record in decode(path.read_bytes())[0]
        ]

    return await asyncio.to_thread(read)


def test_publish_is_a_plain_function() -> None:
    """It cannot wait for anything: it is not a coroutine function."""
    assert not inspect.iscoroutinefunction(EventPublisher.publish)
    assert not inspect.isasyncgenfunction(EventPublisher.publish)


async def test_broker_down_from_the_start_spools_then_replays_in_order(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    spool_dir = tmp_path / "spool"
    events = pings(0, 500)
    broker: asyncio.subprocess.Process | None = None
    try:
        async with running(publisher(bootstrap, spool_dir)) as events_out:
            publish_all(events_out, events)
            await wait_for(lambda: events_out.spooled == len(events))
            assert events_out.published == 0 and events_out.backlog == 0
            assert events_out.spool_bytes > 0
            assert await spooled_events(spool_dir) == events
            # What an operator alerts on before the spool fills: its bytes, its limit.
            scraped = generate_latest(IngressMetrics(events_out).registry).decode()
            assert sample(scraped, "llmtap_spool_bytes") == events_out.spool_bytes
            assert sample(scraped, "llmtap_spool_limit_bytes") == 1 << 30

            broker = await start_tansu(bootstrap)
            await wait_for(
                lambda: events_out.replayed == len(events) and not events_out.spool_bytes
            )
            scraped = generate_latest(IngressMetrics(events_out).registry).decode()
            assert sample(scraped, "llmtap_spool_bytes") == 0
            assert events_out.published == len(events)
            assert events_out.dropped == 0
        assert_exactly_once_in_order(
            await read_all(bootstrap, {e.event_id for e in events}), events
        )
        assert await spooled_events(spool_dir) == []
    finally:
        if broker is not None:
            await stop_tansu(broker)


async def test_an_outage_mid_stream_loses_and_repeats_nothing(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    before, during, after = pings(0, 200), pings(200, 200), pings(400, 200)
    ids = {e.event_id for e in before + during + after}
    spool_dir = tmp_path / "spool"
    broker = await start_tansu(bootstrap)
    try:
        async with running(publisher(bootstrap, spool_dir)) as events_out:
            publish_all(events_out, before)
            await wait_for(lambda: events_out.published == len(before))
            delivered_before = await read_all(bootstrap, ids)  # Tansu forgets them on stop
            assert delivered_before == before

            await stop_tansu(broker)
            publish_all(events_out, during[:100])
            await wait_for(lambda: events_out.backlog == 0)  # a batch is in flight, stuck
            publish_all(events_out, during[100:])  # spooled behind it, while it is stuck
            await wait_for(lambda: events_out.spooled == len(during) and events_out.backlog == 0)
            assert events_out.published == len(before)
            assert await spooled_events(spool_dir) == during  # the stuck batch kept its turn

            broker = await start_tansu(bootstrap)
            publish_all(events_out, after)  # behind the spool, not ahead of it
            await wait_for(
                lambda: (
                    events_out.published == len(ids)
                    and events_out.spool_bytes == 0
                    and events_out.backlog == 0
                )
            )
            assert events_out.replayed >= len(during) and events_out.dropped == 0
        delivered_after = await read_all(bootstrap, ids)
    finally:
        await stop_tansu(broker)
    assert_exactly_once_in_order(delivered_before + delivered_after, before + during + after)


async def test_a_restart_replays_what_the_last_run_spooled(tmp_path: Path, broker: Broker) -> None:
    spool_dir = tmp_path / "spool"
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens there
    spooled, in_memory = pings(0, 300), pings(300, 50)
    first = publisher(nowhere, spool_dir)
    async with running(first):
        publish_all(first, spooled)
        await wait_for(lambda: first.spooled == len(spooled))
        publish_all(first, in_memory)  # still in memory when stop() is called
    assert first.spooled == len(spooled) + len(in_memory) and first.dropped == 0
    assert await spooled_events(spool_dir) == spooled + in_memory

    second = publisher(broker.bootstrap, spool_dir)
    async with running(second):
        await wait_for(
            lambda: second.replayed == len(spooled) + len(in_memory) and not second.spool_bytes
        )
    sent = spooled + in_memory
    assert_exactly_once_in_order(await read_all(broker.bootstrap, {e.event_id for e in sent}), sent)


async def test_a_tombstone_waits_in_the_spool_as_a_tombstone(
    tmp_path: Path, broker: Broker
) -> None:
    """A stopping ingress deletes its key on the reservations topic with a tombstone (no
    value), behind its last announcement: spooled while the broker is away, it is
    replayed as one, in its place (not as an empty value, nor lost)."""
    spool_dir = tmp_path / "spool"
    key = f"stopping-{uuid.uuid4()}".encode()
    last = pings(0, 1)[0].model_dump_json().encode()
    first = publisher(f"127.0.0.1:{free_port()}", spool_dir)  # nothing listens there
    async with running(first):
        first.publish(TOPIC, key, last)
        first.publish(TOPIC, key, None)
        await wait_for(lambda: first.spooled == 2)
    assert first.dropped == 0

    second = publisher(broker.bootstrap, spool_dir)
    async with running(second):
        await wait_for(lambda: second.replayed == 2 and not second.spool_bytes)
    values = [record.value for record in await read_topic(broker.bootstrap) if record.key == key]
    assert values == [last, None]


async def test_an_empty_value_is_refused_not_sent_nor_spooled_as_a_tombstone(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """No event is empty, and the spool frames a tombstone as no bytes: an empty value
    would reach Kafka as an empty value sent at once, and as a tombstone (deleting its
    key from a compacted topic) after a spell in the spool. It is refused, counted as
    dropped and logged; the events around it go out."""
    key = f"empty-{uuid.uuid4()}".encode()
    before, after = (ping.model_dump_json().encode() for ping in pings(0, 2))
    target = publisher(broker.bootstrap, tmp_path / "spool")
    async with running(target):
        target.publish(TOPIC, key, before)
        target.publish(TOPIC, key, b"")
        target.publish(TOPIC, key, after)
        await wait_for(lambda: target.published + target.dropped == 3)
    assert (target.published, target.dropped) == (2, 1)
    assert "an empty value" in caplog.text
    values = [record.value for record in await read_topic(broker.bootstrap) if record.key == key]
    assert values == [before, after]


async def test_a_slow_broker_does_not_keep_new_events_going_through_the_disk(
    tmp_path: Path,
) -> None:
    """A spool left by an outage, replayed to a broker that answers in 150 ms: events
    published meanwhile wait in memory behind it, and once it is empty they go straight
    to Kafka. Sent to disk because the spool was not yet empty, as they were, every
    event went through it for good: each replay outlasted the 50 ms the policy waits,
    and what it spooled meanwhile was the next segment to replay."""
    spool_dir = tmp_path / "spool"
    earlier = pings(0, 200)
    first = publisher(f"127.0.0.1:{free_port()}", spool_dir)  # nothing listens there
    async with running(first):
        publish_all(first, earlier)
        await wait_for(lambda: first.spooled == len(earlier))

    later: list[Ping] = []
    async with tansu_behind_front(None) as broker:
        broker.front.delay_s = 0.15
        bootstrap = broker.front.bootstrap
        async with running(publisher(bootstrap, spool_dir)) as events_out:
            for seq in range(len(earlier), len(earlier) + 300, 10):  # ~3 s, from its start
                later += pings(seq, 10)
                publish_all(events_out, later[-10:])
                await asyncio.sleep(0.1)
            await wait_for(
                lambda: (
                    events_out.published == len(earlier) + len(later) and not events_out.spool_bytes
                )
            )
            assert (events_out.replayed, events_out.spooled) == (len(earlier), 0)
            assert events_out.dropped == 0
        sent = earlier + later
        got = await read_all(bootstrap, {e.event_id for e in sent})
    assert_exactly_once_in_order(got, sent)


async def test_a_spool_another_process_holds_is_opened_once_it_lets_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process (a replica on the same volume, one still stopping) holds the
    spool: events wait in memory, and go to the spool once it is free. The spool was
    opened once, at start: never after, and events waited in memory for good."""
    spool_dir = tmp_path / "spool"
    held = Spool(spool_dir, max_bytes=1 << 30)
    events = pings(0, 100)
    nowhere = f"127.0.0.1:{free_port()}"
    async with running(publisher(nowhere, spool_dir)) as events_out:
        publish_all(events_out, events)
        await wait_for(lambda: "cannot open the spool" in caplog.text)
        assert events_out.backlog == len(events)
        assert not events_out.spool_room and events_out.spooled == 0
        await asyncio.to_thread(held.close)
        await wait_for(lambda: events_out.spooled == len(events))
        assert events_out.dropped == 0
    assert await spooled_events(spool_dir) == events


def _locked(path: Path) -> bool:
    """Whether a process holds a lock on ``path`` (read from /proc/locks: trying the
    lock ourselves would take it from whoever is about to)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    with open("/proc/locks") as locks:
        return any(line.split()[5].endswith(f":{inode}") for line in locks)


async def test_a_spool_open_cut_off_by_stop_is_taken_not_tried_again(tmp_path: Path) -> None:
    """stop() cancels a loop that overruns it; cancelled while the spool opens in its
    thread, that open goes on and locks the directory. stop() takes that spool for what
    is in memory, and closes it. It opened another, which raced the first for the lock
    (the loser took the spool for another process's, and stop() lost the events), and
    the first spool was left to the garbage collector to close: here it never held the
    lock long enough to be seen."""
    spool_dir = tmp_path / "spool"
    events = pings(0, 100)
    events_out = publisher(f"127.0.0.1:{free_port()}", spool_dir)
    publish_all(events_out, events)  # in memory: the publisher was never started
    opening = asyncio.ensure_future(events_out._open_spool())
    await asyncio.sleep(0)  # the open is in its thread
    opening.cancel()
    await wait_for(lambda: _locked(spool_dir / "LOCK"))  # and went on, to lock the spool
    await events_out.stop(drain_timeout=0)
    assert events_out.dropped == 0
    assert await spooled_events(spool_dir) == events
    assert not _locked(spool_dir / "LOCK")  # closed at stop


async def test_a_batch_the_spool_cannot_write_waits_in_memory(tmp_path: Path) -> None:
    """A batch in flight when spooling starts keeps a place in the spool; when it then
    fails and that place cannot be written (a disk error: here a directory in the way),
    it waits in memory, where there is room, and is delivered. It was dropped."""
    spool_dir = tmp_path / "spool"
    first, stuck, behind = pings(0, 1), pings(1, 50), pings(51, 50)
    async with tansu_behind_front(None) as broker:
        bootstrap = broker.front.bootstrap
        async with running(publisher(bootstrap, spool_dir)) as events_out:
            publish_all(events_out, first)
            await wait_for(lambda: events_out.published == 1)
            # The spool's first place, which the batch in flight will reserve, unwritable.
            (spool_dir / f"{1:020d}.seg").mkdir()
            broker.front.delay_s = 6.0  # past the publisher's 2 s request timeout
            publish_all(events_out, stuck)
            await wait_for(lambda: events_out.backlog == 0)  # in flight
            publish_all(events_out, behind)  # spooled once the flight is slow, behind it
            await wait_for(lambda: events_out.spooled >= len(behind))
            # The flight fails, its place is not written: in memory, then spooled again.
            await wait_for(
                lambda: events_out.spooled == len(stuck) + len(behind) or events_out.dropped > 0
            )
            assert events_out.dropped == 0
            broker.front.delay_s = 0.0
            await wait_for(
                lambda: (
                    events_out.published == len(first + stuck + behind)
                    and not events_out.spool_bytes
                )
            )
        sent = first + stuck + behind
        got = await read_all(bootstrap, {e.event_id for e in sent})
    assert {e.event_id for e in got} == {e.event_id for e in sent}  # at least once each


async def test_a_segment_larger_than_a_flight_is_replayed_a_flight_at_a_time(
    tmp_path: Path, broker: Broker
) -> None:
    """What stop() spools goes to one segment (here 12,000 events); its replay sends
    MAX_BATCH at a time, each flight accounted for on the event loop: once each, in
    order, and the segment is deleted only once all of it went."""
    assert MAX_BATCH < 12_000
    spool_dir = tmp_path / "spool"
    events = pings(0, 12_000)
    first = publisher(f"127.0.0.1:{free_port()}", spool_dir, queue_size=20_000)
    async with running(first):
        publish_all(first, events)
    assert first.spooled == len(events) and len(segment_files(spool_dir)) == 1

    second = publisher(broker.bootstrap, spool_dir)
    async with running(second):
        await wait_for(lambda: second.replayed == len(events) and not second.spool_bytes)
    assert second.dropped == 0 and segment_files(spool_dir) == []
    assert_exactly_once_in_order(
        await read_all(broker.bootstrap, {e.event_id for e in events}), events
    )


async def test_events_spooled_under_another_namespace_go_to_this_one_s_topics(
    tmp_path: Path, broker: Broker
) -> None:
    """kafka_namespace changed while events waited in the spool: they are replayed to
    the topics of their kind that the deployment now uses (the old ones may be read by
    nobody, or be out of its ACLs)."""
    spool_dir = tmp_path / "spool"
    events = pings(0, 40)
    old = Names("old-namespace")
    nowhere = Kafka(f"127.0.0.1:{free_port()}", names=old)
    first = EventPublisher(nowhere, spool_dir=spool_dir, queue_size=1_000, spool_max_bytes=1 << 20)
    async with running(first):
        for event in events:
            first.publish(old.requests, KEY, event.model_dump_json().encode())
        await wait_for(lambda: first.spooled == len(events))

    second = publisher(broker.bootstrap, spool_dir)  # the default namespace: TOPIC's
    async with running(second):
        await wait_for(lambda: second.replayed == len(events) and not second.spool_bytes)
    assert TOPIC == second.names.requests
    assert_exactly_once_in_order(
        await read_all(broker.bootstrap, {e.event_id for e in events}), events
    )


async def test_a_full_spool_keeps_the_oldest_and_drops_the_newest(
    tmp_path: Path, broker: Broker
) -> None:
    spool_dir = tmp_path / "spool"
    events = pings(0, 30)
    fits = 5
    limit = sum(
        len(encode(Record(TOPIC, KEY, e.model_dump_json().encode()))) for e in events[:fits]
    )
    nowhere = f"127.0.0.1:{free_port()}"
    first = publisher(nowhere, spool_dir, queue_size=10, spool_max_bytes=limit)
    async with running(first):
        publish_all(first, events)  # 10 queued, 20 dropped at once: the queue is full
        assert first.dropped == 20 and first.backlog == 10
        await wait_for(lambda: first.spooled == fits)
        assert first.backlog == 10 - fits  # what the spool refused waits in memory
    assert first.dropped == len(events) - fits  # stop: the spool refuses the rest too
    assert first.spool_bytes == limit

    second = publisher(broker.bootstrap, spool_dir)
    async with running(second):
        await wait_for(lambda: second.replayed == fits)
    kept = events[:fits]
    assert_exactly_once_in_order(await read_all(broker.bootstrap, {e.event_id for e in kept}), kept)


async def test_with_spool_max_bytes_zero_events_wait_in_memory(tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    spool_dir = tmp_path / "spool"
    events = pings(0, 50)
    broker: asyncio.subprocess.Process | None = None
    try:
        async with running(publisher(bootstrap, spool_dir, spool_max_bytes=0)) as events_out:
            publish_all(events_out, events)
            broker = await start_tansu(bootstrap)
            await wait_for(lambda: events_out.published == len(events))
            assert events_out.spooled == 0 and events_out.dropped == 0
        assert_exactly_once_in_order(
            await read_all(bootstrap, {e.event_id for e in events}), events
        )
        assert segment_files(spool_dir) == []
    finally:
        if broker is not None:
            await stop_tansu(broker)


async def test_with_spool_max_bytes_zero_and_nothing_spooled_the_spool_is_not_touched(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """``spool_max_bytes`` 0 is no spool. It opened one all the same (to replay what a
    run with one left), with no lock on the data_dir (the ingress takes it only with a
    spool): on a data_dir another ingress's spool is open in, or one it cannot write,
    it said "cannot open the spool" at ERROR, once a minute for its life."""
    events = pings(0, 20)
    spool_dir = tmp_path / "spool"
    held = Spool(spool_dir, max_bytes=1 << 30)  # another ingress's, empty
    try:
        async with running(publisher(broker.bootstrap, spool_dir, spool_max_bytes=0)) as out:
            publish_all(out, events)
            await wait_for(lambda: out.published == len(events))
    finally:
        held.close()
    unwritable = tmp_path / "a-file"
    unwritable.write_text("not a directory\n")
    async with running(publisher(broker.bootstrap, unwritable, spool_max_bytes=0)) as out:
        publish_all(out, events)
        await wait_for(lambda: out.published == len(events))
    assert "cannot open the spool" not in caplog.text, caplog.text
    # Stopped with events the broker never took: lost (no spool), none written there.
    nowhere = f"127.0.0.1:{free_port()}"
    async with running(publisher(nowhere, tmp_path / "none", spool_max_bytes=0)) as out:
        publish_all(out, events)
    assert out.dropped == len(events) and not (tmp_path / "none").exists()
    assert "stopping with 20 events lost (no spool)" in caplog.text


async def test_with_spool_max_bytes_zero_what_a_spool_left_goes_first(
    tmp_path: Path, broker: Broker
) -> None:
    """A run with a spool left events in it (stopped while the broker was down); one with
    ``spool_max_bytes`` 0 after it sends them before its own, and writes nothing there."""
    spool_dir = tmp_path / "spool"
    earlier, later = pings(0, 30), pings(30, 20)
    first = publisher(f"127.0.0.1:{free_port()}", spool_dir)  # nothing listens there
    async with running(first):
        publish_all(first, earlier)
    assert first.spooled == len(earlier)
    async with running(publisher(broker.bootstrap, spool_dir, spool_max_bytes=0)) as second:
        publish_all(second, later)
        await wait_for(lambda: second.published == len(earlier) + len(later))
        assert (second.replayed, second.spooled, second.dropped) == (len(earlier), 0, 0)
    assert segment_files(spool_dir) == []
    sent = earlier + later
    assert_exactly_once_in_order(await read_all(broker.bootstrap, {e.event_id for e in sent}), sent)


class Blob(Ping):
    pad: str


async def test_an_event_too_large_for_kafka_is_dropped_and_the_rest_delivered(
    tmp_path: Path, broker: Broker
) -> None:
    """Events go out as whole batches: one no batch can hold is dropped (counted, logged),
    and those before and after it are delivered, in order."""
    before, after = pings(0, 100), pings(100, 100)
    target = publisher(broker.bootstrap, tmp_path / "spool")
    async with running(target):
        publish_all(target, before)
        blob = Blob(event_id=uuid.uuid4(), seq=-1, pad="x" * (2 << 20))
        target.publish(TOPIC, KEY, blob.model_dump_json().encode())
        publish_all(target, after)
        await wait_for(lambda: target.published + target.dropped == 201)
    assert (target.published, target.dropped, target.spooled) == (200, 1, 0)
    sent = before + after
    assert_exactly_once_in_order(await read_all(broker.bootstrap, {e.event_id for e in sent}), sent)


async def placements(bootstrap: str, ids: set[uuid.UUID]) -> dict[uuid.UUID, tuple[int, int]]:
    """Where each of our events is on TOPIC: its partition and offset, as a consumer
    reads them."""
    return {
        ping.event_id: (record.partition, record.offset)
        for record in await read_topic(bootstrap)
        if (ping := ours(record, ids))
    }


def publish_told(
    target: EventPublisher, events: list[Ping], heard: dict[uuid.UUID, tuple[int, int]]
) -> None:
    """Publish each event under its own key (any partition), to be told where it went."""

    def listener(event_id: uuid.UUID) -> Callable[[int, int], None]:
        def delivered(partition: int, offset: int) -> None:
            assert event_id not in heard, "told twice"
            heard[event_id] = (partition, offset)

        return delivered

    for event in events:
        value = event.model_dump_json().encode()
        target.publish(TOPIC, event.event_id.bytes, value, listener(event.event_id))


async def test_each_event_s_listener_is_told_its_partition_and_offset(
    tmp_path: Path, broker: Broker
) -> None:
    """What lets a hard cap hold a call's cost exactly until a budget state counts it."""
    events = pings(0, 300)
    heard: dict[uuid.UUID, tuple[int, int]] = {}
    async with running(publisher(broker.bootstrap, tmp_path / "spool")) as events_out:
        publish_told(events_out, events[:150], heard)
        publish_all(events_out, pings(1000, 50))  # no listener: nobody told
        publish_told(events_out, events[150:], heard)
        await wait_for(lambda: len(heard) == len(events))
    found = await placements(broker.bootstrap, {e.event_id for e in events})
    assert heard == found
    assert len({partition for partition, _ in found.values()}) > 1


async def test_a_listener_that_fails_fails_alone(tmp_path: Path, broker: Broker) -> None:
    """A listener raising stopped the flight's settling: what was to be retried was
    lost, uncounted, and a reserved spool segment left unfilled stopped the replay for
    good. The others are told, and every event is published."""
    events = pings(0, 100)
    heard: dict[uuid.UUID, tuple[int, int]] = {}

    def failing(partition: int, offset: int) -> None:
        raise RuntimeError("a listener's bug")

    async with running(publisher(broker.bootstrap, tmp_path / "spool")) as events_out:
        for event in events[:10]:
            events_out.publish(
                TOPIC, event.event_id.bytes, event.model_dump_json().encode(), failing
            )
        publish_told(events_out, events[10:], heard)
        await wait_for(lambda: len(heard) == 90)
        await wait_for(lambda: events_out.published >= 100)
    assert set(heard) == {e.event_id for e in events[10:]}
    found = await placements(broker.bootstrap, {e.event_id for e in events})
    assert set(found) == {e.event_id for e in events}


async def test_an_event_that_waited_in_the_spool_is_still_told_where_it_went(
    tmp_path: Path,
) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    spooled, later = pings(0, 100), pings(100, 50)
    heard: dict[uuid.UUID, tuple[int, int]] = {}
    broker: asyncio.subprocess.Process | None = None
    try:
        async with running(publisher(bootstrap, tmp_path / "spool")) as events_out:
            publish_told(events_out, spooled, heard)
            await wait_for(lambda: events_out.spooled == len(spooled))
            assert heard == {}
            broker = await start_tansu(bootstrap)
            publish_told(events_out, later, heard)
            await wait_for(lambda: len(heard) == len(spooled) + len(later))
            assert events_out.replayed >= len(spooled)  # and the later ones, queued behind
        found = await placements(bootstrap, {e.event_id for e in spooled + later})
        assert heard == found
    finally:
        if broker is not None:
            await stop_tansu(broker)


@pytest.mark.parametrize("records", [1, 7, 8, 50, 128, 129, 300, 4_999, MAX_BATCH])
def test_a_flight_takes_a_bounded_number_of_turns_of_the_loop(records: int) -> None:
    """Small flights give way every APPEND_SLICE records; a large one in larger slices,
    never more than FLIGHT_TURNS turns of the loop: each turn of a saturated loop takes
    milliseconds, and a flight sliced finely whatever its size outlasted the next one's
    gathering, which then was larger, until the queue went to the spool with the broker
    up."""
    per_turn = append_slice(records)
    assert -(-records // per_turn) <= FLIGHT_TURNS  # turns, the last slice maybe short
    if records <= APPEND_SLICE * FLIGHT_TURNS:
        assert per_turn == APPEND_SLICE
    else:  # the finest slices that keep the bound
        assert -(-records // (per_turn - 1)) > FLIGHT_TURNS


def test_spool_leaves_alone_a_segment_name_not_its_own_spelling(tmp_path: Path) -> None:
    """A stray "7.seg" (a copy, a restore, a file renamed by hand): its digits parse,
    but the spool reads and deletes ``00000000000000000007.seg``, which does not exist.
    Opening the spool took it as a segment; reading it raised FileNotFoundError."""
    (tmp_path / "7.seg").write_bytes(encode(record(7)))
    spool = Spool(tmp_path, max_bytes=1 << 20)
    assert spool.append([record(1)]) == 0
    assert list(spool) == [record(1)]
    segment = spool.oldest()
    assert segment is not None and segment.records == [record(1)]
    spool.ack(segment.number)
    assert spool.empty
    assert (tmp_path / "7.seg").read_bytes() == encode(record(7))


async def test_a_stray_segment_name_does_not_stop_delivery(tmp_path: Path, broker: Broker) -> None:
    """With a stray "7.seg" in the spool directory, every replay failed on it and the
    publisher restarted every second for good: nothing reached Kafka again."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (spool_dir / "7.seg").write_bytes(b"")
    events = pings(0, 20)
    async with running(publisher(broker.bootstrap, spool_dir)) as events_out:
        publish_all(events_out, events)
        await wait_for(lambda: events_out.published == len(events), seconds=15)
    assert_exactly_once_in_order(
        await read_all(broker.bootstrap, {e.event_id for e in events}), events
    )


async def test_a_spool_still_held_at_start_is_replayed_before_anything_new(
    tmp_path: Path, broker: Broker
) -> None:
    """A restart while the last run (a replica still stopping) holds the spool: what it
    spooled is sent before any event of the new run (README: "A restart, or a crash,
    replays what was spooled before anything new"; "events waiting in memory
    meanwhile"). The new events went straight to Kafka, ahead of the old spool."""
    spool_dir = tmp_path / "spool"
    old, new = pings(0, 30), pings(30, 30)
    held = Spool(spool_dir, max_bytes=1 << 30)  # the last run, still stopping
    assert held.append([Record(TOPIC, KEY, e.model_dump_json().encode()) for e in old]) == 0
    async with running(publisher(broker.bootstrap, spool_dir)) as events_out:
        publish_all(events_out, new)
        # Time for the new events to overtake, as they did (sent within ~0.1 s): no
        # state of the publisher says it, so a while, not a readiness check.
        await asyncio.sleep(1.0)
        await asyncio.to_thread(held.close)  # the last run has stopped
        await wait_for(lambda: events_out.published == len(old) + len(new))
    sent = old + new
    assert_exactly_once_in_order(await read_all(broker.bootstrap, {e.event_id for e in sent}), sent)


async def test_events_a_spool_write_cut_off_by_stop_refuses_are_not_lost_uncounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() cancels a loop that overruns it; cancelled while a spool append goes on in
    its thread (here: the segment it creates is a FIFO nobody reads, so its open hangs,
    as on a hung disk), that append goes on. What it then refuses (its write fails) is
    spooled again by stop(), or counted as dropped. The queue was already cleared: it
    was lost, not counted, not logged."""
    monkeypatch.setattr(publisher_module, "ABANDON_TIMEOUT_S", 0.2)
    spool_dir = tmp_path / "spool"
    events = pings(0, 50)
    events_out = publisher(f"127.0.0.1:{free_port()}", spool_dir)
    await events_out.start()
    await wait_for(lambda: events_out.spool_room)  # opened: its next segment is the 1st
    fifo = spool_dir / f"{1:020d}.seg"
    os.mkfifo(fifo)
    publish_all(events_out, events)
    await wait_for(lambda: events_out.backlog == 0)  # taken by the append, stuck in open
    task = events_out._task
    assert task is not None
    stopping = asyncio.ensure_future(events_out.stop(drain_timeout=0))
    await wait_for(task.done)  # stop() gave up on the loop; the append goes on
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # let its open return, then
    os.close(reader)  # its write (or fsync) fail: the whole batch refused
    await asyncio.wait_for(stopping, 30)
    fifo.unlink()
    assert events_out.spooled + events_out.dropped == len(events)
    assert await spooled_events(spool_dir) == events[: events_out.spooled]


async def test_a_segment_that_cannot_be_read_does_not_hold_up_the_rest(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment the spool cannot read (here a directory where its file should be: an
    I/O error on open, as a permission denied is) is logged at ERROR with its path and
    left on disk; the segments after it and new events are delivered meanwhile, and it
    is tried again (with a capped backoff), and replayed once readable. Its failed read
    restarted the publisher every second, forever: nothing after it was ever sent."""
    spool_dir = tmp_path / "spool"
    stuck, later, new = pings(0, 20), pings(20, 20), pings(40, 20)
    unreadable = spool_dir / f"{1:020d}.seg"
    unreadable.mkdir(parents=True)
    held = Spool(spool_dir, max_bytes=1 << 30)  # its next segment is the 2nd
    assert held.append([Record(TOPIC, KEY, e.model_dump_json().encode()) for e in later]) == 0
    held.close()
    elsewhere = Spool(tmp_path / "elsewhere", max_bytes=1 << 30)
    assert elsewhere.append([Record(TOPIC, KEY, e.model_dump_json().encode()) for e in stuck]) == 0
    elsewhere.close()
    async with running(publisher(broker.bootstrap, spool_dir)) as events_out:
        publish_all(events_out, new)
        await wait_for(lambda: events_out.published == len(later + new), seconds=15)
        assert f"cannot read spool segment {unreadable}" in caplog.text
        assert events_out.spool_unreadable == 1 and unreadable.is_dir()  # left as it was
        rendered = generate_latest(IngressMetrics(events_out).registry).decode()
        assert sample(rendered, "llmtap_spool_unreadable_segments") == 1
        unreadable.rmdir()  # readable now: tried again, and replayed
        (tmp_path / "elsewhere" / f"{1:020d}.seg").rename(unreadable)
        await wait_for(lambda: events_out.published == len(stuck + later + new), seconds=15)
        await wait_for(lambda: not events_out.spool_bytes)
        assert events_out.dropped == 0 and events_out.spool_unreadable == 0
    sent = stuck + later + new
    got = await read_all(broker.bootstrap, {e.event_id for e in sent})
    assert sorted(e.seq for e in got) == [e.seq for e in sent]  # each once


async def test_a_segment_whose_file_is_gone_is_forgotten_not_read_again_for_ever(
    tmp_path: Path, broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    """A segment set aside as unreadable, then deleted from outside llmtap: its next
    read finds no file, so it is forgotten (logged at ERROR once: its events are lost),
    no longer counted unreadable nor in the spool's bytes. It was read again, with an
    ERROR, every minute for ever, and ``llmtap_spool_unreadable_segments`` stayed 1."""
    spool_dir = tmp_path / "spool"
    later = pings(0, 20)
    unreadable = spool_dir / f"{1:020d}.seg"
    unreadable.mkdir(parents=True)
    held = Spool(spool_dir, max_bytes=1 << 30)  # its next segment is the 2nd
    assert held.append([Record(TOPIC, KEY, e.model_dump_json().encode()) for e in later]) == 0
    held.close()
    async with running(publisher(broker.bootstrap, spool_dir)) as events_out:
        await wait_for(lambda: events_out.published == len(later), seconds=15)
        assert events_out.spool_unreadable == 1
        unreadable.rmdir()  # deleted from outside
        await wait_for(lambda: not events_out.spool_unreadable, seconds=10)
        assert events_out.spool_bytes == 0
        assert caplog.text.count(f"{unreadable} is gone") == 1 and "lost" in caplog.text
    assert caplog.text.count(f"cannot read spool segment {unreadable}") == 1


async def test_spool_room_means_room_for_the_largest_event(tmp_path: Path) -> None:
    """``spool_room`` (/readyz's) says whether events have somewhere to wait: with less
    room left than the largest event takes (a 1 MiB record), it is not. It said so as
    long as the spool was below its limit by a byte."""
    nowhere = f"127.0.0.1:{free_port()}"
    limit = 2 << 20
    async with running(publisher(nowhere, tmp_path / "spool", spool_max_bytes=limit)) as out:
        await wait_for(lambda: out.spool_room)  # opened, empty
        for _ in range(12):  # 1.2 MB spooled: 0.8 MiB left, less than one largest event
            out.publish(TOPIC, KEY, b"x" * 100_000)
        await wait_for(lambda: out.spooled == 12)
        assert limit - out.spool_bytes < 1 << 20
        assert not out.spool_room


async def test_a_stop_mid_segment_replays_only_what_was_not_delivered(
    tmp_path: Path, broker: Broker
) -> None:
    """A stop in the middle of a segment's replay notes (in a file beside it, fsynced)
    how many of its records were delivered: the next start replays the rest only, each
    event once. It replayed the whole segment again (up to 100,000 duplicates)."""
    spool_dir = tmp_path / "spool"
    events = pings(0, 6 * MAX_BATCH)
    first = publisher(f"127.0.0.1:{free_port()}", spool_dir, queue_size=len(events))
    async with running(first):
        publish_all(first, events)
    assert first.spooled == len(events) and len(segment_files(spool_dir)) == 1

    second = publisher(broker.bootstrap, spool_dir)
    async with running(second):
        await wait_for(lambda: second.replayed >= MAX_BATCH)
    assert 0 < second.replayed < len(events)  # stopped mid-segment

    third = publisher(broker.bootstrap, spool_dir)
    async with running(third):
        await wait_for(lambda: third.replayed > 0 and not third.spool_bytes)
    assert third.replayed == len(events) - second.replayed
    assert list(spool_dir.iterdir()) == [spool_dir / "LOCK"]
    assert_exactly_once_in_order(
        await read_all(broker.bootstrap, {e.event_id for e in events}), events
    )


_REPO = Path(__file__).resolve().parents[1]
_REPLAY_UNTIL_KILLED = """
import asyncio, sys
from pathlib import Path
from ingress.publisher import EventPublisher
from llmtap.kafka import Kafka
async def main() -> None:
    out = EventPublisher(
        Kafka(sys.argv[1]), queue_size=10, spool_dir=Path(sys.argv[2]), spool_max_bytes=1 << 30
    )
    await out.start()
    told = -1
    while True:  # each count once: what the test reads is never behind
        if out.replayed != told:
            told = out.replayed
            print(told, flush=True)
        await asyncio.sleep(0.005)
asyncio.run(main())
"""


async def test_a_crash_mid_segment_replays_only_what_followed_the_last_note(
    tmp_path: Path, broker: Broker
) -> None:
    """A process replaying a large segment (100,000 events, as stop() spools them),
    killed outright (SIGKILL: no stop, no note at stop), has noted its progress as it
    went: the next start replays only what followed the last note, and every event
    arrives at least once. It replayed the whole segment again."""
    spool_dir = tmp_path / "spool"
    events = pings(0, 20 * MAX_BATCH)
    spool = Spool(spool_dir, max_bytes=1 << 30)
    assert spool.append([Record(TOPIC, KEY, e.model_dump_json().encode()) for e in events]) == 0
    spool.close()
    assert len(segment_files(spool_dir)) == 1

    env = os.environ | {
        "PYTHONPATH": os.pathsep.join((str(_REPO), os.environ.get("PYTHONPATH", "")))
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _REPLAY_UNTIL_KILLED,
        broker.bootstrap,
        str(spool_dir),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        replayed = 0
        async with asyncio.timeout(60):
            while replayed < 2 * MAX_BATCH:  # two flights at least: one noted
                line = await child.stdout.readline()
                assert line, "the replaying process exited"
                replayed = int(line)
        child.kill()
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert replayed < len(events), "killed too late: the replay was over"

    third = publisher(broker.bootstrap, spool_dir)
    async with running(third):
        await wait_for(lambda: third.replayed > 0 and not third.spool_bytes, seconds=60)
    assert third.dropped == 0 and segment_files(spool_dir) == []
    assert third.replayed <= len(events) - MAX_BATCH  # fewer than the whole segment again
    got = await read_all(broker.bootstrap, {e.event_id for e in events})
    assert {e.event_id for e in got} == {e.event_id for e in events}  # each at least once
    assert len(got) - len(events) < len(events)
