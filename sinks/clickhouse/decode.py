"""The writer's first step, decode, as a pure function of raw records: bytes -> costed
events and windows (validated by the contract's msgspec mirror, ``wire``) -> the body
of the ``calls`` insert (or its columns of plain values) and window structs, or a dead
letter (raw bytes kept) for a message that is not a valid event, or is one ``calls``
cannot hold (:func:`sinks.clickhouse.rows.unstorable`).

It is the step that holds the GIL longest, so the writer can run :func:`decode_batch`
in separate processes (the ``sink_decode_processes`` setting) while its own process
reads Kafka and inserts: what crosses the process boundary is cheap to pickle (bytes
in, as :class:`Run`s; the body of the ``calls`` insert, in ClickHouse's Native format,
and its event ids out). No Kafka client, no connection to ClickHouse here.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Any, TypeVar

import msgspec
from aiokafka import TopicPartition
from pydantic import BaseModel, ValidationError

from llmtap import names, wire
from llmtap.events import CostedEvent, WindowEvent, utcnow
from sinks.clickhouse.rows import (
    CALLS_COLUMNS,
    EVENT_ID,
    call_row,
    ts_end_range,
    unstorable,
    window_unstorable,
)
from sql.native import native_body

T = TypeVar("T")

# A raw message: topic, partition, offset, value.
Record = tuple[str, int, int, bytes]


@dataclass(frozen=True)
class Run:
    """Messages read from one partition, in the order read (offsets ascending): what a
    batch holds of it, as two lists. A batch is its runs in topic and partition order,
    so the same messages give the same rows in the same order, to a first insert and to
    its replay (sinks/clickhouse/replay.py). A list of offsets and one of values pickle
    in ~0.4 us a message and unpickle in ~0.2, where a tuple a message took ~0.7 and
    ~0.9 (the records cross to a decode process), and a batch is not sorted message by
    message."""

    topic: str
    partition: int
    offsets: list[int]
    values: list[bytes]

    def __len__(self) -> int:
        return len(self.offsets)


def runs_of(records: Iterable[Record]) -> list[Run]:
    """Messages in any order as runs: by topic, partition and offset."""
    ordered = sorted(records, key=itemgetter(0, 1, 2))
    return [
        Run(topic, partition, [r[2] for r in same], [r[3] for r in same])
        for (topic, partition), group in groupby(ordered, key=itemgetter(0, 1))
        for same in [list(group)]
    ]


# The offsets of one partition a batch holds: topic, partition, first offset, next offset.
Range = tuple[str, int, int, int]


@dataclass(frozen=True)
class DeadLetter:
    """A message that could not be decoded, kept whole. Fields in DEAD_LETTER_COLUMNS order."""

    ts: datetime
    topic: str
    partition: int
    offset: int
    raw: bytes
    error: str


@dataclass(frozen=True)
class CallsBody:
    """A batch's ``calls`` columns as the body of their insert (built in a decode
    process), with what deciding the insert needs: the event ids, in order, and the
    earliest and latest ``ts_end`` (as ticks)."""

    native: bytes
    event_ids: tuple[str, ...]
    ts_end: tuple[int, int]


def calls_body(types: tuple[str, ...], columns: list[tuple[Any, ...]]) -> bytes:
    """The Native body inserting ``columns`` into ``calls`` (``types``: what
    sinks/clickhouse/write.py's ``calls_types`` says to send them as)."""
    return native_body("calls", CALLS_COLUMNS, types, columns)


@dataclass
class Batch:
    """What the writer holds between reads and one write, with the offsets it covers.

    Costed events are models (``events``, as tests and tools build a batch), or
    already ``calls`` columns (``calls``, CALLS_COLUMNS order, as :func:`decode_batch`
    returns them), or the body of their insert (``calls_body``, as :func:`decode_batch`
    given the types returns them; ``source``, the messages, is kept with it by the
    writer, to decode again should the duplicate check leave some rows out). A write
    takes any of them.
    """

    events: list[CostedEvent] = field(default_factory=list)
    windows: list[wire.Window] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    costed_ranges: tuple[Range, ...] = ()  # where its costed events came from
    calls_body: CallsBody | None = None
    source: list[Run] = field(default_factory=list)
    epoch: int = 0  # the writer's revocations before its messages were read

    def __len__(self) -> int:
        calls = len(self.calls[0]) if self.calls else 0
        if self.calls_body is not None:
            calls = len(self.calls_body.event_ids)
        return len(self.events) + calls + len(self.windows) + len(self.dead_letters)


def decode_batch(runs: list[Run], calls_types: tuple[str, ...] | None = None) -> Batch:
    """Decode raw messages into a batch whose costed events are ``calls`` columns, or,
    given the types to send them as, the body of their insert (its offsets are the
    caller's to set). Runs in a decode process: everything it returns pickles cheaply
    (bytes; windows and dead letters are few). Events are read by the contract's
    msgspec structs (``wire``)."""
    batch = Batch()
    # A costed event's row is made as it is read, and the event let go: holding a
    # batch's events (nested structs, UUIDs, datetimes, Decimals) until its columns
    # were made took ~60% more memory at the peak (~175 MB against ~110 MB above
    # the records, for 40,000 rows), for each decode process.
    rows: list[tuple[Any, ...]] = []
    for run in runs:
        rows += _decode_run(run, batch)
    if rows:
        columns = list(zip(*rows, strict=True))
        del rows
        batch.calls = columns
        if calls_types is not None:
            try:
                native = calls_body(calls_types, columns)
            except Exception:  # unforeseen (unstorable has the known cases): the write
                return batch  # builds the body again, and reports what fails
            batch.calls = []
            batch.calls_body = CallsBody(native, columns[EVENT_ID], ts_end_range(columns))
    return batch


def _decode_run(run: Run, batch: Batch) -> list[tuple[Any, ...]]:
    """The ``calls`` rows of a run's costed events; its windows and dead letters go to
    ``batch``."""
    rows: list[tuple[Any, ...]] = []
    windows = names.kind(run.topic) == "windows"
    for offset, raw in zip(run.offsets, run.values, strict=True):
        event: wire.CostedEvent | None = None
        try:
            if windows:
                window = _as_contract(raw, wire.decode_window, WindowEvent)
                if problem := window_unstorable(window):
                    raise ValueError(problem)
                batch.windows.append(window)
            else:
                event = _as_contract(raw, wire.decode_costed, CostedEvent)
                if problem := unstorable(event):
                    raise ValueError(problem)
        except (
            ValidationError,
            msgspec.ValidationError,
            msgspec.DecodeError,
            ValueError,
            ArithmeticError,  # a decimal operation on an amount no context holds
        ) as exc:
            batch.dead_letters.append(
                DeadLetter(utcnow(), run.topic, run.partition, offset, raw, str(exc))
            )
            continue
        if event is not None:  # an event that passed: only a bug raises here, and stops
            rows.append(call_row(event))  # the writer rather than make a dead letter
    return rows


def _as_contract(raw: bytes, decode: Callable[[bytes], T], model: type[BaseModel]) -> T:
    """``decode(raw)``; a message msgspec refuses that the contract's model reads (in a
    spelling pydantic's lax mode takes and msgspec's does not: a bool as "yes", an
    int with a space or an underscore, a UUID in braces, a time in milliseconds...) is
    read as the model reads it, not dead-lettered. Refused by both: msgspec's error."""
    try:
        return decode(raw)
    except msgspec.ValidationError as refused:
        try:
            read = model.model_validate_json(raw)
        except ValidationError:
            raise refused from None
        return decode(read.model_dump_json().encode())


def decode_pool(processes: int) -> ProcessPoolExecutor:
    """The decode processes: spawned, not forked from a process holding chDB's threads,
    each started by :func:`start_decode_process` (the pool starts them as work comes)."""
    return ProcessPoolExecutor(
        processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=start_decode_process,
    )


def start_decode_process() -> None:
    """A decode process's start. It exits when the writer's process is gone, even
    SIGKILLed (the pool cannot tell it then, and it would wait for work forever); and
    its garbage collector is tuned as the writer's process tunes it
    (``llmtap.runtime.tune_gc``: decoding allocates tens of thousands of small objects a
    batch, and default thresholds make collections cost more than decoding). The
    insert's encoder is run once on a row of its own first: clickhouse-connect imports
    what it needs (pandas, ~0.3 s of CPU) at its first use, which was the first batch's
    (in every decode process, each time the pool started), and is frozen with the rest.
    Ctrl-C in a terminal reaches the whole process group: the writer's process stops the
    pool, and a decode process took it as a KeyboardInterrupt, its traceback on stderr."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    native_body("warm_up", ("x",), ("String",), [("x",)])
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def ready() -> bool:
    """A no-op a new decode process runs first, so its start happens before any batch."""
    return True
