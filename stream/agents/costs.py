"""The cost agent: response events in, costed events out."""

from __future__ import annotations

import logging
from typing import Any

import faust
from pydantic import ValidationError

from llmtap import topics
from llmtap.events import ResponseEvent
from stream.pricing import Catalog, price

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05


def register(app: faust.App, catalog: Catalog) -> Any:
    responses = app.topic(topics.RESPONSES, key_serializer="raw", value_serializer="raw")
    costed = app.topic(topics.COSTED, key_serializer="raw", value_serializer="raw")

    @app.agent(responses, name="costs")
    async def costs(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(BATCH, within=BATCH_SECONDS):
            for raw in batch:
                try:
                    event = ResponseEvent.model_validate_json(raw)
                except ValidationError as exc:
                    log.error("undecodable response event skipped: %s", exc.errors()[:1])
                    continue
                out = price(event, catalog)
                if out.unpriced:
                    log.warning("no price for model %r (provider %s)", event.model, event.provider)
                await costed.send(
                    key=topics.partition_key(out.request_id),
                    value=out.model_dump_json().encode(),
                )

    return costs
