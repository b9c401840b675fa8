"""The costs of ended calls no budget state has counted outlive the ingress process that
held them: a restarted ingress (or a replica taking over from a dead one) reads them on
the reservations topic and holds them until a state counts them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from ingress.guards.book_topics import announce, hear_others
from ingress.guards.budgets import BudgetBook
from ingress.guards.refusals import Exhausted
from ingress.publisher import EventPublisher
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import Attribution, BudgetState, PlacedCosts, Reservations, Usage, utcnow
from llmtap.kafka import Kafka
from llmtap.names import Names
from stream.budgets import fresh
from stream.catalog import load_catalog
from tests.test_budget_caps import records_of

ACME = Attribution(tenant="acme")
USAGE = Usage(input_tokens=0, output_tokens=40_000)  # gpt-4o: $0.40


def stopped(seen: list[bytes | None]) -> bool:
    """An announcement holding nothing in flight (the process stopped) is among them."""
    return any(v is not None and Reservations.model_validate_json(v).held == {} for v in seen)


async def test_a_restarted_ingress_holds_the_costs_its_predecessor_left_uncounted(
    ingress_settings: Settings, tmp_path: Path
) -> None:
    """The stream is down: the process admitted two $0.40 calls on a $1.00 day cap with
    $0.10 counted, and stopped (a deploy). Its successor read the same state: it used to
    start holding nothing and admit two more ($1.70 spent). It reads the costs the old
    one told on the reservations topic, refuses, and lets them go once a state counts
    them (not counted twice)."""
    budget = BudgetConfig(
        name=f"restart-{uuid.uuid4().hex[:8]}",
        scope="tenant",
        value="acme",
        period="day",
        limit_usd=Decimal("1.00"),
    )
    catalog = load_catalog(ingress_settings.pricing_file)
    bootstrap = ingress_settings.kafka_bootstrap
    topic = Names().reservations
    now = utcnow()
    published = fresh(budget, now, now).model_copy(
        update={"spent_usd": Decimal("0.10"), "applied": {0: 100}}
    )
    publisher = EventPublisher(
        Kafka(bootstrap), queue_size=1000, spool_dir=tmp_path / "spool", spool_max_bytes=0
    )
    await publisher.start()
    try:
        old = BudgetBook([budget], catalog, 1000)
        old.ingress_id = f"ingress-{uuid.uuid4()}"
        old.update(published)
        for offset in (100, 101):  # in Kafka; no state counts them (the stream is down)
            call = uuid.uuid4()
            assert old.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
            held = old.settle(call, "gpt-4o", USAGE, now)
            assert held is not None
            held.delivered(0, offset)
        announcing = asyncio.create_task(
            announce(old, publisher.publish, topic, old.ingress_id, 0.2)
        )
        await records_of(bootstrap, old.ingress_id.encode(), lambda seen: bool(seen))
        announcing.cancel()  # a graceful stop
        with contextlib.suppress(asyncio.CancelledError):
            await announcing
        await records_of(bootstrap, old.ingress_id.encode(), stopped)
    finally:
        await publisher.stop()

    new = BudgetBook([budget], catalog, 1000)
    new.ingress_id = f"ingress-{uuid.uuid4()}"
    new.update(published)  # the same state: the stream is still down
    hearing = asyncio.create_task(hear_others(new, ingress_settings.kafka, "test-restart"))
    try:
        async with asyncio.timeout(30):
            await new.others_read.wait()
        later = utcnow() + timedelta(minutes=1)  # the old process long silent
        refused = new.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, later)
        assert isinstance(refused, Exhausted)  # was: admitted, the cap overshot
        assert refused.held == Decimal("0.80")
        assert new.committed(budget, later)[1] == Decimal("0.90")
        assert new.holds_placed(old.ingress_id, later)  # its entry is not reaped

        # The stream is back: a state counting both calls is published.
        counted = published.model_copy(update={"spent_usd": Decimal("0.90"), "applied": {0: 102}})
        new.update(counted)
        assert new.committed(budget, later)[1] == Decimal("0.90")  # not 1.70
        assert new.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 5_000, later) is None  # $0.05
        assert not new.holds_placed(old.ingress_id, later)
    finally:
        hearing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hearing


def test_a_killed_replica_s_placed_costs_outlive_its_silence() -> None:
    """A replica killed: its in-flight worst cases go with its liveness (30 s), the
    costs Kafka has the events of stay until a state counts past them."""
    budget = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal("1.00")
    )
    book = BudgetBook([budget], load_catalog(), 1000)
    now = utcnow()
    state = fresh(budget, now, now).model_copy(update={"applied": {0: 5}})
    book.update(state)
    other = BudgetBook([budget], load_catalog(), 1000)
    other.update(state)
    call = uuid.uuid4()
    assert other.admit(call, ACME, "gpt-4o", 10, 40_000, now) is None
    held = other.settle(call, "gpt-4o", USAGE, now)
    assert held is not None
    held.delivered(0, 7)
    assert other.admit(uuid.uuid4(), ACME, "gpt-4o", 0, 10_000, now) is None  # in flight
    book.heard(
        Reservations(
            ingress_id="killed",
            at=now,
            interval_s=10,
            held=other.held(now),
            placed=other.placed(now),
        )
    )
    assert book.committed(budget, now)[1] == Decimal("0.50")  # $0.40 ended, $0.10 in flight
    silent = now + timedelta(minutes=5)
    assert book.committed(budget, silent)[1] == Decimal("0.40")  # in flight: gone with it
    book.update(state.model_copy(update={"applied": {0: 7}}))
    assert book.committed(budget, silent)[1] == Decimal("0.40")  # not past offset 7 yet
    book.update(state.model_copy(update={"spent_usd": Decimal("0.40"), "applied": {0: 8}}))
    assert book.committed(budget, silent)[1] == Decimal("0.40")  # counted once


def test_an_announcement_placing_nothing_reads_as_before_placed_existed() -> None:
    """`placed` is left out when empty: such an announcement is what an older reader
    (which refuses fields it does not know) reads."""
    now = utcnow()
    empty = Reservations(ingress_id="i", at=now, interval_s=10, held={"b": Decimal("0.1")})
    assert '"placed"' not in empty.model_dump_json()
    assert Reservations.model_validate_json(empty.model_dump_json()) == empty


def _placing(book: BudgetBook, budget: BudgetConfig, offset: int) -> None:
    call = uuid.uuid4()
    assert book.admit(call, ACME, "gpt-4o", 10, 40_000, utcnow()) is None
    held = book.settle(call, "gpt-4o", USAGE, utcnow())
    assert held is not None
    held.delivered(0, offset)


async def test_every_announcement_tells_the_placed_costs_as_they_are() -> None:
    """The compacted topic keeps a process's last announcement only: told only with the
    periodic one, a killed process's were all lost once that one was compacted away
    behind a later announcement made for a change (review R3). Each tells them, the
    one made for a change too, as they are then."""
    budget = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal("100")
    )
    book = BudgetBook([budget], load_catalog(), 1000)
    now = utcnow()
    book.update(fresh(budget, now, now).model_copy(update={"applied": {0: 5}}))
    _placing(book, budget, 7)
    sent: list[Reservations] = []

    def publish(
        topic: str,
        key: bytes,
        value: bytes | None,
        delivered: Callable[[int, int], None] | None = None,
        partition: int | None = None,
    ) -> None:
        if value is not None:
            sent.append(Reservations.model_validate_json(value))

    announcing = asyncio.create_task(announce(book, publish, "t", "me", 3600))
    while not sent:
        await asyncio.sleep(0.05)
    _placing(book, budget, 8)  # a change: announced within 0.2 s
    while len(sent) < 2:
        await asyncio.sleep(0.05)
    announcing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await announcing
    assert [p.through for p in sent[0].placed] == [7]
    assert sent[1].held["acme-day"] == Decimal("0.80")
    assert [(p.through, p.usd) for p in sent[1].placed] == [(8, Decimal("0.80"))]
    # A process started later reads only the last of a killed one's: all of them held.
    successor = BudgetBook([budget], load_catalog(), 1000)
    successor.update(fresh(budget, now, now).model_copy(update={"applied": {0: 5}}))
    successor.heard(sent[1])
    assert successor.committed(budget, now + timedelta(minutes=5))[1] == Decimal("0.80")


def test_an_announcement_placing_nothing_lets_go_what_it_placed_before() -> None:
    """Each tells all of them: one without any (placed left out) says none are."""
    budget = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal("1.00")
    )
    book = BudgetBook([budget], load_catalog(), 1000)
    now = utcnow()
    state = fresh(budget, now, now).model_copy(update={"applied": {0: 5}})
    book.update(state)
    other = BudgetBook([budget], load_catalog(), 1000)
    other.update(state)
    _placing(other, budget, 7)
    held = other.held(now)
    book.heard(
        Reservations(ingress_id="k", at=now, interval_s=10, held=held, placed=other.placed(now))
    )
    later = now + timedelta(seconds=1)
    assert book.committed(budget, later + timedelta(minutes=5))[1] == Decimal("0.40")
    book.heard(Reservations(ingress_id="k", at=later, interval_s=10, held=held))
    assert book.committed(budget, later + timedelta(minutes=5))[1] == Decimal(0)


def test_placed_costs_told_alike_twice_are_let_go_once_counted() -> None:
    """A stopped process's placed costs told alike in its last two announcements: once
    a state counted them, their first-told times were kept for good (an identity check
    where the entries were equal, not the same object), one a process, and every refusal
    walked them (review R3)."""
    budget = BudgetConfig(
        name="acme-day", scope="tenant", value="acme", period="day", limit_usd=Decimal("1.00")
    )
    book = BudgetBook([budget], load_catalog(), 1000)
    now = utcnow()
    state = fresh(budget, now, now).model_copy(update={"applied": {0: 5}})
    book.update(state)

    def placed() -> tuple[PlacedCosts, ...]:
        cost = PlacedCosts(
            budget="acme-day",
            period_start=state.period_start,
            partition=0,
            through=9,
            usd=Decimal("0.001"),
        )
        return (cost,)

    for i in range(10):
        told, stopped = now - timedelta(seconds=12), now - timedelta(seconds=2)
        held = {"acme-day": Decimal("0.001")}
        book.heard(
            Reservations(ingress_id=f"old{i}", at=told, interval_s=10, held=held, placed=placed())
        )
        book.heard(Reservations(ingress_id=f"old{i}", at=stopped, interval_s=10, placed=placed()))
    assert book.committed(budget, now)[1] == Decimal("0.010")
    book.update(state.model_copy(update={"applied": {0: 10}, "spent_usd": Decimal("0.10")}))
    assert book.committed(budget, now)[1] == Decimal("0.10")
    others = book.held_by_others.placed
    assert others._placed_by == {} and others._placed_since == {}


def fifty_capped_budgets(
    now: datetime,
) -> tuple[list[str], list[BudgetConfig], BudgetBook, datetime]:
    """50 hard-capped $1.00 day budgets (b0 of tenant acme), each with a state counted to
    offset 5 of 6 partitions: their names, configs, the book, and the period's start."""
    names = [f"b{i}" for i in range(50)]
    capped = [
        BudgetConfig(
            name=n,
            scope="tenant",
            value="acme" if n == "b0" else n,
            period="day",
            limit_usd=Decimal("1.00"),
        )
        for n in names
    ]
    book = BudgetBook(capped, load_catalog(), 1000)
    for b in capped:
        book.update(fresh(b, now, now).model_copy(update={"applied": {p: 5 for p in range(6)}}))
    return names, capped, book, fresh(capped[0], now, now).period_start


