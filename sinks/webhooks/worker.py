"""One endpoint's worker: its own bounded queue, its own HTTP session, one delivery at a time.

The queue holds what is also recorded as pending in ClickHouse, so it may drop: when
it is full, or at start, or when an unfinished delivery it does not hold is seen, the
worker rescans ClickHouse (``webhook_unfinished``) once its queue runs dry. A slow or
dead receiver therefore fills only its own queue and never holds up another endpoint,
nor the Kafka consumer.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import aiohttp
import jinja2

from llmtap.config import WebhookEndpoint
from llmtap.events import utcnow
from sinks.webhooks import deliver, records, render
from sinks.webhooks.records import Attempt, Job
from sql.store import Store

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
ERROR_PAUSE_S = 1.0  # after an unexpected error, before going on


class EndpointWorker:
    def __init__(
        self,
        endpoint: WebhookEndpoint,
        store: Store,
        *,
        allow_private: bool,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.endpoint = endpoint
        self._store = store
        self._allow_private = allow_private
        self._template = render.load(endpoint.template)  # a broken template fails at start
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue(queue_size)
        self._held: set[uuid.UUID] = set()  # alert ids queued or being delivered
        self._rescan = True  # at start: resume deliveries a previous run left unfinished
        self.outcomes: dict[records.Outcome, int] = {}  # deliveries finished
        self.attempts: dict[records.Outcome, int] = {}  # HTTP attempts, by result

    def offer(self, job: Job) -> None:
        """Queue a delivery recorded as pending; never blocks."""
        if job.alert.event_id in self._held:
            return
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._rescan = True  # it is pending in ClickHouse: a rescan will find it
            return
        self._held.add(job.alert.event_id)

    def resume(self, alert_id: uuid.UUID) -> None:
        """An unfinished delivery was seen: rescan unless this worker holds it."""
        if alert_id in self._held:
            return
        self._rescan = True
        if self._queue.empty():
            self._queue.put_nowait(None)  # wake an idle worker

    async def run(self) -> None:
        async with deliver.client_session(allow_private=self._allow_private) as session:
            while True:
                if self._rescan and self._queue.empty():
                    await self._refill()
                job = await self._queue.get()
                if job is None:
                    continue
                try:
                    await self._deliver(session, job)
                except Exception:
                    # A bug must not stop this endpoint for good: the delivery is still
                    # unfinished in ClickHouse, and is picked up again by a rescan.
                    log.exception("webhook %s: delivery failed unexpectedly", self.endpoint.name)
                    self._rescan = True
                    await asyncio.sleep(ERROR_PAUSE_S)
                finally:
                    self._held.discard(job.alert.event_id)

    async def _refill(self) -> None:
        self._rescan = False
        limit = self._queue.maxsize
        name = self.endpoint.name
        jobs = await records.durably(
            "reading unfinished deliveries", records.unfinished, self._store, name, limit
        )
        if jobs:
            log.info("webhook %s: %d unfinished deliveries resumed", name, len(jobs))
        self._rescan = self._rescan or len(jobs) >= limit
        for job in jobs:
            self.offer(job)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def _record(self, attempt: Attempt) -> None:
        self.attempts[attempt.outcome] = self.attempts.get(attempt.outcome, 0) + 1
        await records.durably("recording an attempt", records.record, self._store, [attempt])

    async def _deliver(self, session: aiohttp.ClientSession, job: Job) -> None:
        alert = job.alert
        try:
            body = render.render(self._template, alert)
        except jinja2.TemplateError as exc:
            error = f"template {self._template.source}: {exc}"
            name = self.endpoint.name
            attempt = Attempt(
                alert.event_id, name, job.attempts, utcnow(), None, error, "dead_lettered"
            )
            await self._record(attempt)
            outcome: records.Outcome = "dead_lettered"
        else:
            outcome = await deliver.deliver(
                session,
                self.endpoint,
                alert.event_id,
                body,
                allow_private=self._allow_private,
                record=self._record,
                attempts_made=job.attempts,
            )
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(level, "webhook %s: alert %s %s", self.endpoint.name, alert.event_id, outcome)
