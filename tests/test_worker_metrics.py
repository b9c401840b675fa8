"""The stream worker's /metrics and /healthz: a real `llmtap worker` (tests/
test_stream_scale.py's) on a real broker, fed response events and windows straight
onto its topics (one unpriced, one late, one stamped ahead, undecodable ones), scraped
over HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer

from llmtap import topics, wire
from llmtap.config import Settings
from llmtap.events import Alert, Attribution, BudgetState, ResponseEvent, Usage
from llmtap.kafka import Kafka
from llmtap.names import Names
from stream.aggregates import Aggregate
from stream.app import StreamWorker, create_app
from stream.web import WorkerWeb
from tests import sample
from tests.conftest import start_broker
from tests.fake_provider import free_port
from tests.prometheus import sample as metric
from tests.test_stream_scale import PARTITIONS, stream_worker

WAIT_S = 60.0
ON_TIME = 3  # priced calls, ended now
SECOND = timedelta(seconds=1)
RULE = {
    "name": "chat-requests",
    "dimension": "feature",
    "metric": "requests",
    "window_s": 1,
    "history_windows": 10,
    "min_history": 5,
    "cooldown_windows": 3,
}
# Crossed at once by the first priced call: one alert per threshold (50, 80, 100 %).
BUDGET = {"name": "tiny", "scope": "tenant", "value": "acme", "limit_usd": "0.000000001"}


def call(at: datetime, model: str = "gpt-4o-mini") -> ResponseEvent:
    return sample.response(
        at,
        model_requested=model,
        usage=Usage(input_tokens=100, output_tokens=10),
        attribution=Attribution(tenant="acme", team="search"),
    )


def window(series: str, start: datetime, requests: int) -> bytes:
    """A whole one-second window (a share of every partition) of feature ``series``."""
    whole = Aggregate(requests=requests).to_event(
        ("feature", "acme", series), start, SECOND, range(PARTITIONS)
    )
    return wire.encode(whole)


async def send(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for value in values:  # keyed alike: one partition, in order
            await producer.send_and_wait(topic, value, key=b"metrics-test")
    finally:
        await producer.stop()


async def scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as response:
        assert response.status == 200
        return await response.text()


async def scraped_when(
    session: aiohttp.ClientSession, url: str, done: Callable[[str], bool], what: str
) -> str:
    """The worker's /metrics once ``done`` holds of it."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while asyncio.get_running_loop().time() < deadline:
        text = await scrape(session, url)
        if done(text):
            return text
        await asyncio.sleep(0.1)
    pytest.fail(f"never {what}; last scrape:\n{text}")


