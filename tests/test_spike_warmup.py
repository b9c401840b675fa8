"""A restarted worker's spike detector knows the windows judged before (stream/warmup.py):
read back from the windows topic up to the stream group's committed offsets, within
the rules' horizon. Real broker (Tansu, one of its own: the test commits the stream
group's offsets)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from llmtap import topics, wire
from llmtap.config import Settings, SpikeRule
from llmtap.events import Alert, utcnow
from llmtap.kafka import Kafka
from llmtap.names import Names
from stream.agents.spikes import SpikesStage
from stream.aggregates import Aggregate
from stream.detector import Detector
from stream.spikes import horizon
from stream.warmup import spike_settle, warmed_detector
from tests.conftest import start_broker
from tests.fake_provider import free_port

RULE = SpikeRule(
    name="search-requests",
    dimension="team",
    metric="requests",
    history_windows=10,
    min_history=5,
    cooldown_windows=3,
)
MINUTE = timedelta(minutes=1)


def window(start: datetime, requests: int, partitions: int) -> wire.Window:
    return Aggregate(requests=requests).to_event(
        ("team", "acme", "search"), start, MINUTE, range(partitions)
    )


async def publish(bootstrap: str, windows: list[wire.Window], at: datetime) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for w in windows:
            await producer.send_and_wait(
                Names().windows,
                wire.encode(w),
                key=w.series.encode(),
                timestamp_ms=int(at.timestamp() * 1000),
            )
    finally:
        await producer.stop()


async def commit_all(bootstrap: str, group: str) -> None:
    """The group consumed every window on the topic so far (as the spikes agent does)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group)
    await consumer.start()
    try:
        tps = [
            TopicPartition(Names().windows, p)
            for p in consumer.partitions_for_topic(Names().windows) or ()
        ]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        await consumer.commit({tp: await consumer.position(tp) for tp in tps})
    finally:
        await consumer.stop()


def test_the_horizon_covers_history_cooldown_and_seasonal_days() -> None:
    assert horizon([RULE]) == 11 * MINUTE
    hourly = RULE.model_copy(update={"window_s": 3600, "cooldown_windows": 20})
    assert horizon([RULE, hourly]) == 21 * timedelta(hours=1)
    seasonal = RULE.model_copy(update={"seasonality": "hour_of_day", "seasonal_days": 7})
    assert horizon([seasonal]) == timedelta(days=8)


async def test_a_restarted_detector_judges_a_spike_with_what_was_judged_before() -> None:
    async with start_broker() as broker:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap, topic_partitions=2, spike_rules=[RULE]
        )
        now = utcnow()
        first = now.replace(second=0, microsecond=0) - 12 * MINUTE
        steady = [window(first + i * MINUTE, 100 + (i % 3), 2) for i in range(10)]
        long_ago = now - timedelta(days=3)
        old = window(first - 60 * MINUTE, 5_000, 2)  # past the horizon: not read back
        await publish(broker.bootstrap, [old], long_ago)
        await publish(broker.bootstrap, steady, now)
        await commit_all(broker.bootstrap, Names().spikes_group)
        spike = window(first + 10 * MINUTE, 1_000, 2)
        await publish(broker.bootstrap, [spike], now)  # not consumed yet: not read back

        warm = await warmed_detector(settings)
        state = warm.states[(RULE.name, "acme", "search")]
        assert len(state.history) == 10  # the steady windows, not the old one
        assert state.last_window == steady[-1].window_start  # nor the spike

        fired = warm.offer(spike, now)
        assert [a.state for a in fired] == ["firing"]
        assert fired[0].observed == Decimal(1_000)
        # Without them, a restarted worker would have judged nothing yet:
        cold = Detector([RULE], 2, spike_settle(settings))
        assert cold.offer(spike, now) == []


async def test_nothing_is_read_back_for_a_group_that_committed_nothing() -> None:
    async with start_broker() as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, spike_rules=[RULE])
        start = utcnow().replace(second=0, microsecond=0) - 5 * MINUTE
        await publish(broker.bootstrap, [window(start, 100, 2)], datetime.now(UTC))
        assert (await warmed_detector(settings)).states == {}


async def test_a_worker_whose_broker_is_not_up_yet_starts_with_empty_baselines() -> None:
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", spike_rules=[RULE])
    assert (await warmed_detector(settings)).states == {}


async def test_the_spikes_stage_waits_for_as_many_shares_as_the_topic_has_partitions() -> None:
    """A responses topic made earlier, or grown to scale out, need not have the
    configured count: a window judged on 2 shares of 4 would miss half its calls."""
    async with start_broker(2) as broker:
        settings = Settings(kafka_bootstrap=broker.bootstrap, topic_partitions=4)
        detector = Detector([RULE], settings.topic_partitions, spike_settle(settings))
        stage = SpikesStage(settings, detector)
        await stage.start()
        try:
            assert detector.partitions == 2
        finally:
            await stage.stop()


async def test_a_spike_fired_by_one_worker_is_not_fired_again_by_the_next_owner() -> None:
    """A series' windows partition moves to another worker (a rebalance): that worker
    reads back what the group judged of it, so the spike its previous owner fired is
    ongoing there, not new (it fired again, a second page for one incident), and its
    end is resolved."""
    async with start_broker(2) as broker:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            topic_partitions=2,
            spike_rules=[RULE],
            stream_session_timeout_s=6,
        )
        start = utcnow().replace(second=0, microsecond=0) - 20 * MINUTE
        levels = [100 + i % 3 for i in range(10)]
        stages: list[SpikesStage] = []

        async def join() -> SpikesStage:
            stage = SpikesStage(settings, await warmed_detector(settings))
            await stage.start()
            stages.append(stage)
            return stage

        async def judged_through(minute: int) -> SpikesStage:
            """The stage that judged ``minute`` of the series, once one has."""
            at = start + minute * MINUTE
            async with asyncio.timeout(30):
                while True:
                    for stage in stages:
                        state = stage.detector.states.get((RULE.name, "acme", "search"))
                        if state is not None and state.last_window == at:
                            return stage
                    await asyncio.sleep(0.05)

        async def send(minute: int, requests: int) -> None:
            w = window(start + minute * MINUTE, requests, 2)
            await publish(broker.bootstrap, [w], utcnow())

        try:
            await join()
            for m, level in enumerate(levels):
                await send(m, level)
            await judged_through(9)
            # Committed too (each second): the joining worker warms up on what the group
            # committed, and judged on fewer windows, it would not know the baseline yet.
            async with asyncio.timeout(30):
                kafka = Kafka(broker.bootstrap)
                while await topics.lag(kafka, Names().spikes_group, Names().windows):
                    await asyncio.sleep(0.1)
            await join()  # the group splits the partitions
            await send(10, 1_000)
            owner = await judged_through(10)
            await send(11, 1_000)
            await judged_through(11)
            await owner.stop()  # its partitions go to the other worker
            stages.remove(owner)
            await send(12, 1_000)  # the spike goes on
            await send(13, 100)  # and ends
            await judged_through(13)
        finally:
            for stage in stages:
                await stage.stop()
        alerts = [
            Alert.model_validate_json(raw)
            for raw in await topics.read_all(Kafka(broker.bootstrap), Names().alerts)
        ]
        seen = sorted((a.window_start, a.state) for a in alerts)
        assert seen == [(start + 10 * MINUTE, "firing"), (start + 13 * MINUTE, "resolved")], [
            ((w - start) / MINUTE, s) for w, s in seen
        ]
