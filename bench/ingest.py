"""Ingest benchmark: costed events on a Kafka topic -> queryable rows in chDB.

    python bench/ingest.py [--events 400000] [--batch-rows N] [--decode-processes N]
                           [--compare-decode-processes N ...] [--compare-batch-rows N]
                           [--out bench/results/ingest.md]

Starts the embedded Tansu broker, fills `llmtap.costed` with synthetic costed events
encoded as the worker writes them (before the clock starts), then runs the real
ClickHouse writer (read -> decode, in decode processes with --decode-processes ->
duplicate check -> columnar insert -> commit) against a fresh chDB store and times it
until every row is queryable: with the settings' batch size and decode processes (or
as many as given) and, run by run in turn, with each count of --compare-decode-processes
(by default every count below the one measured: 1 and 0, the writer decoding in its own
process, beside the default 2), so they are measured side by side (with
--compare-batch-rows N, batches of N rows too, in the same turns). It also times the
writer's steps alone, in one process, on the same events (decode, columns, duplicate
check + insert), so the report says where time goes; and, from /proc, the CPU each
part used end to end (the store process, the decode processes, the broker) a row, with
the cores kept busy, which says whether the machine, not the pipeline, is the limit.
Target (issue): >= 50,000 rows/s on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaProducer
from ingress_latency import machine_busy_seconds  # bench/, beside this script

from llmtap.config import Settings
from llmtap.events import Attribution, Cost, CostedEvent, ResponseEvent, Usage
from llmtap.names import Names
from llmtap.runtime import tune_gc
from llmtap.supervisor import embedded_broker
from llmtap.wire import decode_costed, encode
from sinks.clickhouse.decode import decode_batch, runs_of
from sinks.clickhouse.rows import call_columns
from sinks.clickhouse.write import calls_types, write_batch
from sinks.clickhouse.writer import ClickHouseWriter
from sql.migrate import migrate
from sql.store import Store

Config = tuple[int, int]  # rows a batch, decode processes


def label(config: Config) -> str:
    return f"batches of {config[0]:,} rows, {config[1]} decode process(es)"


MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "claude-3-5-sonnet", "o3-mini")


def synthetic(n: int) -> list[bytes]:
    """``n`` costed events as the worker's cost stage writes them: llmtap.wire's encoding,
    which leaves out a usage count at its default (the pydantic model's JSON writes every
    field, each one more for the writer to read and check)."""
    start = datetime.now(UTC) - timedelta(hours=1)
    out = []
    for i in range(n):
        at = start + timedelta(milliseconds=i)
        cost = Decimal(i % 1000) / Decimal(1_000_000)
        response = ResponseEvent(
            request_id=uuid.uuid4(),
            ts_start=at,
            ts_end=at,
            provider="openai",
            endpoint="chat.completions",
            model_requested=MODELS[i % len(MODELS)],
            stream=i % 2 == 0,
            status="ok",
            http_status=200,
            usage=Usage(input_tokens=500 + i % 300, output_tokens=100, cached_input_tokens=50),
            latency_ms=200.0 + i % 50,
            ttft_ms=80.0,
            proxy_overhead_ms=0.4,
            attribution=Attribution(tenant=f"t{i % 5}", team=f"team{i % 20}", user=f"u{i % 1000}"),
        )
        priced = Cost(
            input=cost,
            cached_input=Decimal(0),
            cache_write=Decimal(0),
            output=Decimal(0),
            reasoning=Decimal(0),
            total=cost,
        )
        event = CostedEvent(event_id=uuid.uuid4(), response=response, cost=priced, unpriced=False)
        # Read back into the wire's structs from JSON without defaults, so each usage
        # count at its default is the wire's own (msgspec leaves out a str default by
        # identity, not equality: "global" read from JSON would be written again).
        out.append(encode(decode_costed(event.model_dump_json(exclude_defaults=True).encode())))
    return out


async def fill_topic(bootstrap: str, payloads: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20)
    await producer.start()
    try:
        for i, value in enumerate(payloads):
            await producer.send(Names().costed, value, key=str(i).encode())
        await producer.flush()
    finally:
        await producer.stop()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PARTS = ("store process", "decode processes", "broker")


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user and system, all threads) used so far by this process (the
    writer's store process: reads, duplicate check, insert in chDB), its decode
    processes and the broker, by pid, read from /proc (Linux; empty elsewhere)."""
    used: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, seconds = int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        if pid == me:
            used[pid] = ("store process", seconds)
        elif ppid == me and b"spawn_main" in cmdline:  # not the resource tracker
            used[pid] = ("decode processes", seconds)
        elif ppid == me and b"tansu" in cmdline:
            used[pid] = ("broker", seconds)
    return used


