"""One endpoint's worker: its own bounded queue, its own HTTP session, one delivery at a time.

The queue holds what is also recorded as pending in ClickHouse, so it may drop: when
it is full, or at start, or when an unfinished delivery it does not hold is seen, the
worker rescans ClickHouse (``webhook_unfinished``) once its queue runs dry. A slow or
dead receiver therefore fills only its own queue and never holds up another endpoint,
nor the Kafka consumer. A receiver that answers 410 Gone disables its endpoint (here,
or in another store process: read before each delivery): what the worker holds or is
given is then recorded ``gone``, unsent (gone.py).

A delivery belongs to the alerts-topic partition its alert was read from, and only the
store process that owns that partition (:class:`Owned`, kept by the dispatcher's
rebalance listener) queues, resumes or sends it. Losing partitions, the worker drops
their queued deliveries and stops the one it is sending before the rebalance goes on
(an attempt, or a close-out, being recorded is recorded first): the next owner
resumes them, counting the attempts recorded and waiting for the retry the last one
was due at, so no two members of the group send one delivery or record its outcome.
(A process the broker expelled but still running is not fenced off: until it hears so,
it may send what the group gave another. Delivery stays at least once.)

An unfinished delivery is judged by its age when it is resumed from ClickHouse (at
start, and at each rescan), not before each attempt: one whose sending began (its first
attempt; never tried, its pending row) more than the endpoint's ``max_age_s`` ago (a
store process down for days, an endpoint configured again weeks later) is dead-lettered
unsent (records.unfinished). A rescan runs only between deliveries, so one being
retried is never cut short; one resumed mid-schedule (handed over, or after a quick
restart) is within it, however long it was queued before, as ``max_age_s`` exceeds the
longest schedule (config_sections), unless a receiver's retry-afters stretched it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, replace

import aiohttp
import jinja2

from llmtap.config_sections import WebhookEndpoint
from llmtap.events import utcnow
from sinks.webhooks import deliver, gone, records, render
from sinks.webhooks.records import Attempt, Job
from sql.store import Store

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
ERROR_PAUSE_S = 1.0  # after an unexpected error, before going on


@dataclass
class Owned:
    """The alerts-topic partitions this store process owns in the webhooks group."""

    partitions: frozenset[int] = frozenset()

    def holds(self, job: Job) -> bool:
        """A job of no known partition (-1: recorded before they had one) is partition 0's."""
        return max(job.partition, 0) in self.partitions


