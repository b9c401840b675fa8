"""The budgets step: costed events counted against budgets (stream/budgets.py); budget
states (compacted topic) and budget alerts out.

Each batch's states and alerts are delivered (acknowledged by the broker) in ``flush``,
before the batch's offsets can be committed, so a committed offset never runs ahead of
a state that counted it; states carry the offsets they counted, so a restart from older
offsets counts nothing twice (stream/ledger.py)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import faust
from aiokafka import AIOKafkaProducer

from llmtap import wire
from llmtap.events import Alert, BudgetState, utcnow
from llmtap.names import Names
from stream.agents.costs import Position
from stream.ledger import Ledger

log = logging.getLogger(__name__)

ROLL_EVERY_S = 1.0


class BudgetsStep:
    def __init__(self, app: faust.App, ledger: Ledger, names: Names) -> None:
        self.ledger = ledger
        self._states = app.topic(names.budgets, key_serializer="raw", value_serializer="raw")
        self._alerts = app.topic(names.alerts, key_serializer="raw", value_serializer="raw")
        self._changed: set[str] = set()  # budgets whose state the batch changed
        self._raised: list[Alert] = []

        @app.timer(ROLL_EVERY_S)  # type: ignore[untyped-decorator]
        async def roll_periods() -> None:
            """New periods start on time (and every budget has a state) without a call."""
            await self._publish(self.ledger.roll(utcnow()), [])

    async def start(self, producer: AIOKafkaProducer) -> None:
        """Nothing to do: states and alerts (a few a second) go through the app's topics."""

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None:
        changed, raised = self.ledger.record(event, now, position)
        self._changed |= changed
        self._raised += raised

    async def flush(self) -> None:
        """Publish the latest state of each budget the batch changed, and its alerts."""
        changed = [self.ledger.state(name) for name in self._changed]
        raised, self._changed, self._raised = self._raised, set(), []
        for alert in raised:
            log.warning("%s", alert.message)
        await self._publish(changed, raised)

    async def _publish(self, changed: list[BudgetState], raised: list[Alert]) -> None:
        sent = [
            await self._alerts.send(
                key=alert.event_id.bytes, value=alert.model_dump_json().encode()
            )
            for alert in raised
        ]
        sent += [
            await self._states.send(
                key=state.budget.encode(), value=state.model_dump_json().encode()
            )
            for state in changed
        ]
        await asyncio.gather(*sent)  # delivered, not just queued