def test_admission_does_not_walk_the_processes_placed_costs(monkeypatch: object) -> None:
    """Every admission copied every process's placed costs and walked each stopped
    one's (every budget and partition): 25 -> 2,000 µs a call with 200 budgets of 12
    partitions, 20 live and 10 dead replicas. A live one's are in what it holds, not
    looked at; a dead one's summed once per budget and state, not at each call; a
    refusal looks at the refused budget's only."""
    import pytest

    from ingress.guards import placed as module

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    now = utcnow()
    names, capped, book, start = fifty_capped_budgets(now)
    old = now - timedelta(minutes=1)

    def placed() -> tuple[PlacedCosts, ...]:
        return tuple(
            PlacedCosts(budget=n, period_start=start, partition=p, through=9, usd=Decimal("0.01"))
            for n in names
            for p in range(6)
        )

    for i in range(10):  # stopped, then live ones placing for a minute
        book.heard(Reservations(ingress_id=f"dead{i}", at=old, interval_s=10, placed=placed()))
    for i in range(20):
        for at in (old, now):
            book.heard(
                Reservations(
                    ingress_id=f"live{i}",
                    at=at,
                    interval_s=10,
                    held={"b0": Decimal("0.01")},
                    placed=placed(),
                )
            )
    looked = [0]
    real = module._settled_by

    def settled_by(p: PlacedCosts, state: BudgetState) -> bool:
        looked[0] += 1
        return real(p, state)

    monkeypatch.setattr(module, "_settled_by", settled_by)
    monkeypatch.setattr(
        Reservations, "live", lambda self, at: looked.__setitem__(0, looked[0] + 1) or True
    )
    for _ in range(100):
        call = uuid.uuid4()
        assert book.admit(call, ACME, "gpt-4o", 10, 10, now) is None
        book.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=0), now)
    assert looked[0] <= 6 * 10  # the dead ones' entries of b0, once
    committed = book.committed(capped[0], now)[1]
    assert committed == Decimal("0.80")  # 20 x $0.01 held, 10 x 6 x $0.01 placed
    looked[0] = 0
    refused = book.admit(uuid.uuid4(), ACME, "gpt-4o", 10, 40_000, now)
    assert isinstance(refused, Exhausted)
    assert refused.ended == Decimal("1.80")  # 30 processes' b0 costs, told a minute
    assert looked[0] <= 30 * 6 + 6 * 10  # b0's entries only