class EndpointWorker:
    def __init__(
        self,
        endpoint: WebhookEndpoint,
        store: Store,
        *,
        allow_private: bool,
        owned: Owned,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.endpoint = endpoint
        self._store = store
        self._allow_private = allow_private
        self._owned = owned
        self._template = render.load(endpoint.template)  # a broken template fails at start
        self._queue: asyncio.Queue[Job | None] = asyncio.Queue(queue_size)
        self._held: set[uuid.UUID] = set()  # alert ids queued or being delivered
        # Deliveries a previous run (or owner) left unfinished are resumed once the
        # worker is given partitions (:meth:`reassigned`), and only theirs.
        self._rescan = False
        self._refilling = False
        self._waking = False  # the queue holds the None that wakes the worker (at most one)
        self._sending: tuple[Job, asyncio.Task[None]] | None = None
        self.outcomes: dict[records.Outcome, int] = {}  # deliveries finished
        self.attempts: dict[records.Outcome, int] = {}  # HTTP attempts, by result
        self.disabled = ""  # why nothing is sent (its receiver answered 410), or ""
        # A 410 recorded since (by any store process) disables it: gone.py.
        self._enabled_at = utcnow()
        self._closing = asyncio.Lock()  # held while a 410 or closed-out deliveries are recorded

    def offer(self, job: Job) -> None:
        """Queue a delivery recorded as pending; never blocks."""
        if not self._wanted(job):
            return
        if self._rescan or self._refilling:
            # A rescan is due or under way: it finds this delivery (recorded as pending
            # before it is offered) in the order alerts were raised; queued now, it
            # would overtake the deliveries the rescan is to queue.
            self._rescan_soon()
            return
        self._put(job)

    def _wanted(self, job: Job) -> bool:
        """Whether a delivery is to be queued: not held already, of a partition owned."""
        return job.alert.event_id not in self._held and self._owned.holds(job)

    def _put(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._rescan = True  # it is pending in ClickHouse: a rescan will find it
            return
        self._held.add(job.alert.event_id)

    def resume(self, alert_id: uuid.UUID) -> None:
        """An unfinished delivery was seen: rescan unless this worker holds it."""
        if alert_id not in self._held:
            self._rescan_soon()

    def reassigned(self) -> None:
        """Partitions were given: resume their unfinished deliveries."""
        self._rescan_soon()

    async def enable(self) -> None:
        """Send again (after a 410); returns once a close-out, or a 410, being recorded
        is recorded (the 410 disabled the endpoint first: this clearing comes last)."""
        self._enabled_at = utcnow()
        self.disabled = ""
        async with self._closing:
            pass

    def redelivered(self) -> None:
        """Deliveries were made due again (redeliver.py): resume them."""
        self._rescan_soon()

    def _rescan_soon(self) -> None:
        self._rescan = True
        if self._queue.empty():
            self._queue.put_nowait(None)  # wake an idle worker
            self._waking = True

    async def revoke(self) -> None:
        """Partitions were taken (:class:`Owned` says which are left): drop what is
        queued of the others, let what is being recorded ``gone`` be recorded, and stop
        sending theirs, before their next owner starts."""
        kept = []
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is None:
                continue
            if self._owned.holds(job):
                kept.append(job)
            else:
                self._held.discard(job.alert.event_id)
        self._waking = False
        for job in kept:
            self._queue.put_nowait(job)
        async with self._closing:  # a close-out (or a 410) being recorded is recorded first
            pass
        if self._sending is not None and not self._owned.holds(self._sending[0]):
            job, task = self._sending
            task.cancel()
            await asyncio.wait([task])  # stopped (or failed: the run loop logs that)
            log.info(
                "webhook %s: alert %s handed over with its partition",
                self.endpoint.name,
                job.alert.event_id,
            )

    async def run(self) -> None:
        async with deliver.client_session(allow_private=self._allow_private) as session:
            while True:
                # Again while a rescan queues nothing yet leaves more to read: it read
                # only deliveries it dead-lettered (expired), and younger ones wait
                # behind them, which nothing else would wake this worker for. Not
                # again after a pass that changed nothing (it would read the same rows).
                while self._rescan and self._queue.empty():
                    if not await self._refill():
                        break
                job = await self._queue.get()
                if job is None:
                    self._waking = False
                    continue
                if not self._owned.holds(job):  # its partition was taken meanwhile
                    self._held.discard(job.alert.event_id)
                    continue
                if self.disabled:
                    await self._close_out(job)
                    continue
                sending = asyncio.create_task(self._deliver(session, job))
                self._sending = (job, sending)
                try:
                    await sending
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if current is not None and current.cancelling():
                        raise  # the worker's own stop
                    # revoke(): its partition is another process's now
                except Exception:
                    # A bug must not stop this endpoint for good: the delivery is still
                    # unfinished in ClickHouse, and is picked up again by a rescan.
                    log.exception("webhook %s: delivery failed unexpectedly", self.endpoint.name)
                    self._sending = None
                    self._rescan = True
                    await asyncio.sleep(ERROR_PAUSE_S)
                finally:
                    self._sending = None
                    self._held.discard(job.alert.event_id)

    async def _refill(self) -> bool:
        """Queue the oldest unfinished deliveries (up to the queue's size), and record
        those past ``max_age`` dead-lettered; whether it queued or recorded any."""
        self._rescan = False
        self._refilling = True
        limit = self._queue.maxsize
        name = self.endpoint.name
        partitions = self._owned.partitions
        try:
            resumed = await records.durably(
                "reading unfinished deliveries",
                records.unfinished,
                self._store,
                name,
                limit,
                partitions,
                self.endpoint.max_age(),
            )
        finally:
            self._refilling = False
        jobs = resumed.jobs
        if jobs:
            log.info("webhook %s: %d unfinished deliveries resumed", name, len(jobs))
        if resumed.given_up:
            given_up = self.outcomes.get("dead_lettered", 0) + resumed.given_up
            self.outcomes["dead_lettered"] = given_up
        self._rescan = self._rescan or resumed.read >= limit
        queued = self._queue.qsize()
        for job in jobs:
            if self._wanted(job):
                self._put(job)
        return bool(resumed.given_up) or self._queue.qsize() > queued

    async def _close_out(self, job: Job) -> None:
        """Record ``job`` and every owned one queued behind it ``gone``, in one insert."""
        jobs = [job]
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            if queued is not None and self._owned.holds(queued):
                jobs.append(queued)
            elif queued is not None:
                self._held.discard(queued.alert.event_id)
        self._waking = False
        rows = gone.closed_out(self.endpoint.name, self.disabled, jobs)
        try:
            async with self._closing:
                await records.durably(
                    "recording closed-out deliveries", records.record, self._store, rows
                )
        finally:
            for closed in jobs:
                self._held.discard(closed.alert.event_id)
        self.outcomes["gone"] = self.outcomes.get("gone", 0) + len(rows)

    @property
    def queued(self) -> int:
        """Deliveries in the queue (not its wake-up); not those pending in ClickHouse
        only (dropped when it was full, or offered while a rescan was due)."""
        return self._queue.qsize() - self._waking

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing being sent, no rescan due or under way."""
        return (
            self._queue.empty()
            and self._sending is None
            and not self._rescan
            and not self._refilling
        )

    async def _record(self, attempt: Attempt, *, attempted: bool = True) -> None:
        """Record an attempt (or, not ``attempted``, a delivery refused before one); a
        delivery stopped meanwhile (revoke) stops once it is recorded, so the next owner
        counts it."""
        if attempted:
            self.attempts[attempt.outcome] = self.attempts.get(attempt.outcome, 0) + 1
        recording = asyncio.ensure_future(
            records.durably("recording an attempt", records.record, self._store, [attempt])
        )
        try:
            await asyncio.shield(recording)
        except asyncio.CancelledError:
            await recording
            raise

    async def _gone_elsewhere(self, job: Job) -> bool:
        """Whether another store process recorded a 410 from the endpoint since this
        worker was enabled: if so, the endpoint is disabled here too and ``job`` is
        recorded ``gone``, unsent. Under the lock enable() waits for, as a 410 is."""
        async with self._closing:
            since = self._enabled_at
            name = self.endpoint.name
            try:
                alert_id = await asyncio.to_thread(records.gone_since, self._store, name, since)
            except Exception as exc:  # a check only: a 410 this worker gets disables it too
                log.warning("webhook %s: reading its latest 410 failed (%s)", name, exc)
                return False
            if alert_id is None or since != self._enabled_at:  # none, or enabled meanwhile
                return False
            self.disabled = gone.disabled(name, alert_id)
            self._rescan = True  # its unfinished deliveries in ClickHouse: closed out too
            await self._record(gone.closed_out(name, self.disabled, [job])[0], attempted=False)
        self.outcomes["gone"] = self.outcomes.get("gone", 0) + 1
        return True

    async def _deliver(self, session: aiohttp.ClientSession, job: Job) -> None:
        alert = job.alert
        if await self._gone_elsewhere(job):
            return

        async def record(attempt: Attempt) -> None:
            attempt = replace(attempt, alert_partition=job.partition, redelivery=job.redelivery)
            if attempt.outcome != "gone":
                await self._record(attempt)
                return
            # Disabled before its row is in, under the lock enable() waits for: a
            # redeliver that finds the row has enabled the endpoint after this.
            async with self._closing:
                self.disabled = gone.disabled(self.endpoint.name, alert.event_id)
                self._rescan = True  # its unfinished deliveries in ClickHouse: closed out too
                await self._record(attempt)

        try:
            body = render.render(self._template, alert)
        except jinja2.TemplateError as exc:
            # The configuration's fault, not the receiver's: nothing is sent, no attempt
            # counted; given up at once, `llmtap alerts redeliver` sends it once fixed.
            error = f"not sent: template {self._template.source} failed: {exc}"
            name = self.endpoint.name
            refused = Attempt(
                alert.event_id,
                name,
                job.attempts,
                utcnow(),
                None,
                error,
                "refused",
                job.partition,
                redelivery=job.redelivery,
            )
            await self._record(refused, attempted=False)
            self.outcomes["refused"] = self.outcomes.get("refused", 0) + 1
            log.error(
                "webhook %s: alert %s refused, %s; fix the template, then `llmtap alerts "
                "redeliver --endpoint %s` sends it",
                name,
                alert.event_id,
                error,
                name,
            )
            return
        outcome = await deliver.deliver(
            session,
            self.endpoint,
            alert.event_id,
            body,
            allow_private=self._allow_private,
            record=record,
            attempts_made=job.attempts,
            not_before=job.not_before,
        )
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        level = logging.INFO if outcome == "delivered" else logging.WARNING
        log.log(level, "webhook %s: alert %s %s", self.endpoint.name, alert.event_id, outcome)
