"""The costs of ended calls no budget state has counted outlive the ingress process that
held them: a restarted ingress (or a replica taking over from a dead one) reads them on
the reservations topic and holds them until a state counts them."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

from ingress.guards.budgets import BudgetBook, Exhausted, announce, hear_others
from ingress.publisher import EventPublisher
from llmtap.config import Settings
from llmtap.config_sections import BudgetConfig
from llmtap.events import Attribution, Reservations, Usage, utcnow
from llmtap.kafka import Kafka
from llmtap.names import Names
from stream.budgets import fresh
from stream.pricing import load_catalog
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
