"""llmtap/following.py: what one bad event does to the rest; partitions added."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from pydantic import BaseModel, field_validator

from llmtap import following
from llmtap.config import Settings
from llmtap.following import Follower
from llmtap.kafka import Kafka
from tests.conftest import Broker


class Picky(BaseModel):
    x: int

    @field_validator("x")
    @classmethod
    def not_seven(cls, x: int) -> int:
        if x == 7:
            raise TypeError("a validator's bug")  # pydantic passes a TypeError through
        return x


def test_an_event_that_breaks_its_model_is_passed_over() -> None:
    seen: list[Picky] = []
    follower = Follower(Settings().kafka, "t", "test", Picky, seen.append)
    for raw in (b'{"x": 1}', b'{"x": 7}', b"", b'{"x": 2}'):
        follower._take(raw)  # raising here restarted run() before the batch's offsets
    assert [e.x for e in seen] == [1, 2]


class Ping(BaseModel):
    x: int


async def test_a_partition_added_to_the_topic_is_followed(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka grows a topic (never shrinks it): its partitions were read at start only,
    so a key hashed to one added since (a budget's next states, a replica's
    announcements) was never read until the process restarted: a hard cap judged on a
    spend that stood still. (Tansu cannot add partitions: the topic is made again with
    more, under the follower.)"""
    monkeypatch.setattr(following, "METADATA_MAX_AGE_MS", 200)
    topic = f"grow-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    seen: list[int] = []
    follower = Follower(Kafka(broker.bootstrap), topic, "test", Ping, lambda p: seen.append(p.x))
    running = asyncio.create_task(follower.run())
    try:
        await admin.create_topics([NewTopic(topic, 1, 1)])
        await send(broker.bootstrap, topic, 1, 0)
        async with asyncio.timeout(30):
            while seen != [1]:
                await asyncio.sleep(0.05)
        await admin.delete_topics([topic])
        await admin.create_topics([NewTopic(topic, 2, 1)])
        await send(broker.bootstrap, topic, 2, 1)
        async with asyncio.timeout(30):
            while 2 not in seen:  # was: a timeout, partition 1 never read
                await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await admin.close()


async def send(bootstrap: str, topic: str, x: int, partition: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, Ping(x=x).model_dump_json().encode(), partition=partition
        )
    finally:
        await producer.stop()