async def end_to_end(
    settings: Settings, store: Store, n: int, batch_rows: int, decode_processes: int
) -> tuple[float, dict[str, float]]:
    """Seconds from the writer's first message read until n rows are queryable, and
    the CPU seconds each part used meanwhile (:func:`cpu_seconds`), and the machine's
    in all (``machine``: the other load is what the parts did not use of it).

    A fresh consumer group each time, so every run reads the whole topic; the group
    join and the decode processes' start that come before the first read (seconds) are
    not counted.
    """
    writer = ClickHouseWriter(
        settings.model_copy(
            update={"sink_batch_rows": batch_rows, "sink_decode_processes": decode_processes}
        ),
        store,
        group_id=f"llmtap-bench-{uuid.uuid4().hex[:8]}",
    )
    task = asyncio.create_task(writer.run())
    loop = asyncio.get_running_loop()
    before: dict[int, tuple[str, float]] | None = None
    busy_before = 0.0
    try:
        while writer.rows_written < n:
            if before is None and writer.first_read_at is not None:
                before = cpu_seconds()  # within ~10 ms of the first read
                busy_before = machine_busy_seconds()
            await asyncio.sleep(0.01)
        after = cpu_seconds()
        busy_after = machine_busy_seconds()
        assert writer.first_read_at is not None
        took = loop.time() - writer.first_read_at
        assert int(store.command("SELECT count() FROM calls")) == n  # queryable, once each
        used = dict.fromkeys(PARTS, 0.0) if after else {}
        for pid, (part, seconds) in after.items():  # what each used since, by pid
            since = (before or {}).get(pid, (part, 0.0))[1]
            used[part] += seconds - since
        if used:
            used["machine"] = busy_after - busy_before
        return took, used
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def steps(store: Store, payloads: list[bytes], batch_rows: int) -> dict[str, float]:
    """Rows/s of the writer's steps alone, in this process, over the same payloads."""
    n = len(payloads)
    messages = [(Names().costed, 0, i, p) for i, p in enumerate(payloads)]
    runs = [runs_of(messages[start : start + batch_rows]) for start in range(0, n, batch_rows)]
    types = calls_types(store)
    t0 = time.perf_counter()
    events = [CostedEvent.model_validate_json(p) for p in payloads]
    t1 = time.perf_counter()
    for p in payloads:
        decode_costed(p)
    t2 = time.perf_counter()
    for start in range(0, n, batch_rows):
        call_columns(events[start : start + batch_rows])
    t3 = time.perf_counter()
    batches = [decode_batch(batch_runs, types) for batch_runs in runs]
    t4 = time.perf_counter()
    for batch_runs, batch in zip(runs, batches, strict=True):
        batch.source = batch_runs  # as the writer keeps them, made before the clock
        write_batch(store, batch)
    t5 = time.perf_counter()
    return {
        "decode: JSON -> CostedEvent (the contract's pydantic model, for comparison)": n
        / (t1 - t0),
        "decode: JSON -> wire.CostedEvent (msgspec, what the writer uses)": n / (t2 - t1),
        "columns: costed events -> calls columns of plain values": n / (t3 - t2),
        "decode process's work: decode + columns + insert body (decode_batch)": n / (t4 - t3),
        "write: duplicate check + insert of the body (write_batch)": n / (t5 - t4),
    }


