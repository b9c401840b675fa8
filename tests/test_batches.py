"""llmtap/batches.py on a real broker: every record delivered once, in order within its
partition, on the partition a producer's own ``send`` picks for its key, however many
batches a partition's records fill."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from llmtap.batches import Batches, key_hash, murmur2
from llmtap.names import Names
from tests.conftest import start_broker

PARTITIONS = 3


async def test_records_land_where_send_puts_them_and_arrive_once() -> None:
    async with start_broker(PARTITIONS) as broker:
        # Small batches, so each partition's records fill several.
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, max_batch_size=16_384)
        await producer.start()
        try:
            keys = [str(uuid.uuid4()).encode() for _ in range(600)]
            batches = await Batches.of(producer, Names().costed)
            for i, key in enumerate(keys):
                # Every other record with its key's hash given, as the ingress publisher
                # gives it for a call's second event: the same partition either way.
                hashed = key_hash(key) if i % 2 else None
                batches.add(key, b"%d:" % i + b"x" * 1_000, hashed=hashed)
            assert len(batches) > PARTITIONS  # some partitions filled more than one batch
            for delivered in await batches.send():
                await delivered
            assert len(batches) == 0
            # The same keys through the producer's own send, on another topic.
            sent = {
                key: (await producer.send_and_wait(Names().windows, b"", key=key)).partition
                for key in keys
            }
        finally:
            await producer.stop()

        reader = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
        await reader.start()
        try:
            tps = [TopicPartition(Names().costed, p) for p in range(PARTITIONS)]
            reader.assign(tps)
            await reader.seek_to_beginning(*tps)
            read: dict[bytes, tuple[int, int]] = {}
            order: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
            while fetched := await reader.getmany(timeout_ms=1_000):
                for tp, records in fetched.items():
                    for record in records:
                        assert record.key is not None and record.value is not None
                        assert record.key not in read, "a record arrived twice"
                        index = int(record.value.split(b":")[0])
                        read[record.key] = (tp.partition, index)
                        order[tp.partition].append(index)
        finally:
            await reader.stop()

    assert set(read) == set(keys)
    assert {key: partition for key, (partition, _) in read.items()} == sent
    assert all(indexes == sorted(indexes) for indexes in order.values())
    assert all(order.values()), "every partition got records"


@settings(max_examples=2_000, deadline=None)
@given(st.binary(max_size=300))
def test_murmur2_is_kafkas(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)
