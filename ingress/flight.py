"""A flight: records the publisher hands to Kafka in one go, as whole batches (an
append each, llmtap/batches.py, not a producer ``send``), and what became of each:
sent, dropped for good (no retry can deliver it), or to be retried. The publisher
(ingress/publisher.py) decides what flies and when; this is the flying."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
)

from ingress.spool import Record
from llmtap.batches import Batches, key_hash

log = logging.getLogger(__name__)

# Records appended to a flight's batches between two turns of the event loop: a large
# flight (a burst, a spool segment replayed) must not hold up the calls being served.
# At 500 calls/s (flights of ~50 records) 32 took the p99 of the loop's longest
# publisher callback from ~820-880 us to ~390-500, at the same CPU (alternating runs),
# and 8 (with a key hashed once a flight) the calls' added p99 further down (bench/NOTES.md,
# proxy overhead). But a turn of a saturated loop takes milliseconds: a flight takes at
# most FLIGHT_TURNS of them, in larger slices when it is larger. Sliced by 8 whatever
# its size, a flight at ~3,000 calls/s outlasted the next 50 ms, the next flight was
# larger, and so on until one passed slow_after_s and the queue went to the spool with
# the broker up (~73,000 events of a bench/ingress_latency.py run; none with this bound).
APPEND_SLICE = 8
FLIGHT_TURNS = 16

# No retry can deliver these: the event is dropped rather than block all behind it.
UNDELIVERABLE = (MessageSizeTooLargeError, RecordTooLargeError, InvalidTopicError)


class Outcome(enum.Enum):
    SENT = "sent"
    DROP = "drop"
    RETRY = "retry"


@dataclass
class InFlight:
    """Records handed to the producer, and what became of each."""

    records: list[Record]
    started: float
    segment: int | None = None  # from the spool (and which segment); None: from the queue
    indices: list[int] = field(default_factory=list)  # the records' places in that segment
    futures: list[asyncio.Future[Any]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # each record's offset in its batch

    def outcomes(self) -> list[Outcome]:
        found = [outcome_of(f) for f in self.futures]
        return found + [Outcome.RETRY] * (len(self.records) - len(found))


def outcome_of(future: asyncio.Future[Any]) -> Outcome:
    if not future.done() or future.cancelled():
        return Outcome.RETRY
    error = future.exception()
    if error is None:
        return Outcome.SENT
    return Outcome.DROP if isinstance(error, UNDELIVERABLE) else Outcome.RETRY


def append_slice(records: int) -> int:
    """How many of a flight's ``records`` are appended between two turns of the event
    loop: APPEND_SLICE, or more, so that the flight takes at most FLIGHT_TURNS turns."""
    return max(APPEND_SLICE, -(-records // FLIGHT_TURNS))


async def deliver(producer: AIOKafkaProducer, flight: InFlight) -> None:
    """Send the flight's records as whole batches (``llmtap.batches``: an append
    each, not a ``send``); each record's future is its batch's."""
    loop = asyncio.get_running_loop()
    by_topic: dict[str, Batches] = {}
    placed: list[tuple[Batches, int] | asyncio.Future[Any]] = []
    hashes: dict[bytes, int] = {}  # a call's two events share a key: hashed once
    per_turn = append_slice(len(flight.records))
    for i, record in enumerate(flight.records):
        if i and not i % per_turn:
            await asyncio.sleep(0)
        batches = by_topic.get(record.topic)
        if batches is None:
            try:
                batches = by_topic[record.topic] = await Batches.of(producer, record.topic)
            except KafkaError as exc:
                log.warning("send to %s failed: %r", record.topic, exc)
                break  # what follows waits: sending it now would overtake this record
        try:
            if record.partition is not None and record.partition < batches.partitions:
                # Where its key's entry lives on a compacted topic, partitions added to
                # it since having moved its key's (ingress/guards/book_topics.py, announce)
                number, offset = batches.add(record.key, record.value, record.partition)
            else:
                hashed = hashes.get(record.key)
                if hashed is None:
                    hashed = hashes[record.key] = key_hash(record.key)
                number, offset = batches.add(record.key, record.value, hashed=hashed)
            placed.append((batches, number))
        except ValueError:  # too large: no retry can send it
            refused = loop.create_future()
            refused.set_exception(RecordTooLargeError())
            placed.append(refused)
            offset = -1
        flight.offsets.append(offset)
    sent = {id(batches): await batches.send() for batches in by_topic.values()}
    for place in placed:
        if isinstance(place, asyncio.Future):
            flight.futures.append(place)
        else:
            batches, number = place
            flight.futures.append(sent[id(batches)][number])
    if flight.futures:
        await asyncio.wait(set(flight.futures))
