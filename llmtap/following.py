"""Following a compacted topic (budget states, reservations) from its beginning, for as
long as a process runs, with no consumer group: every process that follows it sees
every message. Used by the ingress and the API (the budget book) and by the stream
worker (a standby's ledger, kept current for the partitions it may be given).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition
from pydantic import BaseModel, ValidationError

from llmtap.kafka import Kafka

log = logging.getLogger(__name__)

E = TypeVar("E", bound=BaseModel)

RETRY_S = 1.0
# How often the topic's partitions are asked of the broker (aiokafka's default: 5 min):
# one added to the topic (Kafka grows a topic) is read from then. Read only at start, it
# was never read: a budget's states, or a replica's announcements, keyed to it since were
# not seen until the process restarted (a cap judged on a spend that stood still).
METADATA_MAX_AGE_MS = 30_000


class Follower(Generic[E]):
    """Hands every event of ``topic``, read as a ``model``, to ``on_event``, in offset
    order per partition, from the beginning, as Kafka client ``client``; a message that
    is not one is logged and passed over. A tombstone (no value: its key deleted, as a
    stopping ingress deletes its entry on the reservations topic) is no event: its key
    is handed to ``on_gone``, or, with none, it is passed over silently. After a broker
    outage it goes on where it was. :meth:`caught_up` waits until it has handed over
    everything on the topic now. While an event or a key is handed over, :attr:`partition`
    is the one it was read from."""

    def __init__(
        self,
        kafka: Kafka,
        topic: str,
        client: str,
        model: type[E],
        on_event: Callable[[E], None],
        on_gone: Callable[[bytes], None] | None = None,
    ) -> None:
        self._kafka = kafka
        self.topic = topic
        self._client = client
        self._model = model
        self._on_event = on_event
        self._on_gone = on_gone
        self._next: dict[TopicPartition, int] = {}  # offsets handed over up to
        self._read = asyncio.Event()  # set after each fetch handed over
        self._consumer: AIOKafkaConsumer | None = None
        self.partition: int | None = None  # of the record being handed over

    async def run(self) -> None:
        """Follow the topic, forever (reconnecting when the broker goes away)."""
        while True:
            consumer = self._consumer = AIOKafkaConsumer(
                # fetch_wait_ms: on Tansu, how soon a new state counts
                **self._kafka.consumer_options(self._client),
                enable_auto_commit=False,
                # A position the topic no longer has (a broker that lost it: the embedded
                # one restarted) reads it again from its start, not from its end.
                auto_offset_reset="earliest",
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
            )
            try:
                await consumer.start()
                partitions = await self._assign(consumer)
                while True:
                    fetched = await consumer.getmany(timeout_ms=1000)
                    for tp, records in fetched.items():
                        self.partition = tp.partition
                        for record in records:
                            if record.value is not None:
                                self._take(record.value)
                            elif self._on_gone is not None and record.key is not None:
                                self._gone(self._on_gone, record.key)
                        self._next[tp] = records[-1].offset + 1
                    self._read.set()
                    if (consumer.partitions_for_topic(self.topic) or partitions) != partitions:
                        partitions = await self._assign(consumer)  # the topic grew
            except (KafkaError, OSError) as exc:
                log.warning("%s unavailable (%s); retrying", self.topic, exc)
                await asyncio.sleep(RETRY_S)
            except Exception:  # unforeseen: a follower that died would stop silently
                log.exception("following %s failed; again", self.topic)
                await asyncio.sleep(RETRY_S)
            finally:
                self._consumer = None
                await consumer.stop()

    async def _assign(self, consumer: AIOKafkaConsumer) -> set[int]:
        """Read every partition the topic has now, each from where it was read to (a
        partition not read yet: from its beginning); returns them."""
        partitions = consumer.partitions_for_topic(self.topic) or set()
        if not partitions:
            raise KafkaError(f"topic {self.topic} not found yet")
        tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp in tps:
            if tp in self._next:
                consumer.seek(tp, self._next[tp])
            else:
                await consumer.seek_to_beginning(tp)
        return set(partitions)

    def _take(self, raw: bytes) -> None:
        try:
            event = self._model.model_validate_json(raw)
        except ValidationError as exc:
            log.error("unreadable %s event skipped: %s", self.topic, exc.errors()[:1])
            return
        except Exception:  # a validator's own error: escaping, it would stop the rest
            log.exception("%s: an event could not be read", self.topic)
            return
        try:
            self._on_event(event)
        except Exception:  # a bug with one must not stop the rest
            log.exception("%s: an event could not be taken", self.topic)

    def _gone(self, on_gone: Callable[[bytes], None], key: bytes) -> None:
        try:
            on_gone(key)
        except Exception:  # a bug with one must not stop the rest
            log.exception("%s: a deletion could not be taken", self.topic)

    async def caught_up(self) -> None:
        """Return once every message on the topic when called was handed over."""
        while True:
            consumer = self._consumer
            if consumer is not None and consumer.assignment():
                try:
                    ends = await consumer.end_offsets(list(consumer.assignment()))
                except KafkaError as exc:
                    log.warning("%s: end offsets unknown (%s); asking again", self.topic, exc)
                else:
                    # On Tansu an end offset is the last record batch's first offset plus
                    # one (llmtap/topics.py: read_latest): a fetch hands over whole
                    # batches, so reaching it is reaching the end there too.
                    while any(self._next.get(tp, 0) < end for tp, end in ends.items()):
                        self._read.clear()
                        await self._read.wait()
                    return
            await asyncio.sleep(0.05)  # not connected yet, or again

    async def run_telling(self, read: asyncio.Event) -> None:
        """:meth:`run`, setting ``read`` once what the topic held at the start is handed
        over (:meth:`caught_up`): for a reader that must not judge on a topic half read."""
        following = asyncio.create_task(self.run(), name=f"{self._client}-follow")
        try:
            await self.caught_up()
            read.set()
            await following
        finally:
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following


async def follow_topic(
    topic: str,
    model: type[E],
    on_event: Callable[[E], None],
    kafka: Kafka,
    client: str,
    on_gone: Callable[[bytes], None] | None = None,
) -> None:
    """Hand every event of a compacted ``topic`` to ``on_event``, and every key deleted
    to ``on_gone``, from its beginning, forever (:class:`Follower`)."""
    await Follower(kafka, topic, client, model, on_event, on_gone).run()
