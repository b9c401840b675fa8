"""The budgets step: costed events counted against budgets (stream/budgets.py); budget
states (compacted topic) and budget alerts out.

It counts on the worker holding every partition of ``llmtap.responses``
(stream/agents/assignment.py). Every worker follows the budgets topic: at its start it
takes up the states published so far (its own before a restart, or the store's rebuild
from ClickHouse) before it joins the group, and while standing by, those the holder
publishes. Given partitions it did not hold, it first takes up what it has not yet
followed, before any of them is read. States carry the offsets they counted, so the
events it reads again from the partitions' checkpoints are not counted twice.

Each batch's alerts and then its states are delivered (acknowledged by the broker) in
``flush``, before the batch's offsets can be committed, so a committed offset never runs
ahead of a state that counted it, nor a state ahead of its alerts; states carry the
offsets they counted, so a restart from older offsets counts nothing twice
(stream/ledger.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

import faust
from aiokafka import AIOKafkaProducer

from llmtap import topics, wire
from llmtap.events import Alert, BudgetState, utcnow
from llmtap.following import Follower
from llmtap.kafka import Kafka
from stream.agents.costs import Position
from stream.budgets import later_or_larger
from stream.ledger import Ledger
from stream.rolls import roll_time

log = logging.getLogger(__name__)

ROLL_EVERY_S = 1.0


class BudgetsStep:
    def __init__(
        self,
        app: faust.App,
        ledger: Ledger,
        kafka: Kafka,
        read_up_to: Callable[[], Awaitable[datetime | None]] | None = None,
    ) -> None:
        self.ledger = ledger
        # The time up to which the stage has read every call appended (the cost stage's
        # :meth:`read_up_to`): periods roll no further. None: by the clock alone.
        self._read_up_to = read_up_to
        names = kafka.names
        # Whether the group gave this worker the partitions: it counts the budgets, and
        # keeps the states it follows aside (its own, as a rule) until its next
        # assignment.
        self.holding = False
        self._follower = Follower(
            kafka, names.budgets, "worker-budgets", BudgetState, self._followed
        )
        self._following: asyncio.Task[None] | None = None
        self._seeded = 0
        # The latest state of each budget followed while holding: its own, read back, or
        # another worker's, counted while this one held the partitions without knowing
        # it had lost them (its group membership lost while it lived: a network cut, a
        # paused process). Taken up at its next takeover, or when it stands by.
        self._passed: dict[str, BudgetState] = {}
        self._states = app.topic(names.budgets, key_serializer="raw", value_serializer="raw")
        self._alerts = app.topic(names.alerts, key_serializer="raw", value_serializer="raw")
        # One publishing at a time, the roll timer's or a batch's flush: interleaved, a
        # closing period's state the timer took could be delivered after its budget's
        # current one (the compacted topic then kept the closing one), and a batch's
        # states before the alerts the timer took from it.
        self._publishing = asyncio.Lock()
        self._changed: set[str] = set()  # budgets whose state the batch changed
        self._raised: list[Alert] = []
        # For the worker's /metrics: budget alerts and states delivered to the broker.
        self.alerts_raised = 0
        self.states_published = 0
        self.states_followed = 0  # read from the budgets topic (its own among them)

        @app.timer(ROLL_EVERY_S)  # type: ignore[untyped-decorator]
        async def roll_periods() -> None:
            """New periods start on time (and every budget has a state) without a call,
            by the worker counting them (one standing by has nothing to say); a state
            counted under another limit is judged by this one's, its alerts raised.
            Not past calls still unread: a worker with a backlog at a period's end
            (lagging, or back after being down across it) rolls once it has read every
            call appended before then (stream/rolls.py), else the closing period's last
            calls, read after, would count nowhere."""
            if not self.holding:
                return
            now = utcnow()
            at = now if self._read_up_to is None else roll_time(now, await self._read_up_to())
            if at is None or not self.holding:
                return
            async with self._publishing:
                rolled, raised = self.ledger.roll(at)
                # A batch counted but not flushed yet (the cost stage awaits between):
                # its alerts go first, as the rolled states may carry its offsets, and a
                # worker restarted from those would not raise them again.
                counted, self._raised = self._raised, []
                await self._publish(self.ledger.closings() + rolled, counted + raised)

    async def start(self, producer: AIOKafkaProducer) -> None:
        """Before the stage joins its group: every state published so far, taken up,
        and the topic followed from then on (states go through the app's topics)."""
        self._following = asyncio.create_task(self._follower.run(), name="budget-states")
        await self._follower.caught_up()
        log.info("budgets taken up from %d published states", self._seeded)

    async def stop(self) -> None:
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following

    def _followed(self, state: BudgetState) -> None:
        """A state on the budgets topic: taken up by a worker standing by (the worker
        counting the budgets published it, or the store's rebuild before it started)."""
        self.states_followed += 1
        if self.holding:
            # The store's rebuild (no offsets), started beside this worker: taken now.
            if not state.applied and self.ledger.rebuilt(state):
                return
            kept = self._passed.get(state.budget)
            if kept is None or not later_or_larger(kept, state):
                self._passed[state.budget] = state
            return
        self.ledger.seed(state)
        self._seeded += 1

    async def taken(self, held: set[int]) -> None:
        """Before the partitions ``held`` are read: what was published on the budgets
        topic since it last took states up (kept aside while holding, or not yet
        followed), taken up. Also for partitions it held before the rebalance: a worker
        whose membership lapsed may be given back partitions another counted meanwhile."""
        self.holding = False  # taking up states, and rolling no period meanwhile
        self.ledger.forget_closings()  # another may have counted them meanwhile
        passed, self._passed = self._passed, {}
        for state in passed.values():
            self.ledger.seed(state)
        # Partitions it held before may have been another's meanwhile (this worker lost
        # its membership and the group gave them on): what it has not followed, too.
        if held:
            before = self._seeded
            await self._follower.caught_up()
            log.info("budgets taken up from %d more published states", self._seeded - before)
        self.holding = bool(held)

    def add(self, event: wire.CostedEvent, position: Position, now: datetime) -> None:
        changed, raised = self.ledger.record(event, now, position)
        self._changed |= changed
        self._raised += raised

    async def flush(self) -> None:
        """Publish the latest state of each budget the batch changed, and its alerts."""
        # A closing period's state (counted into, or final as a call of the next period
        # rolled its budget) before its budget's current one: the compacted topic keeps
        # the last of a key.
        async with self._publishing:
            closing = self.ledger.closings()
            changed = closing + [self.ledger.state(name) for name in self._changed]
            raised, self._changed, self._raised = self._raised, set(), []
            await self._publish(changed, raised)

    async def _publish(self, changed: list[BudgetState], raised: list[Alert]) -> None:
        for alert in raised:
            log.warning("%s", alert.message)
        alerts = [
            await self._alerts.send(
                key=topics.alert_key(alert), value=alert.model_dump_json().encode()
            )
            for alert in raised
        ]
        # Delivered before any state: one that counted their calls, delivered alone (the
        # alerts' partition leader elsewhere, unreachable), restarts a worker that skips
        # those calls and raises their alerts never.
        await asyncio.gather(*alerts)
        sent = [
            await self._states.send(
                key=state.budget.encode(), value=state.model_dump_json().encode()
            )
            for state in changed
        ]
        await asyncio.gather(*sent)  # delivered, not just queued
        self.alerts_raised += len(raised)
        self.states_published += len(changed)
