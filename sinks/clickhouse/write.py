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
from dataclasses import astuple, dataclass
from datetime import timedelta
from typing import Any

from sinks.clickhouse.decode import Batch, DeadLetter
from sinks.clickhouse.rows import (
    CALLS_COLUMNS,
    DEAD_LETTER_COLUMNS,
    EVENT_ID,
    TS_END,
    WINDOW_ID,
    WINDOW_START,
    WINDOWS_COLUMNS,
    call_columns,
    from_ticks,
    window_row,
)
from sql.store import Store, render

log = logging.getLogger(__name__)

Columns = list[tuple[Any, ...]]  # CALLS_COLUMNS order

# Money goes as the exact decimal text the columns hold; ClickHouse parses it into
# Decimal(18, 9) (clickhouse-connect would scale each value in Python: ~1 us apiece).
MONEY_AS_TEXT = {name: "Nullable(String)" for name in CALLS_COLUMNS if name.startswith("cost_")}

ID_PREFIX = 8  # hex digits of an event id the duplicate check sends (existing_call_ids.sql)


@dataclass(frozen=True)
class CallsInsert:
    """A batch's insert into ``calls``, decided once: repeat it, never decide it again.

    ``left_out``: the batch's event ids stored before it (what a replay of the same
    messages leaves out again, sinks/clickhouse/replay.py)."""

    columns: Columns
    token: str
    left_out: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0


def token_of(columns: Columns) -> str:
    """The insert's deduplication token: a digest of its event ids, in order."""
    ids = columns[EVENT_ID] if columns else ()
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:32]


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


def stored_call_ids(store: Store, columns: Columns) -> set[str]:
    """Which of the columns' event ids ``calls`` holds (the duplicate check)."""
    if not columns:
        return set()
    ids = columns[EVENT_ID]
    ts_end = columns[TS_END]
    slack = 1000  # ms
    stored = store.rows(
        render("existing_call_ids"),
        {
            "ts_from": from_ticks(min(ts_end) - slack),
            "ts_to": from_ticks(max(ts_end) + slack),
            "id_prefixes": ",".join({event_id[:ID_PREFIX] for event_id in ids}),
        },
    )
    batch = set(ids)
    return {event_id for r in stored if (event_id := str(r["event_id"])) in batch}


def batch_calls(batch: Batch) -> Columns:
    """A batch's ``calls`` columns: decoded ones and those of its event models."""
    calls = batch.calls
    if batch.events:
        extra = call_columns(batch.events)
        calls = [a + b for a, b in zip(calls, extra, strict=True)] if calls else extra
    return calls


def prepare_calls(store: Store, batch: Batch) -> CallsInsert:
    """Decide a batch's insert into ``calls``: its events not stored yet, each once."""
    columns = batch_calls(batch)
    stored = stored_call_ids(store, columns)
    fresh = fresh_calls(columns, stored)
    return CallsInsert(fresh, token_of(fresh), tuple(sorted(stored)))


def insert_calls(store: Store, insert: CallsInsert) -> int:
    """Make (or repeat) an insert into ``calls``; return its row count."""
    if insert.columns:
        store.insert_columns(
            "calls",
            insert.columns,
            CALLS_COLUMNS,
            send_as=MONEY_AS_TEXT,
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
    stored = store.rows(
        render("existing_window_ids"),
        {
            "ts_from": min(row[WINDOW_START] for row in unique) - slack,
            "ts_to": max(row[WINDOW_START] for row in unique) + slack,
            "event_ids": [row[WINDOW_ID] for row in unique],
        },
    )
    known = {r["event_id"] for r in stored}
    return [row for row in unique if row[WINDOW_ID] not in known]


def new_dead_letters(store: Store, letters: list[DeadLetter]) -> list[DeadLetter]:
    """The dead letters of a batch not stored yet (keyed by topic, partition, offset)."""
    fresh: list[DeadLetter] = []
    for topic in {d.topic for d in letters}:
        mine = [d for d in letters if d.topic == topic]
        rows = store.rows(
            render("existing_dead_letters"),
            {
                "topic": topic,
                "offset_from": min(d.offset for d in mine),
                "offset_to": max(d.offset for d in mine),
            },
        )
        stored = {(r["partition"], r["offset"]) for r in rows}
        fresh.extend(d for d in mine if (d.partition, d.offset) not in stored)
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
