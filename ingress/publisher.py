"""Publishing events to Kafka without ever delaying or failing a call.

Handlers call :meth:`EventPublisher.publish`, which only appends to a bounded
in-memory queue. A background task owns the aiokafka producer: it connects (and
reconnects) with backoff and drains the queue. When the queue is full the event is
dropped, counted and logged loudly; the call itself is never held up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    key: bytes
    value: bytes


class EventPublisher:
    def __init__(self, bootstrap: str, *, queue_size: int) -> None:
        self._bootstrap = bootstrap
        self._queue_size = queue_size
        self._queue: deque[Outgoing] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._closing = False
        self.published = 0
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self._producer is not None

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def publish(self, topic: str, key: bytes, event: BaseModel) -> None:
        """Queue an event for Kafka. Never blocks, never raises."""
        if len(self._queue) >= self._queue_size:
            self.dropped += 1
            log.error("publish queue full (%d): event dropped", self._queue_size)
            return
        self._queue.append(Outgoing(topic, key, event.model_dump_json().encode()))
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Give queued events a bounded chance to reach the broker, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        if self._queue:
            log.error("stopping with %d unpublished events", len(self._queue))

    async def _run(self) -> None:
        backoff = 0.2
        while not (self._closing and not self._queue):
            if self._producer is None:
                self._producer = await self._connect()
                if self._producer is None:
                    if self._closing:
                        return
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.2
            if not self._queue:
                self._wakeup.clear()
                if self._closing:
                    break
                await self._wakeup.wait()
                continue
            await self._drain(self._producer)
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _connect(self) -> AIOKafkaProducer | None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            linger_ms=2,
            acks="all",
            request_timeout_ms=10_000,
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            log.warning("broker not reachable at %s: %s", self._bootstrap, exc)
            await producer.stop()
            return None
        log.info("connected to broker at %s", self._bootstrap)
        return producer

    async def _drain(self, producer: AIOKafkaProducer) -> None:
        """Send everything queued; what fails to deliver goes back in front, in order."""
        batch = list(self._queue)
        self._queue.clear()
        pending: list[asyncio.Future[object]] = []
        for outgoing in batch:
            try:
                pending.append(
                    await producer.send(outgoing.topic, outgoing.value, key=outgoing.key)
                )
            except KafkaError as exc:
                failed_now: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                failed_now.set_exception(exc)
                pending.append(failed_now)
        results = await asyncio.gather(*pending, return_exceptions=True)
        failed = [o for o, r in zip(batch, results, strict=True) if isinstance(r, BaseException)]
        self.published += len(batch) - len(failed)
        if failed:
            first_error = next(r for r in results if isinstance(r, BaseException))
            log.warning("%d events not delivered (%s); retrying", len(failed), first_error)
            self._queue.extendleft(reversed(failed))
            await asyncio.sleep(0.5)
