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
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

_PARTITIONER = DefaultPartitioner()
# What a producer's send refuses (aiokafka's max_request_size default, and the broker's
# usual message.max.bytes): a batch would take such a record alone and the broker then
# refuse it, or accept it where a Kafka broker would not.
MAX_RECORD_BYTES = 1 << 20


class Batches:
    """What is being gathered for ``topic`` (whose partitions are ``partitions``).

    :meth:`add` returns the number of the batch the record went into; :meth:`send`
    returns one delivery future per batch, in that numbering, so a caller that needs
    to know what became of each record (the ingress publisher) can tell.
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

    def add(self, key: bytes, value: bytes, partition: int | None = None) -> int:
        """Append a record (timestamped now) to its partition's batch: ``partition``
        when the caller knows where the key hashes to (saves the hash, ~4 µs), else
        the key's. Returns the batch's number; raises ValueError for a record larger
        than MAX_RECORD_BYTES."""
        if len(key) + len(value) > MAX_RECORD_BYTES:
            raise ValueError(f"a record of {len(key) + len(value)} bytes is too large")
        if partition is None:
            partition = _PARTITIONER(key, self._partitions, self._partitions)
        number = self._open.get(partition)
        if number is not None:
            if self._batches[number][1].append(key=key, value=value, timestamp=None):
                return number
            self._batches[number][1].close()
        batch = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            raise ValueError(f"a record of {len(key) + len(value)} bytes is too large")
        self._batches.append((partition, batch))
        self._open[partition] = number = len(self._batches) - 1
        return number

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
