"""One batch into ClickHouse, idempotently: the writer's write step, without Kafka.

- ``calls``: the rows whose event ids are not stored yet, each event once, decided once
  per batch (:func:`prepare_calls`) and inserted with a deduplication token derived
  from those ids (:func:`insert_calls`). Repeated, the same insert is dropped by
  ``calls`` and by every view's table that has it, and fills the views that lack it
  (sql/migrations/0009_exact_replay.sql): a retry after an insert that failed half-way
  is exact. Deciding again instead would leave out the rows the failed insert stored
  in ``calls``, and with them the views that did not get them.
- ``windows`` and ``dead_letters``: the rows not stored yet (no views on them, so an
  insert is whole or nothing).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Sequence
from dataclasses import astuple, dataclass
from datetime import timedelta
from typing import Any, TypeVar

from sinks.clickhouse.decode import Batch, DeadLetter, calls_body, decode_batch
from sinks.clickhouse.rows import (
    CALLS_COLUMNS,
    DEAD_LETTER_COLUMNS,
    EVENT_ID,
    WINDOW_ID,
    WINDOW_START,
    WINDOWS_COLUMNS,
    call_columns,
    from_ticks,
    ts_end_range,
    window_row,
)
from sql.store import Store, render

log = logging.getLogger(__name__)

T = TypeVar("T")

Columns = list[tuple[Any, ...]]  # CALLS_COLUMNS order

ID_PREFIX = 8  # hex digits of an event id the duplicate check sends (existing_call_ids.sql)

# The most bytes a duplicate check binds in one value. A ClickHouse server reads a bound
# value as an HTTP form field and refuses one past its http_max_field_value_size (128 KiB
# by default: "Field value too long"): a batch's ids bound at once (~360 KB of prefixes
# for 40,000 calls, the default sink_batch_rows; ~160 KB for 4,000 windows) failed every
# write of the batch, the writer stuck on it (chDB, without HTTP, binds any size). More
# are looked up in parts.
BOUND_BYTES = 100_000
UUID_BOUND = 40  # bytes of a UUID in a bound array: quoted, and a comma and space


def in_parts(values: list[T], each: int) -> list[list[T]]:
    """``values`` in parts of at most BOUND_BYTES bound, ``each`` bytes apiece."""
    step = BOUND_BYTES // each
    return [values[start : start + step] for start in range(0, len(values), step)]


def calls_types(store: Store) -> tuple[str, ...]:
    """The types the insert into ``calls`` sends its columns as (CALLS_COLUMNS order):
    the table's, except where ClickHouse converts faster in the engine than
    clickhouse-connect encodes in Python. Money as the exact decimal text the columns
    hold (scaling each Decimal in Python: ~1 us apiece); LowCardinality strings as plain
    String (no dictionary built in Python per column); the event id as its text (no
    parse to 128 bits in Python)."""
    table = store.column_types("calls", CALLS_COLUMNS)
    return tuple(
        "Nullable(String)"
        if name.startswith("cost_")
        else "String"
        if name == "event_id"
        else kind.replace("LowCardinality(String)", "String")
        for name, kind in zip(CALLS_COLUMNS, table, strict=True)
    )


@dataclass(frozen=True)
class CallsInsert:
    """A batch's insert into ``calls``, decided once: repeat it, never decide it again.

    ``columns``, or (from a decode process) ``body`` with its ``body_rows``: what it
    inserts. ``left_out``: the batch's event ids stored before it (what a replay of the
    same messages leaves out again, sinks/clickhouse/replay.py)."""

    columns: Columns
    token: str
    left_out: tuple[str, ...] = ()
    body: bytes = b""
    body_rows: int = 0

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else self.body_rows


def token_of(event_ids: Sequence[str]) -> str:
    """An insert's deduplication token: a digest of its event ids, in order."""
    return hashlib.sha256("\n".join(event_ids).encode()).hexdigest()[:32]


def event_ids(columns: Columns) -> Sequence[str]:
    return columns[EVENT_ID] if columns else ()


def fresh_calls(columns: Columns, left_out: set[str]) -> Columns:
    """The columns without the events in ``left_out``, each event once (its last copy)."""
    if not columns:
        return columns
    ids = columns[EVENT_ID]
    last = {event_id: i for i, event_id in enumerate(ids)}
    for event_id in left_out:
        last.pop(event_id, None)
    if len(last) == len(ids):
        return columns  # the usual case: nothing to drop
    keep = sorted(last.values())
    return [tuple(column[i] for i in keep) for column in columns] if keep else []


def stored_call_ids(store: Store, ids: Sequence[str], ts_end: tuple[int, int]) -> set[str]:
    """Which of ``ids`` ``calls`` holds (the duplicate check); ``ts_end``: the earliest
    and latest ``ts_end`` of their events, as ticks."""
    if not ids:
        return set()
    slack = 1000  # ms
    batch = set(ids)
    found: set[str] = set()
    for prefixes in in_parts(list({event_id[:ID_PREFIX] for event_id in ids}), ID_PREFIX + 1):
        stored = store.rows(
            render("existing_call_ids"),
            {
                "ts_from": from_ticks(ts_end[0] - slack),
                "ts_to": from_ticks(ts_end[1] + slack),
                "id_prefixes": ",".join(prefixes),
            },
        )
        found.update(event_id for r in stored if (event_id := str(r["event_id"])) in batch)
    return found


