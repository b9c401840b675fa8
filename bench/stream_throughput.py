"""Stream benchmark: one stream worker process through the whole chain on Tansu.

    python bench/stream_throughput.py [--events 100000] [--rate 0] [--lag-seconds 20] \
        [--out bench/results/stream.md]

Starts the embedded Tansu broker and one `llmtap worker` process (its own OS process,
as in production) configured with budgets and spike rules, so every stage runs:
the cost stage (responses -> costed, each costed event counted in the same pass by
the windows and budgets steps), windows -> spikes (alerts) and budget states.

1. **Throughput.** ``--events`` response events are put on `llmtap.responses` before
   the worker starts. The clock runs from the first offset its consumer group commits
   on `llmtap.responses` to the last (a batch is committed only after it was priced,
   windowed and counted against the budgets, its costed events and budget states
   delivered): events/s = events committed in between / time in between. Then the
   budgets' published spend is checked against the cost of the events sent (priced
   here with the same catalog).
2. **Lag at a rate.** Response events are produced open loop at ``--rate`` events/s
   (default: half the measured throughput) for ``--lag-seconds``; for each costed
   event the bench reads, lag = the costed record's broker timestamp minus the time
   its response was sent. p50/p99 reported.

The bench process itself (producing and reading) shares the machine's two cores with
the worker and the broker; the numbers are for this whole setup, not the worker alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from ingress_latency import percentile as ingress_percentile  # bench/, beside this script

from llmtap import topics
from llmtap.config import Settings
from llmtap.events import Attribution, BudgetState, ResponseEvent, Usage
from llmtap.kafka import FETCH_WAIT_MS, Kafka
from llmtap.names import Names
from llmtap.supervisor import embedded_broker
from stream.catalog import load_catalog
from stream.pricing import price

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "claude-3-5-sonnet", "o3-mini", "llama-x")
TENANTS = 5
PARTITIONS = 4
BUDGETS = [
    {"name": f"t{i}-monthly", "scope": "tenant", "value": f"t{i}", "limit_usd": "1000000"}
    for i in range(TENANTS)
]
SPIKE_RULES = [
    {"name": "team-cost", "dimension": "team", "metric": "cost"},
    {"name": "model-requests", "dimension": "model", "metric": "requests"},
    {"name": "model-p95", "dimension": "model", "metric": "p95_latency"},
]


def response(i: int, at: datetime) -> ResponseEvent:
    return ResponseEvent(
        request_id=uuid.uuid4(),
        ts_start=at - timedelta(milliseconds=250),
        ts_end=at,
        provider="openai",
        endpoint="chat.completions",
        model_requested=MODELS[i % len(MODELS)],
        stream=i % 3 == 0,
        status="ok" if i % 50 else "upstream_error",
        http_status=200 if i % 50 else 500,
        usage=Usage(input_tokens=500 + i % 300, output_tokens=100 + i % 50, cached_input_tokens=64),
        latency_ms=200.0 + i % 97,
        ttft_ms=80.0 + i % 13 if i % 3 == 0 else None,
        proxy_overhead_ms=0.4,
        attribution=Attribution(
            tenant=f"t{i % TENANTS}",
            team=f"team{i % 20}",
            user=f"u{i % 1000}",
            feature=f"f{i % 7}",
            key_id=f"k{i % 50}",
        ),
    )


def worker_env(bootstrap: str, data_dir: Path) -> dict[str, str]:
    return {
        # The bench's settings only: none of the caller's (a namespace, say) leaks in.
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMTAP_")},
        "LLMTAP_DATA_DIR": str(data_dir),
        "LLMTAP_KAFKA_BOOTSTRAP": bootstrap,
        "LLMTAP_TOPIC_PARTITIONS": str(PARTITIONS),
        "LLMTAP_BUDGETS": json.dumps(BUDGETS),
        "LLMTAP_SPIKE_RULES": json.dumps(SPIKE_RULES),
        "LLMTAP_LOG_LEVEL": "WARNING",
        "LLMTAP_WORKER_METRICS_PORT": "0",  # not scraped here
    }


@contextlib.asynccontextmanager
async def worker(bootstrap: str, data_dir: Path, ready: bool = True) -> AsyncIterator[None]:
    """A `llmtap worker` process; entered once it reported ready (or at once)."""
    settings = Settings(data_dir=data_dir)
    ready_path = settings.run_dir / "worker.ready"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmtap",
        "worker",
        env=worker_env(bootstrap, data_dir),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=(data_dir / "worker.log").open("wb"),
    )
    loop = asyncio.get_running_loop()
    try:
        deadline = loop.time() + 120
        while ready and not ready_path.exists():
            if process.returncode is not None or loop.time() > deadline:
                raise RuntimeError(f"worker did not start; see {data_dir / 'worker.log'}")
            await asyncio.sleep(0.05)
        yield
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def produce(bootstrap: str, events: list[ResponseEvent]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for event in events:
            await producer.send(
                Names().responses,
                event.model_dump_json().encode(),
                key=topics.partition_key(event.request_id),
            )
        await producer.flush()
    finally:
        await producer.stop()


async def committed(reader: AIOKafkaConsumer, topic: str) -> int:
    """Offsets the stream's group has committed on ``topic``, summed over partitions
    (``reader`` has the group's id but never joins it: it only fetches offsets)."""
    total = 0
    for partition in range(PARTITIONS):
        offset = await reader.committed(TopicPartition(topic, partition))
        total += offset or 0
    return total


async def throughput(bootstrap: str, data_dir: Path, n: int) -> tuple[float, Decimal, Decimal]:
    now = datetime.now(UTC)
    # Spread over the last minutes, in order, so windows close as the worker goes.
    events = [response(i, now - timedelta(milliseconds=(n - i) * 5)) for i in range(n)]
    catalog = load_catalog()
    expected = sum(
        (c.cost.total for c in (price(e, catalog) for e in events) if c.cost is not None),
        Decimal(0),
    )
    print(f"putting {n:,} response events on the topic...", file=sys.stderr)
    await produce(bootstrap, events)
    admin = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=Names().stream_group, enable_auto_commit=False
    )
    await admin.start()
    loop = asyncio.get_running_loop()
    try:
        # The worker's cost stage may start before the rest of the worker reports
        # ready, so the clock runs from the first commit seen to the last: events/s =
        # events committed in between / time in between (polled every 50 ms).
        async with worker(bootstrap, data_dir, ready=False):
            first: tuple[float, int] | None = None
            done = 0
            while done < n:
                await asyncio.sleep(0.05)
                done = await committed(admin, Names().responses)
                if done and first is None:
                    first = (loop.time(), done)
                print(f"  {done:,} committed", file=sys.stderr)
            assert first is not None
            took = loop.time() - first[0]
            rate = (n - first[1]) / took
    finally:
        await admin.stop()
    spent = Decimal(0)
    latest: dict[str, BudgetState] = {}
    for raw in await topics.read_all(Kafka(bootstrap), Names().budgets):
        state = BudgetState.model_validate_json(raw)
        latest[state.budget] = state
    spent = sum((s.spent_usd for s in latest.values()), Decimal(0))
    return rate, expected, spent


