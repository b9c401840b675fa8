"""Compressed event batches (setting ``kafka_compression``): every producer of llmtap
compresses, every consumer reads them, and a call is metered and costed exactly.

The real Tansu broker behind a plain TCP front (tests/tls.py) that keeps what clients
send: an attribution value that every event of the call carries never crosses in clear.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from aiokafka import AIOKafkaProducer

from tests.conftest import FakeUpstream, run_llmtap
from tests.fake_provider import SNAPSHOT
from tests.test_e2e import expected_cost, model_row
from tests.tls import client_of, tansu_behind_front

MARKER = "feature-marker-5b1e9d"  # in the request, response and costed events' attribution


async def test_llmtap_up_compresses_every_batch_it_sends_and_reads_them(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    async with tansu_behind_front(None) as broker:
        env = {
            "LLMTAP_EMBEDDED_BROKER": "false",
            "LLMTAP_KAFKA_BOOTSTRAP": broker.front.bootstrap,
            "LLMTAP_KAFKA_COMPRESSION": "zstd",
        }
        async with run_llmtap(tmp_path, upstream, env) as running, running.openai() as sdk:
            await sdk.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "compressed"}],
                extra_headers={"x-llmtap-feature": MARKER},
            )
            # Published by the ingress, read and costed by the worker, read and written
            # by the store: compressed at every hop.
            row = await model_row(running.api_url, "gpt-4o" + SNAPSHOT, lambda r: r["requests"])
            fake = upstream.provider
            cost = expected_cost(
                "gpt-4o", fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens
            )
            assert Decimal(row["cost"]) == cost
        assert MARKER.encode() not in broker.front.sent

        # The check can fail: the same value sent uncompressed crosses in clear.
        producer = AIOKafkaProducer(**client_of(broker.front, None).producer_options("test"))
        await producer.start()
        try:
            await producer.send_and_wait("llmtap.requests", MARKER.encode())
        finally:
            await producer.stop()
        assert MARKER.encode() in broker.front.sent
