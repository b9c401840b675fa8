"""Records for one topic appended into one aiokafka batch per partition, sent as batches.

``AIOKafkaProducer.send`` costs tens of microseconds a record (a future, a lookup of
the batch, the accumulator's bookkeeping; through Faust's ``Topic.send`` ~100 µs,
bench/results/stream.md). Appending to a ``BatchBuilder`` costs a few: at thousands
of records a second that is the difference. The key picks the partition exactly as a
producer's ``send`` would (Kafka's murmur2 default partitioner), so a record lands
where any other llmtap producer would have put it.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS = [struct.Struct(f"<{n}I").unpack_from for n in range(64)]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of ``data`` (Java's ``Utils.murmur2``, as an unsigned int):
    the same value as aiokafka's ``murmur2`` in ~45% of its time (~3 us for a request
    id instead of ~6.8), by reading the data four bytes at a time and masking only
    where the value must wrap. tests/test_batches.py holds it to aiokafka's."""
    length = len(data)
    h = 0x9747B28C ^ length
    words = length >> 2
    unpack = _WORDS[words] if words < len(_WORDS) else struct.Struct(f"<{words}I").unpack_from
    for k in unpack(data):
        k = k * _M & _MASK
        h = (h * _M ^ (k ^ k >> 24) * _M) & _MASK
    rest = length & 3
    if rest:
        tail = words << 2
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h = (h ^ data[tail]) * _M & _MASK
    h ^= h >> 13
    h = h * _M & _MASK
    return h ^ h >> 15


def key_hash(key: bytes) -> int:
    """What Kafka's default partitioner (aiokafka's ``DefaultPartitioner``) picks a key's
    partition by: its murmur2, made positive, modulo the partition count. The same for a
    key whatever its topic: a caller sending one key to several topics may hash it once
    (:meth:`Batches.add`)."""
    return murmur2(key) & 0x7FFFFFFF


# What a producer's send refuses (aiokafka's max_request_size default, and the broker's
# usual message.max.bytes): a batch would take such a record alone and the broker then
# refuse it, or accept it where a Kafka broker would not.
MAX_RECORD_BYTES = 1 << 20


class Batches:
    """What is being gathered for ``topic`` (whose partitions are ``partitions``).

    :meth:`add` returns the number of the batch the record went into, and its place
    in it; :meth:`send` returns one delivery future per batch, in that numbering, so a
    caller that needs to know what became of each record, and where it went (the
    ingress publisher), can tell.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: Sequence[int]) -> None:
        if not partitions:
            raise ValueError(f"topic {topic!r} has no partitions")
        self._producer = producer
        self._topic = topic
        self._partitions = sorted(partitions)
        self._batches: list[tuple[int, Any]] = []  # (partition, aiokafka BatchBuilder)
        self._open: dict[int, int] = {}  # partition -> its batch still filling

    @classmethod
    async def of(cls, producer: AIOKafkaProducer, topic: str) -> Batches:
        """Batches for ``topic``, its partitions read from the broker's metadata."""
        return cls(producer, topic, sorted(await producer.partitions_for(topic)))

    @property
    def partitions(self) -> int:
        return len(self._partitions)

    def add(
        self,
        key: bytes,
        value: bytes | None,
        partition: int | None = None,
        hashed: int | None = None,
    ) -> tuple[int, int]:
        """Append a record (timestamped now) to its partition's batch: ``partition``
        when the caller knows where the key hashes to, else the key's, from its
        :func:`key_hash` if the caller has it (either saves the hash, ~3 µs). Returns
        the batch's number and the record's offset in it (its offset in the partition:
        the delivered batch's base offset plus that); raises ValueError for a record
        larger than MAX_RECORD_BYTES. A ``value`` of None is a tombstone."""
        size = len(key) + (len(value) if value is not None else 0)
        if size > MAX_RECORD_BYTES:
            raise ValueError(f"a record of {size} bytes is too large")
        if partition is None:
            if hashed is None:
                hashed = key_hash(key)
            partition = self._partitions[hashed % len(self._partitions)]
        number = self._open.get(partition)
        if number is not None:
            appended = self._batches[number][1].append(key=key, value=value, timestamp=None)
            if appended is not None:
                return number, appended.offset
            self._batches[number][1].close()
        batch = self._producer.create_batch()
        appended = batch.append(key=key, value=value, timestamp=None)
        if appended is None:
            raise ValueError(f"a record of {size} bytes is too large")
        self._batches.append((partition, batch))
        self._open[partition] = number = len(self._batches) - 1
        return number, appended.offset

    def __len__(self) -> int:
        return len(self._batches)

    async def send(self) -> list[asyncio.Future[Any]]:
        """Submit every batch gathered so far (and start afresh); each future resolves
        once its batch is delivered (acknowledged as the producer's ``acks`` asks) or
        fails. A batch the producer refuses outright gets a future holding the error."""
        ready, self._batches, self._open = self._batches, [], {}
        delivered: list[asyncio.Future[Any]] = []
        for partition, batch in ready:
            batch.close()
            try:
                future = await self._producer.send_batch(batch, self._topic, partition=partition)
            except KafkaError as exc:
                future = asyncio.get_running_loop().create_future()
                future.set_exception(exc)
            delivered.append(future)
        return delivered