async def lag_at_rate(bootstrap: str, data_dir: Path, rate: float, seconds: float) -> list[float]:
    """Lag (ms) from sending a response to its costed record on the broker."""
    sent: dict[bytes, float] = {}
    lags: list[float] = []
    total = int(rate * seconds)
    consumer = AIOKafkaConsumer(
        Names().costed,
        bootstrap_servers=bootstrap,
        auto_offset_reset="latest",
        group_id=None,
        fetch_max_wait_ms=FETCH_WAIT_MS,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    try:
        async with worker(bootstrap, data_dir):
            # Latest offsets now, before the first send (the throughput run's are older).
            await consumer.seek_to_end()
            for tp in consumer.assignment():
                await consumer.position(tp)

            async def read() -> None:
                while len(lags) < total:
                    batches = await consumer.getmany(timeout_ms=500)
                    for records in batches.values():
                        for record in records:
                            at = sent.get(record.key or b"")
                            if at is not None:
                                lags.append(record.timestamp - at)

            reader = asyncio.create_task(read())
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(total):
                due = start + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                event = response(i, datetime.now(UTC))
                key = topics.partition_key(event.request_id)
                sent[key] = time.time() * 1000
                await producer.send(Names().responses, event.model_dump_json().encode(), key=key)
                if i % int(rate) == 0:
                    print(f"  lag run: {i:,}/{total:,} sent, {len(lags):,} seen", file=sys.stderr)
            await asyncio.wait_for(reader, timeout=120)
    finally:
        await producer.stop()
        await consumer.stop()
    return lags


@contextlib.asynccontextmanager
async def broker() -> AsyncIterator[str]:
    """The embedded broker on a free port, with llmtap's topics; yields its address."""
    bootstrap = f"127.0.0.1:{free_port()}"
    async with embedded_broker(bootstrap, PARTITIONS):
        yield bootstrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def percentile(values: list[float], q: float) -> float:
    """``q`` in 0..1, interpolated between closest ranks as the other reports' are."""
    return ingress_percentile(values, q * 100)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=0, help="0: half the throughput")
    parser.add_argument("--lag-seconds", type=float, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/stream.md"))
    args = parser.parse_args()

    rates: list[float] = []
    checks: list[tuple[Decimal, Decimal]] = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            async with broker() as bootstrap:
                rate, expected, spent = await throughput(bootstrap, Path(tmp), args.events)
                rates.append(rate)
                checks.append((expected, spent))
                print(f"run {run + 1}: {rate:,.0f} events/s", file=sys.stderr)
                if run == args.runs - 1:
                    lag_rate = args.rate or statistics.median(rates) / 2
                    lags = await lag_at_rate(bootstrap, Path(tmp), lag_rate, args.lag_seconds)

    report = render(args, rates, checks, lag_rate, lags)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def render(
    args: argparse.Namespace,
    rates: list[float],
    checks: list[tuple[Decimal, Decimal]],
    lag_rate: float,
    lags: list[float],
) -> str:
    exact = all(expected == spent for expected, spent in checks)
    load = os.getloadavg()[0]
    return "\n".join(
        [
            "# Stream benchmark: one worker process, every stage",
            "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores "
            f"(1-min load average at the end: {load:.1f}), Python {platform.python_version()}",
            f"- {args.events:,} response events on `llmtap.responses` (4 partitions) per run, "
            f"{args.runs} runs; {TENANTS} budgets, {len(SPIKE_RULES)} spike rules, windows of "
            "1 min and 1 h over 7 dimensions",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| throughput, median of {len(rates)} runs (events/s per worker) | "
            f"{statistics.median(rates):,.0f} |",
            f"| throughput, best run | {max(rates):,.0f} |",
            f"| lag at {lag_rate:,.0f} events/s, p50 (ms) | {percentile(lags, 0.5):,.0f} |",
            f"| lag at {lag_rate:,.0f} events/s, p99 (ms) | {percentile(lags, 0.99):,.0f} |",
            f"| budget spend published = cost of events sent, every run | "
            f"{'yes' if exact else 'NO'} |",
            "",
            "Target (issue): >= 20,000 events/s per worker process.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