async def main() -> int:
    # The embedded defaults, measured as they ship: none of the caller's LLMTAP_
    # settings (a namespace the topics filled here would not have, say) leaks in.
    for name in [k for k in os.environ if k.startswith("LLMTAP_")]:
        del os.environ[name]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    parser.add_argument("--events", type=int, default=400_000)
    parser.add_argument("--batch-rows", type=int, default=defaults.sink_batch_rows)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--decode-processes",
        type=int,
        default=defaults.sink_decode_processes,
        help="the writer's decode processes to measure",
    )
    parser.add_argument(
        "--compare-decode-processes",
        type=int,
        nargs="*",
        default=None,
        help="also measure these counts of decode processes, in turn (default: every "
        "count below --decode-processes; 0 decodes in the store process)",
    )
    parser.add_argument(
        "--compare-batch-rows",
        type=int,
        default=None,
        help="also measure batches of this many rows (with --decode-processes), in turn",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/ingest.md"))
    args = parser.parse_args()

    tune_gc()  # as the store process does
    with tempfile.TemporaryDirectory() as tmp:
        bootstrap = f"127.0.0.1:{free_port()}"
        async with embedded_broker(bootstrap, partitions=4):
            settings = Settings(kafka_bootstrap=bootstrap, topic_partitions=4)
            print(f"generating {args.events} events...", file=sys.stderr)
            payloads = synthetic(args.events)
            print("filling the topic...", file=sys.stderr)
            await fill_topic(bootstrap, payloads)

            compared = args.compare_decode_processes
            if compared is None:
                compared = range(args.decode_processes - 1, -1, -1)
            configs = [(args.batch_rows, args.decode_processes)]
            configs += [(args.batch_rows, n) for n in compared]
            if args.compare_batch_rows is not None:
                configs.append((args.compare_batch_rows, args.decode_processes))
            configs = list(dict.fromkeys(configs))
            rates: dict[Config, list[float]] = {config: [] for config in configs}
            cpu: dict[Config, list[dict[str, float]]] = {config: [] for config in configs}
            store = Store(f"chdb:///{tmp}/clickhouse")
            try:
                migrate(store)
                for run in range(args.runs):
                    for config in configs:  # side by side: one run of each in turn
                        store.command("TRUNCATE TABLE calls")
                        took, used = await end_to_end(settings, store, args.events, *config)
                        rates[config].append(args.events / took)
                        if used:  # on Linux
                            ours = sum(used[part] for part in PARTS)
                            used["other load"] = max(0.0, used.pop("machine") - ours) / took
                            used["cores busy"] = ours / took
                        cpu[config].append(used)
                        print(
                            f"run {run + 1}, {label(config)}: {rates[config][-1]:,.0f} rows/s",
                            file=sys.stderr,
                        )
                store.command("TRUNCATE TABLE calls")
                step_rates = steps(store, payloads[: min(len(payloads), 50_000)], args.batch_rows)
            finally:
                store.close()

    report = render(args, rates, cpu, step_rates)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def render(
    args: argparse.Namespace,
    rates: dict[Config, list[float]],
    cpu: dict[Config, list[dict[str, float]]],
    steps: dict[str, float],
) -> str:
    lines = [
        "# Ingest benchmark: topic -> queryable rows (chDB)",
        "",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"- events: {args.events:,} costed events on `llmtap.costed` (4 partitions), "
        f"{args.runs} runs of each configuration, in turn",
        "",
        "| measure | rows/s |",
        "|---|---:|",
    ]
    for config, measured in rates.items():
        lines += [
            f"| end to end, {label(config)}, median | {statistics.median(measured):,.0f} |",
            f"| end to end, {label(config)}, best run | {max(measured):,.0f} |",
        ]
    lines += [f"| step alone: {name} | {rate:,.0f} |" for name, rate in steps.items()]
    lines += ["", "Each run, in the order run (rows/s):", ""]
    lines += [
        f"- {label(config)}: " + ", ".join(f"{rate:,.0f}" for rate in measured)
        for config, measured in rates.items()
    ]
    lines += ["", "Target: >= 50,000 rows/s end to end.", ""]
    if any(used for runs in cpu.values() for used in runs):
        lines += [
            "Where the CPU went, end to end (medians of the runs): microseconds of CPU a "
            "row in each part, from the first read to the last row queryable, the "
            f"cores they kept busy meanwhile (of {os.cpu_count()}), and the other load: the "
            "cores busy with what this benchmark did not start (the machine is shared; "
            "rows/s falls as it rises).",
            "",
            "| configuration | " + " | ".join(PARTS) + " | all | cores busy | other load |",
            "|---|" + "---:|" * (len(PARTS) + 3),
        ]
        for config, runs in cpu.items():
            per_row = [
                statistics.median(run[part] for run in runs) / args.events * 1e6 for part in PARTS
            ]
            all_parts = (
                statistics.median(sum(run[part] for part in PARTS) for run in runs)
                / args.events
                * 1e6
            )
            busy = statistics.median(run["cores busy"] for run in runs)
            other = statistics.median(run["other load"] for run in runs)
            cells = " | ".join(f"{value:.1f}" for value in per_row)
            lines.append(
                f"| {label(config)} | {cells} | {all_parts:.1f} | {busy:.2f} | {other:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
