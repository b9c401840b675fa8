"""The budgets agent: costed events in; budget states (compacted topic) and budget
alerts out. The arithmetic is in stream/budgets.py.

Each batch's states and alerts are delivered (acknowledged by the broker) before the
agent takes the next batch, so the offsets Faust commits never run ahead of a state
that counted them; states carry the offsets they counted, so a restart from older
offsets counts nothing twice (stream/budgets.py, Ledger)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import faust
from pydantic import ValidationError

from llmtap import topics
from llmtap.events import Alert, BudgetState, CostedEvent, utcnow
from stream.budgets import Ledger

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05
ROLL_EVERY_S = 1.0


def register(app: faust.App, ledger: Ledger) -> Any:
    costed = app.topic(topics.COSTED, key_serializer="raw", value_serializer="raw")
    states = app.topic(topics.BUDGETS, key_serializer="raw", value_serializer="raw")
    alerts = app.topic(topics.ALERTS, key_serializer="raw", value_serializer="raw")

    async def publish(changed: list[BudgetState], raised: list[Alert]) -> None:
        sent = [
            await alerts.send(key=alert.event_id.bytes, value=alert.model_dump_json().encode())
            for alert in raised
        ]
        sent += [
            await states.send(key=state.budget.encode(), value=state.model_dump_json().encode())
            for state in changed
        ]
        await asyncio.gather(*sent)  # delivered, not just queued

    @app.agent(costed, name="budgets")
    async def budgets(stream: faust.StreamT[bytes]) -> None:
        # take_events (not take): each event carries its partition and offset.
        batches = stream.take_events(BATCH, within=BATCH_SECONDS)  # type: ignore[attr-defined]
        async for batch in batches:
            changed: dict[str, BudgetState] = {}
            raised: list[Alert] = []
            for message in batch:
                try:
                    event = CostedEvent.model_validate_json(message.value)
                except ValidationError as exc:
                    log.error("undecodable costed event skipped: %s", exc.errors()[:1])
                    continue
                position = (message.message.partition, message.message.offset)
                states_now, alerts_now = ledger.record(event, utcnow(), position)
                changed.update(states_now)
                raised += alerts_now
            for alert in raised:
                log.warning("%s", alert.message)
            # The latest state of each budget, once a batch.
            await publish(list(changed.values()), raised)

    @app.timer(ROLL_EVERY_S)  # type: ignore[untyped-decorator]
    async def roll_periods() -> None:
        """New periods start on time (and every budget has a state) without a call."""
        await publish(ledger.roll(utcnow()), [])

    return budgets
