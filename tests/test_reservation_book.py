"""What the store knows of the ingress processes' holds (sql/budgets.ReservationBook):
the processes gone are forgotten, and what it answers is what keeping every process
ever announced answered (a property test against the book that kept them all)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llmtap.events import MAX_INTERVAL_S, Reservations, utcnow
from sql.budgets import ReservationBook


class KeptAll(ReservationBook):
    """The book as it was: every process ever announced, kept."""

    def update(self, event: Reservations) -> None:
        held = self.latest.get(event.ingress_id)
        if held is None or event.at >= held.at:
            self.latest[event.ingress_id] = event


def test_every_ingress_process_ever_started_is_not_kept() -> None:
    """Each start of an ingress announces under a new id, and the compacted topic keeps
    them all: 10,000 restarts were 10,000 entries, each request scanning them."""
    book, now = ReservationBook(), utcnow()
    for i in range(10_000):
        at = now - timedelta(days=30) + i * timedelta(minutes=4)
        book.update(Reservations(ingress_id=f"ingress-{i}", at=at, interval_s=10.0))
    book.update(Reservations(ingress_id="live", at=now, interval_s=10.0, held={"b": Decimal(1)}))
    assert len(book.latest) <= 2 * book.slack + 2
    assert book.reserved(now) == {"b": Decimal(1)}


announcements = st.tuples(
    st.integers(0, 30),  # which process
    st.integers(-600, 120),  # its clock against this one's, in seconds
    st.sampled_from([0.2, 1.0, 10.0]),
    st.dictionaries(st.sampled_from("abc"), st.integers(0, 999).map(Decimal), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(announcements, max_size=300), st.integers(0, 700))
def test_what_is_reserved_is_what_keeping_every_process_answered(
    heard: list[tuple[int, int, float, dict[str, Decimal]]], later_s: int
) -> None:
    book, kept_all, now = ReservationBook(), KeptAll(), utcnow()
    book.slack = 0  # those gone looked for at each announcement
    for process, offset_s, interval_s, held in heard:
        event = Reservations(
            ingress_id=f"ingress-{process}",
            at=now + timedelta(seconds=offset_s),
            interval_s=interval_s,
            held=held,
        )
        book.update(event)
        kept_all.update(event)
    asked = utcnow() + timedelta(seconds=later_s)
    assert book.reserved(asked) == kept_all.reserved(asked)


@pytest.mark.parametrize("interval", ["1e400", '"inf"', '"Infinity"', '"nan"', "1e300", "86400.5"])
def test_an_announcement_interval_no_clock_can_count_is_refused(interval: str) -> None:
    """One of infinity (1e400 in JSON), or past what a time span holds, was read: every
    judgement of who is live raised OverflowError (the budgets endpoint's reserved_usd,
    an ingress's hard caps). The followers skip what the contract refuses."""
    good = Reservations(ingress_id="i", at=utcnow(), interval_s=10.0, held={"b": Decimal(1)})
    raw = good.model_dump_json()
    bad = raw.replace('"interval_s":10.0', f'"interval_s":{interval}')
    assert bad != raw
    with pytest.raises(ValidationError):
        Reservations.model_validate_json(bad)
    a_day = raw.replace('"interval_s":10.0', f'"interval_s":{MAX_INTERVAL_S}')
    book = ReservationBook()
    book.update(Reservations.model_validate_json(a_day))
    assert book.reserved(utcnow()) == {"b": Decimal(1)}
