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
from aiokafka.partitioner import DefaultPartitioner

_PARTITIONER = DefaultPartitioner()


class Batches:
    """What is being gathered for ``topic`` (whose partitions are ``partitions``)."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, partitions: Sequence[int]) -> None:
        if not partitions:
            raise ValueError(f"topic {topic!r} has no partitions")
        self._producer = producer
        self._topic = topic
        self._partitions = sorted(partitions)
        self._open: dict[int, Any] = {}  # partition -> aiokafka BatchBuilder
        self._full: list[tuple[int, Any]] = []

    @classmethod
    async def of(cls, producer: AIOKafkaProducer, topic: str) -> Batches:
        """Batches for ``topic``, its partitions read from the broker's metadata."""
        return cls(producer, topic, sorted(await producer.partitions_for(topic)))

    @property
    def partitions(self) -> int:
        return len(self._partitions)

    def add(self, key: bytes, value: bytes, partition: int | None = None) -> None:
        """Append a record (timestamped now) to its partition's batch: ``partition``
        when the caller knows where the key hashes to (saves the hash, ~4 µs), else
        the key's."""
        if partition is None:
            partition = _PARTITIONER(key, self._partitions, self._partitions)
        batch = self._open.get(partition)
        if batch is None:
            batch = self._open[partition] = self._producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            batch.close()
            self._full.append((partition, batch))
            batch = self._open[partition] = self._producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"a record of {len(value)} bytes is larger than a batch")

    def __len__(self) -> int:
        return len(self._full) + len(self._open)

    async def send(self) -> list[asyncio.Future[Any]]:
        """Submit every batch gathered so far; each future resolves once its batch is
        delivered (acknowledged as the producer's ``acks`` asks) or fails."""
        ready = [*self._full, *self._open.items()]
        self._full, self._open = [], {}
        delivered = []
        for partition, batch in ready:
            batch.close()
            delivered.append(
                await self._producer.send_batch(batch, self._topic, partition=partition)
            )
        return delivered
