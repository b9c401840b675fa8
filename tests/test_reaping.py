"""Which entries of the reservations topic an ingress deletes: those of processes
killed without deleting their own (ingress/guards/reaping.py). The deleting itself, on a
real broker, is in tests/test_budget_caps.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ingress.guards.reaping import REAP_AFTER, Reaper
from llmtap.events import Reservations

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
SECOND = timedelta(seconds=1)


def announced(ingress_id: str, at: datetime) -> Reservations:
    return Reservations(ingress_id=ingress_id, at=at, interval_s=10)


def test_a_process_silent_past_the_delay_is_due_once() -> None:
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-killed", NOW - REAP_AFTER - SECOND))
    reaper.heard(announced("ingress-quiet", NOW - REAP_AFTER + SECOND))
    assert reaper.due(NOW) == ["ingress-killed"]
    assert reaper.due(NOW + REAP_AFTER) == ["ingress-quiet"]  # silent past it since
    assert reaper.due(NOW + 2 * REAP_AFTER) == []  # each deleted once


def test_a_process_heard_since_an_old_announcement_is_not_due() -> None:
    """Its older announcements are read first (the topic from its beginning): the
    latest is what counts, whichever came first."""
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-live", NOW - 2 * REAP_AFTER))
    reaper.heard(announced("ingress-live", NOW - SECOND))
    reaper.heard(announced("ingress-live", NOW - 3 * REAP_AFTER))
    assert reaper.due(NOW) == []


def test_a_process_whose_key_was_deleted_is_not_due() -> None:
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-stopped", NOW - 2 * REAP_AFTER))
    reaper.gone(b"ingress-stopped")
    assert reaper.due(NOW) == []


def test_a_process_deleted_then_heard_again_is_not_deleted_again() -> None:
    """A live process whose clock lags by more than the delay: deleted once, heard
    again at its next announcement, and kept (not deleted at each)."""
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-behind", NOW - 2 * REAP_AFTER))
    assert reaper.due(NOW) == ["ingress-behind"]
    reaper.gone(b"ingress-behind")
    reaper.heard(announced("ingress-behind", NOW - 2 * REAP_AFTER + 10 * SECOND))
    assert reaper.due(NOW + 10 * SECOND) == []


def test_its_own_entry_is_never_due() -> None:
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-me", NOW - 2 * REAP_AFTER))
    assert reaper.due(NOW) == []