def batch_calls(batch: Batch) -> Columns:
    """A batch's ``calls`` columns: decoded ones (decoded again from its messages when a
    decode process sent only their body) and those of its event models."""
    calls = batch.calls
    if not calls and batch.calls_body is not None:
        if not batch.source:
            raise ValueError("a batch whose calls came as a body needs its messages too")
        calls = decode_batch(batch.source).calls
    if batch.events:
        extra = call_columns(batch.events)
        calls = [a + b for a, b in zip(calls, extra, strict=True)] if calls else extra
    return calls


def prepare_calls(store: Store, batch: Batch) -> CallsInsert:
    """Decide a batch's insert into ``calls``: its events not stored yet, each once."""
    body = batch.calls_body
    if body is not None and not batch.events:
        ids = body.event_ids
        stored = stored_call_ids(store, ids, body.ts_end)
        if not stored and len(set(ids)) == len(ids):  # the usual case: insert it all
            return CallsInsert([], token_of(ids), body=body.native, body_rows=len(ids))
        columns = batch_calls(batch)
    else:
        columns = batch_calls(batch)
        stored = stored_call_ids(store, event_ids(columns), ts_end_range(columns))
    return calls_insert(columns, stored)


def calls_insert(columns: Columns, left_out: Collection[str]) -> CallsInsert:
    """The insert of ``columns`` without the events in ``left_out``, each event once:
    how a batch's insert is decided, and remade from its messages by a replay."""
    fresh = fresh_calls(columns, set(left_out))
    return CallsInsert(fresh, token_of(event_ids(fresh)), tuple(sorted(left_out)))


def insert_calls(store: Store, insert: CallsInsert) -> int:
    """Make (or repeat) an insert into ``calls``; return its row count. The body is the
    same bytes however it was built (here or in a decode process), so a repeat splits
    into the same blocks, each with the same deduplication token."""
    if insert.rows:
        body = insert.body or calls_body(calls_types(store), insert.columns)
        store.insert_native(
            "calls",
            CALLS_COLUMNS,
            body,
            settings={
                "insert_deduplicate": 1,
                "insert_deduplication_token": insert.token,
                "deduplicate_blocks_in_dependent_materialized_views": 1,
            },
        )
    return insert.rows


def new_windows(store: Store, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The ``windows`` rows of a batch not stored yet, each once (looked up by id
    within the rows' window starts)."""
    unique = list({row[WINDOW_ID]: row for row in rows}.values())
    if not unique:
        return unique
    slack = timedelta(seconds=1)
    ts_from = min(row[WINDOW_START] for row in unique) - slack
    ts_to = max(row[WINDOW_START] for row in unique) + slack
    known: set[Any] = set()
    for ids in in_parts([row[WINDOW_ID] for row in unique], UUID_BOUND):
        stored = store.rows(
            render("existing_window_ids"), {"ts_from": ts_from, "ts_to": ts_to, "event_ids": ids}
        )
        known.update(r["event_id"] for r in stored)
    return [row for row in unique if row[WINDOW_ID] not in known]


def new_dead_letters(store: Store, letters: list[DeadLetter]) -> list[DeadLetter]:
    """The dead letters of a batch not stored yet (keyed by topic, partition, offset and
    the message's digest: a broker that lost its log gives offsets again)."""
    fresh: list[DeadLetter] = []
    for topic in {d.topic for d in letters}:
        mine = [d for d in letters if d.topic == topic]
        rows = store.rows(
            render("existing_dead_letters"),
            {
                "topic": topic,
                "partitions": sorted({d.partition for d in mine}),
                "offset_from": min(d.offset for d in mine),
                "offset_to": max(d.offset for d in mine),
            },
        )
        stored = {(r["partition"], r["offset"], r["digest"]) for r in rows}
        fresh.extend(
            d for d in mine if (d.partition, d.offset, hashlib.md5(d.raw).hexdigest()) not in stored
        )
    return fresh


def write_others(store: Store, batch: Batch) -> None:
    """A batch's windows and dead letters, those not stored yet."""
    if batch.windows:
        windows = new_windows(store, [window_row(w) for w in batch.windows])
        if windows:
            store.insert("windows", windows, WINDOWS_COLUMNS)
    letters = new_dead_letters(store, batch.dead_letters) if batch.dead_letters else []
    if letters:
        store.insert("dead_letters", [astuple(d) for d in letters], DEAD_LETTER_COLUMNS)
        log.error("%d undecodable messages sent to dead_letters", len(letters))


def write_batch(store: Store, batch: Batch) -> int:
    """Write a batch idempotently in one go (tests and tools; the writer retries the
    steps itself); return how many call rows were inserted."""
    written = insert_calls(store, prepare_calls(store, batch))
    write_others(store, batch)
    return written