def test_admission_with_every_other_process_silent_looks_at_one_budget_s_entries() -> None:
    """Nothing heard on the reservations topic for over 30 s (the broker down): every
    other process looks silent and none is dropped, so admission adds each one's placed
    costs; it walked all of each one's entries (every budget and partition: ~1.7 ms a
    call with 200 budgets of 12 partitions and 20 replicas), not the budget's (R3)."""
    now = utcnow()
    names, capped, book, start = fifty_capped_budgets(now)
    placed = tuple(
        PlacedCosts(budget=n, period_start=start, partition=p, through=9, usd=Decimal("0.001"))
        for n in names
        for p in range(6)
    )
    heard = now - timedelta(minutes=1)  # the last announcement heard: a minute ago
    for i in range(20):
        held = {"b0": Decimal("0.006")}
        book.heard(
            Reservations(ingress_id=f"r{i}", at=heard, interval_s=10, held=held, placed=placed)
        )
    looked = [0]

    class Counted(tuple[PlacedCosts, ...]):
        """A process's entries, counting those walked."""

        def __iter__(self) -> Iterator[PlacedCosts]:
            looked[0] += len(self)
            return super().__iter__()

    told = book.held_by_others.placed._placed_by
    for ingress_id, (at, entries) in list(told.items()):
        told[ingress_id] = (at, Counted(entries))
    call = uuid.uuid4()
    assert book.admit(call, ACME, "gpt-4o", 10, 10, now) is None
    book.settle(call, "gpt-4o", Usage(input_tokens=0, output_tokens=0), now)
    assert looked[0] == 0  # b0's entries of each, not every budget's of every one
    assert book.committed(capped[0], now)[1] == Decimal("0.120")  # 20 x 6 x $0.001, once
