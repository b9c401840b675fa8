"""The floor under a stream stage: how fast records can be handed to code that does nothing.

    python bench/stream_floor.py [--events 120000] [--runs 3] [--out bench/results/stream_floor.md]

Why the worker's stages (stream/agents/) consume below Faust's per-event stream:
the same response events on the embedded broker are read, side by side, by

- ``faust``: a Faust agent doing nothing with ``stream.take_events(1000, within=0.05)``
  (memory store, a 50 ms fetch wait as every llmtap consumer), its own OS process;
- ``aiokafka``: an aiokafka consumer in a group doing nothing with
  ``getmany(max_records=2000)`` and committing each batch, its own OS process.

Each reports events/s from its first batch to its last, and its CPU time per event
(whole process, start-up included, so an upper bound). Median of ``--runs``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from stream_throughput import PARTITIONS, broker, produce, response

from llmtap.kafka import FETCH_WAIT_MS
from llmtap.names import Names

AIOKAFKA_BATCH = 2000


def report(n: int, took: float, data_dir: str, first: int = 0) -> None:
    """Leave the result in ``data_dir`` (Faust's worker takes over stdout): events/s
    over the ``took`` seconds from the first batch (``first`` events, in before the
    clock started) to the last; CPU per event over all ``n``."""
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_us = (usage.ru_utime + usage.ru_stime) / n * 1e6
    Path(data_dir, "result").write_text(f"{(n - first) / took:.0f} {cpu_us:.1f}\n")


def faust_reader(bootstrap: str, n: int, data_dir: str) -> None:
    import faust
    from faust.transport.drivers import aiokafka as driver

    # Faust builds its consumer with fetch_max_wait_ms=1500, fixed, and the embedded
    # Tansu answers a fetch only when that wait is over: the agent's consumer waits
    # FETCH_WAIT_MS, as every llmtap consumer does by default, so the two readers compare fairly.
    class ConsumerThread(driver.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport):  # type: ignore[no-untyped-def]
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = FETCH_WAIT_MS  # read by start()
            return consumer

    class FloorConsumer(driver.Consumer):
        def _new_consumer_thread(self):  # type: ignore[no-untyped-def]
            return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class Transport(driver.Transport):
        Consumer = FloorConsumer

    class FloorApp(faust.App):
        def _new_transport(self):  # type: ignore[no-untyped-def]
            return Transport(self.conf.broker_consumer, self)

    app = FloorApp(
        f"floor-faust-{time.time_ns()}",
        broker=[f"kafka://{bootstrap}"],
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=data_dir,
        topic_partitions=PARTITIONS,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10,
        broker_heartbeat_interval=1,
        broker_rebalance_timeout=10,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
    )
    source = app.topic(Names().responses, key_serializer="raw", value_serializer="raw")
    seen = {"n": 0, "first": 0}
    started: list[float] = []

    @app.agent(source)
    async def nothing(stream):  # type: ignore[no-untyped-def]
        async for batch in stream.take_events(1000, within=0.05):
            if not started:
                started.append(time.perf_counter())
                seen["first"] = len(batch)
            seen["n"] += len(batch)
            if seen["n"] >= n:
                report(seen["n"], time.perf_counter() - started[0], data_dir, seen["first"])
                os._exit(0)

    sys.argv = [sys.argv[0], "worker", "-l", "warn"]
    app.main()


async def aiokafka_reader(bootstrap: str, n: int, data_dir: str) -> None:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        Names().responses,
        bootstrap_servers=bootstrap,
        group_id=f"floor-aiokafka-{time.time_ns()}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=FETCH_WAIT_MS,
    )
    await consumer.start()
    try:
        seen = first = 0
        started = 0.0
        while seen < n:
            fetched = await consumer.getmany(timeout_ms=100, max_records=AIOKAFKA_BATCH)
            if fetched and not seen:
                started = time.perf_counter()
                first = sum(len(records) for records in fetched.values())
            seen += sum(len(records) for records in fetched.values())
            if fetched:
                await consumer.commit()
        report(seen, time.perf_counter() - started, data_dir, first)
    finally:
        await consumer.stop()


async def run_reader(kind: str, bootstrap: str, n: int, data_dir: str) -> tuple[float, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--reader",
        kind,
        "--bootstrap",
        bootstrap,
        "--events",
        str(n),
        "--data-dir",
        data_dir,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(process.wait(), timeout=600)
    result = await asyncio.to_thread(read_result, Path(data_dir))
    if result is None:
        raise RuntimeError(f"{kind} reader reported nothing (exit code {process.returncode})")
    return result


def read_result(data_dir: Path) -> tuple[float, float] | None:
    path = data_dir / "result"
    if not path.exists():
        return None
    rate, cpu = path.read_text().split()
    return float(rate), float(cpu)


async def main(args: argparse.Namespace) -> int:
    results: dict[str, list[tuple[float, float]]] = {"faust": [], "aiokafka": []}
    with tempfile.TemporaryDirectory() as tmp:
        async with broker() as bootstrap:
            now = datetime.now(UTC)
            print(f"putting {args.events:,} response events on the topic...", file=sys.stderr)
            await produce(bootstrap, [response(i, now) for i in range(args.events)])
            for run in range(args.runs):
                for kind in results:  # side by side: each reader reads every event
                    data_dir = f"{tmp}/{kind}-{run}"  # the reader makes it
                    rate, cpu = await run_reader(kind, bootstrap, args.events, data_dir)
                    results[kind].append((rate, cpu))
                    print(f"run {run + 1} {kind}: {rate:,.0f} events/s", file=sys.stderr)

    rows = []
    for kind, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        rows.append(f"| {kind} | {rate:,.0f} | {cpu:.1f} |")
    ratio = statistics.median(r for r, _ in results["aiokafka"]) / statistics.median(
        r for r, _ in results["faust"]
    )
    load = os.getloadavg()[0]
    report_md = "\n".join(
        [
            "# Stream floor: records handed to code that does nothing",
            "",
            f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores "
            f"(1-min load average at the end: {load:.1f}), Python {platform.python_version()}",
            f"- {args.events:,} response events on `llmtap.responses` ({PARTITIONS} partitions); "
            f"{args.runs} runs, the readers alternating",
            "",
            "| reader | events/s (median) | CPU µs per event (process, median) |",
            "|---|---:|---:|",
            *rows,
            "",
            f"aiokafka hands over records {ratio:,.0f}x as fast as Faust's stream: the",
            "worker's stages (stream/agents/) consume with aiokafka for this reason.",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report_md)
    print(report_md)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=120_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/stream_floor.md"))
    parser.add_argument("--reader", choices=["faust", "aiokafka"])
    parser.add_argument("--bootstrap")
    parser.add_argument("--data-dir")
    args = parser.parse_args()
    if args.reader == "faust":
        faust_reader(args.bootstrap, args.events, args.data_dir)
    elif args.reader == "aiokafka":
        asyncio.run(aiokafka_reader(args.bootstrap, args.events, args.data_dir))
    else:
        sys.exit(asyncio.run(main(args)))
