"""The spike alerts open at a restart squared with the states rebuilt from windows
(stream/reconcile.py): plain functions, no broker."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from llmtap.config_sections import SpikeRule
from llmtap.events import Alert
from stream.reconcile import open_alerts, reconciled
from stream.spikes import SeriesState, observe
from tests.test_spike_warmup import MINUTE, RULE

T0 = datetime(2026, 12, 1, 12, tzinfo=UTC)
KEY = (RULE.name, "acme", "search")


def fired(rule: SpikeRule = RULE, at: datetime = T0 + 10 * MINUTE) -> tuple[SeriesState, Alert]:
    """Team search's state and alert once it spiked at ``at`` (steady before)."""
    state = None
    for i in range(10):
        start = at - (10 - i) * MINUTE
        state, _ = observe(rule, "search", state, start, start + MINUTE, 100 + i % 3, tenant="acme")
    state, alerts = observe(rule, "search", state, at, at + MINUTE, 1_000, tenant="acme")
    assert [a.state for a in alerts] == ["firing"]
    return state, alerts[0]


def test_the_latest_alert_of_a_series_says_whether_it_is_open() -> None:
    state, firing = fired()
    _, resolved = observe(
        RULE, "search", state, T0 + 11 * MINUTE, T0 + 12 * MINUTE, 100, tenant="acme"
    )
    assert open_alerts([firing]) == {(RULE.name, "acme", "team", "search"): firing}
    assert open_alerts([firing, *resolved]) == {}
    # Published again by the store after a resolve it had not stored yet: still resolved.
    assert open_alerts([*resolved, firing]) == {}


def test_an_open_alert_fired_before_the_read_back_is_resolved_once_whoever_finds_it() -> None:
    _, firing = fired()
    since = T0 + 40 * MINUTE  # the restart's read-back reaches no further back
    changed, resolves = reconciled([RULE], {}, open_alerts([firing]), since)
    assert changed == {}
    (resolve,) = resolves
    assert (resolve.state, resolve.resolution, resolve.first_seen) == (
        "resolved",
        "unjudged",
        firing.first_seen,
    )
    assert resolve.observed == Decimal(0)
    assert resolve.window_start == firing.window_end
    _, again = reconciled([RULE], {}, open_alerts([firing]), since + MINUTE)
    assert [a.event_id for a in again] == [resolve.event_id]  # another worker, a replay
    assert open_alerts([firing, resolve]) == {}  # read back after: nothing open


def test_an_open_alert_whose_rule_is_gone_or_changed_is_resolved() -> None:
    state, firing = fired()
    since = T0  # within the read-back: its window was judged again
    for rules in ([], [RULE.model_copy(update={"metric": "tokens"})]):
        _, resolves = reconciled(rules, {KEY: state}, open_alerts([firing]), since)
        assert len(resolves) == 1
        assert "was removed, or no longer judges" in resolves[0].message


def test_an_open_alert_the_rebuilt_state_no_longer_fires_is_resolved() -> None:
    """The rule made less sensitive: the replay judged the spike's window normal."""
    _, firing = fired()
    calmer = RULE.model_copy(update={"sensitivity": 500})
    state = None
    for i in range(11):
        start = T0 + i * MINUTE
        value = 1_000 if i == 10 else 100 + i % 3
        state, _ = observe(calmer, "search", state, start, start + MINUTE, value, tenant="acme")
    assert state is not None and not state.firing
    changed, resolves = reconciled([calmer], {KEY: state}, open_alerts([firing]), T0)
    assert [a.state for a in resolves] == ["resolved"]
    assert changed[KEY].last_fired == firing.window_start  # its cooldown runs on


def test_an_open_alert_of_a_window_not_read_back_is_left_to_the_stage() -> None:
    """Published, its window's offset not committed: the stage judges that window again."""
    state, firing = fired()
    before = state.model_copy(update={"firing": False, "last_window": T0 + 9 * MINUTE})
    changed, resolves = reconciled([RULE], {KEY: before}, open_alerts([firing]), T0)
    assert (changed, resolves) == ({}, [])


def test_a_series_fired_in_the_replay_only_is_not_firing() -> None:
    """The rule made more sensitive: the replay fired where no alert was published."""
    state, _ = fired()
    changed, resolves = reconciled([RULE], {KEY: state}, {}, T0)
    assert resolves == []
    assert not changed[KEY].firing
    assert changed[KEY].last_fired is None  # a real spike next is raised


def test_a_series_firing_with_its_alert_open_keeps_the_receivers_episode() -> None:
    state, firing = fired()
    earlier = firing.model_copy(
        update={
            "first_seen": T0 + 8 * MINUTE,
            "window_start": T0 + 8 * MINUTE,
            "window_end": T0 + 9 * MINUTE,
        }
    )
    changed, resolves = reconciled([RULE], {KEY: state}, open_alerts([earlier]), T0)
    assert resolves == []
    assert changed[KEY].firing
    assert changed[KEY].first_seen == T0 + 8 * MINUTE