async def test_the_worker_serves_what_its_stages_counted(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "LLMTAP_WINDOW_GRACE_S": "1",
        "LLMTAP_BUDGETS": json.dumps([BUDGET]),
        "LLMTAP_SPIKE_RULES": json.dumps([RULE]),
    }
    started = time.time()
    async with (
        start_broker(PARTITIONS) as broker,
        stream_worker(broker.bootstrap, tmp_path / "w", metrics_port=port, extra_env=env),
        aiohttp.ClientSession() as session,
    ):
        names, kafka = Names(), Kafka(broker.bootstrap)
        now = datetime.now(UTC)
        calls = [call(now) for _ in range(ON_TIME)]
        calls += [call(now, model="no-such-model"), call(now + timedelta(minutes=10))]
        await send(
            broker.bootstrap,
            names.responses,
            [c.model_dump_json().encode() for c in calls] + [b"not a response event"],
        )

        # Once the windows of the calls ended now are out, the watermark is past them:
        # a call that ended a minute before them is late.
        def counted(text: str) -> bool:
            return metric(text, "llmtap_worker_windows_published_total") > 0

        await scraped_when(session, url, counted, "a window published")
        late = call(now - timedelta(minutes=1))
        await send(broker.bootstrap, names.responses, [late.model_dump_json().encode()])

        # The spikes stage: a series' history, a spike, its end; a window ending ten
        # minutes ahead of the worker's clock; one that is no window.
        start = now.replace(microsecond=0) - timedelta(minutes=20)
        levels = [100, 101, 102, 100, 101, 102, 1_000, 100]
        windows = [window("chat", start + i * SECOND, n) for i, n in enumerate(levels)]
        windows += [window("ahead", now + timedelta(minutes=10), 1), b"not a window"]
        await send(broker.bootstrap, names.windows, windows)

        def settled(text: str) -> bool:
            return (
                metric(text, "llmtap_worker_events_costed_total") == len(calls) + 1
                and metric(text, "llmtap_worker_records_skipped_total", stage="spikes") == 1
                and metric(text, "llmtap_worker_spike_alerts_total", state="resolved") == 1
            )

        text = await scraped_when(session, url, settled, "every record handled")
        # What the worker published, read back: its own windows have a share each.
        read = await topics.read_all(kafka, names.windows)
        published = [
            w
            for w in map(wire.decode_window, (raw for raw in read if raw != b"not a window"))
            if len(w.partitions) == 1
        ]
        states = await topics.read_all(kafka, names.budgets)
        alerts = [Alert.model_validate_json(a) for a in await topics.read_all(kafka, names.alerts)]
        async with session.get(f"{url}/healthz") as response:
            health = response.status, await response.json()

    assert metric(text, "llmtap_worker_events_costed_total") == ON_TIME + 3
    assert metric(text, "llmtap_worker_events_unpriced_total") == 1
    assert metric(text, "llmtap_worker_records_skipped_total", stage="costs") == 1
    assert metric(text, "llmtap_worker_records_skipped_total", stage="spikes") == 1
    assert metric(text, "llmtap_worker_events_late_total") == 1
    assert metric(text, "llmtap_worker_events_ahead_total") == 1
    assert metric(text, "llmtap_worker_windows_ahead_total") == 1
    assert metric(text, "llmtap_worker_windows_published_total") == len(published) > 0
    assert metric(text, "llmtap_worker_spike_alerts_total", state="firing") == 1
    assert metric(text, "llmtap_worker_spike_alerts_total", state="resolved") == 1
    spiked = sorted((a.window_start, a.state) for a in alerts if a.alert_type == "spike")
    assert spiked == [(start + 6 * SECOND, "firing"), (start + 7 * SECOND, "resolved")]
    assert metric(text, "llmtap_worker_budget_alerts_total") == 3
    assert len([a for a in alerts if a.alert_type == "budget"]) == 3
    assert metric(text, "llmtap_worker_budget_states_published_total") == len(states) > 0
    assert metric(text, "llmtap_worker_budget_calls_late_total") == 0
    assert all(BudgetState.model_validate_json(s).budget == "tiny" for s in states)
    for stage in ("costs", "spikes"):
        batch = metric(text, "llmtap_worker_last_batch_timestamp_seconds", stage=stage)
        poll = metric(text, "llmtap_worker_last_poll_timestamp_seconds", stage=stage)
        assert started < batch <= poll <= time.time(), stage
    assert health[0] == 200, health
    assert health[1]["status"] == "ok" and health[1]["partitions_assigned"] is True
    assert {s["state"] for s in health[1]["stages"].values()} == {"running"}


def test_a_worker_given_port_0_serves_no_http(tmp_path: Path) -> None:
    for port, served in ((0, False), (free_port(), True)):
        settings = Settings(data_dir=tmp_path, worker_metrics_port=port)
        worker = StreamWorker(*create_app(settings), settings)
        assert any(isinstance(s, WorkerWeb) for s in worker.services) is served, port


def test_a_worker_makes_its_data_dir_when_it_does_not_exist(tmp_path: Path) -> None:
    """`llmtap worker` run on its own (as compose runs it) with a data_dir not made yet:
    Faust makes only the last directory of its datadir as it starts."""
    settings = Settings(data_dir=tmp_path / "not" / "made", worker_metrics_port=0)
    app, _, _ = create_app(settings)
    app.conf.datadir.mkdir(exist_ok=True)  # what Faust's app does as the worker starts
    assert app.conf.datadir.is_dir()
