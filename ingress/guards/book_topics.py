"""The budget book kept in step with Kafka: the budgets topic's states followed into it
(:func:`follow`), the other ingress processes' reservations heard (:func:`hear_others`),
and what this process holds announced to them (:func:`announce`). The book itself,
what it does with them, is ingress/guards/budgets.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from ingress.guards.budgets import BudgetBook
from llmtap.events import BudgetState, Reservations, utcnow
from llmtap.following import Follower
from llmtap.kafka import Kafka

if TYPE_CHECKING:
    from ingress.guards.reaping import Reaper


async def follow(book: BudgetBook, kafka: Kafka, client: str) -> None:
    """Keep ``book`` up to date with the budgets topic, from its beginning, forever;
    ``book.states_read`` is set once what the topic held when it started was read."""
    follower = Follower(kafka, kafka.names.budgets, client, BudgetState, book.update)
    await follower.run_telling(book.states_read)


class Publish(Protocol):
    """The publisher's :meth:`~ingress.publisher.EventPublisher.publish`: ``topic``,
    ``key``, the event's JSON (None: a tombstone); who is told the partition and offset
    it went to; the partition it goes to (None: its key's)."""

    def __call__(
        self,
        topic: str,
        key: bytes,
        value: bytes | None,
        delivered: Callable[[int, int], None] | None = None,
        partition: int | None = None,
    ) -> None: ...


async def hear_others(
    book: BudgetBook, kafka: Kafka, client: str, reaper: Reaper | None = None
) -> None:
    """Keep ``book.held_by_others`` up to date with the reservations topic, forever;
    ``book.others_read`` is set once what the topic held when it started was read.
    ``reaper`` hears every announcement and deletion too."""

    def heard(event: Reservations) -> None:
        if reaper is not None:
            reaper.heard(event, follower.partition)  # first: it cannot fail
        book.heard(event, follower.partition)

    def gone(key: bytes) -> None:
        if reaper is not None:
            reaper.gone(key, follower.partition)
        book.gone(key, follower.partition)

    follower = Follower(kafka, kafka.names.reservations, client, Reservations, heard, gone)
    await follower.run_telling(book.others_read)


async def announce(
    book: BudgetBook, publish: Publish, topic: str, ingress_id: str, interval_s: float = 10.0
) -> None:
    """Publish what this process holds (:meth:`BudgetBook.held`) on the reservations
    ``topic`` whenever it changes (looked at every 0.2 s) and every ``interval_s`` seconds
    regardless, each with its placed costs (:meth:`BudgetBook.placed`: the compacted
    topic keeps a process's last announcement only); on cancellation, once more with
    nothing held (the process is stopping) but the costs Kafka has the events of that
    no state has counted (``placed``: facts,
    which the others, and the process that replaces this one, hold until a state counts
    them), then, if there are none, a tombstone for its key (with some, the entry stays
    for a process started later to read, deleted by a reaper once they are counted):
    each start announces under a new id, and the compacted topic kept one entry for
    every process ever started, which every ingress and the store read at start.
    Kafka's compaction removes the key (after the topic's ``delete.retention.ms``); a
    reader that sees only the empty announcement, or only the tombstone, forgets the
    process all the same (its placed costs aside, kept until counted).

    Each goes to the partition the first one delivered went to, and the tombstone to
    every partition one went to: partitions added to the topic move a key's (murmur2 %
    n), and a tombstone sent by the key deleted nothing, its entry kept for good (and
    the readers started before read a partition added only once they see it:
    llmtap/following.py)."""
    key = ingress_id.encode()
    placed: list[int | None] = []  # the partitions its announcements went to, the first first

    def delivered(partition: int, offset: int) -> None:
        if partition not in placed:
            placed.append(partition)

    last: dict[str, Decimal] | None = None
    sent_at: float | None = None  # the last periodic one's time (the first is one)
    loop = asyncio.get_running_loop()
    try:
        while True:
            now = utcnow()
            held = book.held(now)
            periodic = sent_at is None or loop.time() - sent_at >= interval_s
            if held != last or periodic:
                event = Reservations(
                    ingress_id=ingress_id,
                    at=now,
                    interval_s=interval_s,
                    held=held,
                    # With each one: compaction keeps a process's last announcement only
                    # (told every interval_s, a killed one's were all lost once the
                    # periodic one was compacted away).
                    placed=book.placed(now),
                )
                pinned = placed[0] if placed else None
                publish(topic, key, event.model_dump_json().encode(), delivered, pinned)
                last = held
                if periodic:
                    sent_at = loop.time()
            await asyncio.sleep(0.2)
    finally:
        now = utcnow()
        book.held(now)  # lets go what a state has counted
        facts = book.placed(now)
        gone = Reservations(ingress_id=ingress_id, at=now, interval_s=interval_s, placed=facts)
        pinned = placed[0] if placed else None
        publish(topic, key, gone.model_dump_json().encode(), None, pinned)
        if not facts:  # else kept, for a process started later: reaped once counted
            for partition in placed or [None]:
                publish(topic, key, None, None, partition)
