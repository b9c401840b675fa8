"""Which entries of the reservations topic an ingress deletes: those of processes
killed without deleting their own (ingress/guards/reaping.py). The deleting itself, on a
real broker, is in tests/test_budget_caps.py."""

from __future__ import annotations

from datetime import datetime, timedelta

from ingress.guards.reaping import REAP_AFTER, Reaper
from llmtap.events import Reservations, utcnow

# Silence is judged against the latest announcement read, none past the clock: a "now"
# in the past, so that every time below is read as stamped.
NOW = utcnow() - 10 * REAP_AFTER
SECOND = timedelta(seconds=1)


def announced(ingress_id: str, at: datetime) -> Reservations:
    return Reservations(ingress_id=ingress_id, at=at, interval_s=10)


def test_a_process_silent_past_the_delay_is_due_once() -> None:
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-killed", NOW - REAP_AFTER - SECOND))
    reaper.heard(announced("ingress-quiet", NOW - REAP_AFTER + SECOND))
    reaper.heard(announced("ingress-me", NOW))  # its own, read back
    assert reaper.due(NOW) == []  # silent at one look: not yet
    assert reaper.due(NOW) == [("ingress-killed", None)]  # and at the next
    reaper.heard(announced("ingress-me", NOW + REAP_AFTER))
    assert reaper.due(NOW + REAP_AFTER) == []
    assert reaper.due(NOW + REAP_AFTER) == [("ingress-quiet", None)]  # silent past it since
    reaper.heard(announced("ingress-me", NOW + 2 * REAP_AFTER))
    assert reaper.due(NOW + 2 * REAP_AFTER) == []  # each deleted once
    assert reaper.due(NOW + 2 * REAP_AFTER) == []


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
    reaper.heard(announced("ingress-me", NOW))
    assert reaper.due(NOW) == []
    assert reaper.due(NOW) == [("ingress-behind", None)]
    reaper.gone(b"ingress-behind")
    reaper.heard(announced("ingress-behind", NOW - 2 * REAP_AFTER + 10 * SECOND))
    reaper.heard(announced("ingress-me", NOW + 10 * SECOND))
    assert reaper.due(NOW + 10 * SECOND) == []


def test_its_own_entry_is_never_due() -> None:
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-me", NOW - 2 * REAP_AFTER))
    assert reaper.due(NOW) == []


def test_a_process_that_read_nothing_for_the_delay_deletes_no_one() -> None:
    """A process paused for an hour (a machine suspended, SIGSTOP), or cut off from
    Kafka that long, has read nothing since: the live processes' announcements of that
    hour wait on the topic, unread. Judged by its clock alone, each was due at once, as
    it woke (before its follower read them) or as Kafka came back (its tombstones
    spooled meanwhile land after their announcements): every ingress and the store
    forgot what each live process held until its next announcement. Silence is judged
    against the latest announcement read, its own among them."""
    reaper = Reaper("ingress-me")
    before = NOW - REAP_AFTER - 10 * SECOND  # the last it read before the pause
    reaper.heard(announced("ingress-me", before))
    reaper.heard(announced("ingress-live", before + SECOND))
    assert reaper.due(NOW) == []  # was: ["ingress-live"], read nothing since
    reaper.heard(announced("ingress-live", NOW - SECOND))  # read again: live
    reaper.heard(announced("ingress-me", NOW))
    assert reaper.due(NOW) == []


def test_a_process_heard_between_two_looks_is_not_due() -> None:
    """Caught up with after an outage, the topic is read a partition at a time: this
    process's own latest announcement (spooled, replayed) may be read before a live
    one's, which then looks an hour silent. It is read before the next look."""
    reaper = Reaper("ingress-me")
    before = NOW - REAP_AFTER - 10 * SECOND
    reaper.heard(announced("ingress-live", before))
    reaper.heard(announced("ingress-me", NOW))  # its own partition, caught up first
    assert reaper.due(NOW) == []
    reaper.heard(announced("ingress-live", NOW - SECOND))  # the other partition's turn
    assert reaper.due(NOW + 60 * SECOND) == []
    assert reaper.due(NOW + 120 * SECOND) == []


def test_an_entry_is_due_on_the_partition_it_was_read_from() -> None:
    """Partitions added to the topic move a key's: a process's entry read on one
    partition is deleted there, and a tombstone read on another deletes nothing of it
    (was: any tombstone of the key forgot it, and its entry stayed for good)."""
    reaper = Reaper("ingress-me")
    reaper.heard(announced("ingress-killed", NOW - 2 * REAP_AFTER), 0)
    reaper.gone(b"ingress-killed", 3)  # a tombstone sent by the key, after the topic grew
    reaper.heard(announced("ingress-me", NOW), 1)
    assert reaper.due(NOW) == []
    assert reaper.due(NOW) == [("ingress-killed", 0)]
    reaper.gone(b"ingress-killed", 0)
    assert reaper.due(NOW) == []
