"""The budgets agent: costed events in; budget states (compacted topic) and budget
alerts out. The arithmetic is in stream/budgets.py."""

from __future__ import annotations

import logging
from typing import Any

import faust
from pydantic import ValidationError

from llmtap import topics
from llmtap.events import BudgetState, CostedEvent, utcnow
from stream.budgets import Ledger

log = logging.getLogger(__name__)

BATCH = 1000
BATCH_SECONDS = 0.05
ROLL_EVERY_S = 1.0


def register(app: faust.App, ledger: Ledger) -> Any:
    costed = app.topic(topics.COSTED, key_serializer="raw", value_serializer="raw")
    states = app.topic(topics.BUDGETS, key_serializer="raw", value_serializer="raw")
    alerts = app.topic(topics.ALERTS, key_serializer="raw", value_serializer="raw")

    async def publish(changed: list[BudgetState]) -> None:
        for state in changed:
            await states.send(key=state.budget.encode(), value=state.model_dump_json().encode())

    @app.agent(costed, name="budgets")
    async def budgets(stream: faust.StreamT[bytes]) -> None:
        async for batch in stream.take(BATCH, within=BATCH_SECONDS):
            changed: dict[str, BudgetState] = {}
            for raw in batch:
                try:
                    event = CostedEvent.model_validate_json(raw)
                except ValidationError as exc:
                    log.error("undecodable costed event skipped: %s", exc.errors()[:1])
                    continue
                states_now, raised = ledger.record(event, utcnow())
                changed.update(states_now)
                for alert in raised:
                    log.warning("%s", alert.message)
                    await alerts.send(
                        key=alert.event_id.bytes, value=alert.model_dump_json().encode()
                    )
            await publish(list(changed.values()))  # the latest state of each, once a batch

    @app.timer(ROLL_EVERY_S)  # type: ignore[untyped-decorator]
    async def roll_periods() -> None:
        """New periods start on time (and every budget has a state) without a call."""
        await publish(ledger.roll(utcnow()))

    return budgets
