"""How long a Kafka consumer's fetch waits at the broker with nothing to read
(``kafka_fetch_wait_ms``; llmtap/kafka.py): every consumer llmtap makes waits what the
setting says, the embedded broker's 50 ms unless told."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from llmtap import topics
from llmtap.config import Settings
from llmtap.events import BudgetState
from llmtap.following import Follower
from sinks.consumer import sink_consumer
from stream.agents.stage import group_consumer
from tests.conftest import Broker


def test_the_wait_is_the_embedded_brokers_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().kafka.consumer_options("x")["fetch_max_wait_ms"] == 50
    monkeypatch.setenv("LLMTAP_KAFKA_FETCH_WAIT_MS", "500")  # as docker-compose.yml sets
    assert Settings().kafka.consumer_options("x")["fetch_max_wait_ms"] == 500


@pytest.mark.parametrize("wait", [0, 1001])
def test_a_wait_out_of_range_is_refused_naming_the_setting(wait: int) -> None:
    with pytest.raises(ValidationError, match="kafka_fetch_wait_ms"):
        Settings(kafka_fetch_wait_ms=wait)


async def test_every_consumer_llmtap_makes_waits_what_the_setting_says(broker: Broker) -> None:
    settings = Settings(kafka_bootstrap=broker.bootstrap, kafka_fetch_wait_ms=321)
    kafka = settings.kafka
    made = [
        sink_consumer("t", kafka, "g", "store-writer"),  # the store's writer
        group_consumer(settings, "g", "test"),  # the worker's stages
        topics._reader(kafka),  # reads of spans and of latest values
    ]
    try:
        assert [c._fetch_max_wait_ms for c in made] == [321, 321, 321]
    finally:
        for consumer in made:
            await consumer.stop()
    # The ingress's and the store's followers (budget states, reservations), connected.
    await topics.ensure_topics(kafka, 1, 1)
    follower = Follower(kafka, kafka.names.budgets, "test", BudgetState, lambda _: None)
    following = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.caught_up(), 30)
        assert follower._consumer is not None
        assert follower._consumer._fetch_max_wait_ms == 321
    finally:
        following.cancel()
        await asyncio.gather(following, return_exceptions=True)
