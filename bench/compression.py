"""What each ``kafka_compression`` codec saves and costs on llmtap's own events.

Builds Kafka record batches of real events with aiokafka's batch builder (what every
llmtap producer appends to: llmtap/batches.py, the ingress publisher), for each codec
in turn, round after round, and reads them back as a consumer does:

- the ingress's batches: of request events and of response events (a topic each),
  12 a batch (a 50 ms flight at 500 calls/s over 4 partitions);
- the worker's batches of costed events, 500 a batch (what the store reads).

Reports bytes on the wire per event and their ratio to no compression, and CPU per
event to build a batch and to read one, medians over the rounds. No broker: the
bytes are the batches a producer sends (and a broker keeps, unless told to recompress).

    python bench/compression.py [--rounds 7] [--out bench/results/compression.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from aiokafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from llmtap.events import (
    Attribution,
    Cost,
    CostedEvent,
    RequestEvent,
    ResponseEvent,
    Usage,
)

CODECS = {
    "none": DefaultRecordBatch.CODEC_NONE,
    "gzip": DefaultRecordBatch.CODEC_GZIP,
    "snappy": DefaultRecordBatch.CODEC_SNAPPY,
    "lz4": DefaultRecordBatch.CODEC_LZ4,
    "zstd": DefaultRecordBatch.CODEC_ZSTD,
}
MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "claude-3-5-sonnet", "o3-mini")


def calls(n: int) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """``n`` calls as (key, request event, response event, costed event), varied as a
    busy tenant's are: five models, twenty teams, a thousand users, a property each."""
    start = datetime.now(UTC) - timedelta(hours=1)
    out = []
    for i in range(n):
        at = start + timedelta(milliseconds=i * 7)
        request_id = uuid.uuid4()
        attribution = Attribution(
            tenant="acme",
            team=f"team-{i % 20}",
            user=f"user-{i % 1000}@example.com",
            feature=("search", "chat", "summaries")[i % 3],
            env="production",
            properties={"session": f"s-{i // 8}"},
        )
        model = MODELS[i % len(MODELS)]
        request = RequestEvent(
            request_id=request_id,
            ts=at,
            provider="openai",
            endpoint="chat.completions",
            model_requested=model,
            stream=i % 2 == 0,
            request_bytes=1_800 + i % 4_000,
            max_tokens=1_024,
            attribution=attribution,
        )
        response = ResponseEvent(
            request_id=request_id,
            ts_start=at,
            ts_end=at + timedelta(milliseconds=400 + i % 900),
            provider="openai",
            endpoint="chat.completions",
            model_requested=model,
            model_served=f"{model}-2024-08-06",
            stream=i % 2 == 0,
            status="ok",
            http_status=200,
            usage=Usage(
                input_tokens=500 + i % 3_000, output_tokens=40 + i % 700, cached_input_tokens=128
            ),
            latency_ms=400.0 + i % 900,
            ttft_ms=120.0 + i % 80,
            proxy_overhead_ms=0.4,
            attribution=attribution,
        )
        cost = Decimal(500 + i % 3_000) * Decimal("0.0000025")
        priced = Cost(
            input=cost,
            cached_input=Decimal("0.00016"),
            cache_write=Decimal(0),
            output=Decimal(40 + i % 700) * Decimal("0.00001"),
            reasoning=Decimal(0),
            total=cost + Decimal("0.00016") + Decimal(40 + i % 700) * Decimal("0.00001"),
        )
        costed = CostedEvent(event_id=uuid.uuid4(), response=response, cost=priced, unpriced=False)
        out.append(
            (
                str(request_id).encode(),
                request.model_dump_json().encode(),
                response.model_dump_json().encode(),
                costed.model_dump_json().encode(),
            )
        )
    return out


def build(records: list[tuple[bytes, bytes]], codec: int) -> bytes:
    builder = DefaultRecordBatchBuilder(
        2, codec, 0, producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=1 << 24
    )
    now_ms = int(time.time() * 1000)
    for offset, (key, value) in enumerate(records):
        assert builder.append(offset, now_ms, key, value, []) is not None
    return bytes(builder.build())


def read(batch: bytes) -> int:
    return sum(len(record.value) for record in DefaultRecordBatch(batch))


def measure(
    batches: list[list[tuple[bytes, bytes]]], rounds: int
) -> dict[str, tuple[float, float, float]]:
    """Per codec: bytes an event, and median µs of CPU an event to build and to read."""
    events = sum(len(b) for b in batches)
    size: dict[str, float] = {}
    built_us: dict[str, list[float]] = {codec: [] for codec in CODECS}
    read_us: dict[str, list[float]] = {codec: [] for codec in CODECS}
    for _ in range(rounds):
        for name, codec in CODECS.items():  # side by side: each codec in every round
            started = time.process_time()
            built = [build(b, codec) for b in batches]
            building = time.process_time() - started
            started = time.process_time()
            values = sum(read(b) for b in built)
            reading = time.process_time() - started
            assert values == sum(len(v) for b in batches for _, v in b)
            size[name] = sum(len(b) for b in built) / events
            built_us[name].append(building / events * 1e6)
            read_us[name].append(reading / events * 1e6)
    return {
        name: (size[name], statistics.median(built_us[name]), statistics.median(read_us[name]))
        for name in CODECS
    }


def table(title: str, results: dict[str, tuple[float, float, float]]) -> list[str]:
    plain = results["none"][0]
    lines = [
        f"### {title}",
        "",
        "| codec | bytes an event | vs none | build µs/event | read µs/event |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (size, built, read_) in results.items():
        lines.append(f"| {name} | {size:,.0f} | {size / plain:.2f} | {built:.2f} | {read_:.2f} |")
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=12_000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/compression.md"))
    args = parser.parse_args()

    made = calls(args.calls)
    # A batch is one topic's: request events and response events go in batches apart.
    requests = [(key, request) for key, request, _, _ in made]
    responses = [(key, response) for key, _, response, _ in made]
    ingress = [e[i : i + 12] for e in (requests, responses) for i in range(0, len(e), 12)]
    costed_events = [(key, costed) for key, _, _, costed in made]
    worker = [costed_events[i : i + 500] for i in range(0, len(costed_events), 500)]

    report = [
        "# Kafka compression of llmtap's events",
        "",
        f"`python bench/compression.py --rounds {args.rounds} --calls {args.calls}`, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, "
        f"{platform.machine()}. Medians over {args.rounds} rounds, every codec in each round "
        "(CPU time of this process). Bytes are those of whole record batches (headers "
        "included), per event.",
        "",
        *table(
            "The ingress's batches (request events, and response events, 12 a batch)",
            measure(ingress, args.rounds),
        ),
        *table("The worker's batches (costed events, 500 a batch)", measure(worker, args.rounds)),
    ]
    text = "\n".join(report)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
