"""Two stream workers in the same consumer groups. Without budgets they split the
partitions, both make progress, and the windows they publish (a share per partition)
add up to every call once. With budgets one holds every partition, and when it dies
the other takes them over and goes on from the budget states it published: every
call counted once (stream/agents/assignment.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from llmtap import topics
from llmtap.config import Settings
from llmtap.events import (
    Attribution,
    BudgetState,
    CostedEvent,
    ResponseEvent,
    Usage,
    WindowEvent,
)
from llmtap.kafka import Kafka
from llmtap.names import Names
from stream import checkpoints
from tests import sample
from tests.conftest import start_broker
from tests.fake_provider import free_port

PARTITIONS = 4
READY_TIMEOUT_S = 60.0
WAIT_S = 60.0
FINAL_BURST = 60  # calls sent at once at the end


BUDGETS = [{"name": "all", "scope": "tenant", "value": "acme", "limit_usd": "1000"}]
SHARE_ERROR = "budgets counted on a share of the calls"
TAKEN_OVER = "more published states"  # logged by a worker given partitions


@contextlib.asynccontextmanager
async def stream_worker(
    bootstrap: str,
    data_dir: Path,
    budgets: bool = False,
    metrics_port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """`llmtap worker` as its own process, its /metrics on ``metrics_port`` (a free
    one by default: several run at once); entered once it reports ready."""
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(data_dir),
        "LLMTAP_KAFKA_BOOTSTRAP": bootstrap,
        "LLMTAP_TOPIC_PARTITIONS": str(PARTITIONS),
        "LLMTAP_WINDOW_SIZES_S": "[1]",
        # Grace for the rebalance when the second worker joins (partitions pause meanwhile).
        "LLMTAP_WINDOW_GRACE_S": "5",
        # A dead worker's partitions go to the other after this long.
        "LLMTAP_STREAM_SESSION_TIMEOUT_S": "6",
        "LLMTAP_BUDGETS": json.dumps(BUDGETS if budgets else []),
        "LLMTAP_WORKER_METRICS_PORT": str(metrics_port or free_port()),
        **(extra_env or {}),
    }
    ready = Settings(data_dir=data_dir).run_dir / "worker.ready"
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    log = await asyncio.to_thread((data_dir / "worker.log").open, "wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llmtap", "worker", env=env, stdout=log, stderr=log
    )
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + READY_TIMEOUT_S
        while not ready.exists():
            assert process.returncode is None, f"worker exited; see {data_dir / 'worker.log'}"
            assert loop.time() < deadline, "worker not ready in time"
            await asyncio.sleep(0.05)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
        log.close()


def response(i: int, now: datetime | None = None) -> ResponseEvent:
    return sample.response(
        now,
        model_requested="gpt-4o-mini",
        usage=Usage(input_tokens=100, output_tokens=10),
        latency_ms=50.0 + i % 10,
        proxy_overhead_ms=0.2,
        attribution=Attribution(tenant="acme", team=f"team{i % 3}"),
    )


async def test_two_workers_split_the_partitions_and_count_every_call_once(
    tmp_path: Path,
) -> None:
    async with (
        start_broker(PARTITIONS) as broker,
        stream_worker(broker.bootstrap, tmp_path / "w1"),
        stream_worker(broker.bootstrap, tmp_path / "w2"),
    ):
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
        await producer.start()
        sent = 0
        try:
            # Calls spread over several seconds (several one-second windows), so the
            # windows after the group's rebalance show how the partitions are split.
            # It ends with a burst of calls that ended at one instant: the last window
            # then has calls on every partition (a paced tail could leave it a call or
            # two, all on one worker's half), so its shares show the final split.
            burst_at = None
            for i in range(300 + FINAL_BURST):
                if i == 300:
                    burst_at = datetime.now(UTC)
                event = response(i, burst_at)
                await producer.send_and_wait(
                    Names().responses,
                    event.model_dump_json().encode(),
                    key=topics.partition_key(event.request_id),
                )
                sent += 1
                if burst_at is None:
                    await asyncio.sleep(0.02)  # the traffic's own pace, ~50 calls/s
        finally:
            await producer.stop()

        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        windows: list[WindowEvent] = []
        costed: list[CostedEvent] = []
        while loop.time() < deadline:
            windows = [
                WindowEvent.model_validate_json(raw)
                for raw in await topics.read_all(Kafka(broker.bootstrap), Names().windows)
            ]
            tenant = [w for w in windows if w.dimension == "tenant"]
            if sum(w.requests for w in tenant) + sum(w.late_events for w in tenant) >= sent:
                break
            await asyncio.sleep(0.25)
        costed = [
            CostedEvent.model_validate_json(raw)
            for raw in await topics.read_all(Kafka(broker.bootstrap), Names().costed)
        ]
        latest = await checkpoints.latest(Kafka(broker.bootstrap), range(PARTITIONS))

    tenant = [w for w in windows if w.dimension == "tenant"]
    # Every call priced once (ids are derived: a reprocessed response yields the same id),
    # and counted in the windows once.
    assert len({c.event_id for c in costed}) == sent
    assert (sum(w.requests for w in tenant), sum(w.late_events for w in tenant)) == (sent, 0)
    # Each window is published as one share per partition that had calls in it.
    assert all(len(w.partitions) == 1 for w in windows)
    last_start = max(w.window_start for w in tenant)
    assert {w.partitions for w in tenant if w.window_start >= last_start} == {
        (p,) for p in range(PARTITIONS)
    }
    # Both workers made progress: at the end the partitions' latest checkpoints name
    # two workers, each with half the partitions, and every partition read to its end.
    owners: dict[uuid.UUID, set[int]] = {}
    for partition, checkpoint in latest.items():
        owners.setdefault(checkpoint.writer, set()).add(partition)
    assert sorted(map(len, owners.values())) == [PARTITIONS // 2, PARTITIONS // 2], latest
    assert sum(c.done for c in latest.values()) == sent
    for worker in ("w1", "w2"):
        log = (tmp_path / worker / "worker.log").read_text()
        assert SHARE_ERROR not in log and TAKEN_OVER not in log, worker


async def send(bootstrap: str, calls: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for i in range(calls):
            event = response(i)
            await producer.send(
                Names().responses,
                event.model_dump_json().encode(),
                key=topics.partition_key(event.request_id),
            )
        await producer.flush()
    finally:
        await producer.stop()


async def counted(bootstrap: str, calls: int) -> tuple[Decimal, list[BudgetState]]:
    """Once ``calls`` costed events are out and the budget's latest state has counted
    them all: their total cost and every state published."""
    kafka = Kafka(bootstrap)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        costs: dict[uuid.UUID, Decimal] = {}
        for raw in await topics.read_all(kafka, Names().costed):
            event = CostedEvent.model_validate_json(raw)
            assert event.cost is not None
            costs[event.event_id] = event.cost.total
        states = [
            BudgetState.model_validate_json(raw)
            for raw in await topics.read_all(kafka, Names().budgets)
        ]
        total = sum(costs.values(), Decimal(0))
        done = [s for s in states if s.applied and sum(s.applied.values()) >= calls]
        if len(costs) >= calls and done and done[-1].spent_usd == total:
            return total, states
        assert loop.time() < deadline, (len(costs), total, states[-1:] if states else None)
        await asyncio.sleep(0.25)


async def test_with_budgets_one_worker_holds_every_partition_and_the_other_takes_over(
    tmp_path: Path,
) -> None:
    """Two workers with budgets: the first holds every partition and the one joining
    stands by (a budget's state is its whole spend). Killed, the holder's partitions go
    to the other, which takes up the states it published and counts every call once:
    before, each counted a share of the calls and published it as the whole."""
    async with start_broker(PARTITIONS) as broker:
        async with (
            stream_worker(broker.bootstrap, tmp_path / "w1", budgets=True) as first,
            stream_worker(broker.bootstrap, tmp_path / "w2", budgets=True),
        ):
            await send(broker.bootstrap, 200)
            total, states = await counted(broker.bootstrap, 200)
            latest = await checkpoints.latest(Kafka(broker.bootstrap), range(PARTITIONS))
            assert len({c.writer for c in latest.values()}) == 1, latest
            assert sorted(latest) == list(range(PARTITIONS))
            assert TAKEN_OVER in (tmp_path / "w1" / "worker.log").read_text()
            assert TAKEN_OVER not in (tmp_path / "w2" / "worker.log").read_text()
            first.kill()  # no handover: it may have published states past its commits
            await first.wait()
            await send(broker.bootstrap, 200)
            total, states = await counted(broker.bootstrap, 400)
            taken = await checkpoints.latest(Kafka(broker.bootstrap), range(PARTITIONS))
    assert len(total.as_tuple().digits) > 3  # costs to the nano-dollar, summed exactly
    # Spend only grew, and never past the cost of the calls: none counted twice.
    spends = [s.spent_usd for s in states]
    assert spends == sorted(spends) and spends[-1] == total
    assert {c.writer for c in taken.values()} - {c.writer for c in latest.values()}
    assert TAKEN_OVER in (tmp_path / "w2" / "worker.log").read_text()
    for worker in ("w1", "w2"):
        assert SHARE_ERROR not in (tmp_path / worker / "worker.log").read_text(), worker


async def test_a_partition_taken_over_closes_its_windows_when_its_last_record_was_skipped(
    tmp_path: Path,
) -> None:
    """The worker stops with a window open on a partition whose last record could not be
    decoded (passed over). The next worker reads the partition again from the window's
    first call: with no traffic after, its windows must still close (by the wall clock,
    as any idle partition's do)."""
    grace = {"LLMTAP_WINDOW_GRACE_S": "10"}  # the window stays open until the first stops
    names = Names()
    async with start_broker(PARTITIONS) as broker:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for i in range(5):  # one key: one partition, in order
                value = response(i).model_dump_json().encode()
                await producer.send_and_wait(names.responses, value, key=b"one")
            await producer.send_and_wait(names.responses, b"not a response event", key=b"one")
        finally:
            await producer.stop()
        async with stream_worker(broker.bootstrap, tmp_path / "w1", extra_env=grace):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + WAIT_S
            while True:
                latest = await checkpoints.latest(Kafka(broker.bootstrap), range(PARTITIONS))
                if [c.done for c in latest.values()] == [6]:
                    break
                assert loop.time() < deadline, latest
                await asyncio.sleep(0.2)
        # Stopped before its grace ended: the window is open in the checkpoint.
        latest = await checkpoints.latest(Kafka(broker.bootstrap), range(PARTITIONS))
        (checkpoint,) = latest.values()
        assert checkpoint.hold < checkpoint.done == 6, checkpoint
        async with stream_worker(broker.bootstrap, tmp_path / "w2", extra_env=grace):
            deadline = loop.time() + 30  # grace (10 s) and a few
            tenant: list[WindowEvent] = []
            while loop.time() < deadline:
                windows = [
                    WindowEvent.model_validate_json(raw)
                    for raw in await topics.read_all(Kafka(broker.bootstrap), names.windows)
                ]
                tenant = [w for w in windows if w.dimension == "tenant"]
                if sum(w.requests for w in tenant) >= 5:
                    break
                await asyncio.sleep(0.5)
    assert sum(w.requests for w in tenant) == 5, tenant


def _timed(at: datetime) -> ResponseEvent:
    return response(0, at)


def _tokens(tokens: int) -> ResponseEvent:
    return response(0).model_copy(update={"usage": Usage(input_tokens=tokens)})


@pytest.mark.parametrize(
    "bad",
    [
        _timed(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        _timed(datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC)),
        _tokens(10**27),
    ],
    ids=["year-9999", "year-1", "10^27-tokens"],
)
async def test_a_call_the_steps_cannot_count_does_not_stop_the_worker(
    tmp_path: Path, bad: ResponseEvent
) -> None:
    """A response event the contract takes, but timed at an end of the calendar (an
    ingress whose clock is broken) or with more tokens than exact decimals price (the
    ingress takes any count a provider answers): the writer dead-letters such a call
    (sinks/clickhouse/rows.py: 1970-2106, UInt32 tokens). The worker must go on with the
    calls after it, not crash on it again at every restart."""
    names = Names()

    async def produce(bootstrap: str, event: ResponseEvent) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(
                names.responses, event.model_dump_json().encode(), key=b"one"
            )
        finally:
            await producer.stop()

    async with start_broker(PARTITIONS) as broker:
        # Sent before the worker starts: read alone, before its windows' first watermark.
        await produce(broker.bootstrap, bad)
        async with stream_worker(broker.bootstrap, tmp_path / "w", budgets=True) as worker:
            await asyncio.sleep(2)  # its windows closed once (every second) with it alone
            await produce(broker.bootstrap, response(1))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            costed: list[bytes] = []
            while loop.time() < deadline and worker.returncode is None:
                costed = await topics.read_all(Kafka(broker.bootstrap), names.costed)
                if len(costed) == 2:
                    break
                await asyncio.sleep(0.25)
            await asyncio.sleep(2)  # its windows closed meanwhile (every second)
            running = worker.returncode is None
    assert running, (tmp_path / "w" / "worker.log").read_text()[-2000:]
    assert len(costed) == 2
