"""The writer's first step, decode, as a pure function of raw records: bytes -> costed
events and windows (validated by the contract's msgspec mirror, ``wire``) -> ``calls``
columns of plain values and window structs, or a dead letter (raw bytes kept) for a
message that is not a valid event.

It is the step that holds the GIL longest, so the writer can run :func:`decode_batch`
in separate processes (the ``sink_decode_processes`` setting) while its own process
reads Kafka and inserts: what crosses the process boundary is plain values (bytes in;
str, int, float, dict out), cheap to pickle. No Kafka client, no ClickHouse here.
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
from aiokafka import TopicPartition
from pydantic import ValidationError

from llmtap import topics, wire
from llmtap.events import CostedEvent, utcnow
from sinks.clickhouse.rows import call_columns

# A raw message: topic, partition, offset, value.
Record = tuple[str, int, int, bytes]

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


@dataclass
class Batch:
    """What the writer holds between reads and one write, with the offsets it covers.

    Costed events are either models (``events``, as tests and tools build a batch) or
    already ``calls`` columns (``calls``, CALLS_COLUMNS order, as :func:`decode_batch`
    returns them); a write takes both.
    """

    events: list[CostedEvent] = field(default_factory=list)
    windows: list[wire.Window] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    costed_ranges: tuple[Range, ...] = ()  # where its costed events came from

    def __len__(self) -> int:
        calls = len(self.calls[0]) if self.calls else 0
        return len(self.events) + calls + len(self.windows) + len(self.dead_letters)


def decode_batch(records: list[Record]) -> Batch:
    """Decode raw records into a batch whose costed events are ``calls`` columns (its
    offsets are the caller's to set). Runs in a decode process: everything it returns
    pickles cheaply (windows and dead letters are few). Events are read by the
    contract's msgspec structs (``wire``)."""
    batch = Batch()
    costed: list[wire.CostedEvent] = []
    for topic, partition, offset, raw in records:
        try:
            if topic == topics.WINDOWS:
                batch.windows.append(wire.decode_window(raw))
            else:
                costed.append(wire.decode_costed(raw))
        except (ValidationError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            batch.dead_letters.append(DeadLetter(utcnow(), topic, partition, offset, raw, str(exc)))
    if costed:
        batch.calls = call_columns(costed)
    return batch


def start_decode_process() -> None:
    """A decode process's start. It exits when the writer's process is gone, even
    SIGKILLed (the pool cannot tell it then, and it would wait for work forever); and
    its garbage collector is tuned as the writer's process tunes it
    (``llmtap.runtime.tune_gc``: decoding allocates tens of thousands of small objects a
    batch, and default thresholds make collections cost more than decoding)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def ready() -> bool:
    """A no-op a new decode process runs first, so its start happens before any batch."""
    return True
