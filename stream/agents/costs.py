"""The cost agent: response events in, costed events out; and every costed event handed,
in the same pass, to the accounting steps (windows, budgets) the worker runs.

One read and one decode per call for the whole chain: pricing, windows and budgets
each read the same decoded event (bench/stream_throughput.py measured what re-reading
``llmtap.costed`` per stage cost). A step sees each event with its position on
``llmtap.responses`` (partition, offset), and its ``flush`` runs after every batch,
before the batch's offsets can be committed (Faust acknowledges ``take_events``
batches when the loop moves on); the batch's costed events are delivered by then too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

import faust
from pydantic import ValidationError

from llmtap import topics
from llmtap.events import CostedEvent, ResponseEvent, utcnow
from stream.pricing import Catalog, price

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05

Position = tuple[int, int]  # (partition, offset) on llmtap.responses


class Step(Protocol):
    """One accounting stage fed with costed events (stream/agents/windows.py, budgets.py)."""

    def add(self, event: CostedEvent, position: Position, now: datetime) -> None: ...

    async def flush(self) -> None: ...


def register(app: faust.App, catalog: Catalog, steps: Sequence[Step] = ()) -> Any:
    responses = app.topic(topics.RESPONSES, key_serializer="raw", value_serializer="raw")
    costed = app.topic(topics.COSTED, key_serializer="raw", value_serializer="raw")
    warned: set[str] = set()  # models already logged as unpriced

    @app.agent(responses, name="costs")
    async def costs(stream: faust.StreamT[bytes]) -> None:
        # take_events (not take): each event carries its partition and offset.
        batches = stream.take_events(BATCH, within=BATCH_SECONDS)  # type: ignore[attr-defined]
        async for batch in batches:
            now = utcnow()
            sent = []
            for message in batch:
                try:
                    event = ResponseEvent.model_validate_json(message.value)
                except ValidationError as exc:
                    log.error("undecodable response event skipped: %s", exc.errors()[:1])
                    continue
                out = price(event, catalog)
                if out.unpriced and event.model not in warned:
                    warned.add(event.model)
                    log.warning("no price for model %r (provider %s)", event.model, event.provider)
                sent.append(
                    await costed.send(
                        key=topics.partition_key(out.request_id),
                        value=out.model_dump_json().encode(),
                    )
                )
                position = (message.message.partition, message.message.offset)
                for step in steps:
                    step.add(out, position, now)
            for step in steps:
                await step.flush()
            # Delivered, not just queued, before the batch's offsets can be committed: a
            # worker killed after the commit must not take costed events with it.
            await asyncio.gather(*sent)

    return costs
