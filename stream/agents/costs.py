"""The cost agent: response events in, costed events out; and every costed event handed,
in the same pass, to the accounting steps (windows, budgets) the worker runs.

One read and one decode per call for the whole chain: pricing, windows and budgets
each read the same decoded event (bench/stream_throughput.py measured what re-reading
``llmtap.costed`` per stage cost). A step sees each event with its position on
``llmtap.responses`` (partition, offset), and its ``flush`` runs after every batch,
before the batch's offsets can be committed (Faust acknowledges ``take_events``
batches when the loop moves on); the batch's costed events are delivered by then too.

The hot path reads and writes events as the contract's msgspec structs (``llmtap.wire``:
a decode ~3 µs instead of pydantic's ~27) and sends the costed events of a batch as
whole Kafka batches (``llmtap.batches``: an append of ~5 µs a record instead of Faust's
``Topic.send`` at ~100), through a producer of its own that lives as long as the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Protocol

import faust
import msgspec
from aiokafka import AIOKafkaProducer

from llmtap import topics, wire
from llmtap.batches import Batches
from llmtap.events import utcnow
from stream.pricing import Catalog, price_wire

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05

Position = tuple[int, int]  # (partition, offset) on llmtap.responses


class Step(Protocol):
    """One accounting stage fed with costed events (stream/agents/windows.py, budgets.py)."""

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None: ...

    async def flush(self) -> None: ...


@contextlib.asynccontextmanager
async def costed_producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20, linger_ms=0
    )
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def register(app: faust.App, catalog: Catalog, bootstrap: str, steps: Sequence[Step] = ()) -> Any:
    responses = app.topic(topics.RESPONSES, key_serializer="raw", value_serializer="raw")
    warned: set[str] = set()  # models already logged as unpriced

    @app.agent(responses, name="costs")
    async def costs(stream: faust.StreamT[bytes]) -> None:
        async with costed_producer(bootstrap) as producer:
            costed = await Batches.of(producer, topics.COSTED)
            # take_events (not take): each event carries its partition and offset.
            batches = stream.take_events(BATCH, within=BATCH_SECONDS)  # type: ignore[attr-defined]
            async for batch in batches:
                now = utcnow()
                for message in batch:
                    try:
                        event = wire.decode_response(message.value)
                    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                        log.error("undecodable response event skipped: %s", exc)
                        continue
                    out = price_wire(event, catalog)
                    if out.unpriced and event.model not in warned:
                        warned.add(event.model)
                        log.warning(
                            "no price for model %r (provider %s)", event.model, event.provider
                        )
                    costed.add(topics.partition_key(event.request_id), wire.encode(out))
                    position = (message.message.partition, message.message.offset)
                    for step in steps:
                        step.add(out, position, now)
                sent = await costed.send()
                for step in steps:
                    await step.flush()
                # Delivered, not just queued, before the batch's offsets can be committed:
                # a worker killed after the commit must not take costed events with it.
                await asyncio.gather(*sent)

    return costs
