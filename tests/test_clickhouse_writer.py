"""The ClickHouse writer against a real broker (Tansu) and a real store (chDB)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from clickhouse_connect.driver.binding import format_bind_value
from clickhouse_connect.driver.exceptions import DataError
from prometheus_client import generate_latest

from llmtap import wire
from llmtap.config import Settings
from llmtap.events import Attribution, CostedEvent, Usage
from llmtap.names import Names
from sinks.clickhouse import replay
from sinks.clickhouse.decode import Batch, calls_body, decode_batch, decode_pool, ready, runs_of
from sinks.clickhouse.rows import CALLS_COLUMNS
from sinks.clickhouse.write import calls_types, write_batch
from sinks.clickhouse.writer import ClickHouseWriter
from sinks.metrics import store_registry
from sql.migrate import available, migrate
from sql.native import native_body
from sql.store import Store
from stream.sketches import bin_of
from tests import prometheus, sample
from tests.conftest import Broker


def costed(model: str = "gpt-4o", output_tokens: int = 5) -> CostedEvent:
    call = sample.response(
        model_requested=model,
        model_served=model,
        usage=Usage(input_tokens=10, output_tokens=output_tokens),
    )
    return sample.costed(call, sample.cost("0.000025", "0.00005"))


def count(store: Store, table: str) -> int:
    return int(store.command(f"SELECT count() FROM {table}"))


def test_migrations_apply_once_and_are_recorded(store: Store) -> None:
    assert migrate(store) == []  # the fixture applied them; nothing left to do
    versions = sorted(r["version"] for r in store.rows("SELECT version FROM schema_migrations"))
    assert versions == [m.version for m in available()]


def test_write_batch_is_idempotent_on_event_id(store: Store) -> None:
    events = [costed() for _ in range(20)]
    batch = Batch(events=[*events, events[0], events[1]])  # duplicates inside the batch too
    assert write_batch(store, batch) == 20
    assert write_batch(store, Batch(events=events[5:])) == 0  # a replay adds nothing
    assert count(store, "calls") == 20
    total = store.rows("SELECT sum(cost_total) AS total FROM calls")[0]["total"]
    assert total == Decimal("0.000075") * 20


def test_money_is_stored_exactly_whatever_its_decimal_spelling(store: Store) -> None:
    """Money is sent as the text of each Decimal (exponents included) and parsed by
    ClickHouse into Decimal(18, 9): exact to the nano-dollar, digits below it cut. A
    zero spelled with an exponent past 9 ("0E+10", as Decimal arithmetic can make it)
    ClickHouse parsed as no number: a priced call stored with its costs NULL."""
    spelled = {
        "7.5E-8": Decimal("0.000000075"),
        "0E-9": Decimal(0),
        "0E+10": Decimal(0),
        "-0E+18": Decimal(0),
        "1E-10": Decimal(0),
        "123456789.1234567891": Decimal("123456789.123456789"),
        "0.000075": Decimal("0.000075"),
    }
    events = []
    for text in spelled:
        event = costed()
        assert event.cost is not None
        cost = event.cost.model_copy(update={"total": Decimal(text), "cache_write": Decimal(text)})
        events.append(event.model_copy(update={"cost": cost}))
    assert write_batch(store, Batch(events=events)) == len(events)
    stored = {
        r["event_id"]: (r["cost_total"], r["cost_cache_write"])
        for r in store.rows("SELECT event_id, cost_total, cost_cache_write FROM calls")
    }
    assert [stored[e.event_id] for e in events] == [(v, v) for v in spelled.values()]


@pytest.mark.parametrize("decoded", ["body", "columns"])
def test_an_amount_below_a_nano_dollar_is_stored_as_zero_not_unknown(
    store: Store, decoded: str
) -> None:
    """Decimal(18, 9) keeps nothing of an amount below a nano-dollar, and ClickHouse cuts
    one to 0; but one whose exponent is long (1E-9999999999999, as a message may spell
    it: the contract takes any decimal) it read as no number, and stored the priced
    call's costs as NULL, unknown. Sent as "0", whether the decode process built the
    body or the write did."""
    message = orjson.loads(costed().model_dump_json())
    message["cost"]["cache_write"] = "1E-9999999999999"
    message["cost"]["reasoning"] = "-1E-4294967297"
    message["cost"]["cached_input"] = "7.5E-10"
    records = runs_of([(Names().costed, 0, 0, orjson.dumps(message))])
    batch = decode_batch(records, calls_types(store) if decoded == "body" else None)
    batch.source = records
    assert (batch.calls_body is not None) == (decoded == "body")
    assert write_batch(store, batch) == 1
    row = store.rows(
        "SELECT cost_cache_write, cost_reasoning, cost_cached_input, cost_total FROM calls"
    )[0]
    assert row == {
        "cost_cache_write": Decimal(0),
        "cost_reasoning": Decimal(0),
        "cost_cached_input": Decimal(0),
        "cost_total": Decimal("0.000075"),
    }


def test_an_id_sharing_a_stored_ids_prefix_is_still_written(store: Store) -> None:
    """The duplicate check looks events up by the first digits of their ids: a new event
    whose id starts like a stored one is a match it must see through."""
    stored = costed()
    twin = costed().model_copy(
        update={"event_id": uuid.UUID(str(stored.event_id)[:8] + str(uuid.uuid4())[8:])}
    )
    assert str(twin.event_id)[:8] == str(stored.event_id)[:8]
    assert twin.event_id != stored.event_id
    assert write_batch(store, Batch(events=[stored])) == 1
    assert write_batch(store, Batch(events=[twin, stored])) == 1
    ids = {r["event_id"] for r in store.rows("SELECT event_id FROM calls")}
    assert ids == {stored.event_id, twin.event_id}


FIELD_VALUE_LIMIT = 128 * 1024  # a ClickHouse server's http_max_field_value_size


def test_a_duplicate_check_binds_no_value_a_clickhouse_server_refuses(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ClickHouse server reads each bound value as an HTTP form field, and refuses one
    past its http_max_field_value_size, 128 KiB by default ("Field value too long"): the
    duplicate checks of a batch of 40,000 calls (the default sink_batch_rows) and of one
    of 4,000 windows bound all their ids at once (~360 KB, ~160 KB) and failed every
    write of the batch, the writer stuck on it. chDB binds any size, so the values are
    measured here, as clickhouse-connect sends them; in parts, every stored row is found."""
    bound: list[int] = []
    rows = store.rows

    def measured(sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        bound.extend(len(format_bind_value(value)) for value in (parameters or {}).values())
        return rows(sql, parameters)

    monkeypatch.setattr(store, "rows", measured)
    windows = runs_of(
        (Names().windows, 0, offset, a_window(event_id=uuid.uuid4())) for offset in range(4_000)
    )
    batch = Batch(events=[costed() for _ in range(40_000)], windows=decode_batch(windows).windows)
    assert write_batch(store, batch) == 40_000
    assert write_batch(store, batch) == 0  # a replay: each found stored
    assert (count(store, "calls"), count(store, "windows")) == (40_000, 4_000)
    assert max(bound) <= FIELD_VALUE_LIMIT


def test_messages_in_any_order_are_runs_in_the_order_a_batch_reads_them() -> None:
    """A batch is a run per partition, in topic, partition and offset order, however its
    messages came (a replay reads them in another order than the writer did)."""
    costed_, windows = Names().costed, Names().windows
    messages = [
        (windows, 0, 4, b"w4"),
        (costed_, 1, 9, b"c9"),
        (costed_, 0, 3, b"a3"),
        (windows, 0, 2, b"w2"),
        (costed_, 0, 1, b"a1"),
    ]
    runs = runs_of(messages)
    assert [(r.topic, r.partition, r.offsets, r.values) for r in runs] == [
        (costed_, 0, [1, 3], [b"a1", b"a3"]),
        (costed_, 1, [9], [b"c9"]),
        (windows, 0, [2, 4], [b"w2", b"w4"]),
    ]
    assert runs == runs_of(reversed(messages)) and sum(map(len, runs)) == 5
    assert runs_of([]) == []


def test_decoded_columns_write_what_the_events_say(store: Store) -> None:
    """A batch decoded in a decode process (plain values: str ids, int times, str money)
    stores exactly what the same events stored as models do; a message that is no
    event is a dead letter, whichever way."""
    events = [costed() for _ in range(5)]
    messages = [(Names().costed, 0, i, e.model_dump_json().encode()) for i, e in enumerate(events)]
    messages.append((Names().costed, 0, 5, b"{}"))
    decoded = decode_batch(runs_of(messages))
    assert len(decoded) == 6 and len(decoded.dead_letters) == 1
    assert decoded.dead_letters[0].offset == 5 and decoded.dead_letters[0].raw == b"{}"
    # Half as columns, half as models, in one batch; then the same events again.
    more = [costed("gpt-4o-mini") for _ in range(3)]
    assert write_batch(store, Batch(events=more, calls=decoded.calls)) == 8
    assert write_batch(store, Batch(events=[*events, *more])) == 0
    stored = {
        str(r["event_id"]): r
        for r in store.rows(
            "SELECT event_id, request_id, ts_start, ts_end, model, cost_total, cost_output"
            " FROM calls"
        )
    }
    assert len(stored) == 8
    for e in [*events, *more]:
        row = stored[str(e.event_id)]
        assert row["request_id"] == e.request_id
        end = e.response.ts_end  # UTC; read back naive (UTC), to the millisecond
        assert row["ts_end"] == end.replace(microsecond=end.microsecond // 1000 * 1000, tzinfo=None)
        assert row["model"] == e.response.model
        assert e.cost is not None
        assert row["cost_total"] == e.cost.total and row["cost_output"] == e.cost.output
    assert count(store, "dead_letters") == 0  # write_batch got none: decode_batch kept it


def test_a_body_built_in_a_decode_process_stores_what_its_columns_do(store: Store) -> None:
    """The body of the ``calls`` insert a decode process builds is the bytes the write
    builds from the same columns (so a repeated insert splits into the same blocks) and
    stores the same rows. When some of its events are stored already, or come twice,
    only the rest is written, decoded again from the messages."""
    who = Attribution(tenant="acme", team="search", user="u1", properties={"plan": "pro"})
    events = [
        sample.costed(sample.response(attribution=who), None if i == 2 else sample.cost("0.1"))
        for i in range(6)
    ]
    messages = [(Names().costed, 0, i, e.model_dump_json().encode()) for i, e in enumerate(events)]
    records = runs_of(messages)
    types = calls_types(store)
    assert "LowCardinality" not in "".join(types)  # plain strings: converted in ClickHouse
    batch = decode_batch(records, types)
    assert batch.calls == [] and batch.calls_body is not None and len(batch) == 6
    assert batch.calls_body.native == calls_body(types, decode_batch(records).calls)
    batch.source = records
    assert write_batch(store, batch) == 6
    everything = "SELECT * FROM calls ORDER BY event_id"
    from_body = store.rows(everything)
    store.command("TRUNCATE TABLE calls")
    assert write_batch(store, Batch(calls=decode_batch(records).calls)) == 6
    assert store.rows(everything) == from_body
    assert {r["properties"]["plan"] for r in from_body} == {"pro"}
    assert sum(r["cost_total"] is None for r in from_body) == 1

    # The fourth event again, later in the partition (an upstream duplicate).
    twice = runs_of([*messages, (Names().costed, 0, 6, messages[3][3])])
    for stored_before, written in ((0, 6), (2, 4)):
        store.command("TRUNCATE TABLE calls")
        assert write_batch(store, Batch(events=events[:stored_before])) == stored_before
        again = decode_batch(twice, types)
        again.source = twice
        assert write_batch(store, again) == written
        assert write_batch(store, batch) == 0
        assert store.rows(everything) == from_body
    # Without its messages, a body whose rows are partly stored cannot be cut down.
    with pytest.raises(ValueError, match="needs its messages"):
        write_batch(store, Batch(calls_body=batch.calls_body))


def modules_a_first_batch_imports(records: list[Any], types: tuple[str, ...]) -> list[str]:
    """Run in a decode process: the modules its first batch's decode imported."""
    before = set(sys.modules)
    assert decode_batch(records, types).calls_body is not None
    return sorted(set(sys.modules) - before)


def test_a_decode_process_is_ready_for_its_first_batch_when_started(store: Store) -> None:
    """A decode process's first batch imports nothing: what the insert's encoder
    imports at its first use (pandas, ~0.3 s) is done as the process starts, not in the
    first batch's time (in every decode process, at every start of the pool)."""
    records = runs_of([(Names().costed, 0, 0, costed().model_dump_json().encode())])
    with decode_pool(1) as pool:
        imported = pool.submit(modules_a_first_batch_imports, records, calls_types(store))
        assert imported.result(timeout=60) == []


def test_an_event_calls_cannot_hold_is_a_dead_letter(store: Store) -> None:
    """The contract bounds no token count; ``calls`` holds them as UInt32. Such an event
    goes to dead_letters, raw bytes kept, and the rest of its batch is written (it
    would otherwise fail every insert of the batch, forever)."""
    huge = sample.costed(sample.response(usage=Usage(input_tokens=2**32)), None)
    fine = costed()
    records = runs_of(
        [
            (Names().costed, 0, 0, huge.model_dump_json().encode()),
            (Names().costed, 0, 1, fine.model_dump_json().encode()),
        ]
    )
    batch = decode_batch(records, calls_types(store))
    batch.source = records
    assert [d.offset for d in batch.dead_letters] == [0]
    assert "4294967296" in batch.dead_letters[0].error
    assert write_batch(store, batch) == 1
    assert count(store, "dead_letters") == 1
    assert store.rows("SELECT event_id FROM calls")[0]["event_id"] == fine.event_id


def test_a_dead_letter_at_an_offset_given_again_is_stored_too(store: Store) -> None:
    """A broker that lost its log (the embedded one, restarted) gives its offsets again:
    another bad message at an offset a stored dead letter has is stored too (it was
    taken for that one, replayed, and lost); the same message again is not."""

    def written(raw: bytes) -> None:
        records = runs_of([(Names().costed, 0, 7, raw)])
        batch = decode_batch(records, calls_types(store))
        batch.source = records
        assert len(batch.dead_letters) == 1
        write_batch(store, batch)

    written(b"not json")
    written(b"not json")  # a replay: already stored
    assert count(store, "dead_letters") == 1
    written(b"\xff other")  # the same place, after the broker's restart
    stored = store.rows("SELECT offset, base64Encode(raw) AS raw FROM dead_letters")
    assert sorted((r["offset"], base64.b64decode(r["raw"])) for r in stored) == [
        (7, b"not json"),
        (7, b"\xff other"),
    ]


@pytest.mark.parametrize("field", ["total", "input", "web_search"])
@pytest.mark.parametrize("amount", ["NaN", "sNaN", "-Infinity", "1234567890.5", "-1E+9"])
def test_a_cost_calls_cannot_hold_is_a_dead_letter(store: Store, amount: str, field: str) -> None:
    """Past Decimal(18, 9), or no number at all: ClickHouse stored NULL, a call neither
    priced nor said to be unpriced, and no error said so."""
    event = orjson.loads(costed().model_dump_json())
    event["cost"][field] = amount
    records = runs_of([(Names().costed, 0, 0, orjson.dumps(event))])
    batch = decode_batch(records, calls_types(store))
    assert [d.offset for d in batch.dead_letters] == [0], batch.dead_letters
    assert "Decimal(18, 9)" in batch.dead_letters[0].error


def a_window(**change: Any) -> bytes:
    """A window message as the stream publishes it, with ``change``."""
    empty = wire.Sketch(relative_accuracy=0.01, zero_count=0, count=0)
    window = wire.Window(
        event_id=uuid.uuid4(),
        size_s=60,
        dimension="team",
        value="search",
        window_start=datetime(2026, 3, 15, 11, 0, tzinfo=UTC),
        window_end=datetime(2026, 3, 15, 11, 1, tzinfo=UTC),
        partitions=(0,),
        requests=1,
        errors=0,
        input_tokens=10,
        output_tokens=5,
        cached_input_tokens=0,
        cost=Decimal("0.01"),
        unpriced=0,
        usage_missing=0,
        latency_ms=empty,
        ttft_ms=empty,
    )
    return wire.encode(msgspec.structs.replace(window, **change))


def test_a_window_windows_cannot_hold_is_a_dead_letter(store: Store) -> None:
    """The contract reads these; the table cannot hold them. Each went into the batch,
    failed every insert of it, and stopped the writer for good."""
    bad = wire.Sketch(relative_accuracy=0.01, zero_count=0, keys=(1, 2), counts=(1,), count=1)

    def sketch(*keys: int) -> wire.Sketch:
        return wire.Sketch(
            relative_accuracy=0.01,
            zero_count=0,
            keys=keys,
            counts=(1,) * len(keys),
            count=len(keys),
            sum=1.0,
            min=1.0,
            max=2.0,
        )

    records = runs_of(
        (Names().windows, 0, offset, raw)
        for offset, raw in enumerate(
            [
                a_window(latency_ms=bad),
                a_window(errors_by_class={"x": -1}),
                a_window(partitions=(70_000,)),
                a_window(cost=Decimal("1e10")),
                # A bin past what a float holds: its quantile overflowed, in the write.
                a_window(ttft_ms=sketch(1_000_000)),
                # Bins 10**12 apart: reading them allocated a list spanning both
                # (MemoryError, in decode: the store process exited, to meet it again).
                a_window(latency_ms=sketch(0, 10**12)),
                a_window(window_start=datetime(999, 6, 1, 12, tzinfo=UTC)),
                a_window(),
            ]
        )
    )
    batch = decode_batch(records, calls_types(store))
    assert [d.offset for d in batch.dead_letters] == [0, 1, 2, 3, 4, 5, 6]
    write_batch(store, batch)
    assert (count(store, "windows"), count(store, "dead_letters")) == (1, 7)


def test_a_window_whose_sketch_is_not_finite_is_a_dead_letter(store: Store) -> None:
    """A sketch's sum, min or max of 1e400 (JSON read as infinity), "nan" or near
    float's largest was read: the window's quantiles stored as infinity or NaN, its
    sketch as nulls no reader takes back, its shares' sums infinite. They are
    durations (and their sum), bounded as a call's are."""
    bin_ = bin_of(2.5)
    assert bin_ is not None
    sketch = wire.Sketch(relative_accuracy=0.01, zero_count=0, keys=(bin_,), counts=(1,),
                         count=1, sum=2.5, min=2.5, max=2.5)  # fmt: skip
    good = a_window(latency_ms=sketch).decode()
    raws = [
        good.replace('"sum":2.5', '"sum":1e400'),
        good.replace('"sum":2.5', '"sum":"nan"'),
        good.replace('"sum":2.5', '"sum":1.7e308'),
        good.replace('"max":2.5', '"max":"inf"'),
        good.replace('"min":2.5', '"min":1e300'),
        good,
    ]
    assert len(set(raws)) == len(raws)
    records = runs_of([(Names().windows, 0, i, raw.encode()) for i, raw in enumerate(raws)])
    batch = decode_batch(records, calls_types(store))
    assert [d.offset for d in batch.dead_letters] == [0, 1, 2, 3, 4]
    write_batch(store, batch)
    assert (count(store, "windows"), count(store, "dead_letters")) == (1, 5)


@pytest.mark.parametrize(
    "at",
    [
        datetime(999, 6, 1, 12, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(2200, 1, 1, tzinfo=UTC),
    ],
)
def test_a_call_at_a_time_the_store_cannot_hold_is_a_dead_letter(
    store: Store, at: datetime
) -> None:
    """The contract takes any UTC time. Before year 1000 the duplicate check bound one
    ClickHouse refused (written unpadded), at year 1 it could not make one, and past
    2106 the rollups' buckets clamp it: the first two failed every write of the batch."""
    raws = [sample.costed(sample.response(at=at), None), costed()]
    records = runs_of(
        [(Names().costed, 0, i, event.model_dump_json().encode()) for i, event in enumerate(raws)]
    )
    batch = decode_batch(records, calls_types(store))
    batch.source = records
    assert [d.offset for d in batch.dead_letters] == [0]
    assert "1970-2106" in batch.dead_letters[0].error
    assert write_batch(store, batch) == 1


def test_a_call_timed_past_what_the_contract_holds_is_a_dead_letter(store: Store) -> None:
    """A ttft of 1e400 (JSON read as infinity) was stored as NULL, and a latency near
    float's largest was stored, its rollups' sums made infinite: any producer can write
    a response event, so the contract bounds a duration (finite, at most a week)."""
    good = costed().model_dump_json()
    raws = [
        good.replace('"ttft_ms":null', '"ttft_ms":1e400'),
        good.replace('"latency_ms":12.5', '"latency_ms":1.7e308'),
        good,
    ]
    assert len(set(raws)) == 3
    records = runs_of([(Names().costed, 0, i, raw.encode()) for i, raw in enumerate(raws)])
    batch = decode_batch(records, calls_types(store))
    batch.source = records
    assert [d.offset for d in batch.dead_letters] == [0, 1]
    assert write_batch(store, batch) == 1
    assert store.rows("SELECT max(latency_ms) AS most FROM calls")[0]["most"] < 1e6


def test_a_batch_of_calls_over_more_than_100_months_is_written(store: Store) -> None:
    """``calls`` and every rollup are partitioned by month, and ClickHouse refuses an
    insert touching more than 100 partitions by default (a backfill, a clock gone
    wrong): the same batch failed every write."""
    start = datetime(2015, 1, 15, tzinfo=UTC)
    events = [
        sample.costed(sample.response(at=start + timedelta(days=31 * m)), None) for m in range(101)
    ]
    records = runs_of(
        [(Names().costed, 0, i, event.model_dump_json().encode()) for i, event in enumerate(events)]
    )
    batch = decode_batch(records, calls_types(store))
    batch.source = records
    assert write_batch(store, batch) == 101
    assert count(store, "calls") == 101


def test_a_body_the_encoder_refuses_is_left_to_the_write(store: Store) -> None:
    """clickhouse-connect does not raise when it cannot encode a value (it logs and
    writes a marker into the body): native_body raises, and a decode process whose body
    failed sends the columns, for the write to encode (and report) itself."""
    with pytest.raises(DataError):
        native_body("t", ["a"], ["UInt16"], [(70_000,)])
    events = [costed(output_tokens=300)]
    records = runs_of([(Names().costed, 0, 0, events[0].model_dump_json().encode())])
    narrow = tuple(
        "UInt8" if name == "output_tokens" else kind
        for name, kind in zip(CALLS_COLUMNS, calls_types(store), strict=True)
    )
    batch = decode_batch(records, narrow)
    assert batch.calls_body is None and len(batch.calls[0]) == 1
    assert write_batch(store, batch) == 1
    assert store.rows("SELECT output_tokens FROM calls")[0]["output_tokens"] == 300


def test_a_compressed_body_stores_the_same_rows(store: Store) -> None:
    """Over HTTP the client compresses what it sends (lz4 or zstd, as negotiated); the
    body of the calls insert is compressed alike. chDB takes a compressed body too, so
    the path runs here."""
    records = runs_of(
        [(Names().costed, 0, i, costed().model_dump_json().encode()) for i in range(3)]
    )
    batch = decode_batch(records, calls_types(store))
    batch.source = records
    store._client.write_compression = "lz4"
    try:
        assert write_batch(store, batch) == 3
    finally:
        store._client.write_compression = None
    ids = {str(r["event_id"]) for r in store.rows("SELECT event_id FROM calls")}
    assert batch.calls_body is not None and ids == set(batch.calls_body.event_ids)


class CrashAfterWrite(Exception):
    pass


class CrashingWriter(ClickHouseWriter):
    """Dies between a successful write and its offset commit: the worst moment."""

    async def _write(self, batch: Batch) -> None:
        await super()._write(batch)
        raise CrashAfterWrite


async def produce(bootstrap: str, payloads: list[bytes], names: Names | None = None) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in payloads:
            await producer.send((names or Names()).costed, value, key=str(uuid.uuid4()).encode())
        await producer.flush()
    finally:
        await producer.stop()


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll a readiness condition for up to 30 s."""
    async with asyncio.timeout(30):
        while not predicate():
            await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    "decode_processes", [0, 1, 2], ids=["decode-here", "decode-process", "decode-processes"]
)
async def test_writer_replay_after_crash_has_no_duplicates_and_dead_letters_bad_input(
    broker: Broker, store: Store, decode_processes: int
) -> None:
    """Killed between a write and its commit (the worst moment), a writer's successor
    re-reads the batch and writes no duplicate; bad input is dead-lettered. Decoding
    in this process or in a decode process alike."""
    settings = Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.3)
    events = [costed() for _ in range(40)]
    payloads = [e.model_dump_json().encode() for e in events]
    payloads.insert(10, b"\x00not an event")
    payloads.append(payloads[3])  # a duplicate delivery from upstream
    await produce(broker.bootstrap, payloads)

    settings = settings.model_copy(update={"sink_decode_processes": decode_processes})
    first = CrashingWriter(settings, store)
    with pytest.raises(CrashAfterWrite):
        await asyncio.wait_for(first.run(), 60)
    written_before_crash = count(store, "calls")
    assert written_before_crash > 0  # it did write, and never committed

    second = ClickHouseWriter(settings, store)
    task = asyncio.create_task(second.run())
    try:
        await wait_for(lambda: count(store, "calls") == 40 and count(store, "dead_letters") == 1)
        # Let the writer go round once more; the count must not grow.
        batches = second.batches_written
        await produce(broker.bootstrap, [costed("gpt-4o-mini").model_dump_json().encode()])
        await wait_for(lambda: second.batches_written > batches and count(store, "calls") == 41)
        # The store's /metrics: rows it inserted (not those it found already written),
        # the insert it repeated, the message it could not decode.
        metrics = generate_latest(store_registry(lambda: second, lambda: None)).decode()
        assert (
            prometheus.sample(metrics, "llmtap_store_rows_written_total")
            == 41 - written_before_crash
        )
        assert prometheus.sample(metrics, "llmtap_store_inserts_repeated_total") >= 1
        assert prometheus.sample(metrics, "llmtap_store_dead_letters_total") == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stored = {str(r["event_id"]) for r in store.rows("SELECT event_id FROM calls")}
    assert {str(e.event_id) for e in events} <= stored
    dead = store.rows("SELECT raw, topic, error FROM dead_letters")[0]
    assert dead["raw"] in (b"\x00not an event", "\x00not an event")
    assert dead["topic"] == Names().costed and dead["error"]


def slow_decode_batch(
    delay: float, records: list[Any], calls_types: tuple[str, ...] | None = None
) -> Batch:
    """decode_batch taking ``delay`` seconds more, so the decodes of batches read one
    after another overlap. Given to the writer as a partial of it, which the decode
    processes import from this module by name."""
    time.sleep(delay)
    return decode_batch(records, calls_types)


async def test_two_decode_processes_write_many_batches_once_each_and_commit_them(
    broker: Broker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default, two decode processes: batches decoded side by side are written
    and committed in the order read. Every event is stored once, the bad message is a
    dead letter, the group commits past every message, and a writer of the same
    group afterwards reads only what came since, with nothing to repeat."""
    monkeypatch.setattr(
        "sinks.clickhouse.writer.decode_batch", functools.partial(slow_decode_batch, 0.05)
    )
    names = Names(f"t{uuid.uuid4().hex[:8]}")  # a topic of this test's own
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        kafka_namespace=names.namespace,
        sink_batch_rows=25,
        sink_batch_seconds=0.3,
        sink_decode_processes=2,
    )
    events = [costed(output_tokens=i + 1) for i in range(300)]
    payloads = [e.model_dump_json().encode() for e in events]
    payloads.insert(150, b"\x00not an event")
    await produce(broker.bootstrap, payloads, names)

    first = ClickHouseWriter(settings, store)
    task = asyncio.create_task(first.run())
    try:
        await wait_for(lambda: count(store, "calls") == 300 and count(store, "dead_letters") == 1)
        assert first.batches_written >= 12  # 301 messages in batches of at most 25
        async with asyncio.timeout(30):  # the last batch's commit follows its write
            while await committed(settings) < len(payloads):
                await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stored = store.rows("SELECT event_id, output_tokens FROM calls")
    assert sorted(int(r["output_tokens"]) for r in stored) == list(range(1, 301))

    second = ClickHouseWriter(settings, store)
    task = asyncio.create_task(second.run())
    try:
        await produce(
            broker.bootstrap, [costed(output_tokens=301).model_dump_json().encode()], names
        )
        await wait_for(lambda: second.batches_written == 1)
        assert second.rows_written == 1 and second.inserts_repeated == 0
        assert count(store, "calls") == 301
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def committed(settings: Settings) -> int:
    """Messages of the costed topic the writers' group has committed past, on all its
    partitions (a topic of the test's own: offsets from 0, one a message; Tansu's end
    offsets are not exact)."""
    names = settings.kafka.names
    partitions = {TopicPartition(names.costed, p) for p in range(settings.topic_partitions)}
    found = await replay.committed_offsets(settings.kafka, names.sink_group, partitions)
    return sum(max(offset, 0) for offset in found.values())


@pytest.mark.parametrize("retry_s", [0.0, 600.0])
async def test_a_killed_decode_process_is_replaced_once_and_no_batch_is_lost(
    broker: Broker,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    retry_s: float,
) -> None:
    """A decode process killed (the OOM killer's pick, say) while both decode
    processes hold a batch: every batch the pool held fails, each is decoded in the
    store process, the pool is replaced once (not once per batch), and every event
    is stored once. A pool that dies within POOL_RETRY_S of its start (600 s: this
    one) is replaced only that much later, the store process decoding meanwhile."""
    monkeypatch.setattr(ClickHouseWriter, "POOL_RETRY_S", retry_s)
    monkeypatch.setattr(
        "sinks.clickhouse.writer.decode_batch", functools.partial(slow_decode_batch, 0.4)
    )
    names = Names(f"t{uuid.uuid4().hex[:8]}")
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        kafka_namespace=names.namespace,
        sink_batch_rows=1_000,
        sink_batch_seconds=0.3,
        sink_decode_processes=2,
    )
    payloads = [costed(output_tokens=i + 1).model_dump_json().encode() for i in range(8_000)]
    await produce(broker.bootstrap, payloads, names)
    writer = ClickHouseWriter(settings, store)
    task = asyncio.create_task(writer.run())
    try:
        async with asyncio.timeout(30):  # two batches being decoded, side by side
            while (
                writer.first_read_at is None  # not the processes' start
                or writer._pool is None
                or len(writer._pool._pending_work_items) < 2
            ):
                await asyncio.sleep(0.01)
        pids = list(writer._pool._processes)
        os.kill(pids[0], signal.SIGKILL)
        await wait_for(lambda: count(store, "calls") == 8_000)
        assert (writer._pool is not None) == (retry_s == 0)  # replaced, or not yet
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    died = [r for r in caplog.records if "a decode process died" in r.getMessage()]
    assert len(died) == 1
    stored = store.rows("SELECT output_tokens FROM calls")
    assert sorted(int(r["output_tokens"]) for r in stored) == list(range(1, 8_001))


def refusing_to_start() -> bool:
    """A decode process's first task failing, as when one is killed as it starts."""
    raise RuntimeError("no decode process today")


async def test_decode_processes_that_cannot_start_leave_the_store_process_decoding_until_they_can(
    broker: Broker,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Decode processes that cannot be started, at the writer's start or again after
    one died, do not stop the writer: the store process decodes (as with none), and
    tries to start them again a while later, then decodes in them once they start."""
    monkeypatch.setattr("sinks.clickhouse.writer.ready", refusing_to_start)
    names = Names(f"t{uuid.uuid4().hex[:8]}")
    settings = Settings(
        kafka_bootstrap=broker.bootstrap,
        kafka_namespace=names.namespace,
        sink_batch_rows=50,
        sink_batch_seconds=0.2,
        sink_decode_processes=2,
    )
    payloads = [costed(output_tokens=i + 1).model_dump_json().encode() for i in range(400)]
    await produce(broker.bootstrap, payloads[:200], names)
    writer = ClickHouseWriter(settings, store)
    task = asyncio.create_task(writer.run())
    try:
        await wait_for(lambda: count(store, "calls") == 200)
        assert writer._pool is None
        failed = [r for r in caplog.records if "could not be started" in r.getMessage()]
        assert [r.levelname for r in failed] == ["ERROR"]  # once: the next try is 60 s on

        monkeypatch.setattr("sinks.clickhouse.writer.ready", ready)
        writer._pool_retry_at = 0.0  # the minute is up
        sent = 200
        async with asyncio.timeout(60):  # a batch after the retry time starts them
            while writer._pool is None:
                await produce(broker.bootstrap, payloads[sent : sent + 10], names)
                sent += 10
                await asyncio.sleep(0.1)
        await produce(broker.bootstrap, payloads[sent:], names)
        await wait_for(lambda: count(store, "calls") == 400)
        assert writer._pool is not None  # the last batches were decoded in it
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    stored = store.rows("SELECT output_tokens FROM calls")
    assert sorted(int(r["output_tokens"]) for r in stored) == list(range(1, 401))


# Spellings the contract's pydantic models read (lax mode) that msgspec's lax mode does not.
SPELLED_OTHERWISE = {
    "stream as 'yes'": ("response.stream", "yes"),
    "usage_missing as 'off'": ("response.usage.usage_missing", "off"),
    "tokens with a space": ("response.usage.input_tokens", " 10"),
    "tokens with an underscore": ("response.usage.output_tokens", "1_000"),
    "event id in braces": ("event_id", "{12345678-1234-5678-1234-567812345678}"),
    "time without seconds": ("response.ts_end", "2026-11-29T10:00Z"),
    "time in milliseconds": ("response.ts_start", 1795946400123),
    "schema version 1.0": ("schema_version", 1.0),
}


@pytest.mark.parametrize("path,value", SPELLED_OTHERWISE.values(), ids=SPELLED_OTHERWISE.keys())
def test_an_event_the_contract_accepts_in_any_spelling_is_stored_not_dead_lettered(
    store: Store, path: str, value: Any
) -> None:
    """The writer reads events with msgspec structs that promise to read what the
    contract's models read ("a message the contract accepts is not refused for its
    spelling"): an event the contract accepts is a call, never a dead letter, and is
    stored as the contract reads it."""
    doc = orjson.loads(costed().model_dump_json())
    *parents, key = path.split(".")
    holder = doc
    for parent in parents:
        holder = holder[parent]
    holder[key] = value
    raw = orjson.dumps(doc)
    contract = CostedEvent.model_validate_json(raw)  # the contract takes it
    records = runs_of([(Names().costed, 0, 0, raw)])
    batch = decode_batch(records, calls_types(store))
    batch.source = records
    assert [d.error for d in batch.dead_letters] == []
    assert write_batch(store, batch) == 1
    assert count(store, "dead_letters") == 0
    [row] = store.rows("SELECT event_id, stream, input_tokens, ts_start, ts_end FROM calls")
    r = contract.response
    assert (row["event_id"], row["stream"], row["input_tokens"]) == (
        contract.event_id,
        r.stream,
        r.usage.input_tokens,
    )
    assert row["ts_end"] == r.ts_end.replace(
        microsecond=r.ts_end.microsecond // 1000 * 1000, tzinfo=None
    )
