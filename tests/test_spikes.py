"""Spike detection: the rules' semantics, and a labelled evaluation on synthetic traffic."""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from llmtap import wire
from llmtap.config_sections import SpikeMetric, SpikeRule
from llmtap.events import Alert, stable_id
from stream.agents.spikes import judged
from stream.aggregates import Aggregate
from stream.aggregates import Series as SeriesKey
from stream.baselines import qn, robust, sampling_noise
from stream.detector import Detector
from stream.spikes import SeriesState, baseline_for, observe, went_quiet

T0 = datetime(2025, 3, 3, tzinfo=UTC)  # a Monday, midnight UTC
M, S = timedelta(minutes=1), timedelta(seconds=1)
MINUTE = timedelta(minutes=1)


def rule(**changes: object) -> SpikeRule:
    fields: dict[str, object] = {"name": "cost-spike", "dimension": "team", "metric": "cost"}
    return SpikeRule.model_validate(fields | changes)


def feed(
    spike_rule: SpikeRule,
    values: Sequence[Decimal | int | float | None],
    *,
    series: str = "search",
    state: SeriesState | None = None,
    start: datetime = T0,
    window: timedelta = MINUTE,
    first: int = 0,
) -> tuple[SeriesState, list[tuple[int, Alert]]]:
    """Observe ``values`` as consecutive windows; the alerts with their window index."""
    alerts: list[tuple[int, Alert]] = []
    for i, value in enumerate(values, start=first):
        ws = start + i * window
        state, raised = observe(spike_rule, series, state, ws, ws + window, value)
        alerts += [(i, a) for a in raised]
    assert state is not None
    return state, alerts


def noisy(n: int, level: float, cv: float, seed: int) -> list[Decimal]:
    rng = random.Random(seed)
    return [Decimal(str(round(max(0.0, rng.gauss(level, level * cv)), 6))) for _ in range(n)]


def firing(alerts: list[tuple[int, Alert]]) -> list[int]:
    return [i for i, a in alerts if a.state == "firing"]


def resolved(alerts: list[tuple[int, Alert]]) -> list[int]:
    return [i for i, a in alerts if a.state == "resolved"]


# -- rules -------------------------------------------------------------------------


def test_rule_defaults_and_validation() -> None:
    r = rule()
    assert (r.sensitivity, r.min_value, r.min_increase) == (Decimal(5), Decimal(0), Decimal(0))
    assert (r.history_windows, r.min_history, r.seasonality) == (30, 5, "none")
    with pytest.raises(ValidationError):
        rule(metric="latency")
    with pytest.raises(ValidationError):
        rule(dimension="env")
    with pytest.raises(ValidationError):
        rule(min_history=40, history_windows=30)
    with pytest.raises(ValidationError):
        rule(sensitivity=0)


def test_an_error_rate_rule_s_floors_are_ratios_not_percentages() -> None:
    """An error rate is 0..1: a ``min_value: 5`` meant as 5% could never be reached,
    and the rule never fired, without a word."""
    assert rule(metric="error_rate", min_value=1, min_increase=1).min_value == 1
    for floor in ("min_value", "min_increase"):
        with pytest.raises(ValidationError, match=r"are 0\.\.1 \(0\.05: 5%\)"):
            rule(metric="error_rate", **{floor: 5})
    assert rule(metric="requests", min_value=5, min_increase=5).min_value == 5


# -- baselines ---------------------------------------------------------------------


def test_flat_series_raises_nothing_on_noise_but_does_on_a_real_jump() -> None:
    flat = [Decimal(10)] * 60
    state, alerts = feed(rule(), flat)
    assert alerts == []
    # A wiggle of a few percent on a perfectly flat series is not a spike: the scale is
    # floored at 5% of the baseline, so it takes more than +25% at sensitivity 5...
    state, alerts = feed(rule(), [Decimal("10.4"), Decimal("12.4")], state=state, first=60)
    assert alerts == []
    # ...and a jump well past that fires.
    _, alerts = feed(rule(), [Decimal(13)], state=state, first=62)
    assert firing(alerts) == [62]


def test_an_all_zero_series_needs_the_absolute_floors() -> None:
    zeros = [Decimal(0)] * 30
    state, _ = feed(rule(min_value=Decimal("0.05")), zeros)
    _, alerts = feed(rule(min_value=Decimal("0.05")), [Decimal("0.01")], state=state, first=30)
    assert alerts == []
    _, alerts = feed(rule(min_value=Decimal("0.05")), [Decimal("0.07")], state=state, first=30)
    assert firing(alerts) == [30]


def test_a_rate_varies_by_chance_at_least_by_one_call() -> None:
    assert sampling_noise(Decimal(0), 20) == Decimal("0.05")  # one call of 20
    assert sampling_noise(Decimal("0.5"), 100) == Decimal("0.05")  # sqrt(.25 / 100)
    assert sampling_noise(Decimal("0.02"), 10_000) == Decimal("0.0014")  # sqrt(.0196 / 1e4)
    with pytest.raises(ValueError, match="no calls"):
        sampling_noise(Decimal(0), 0)


def test_against_a_baseline_of_0_a_rate_fires_at_sensitivity_failed_calls() -> None:
    """The scale 1/calls was rounded to 12 digits, up for 11 calls (0.0909090909091): 5
    failed calls of 11 fell short of the threshold 5 of 11 calls makes, and only 6 fired
    (at 90 counts of calls from 10 to 199). Rounded down, sensitivity calls fire."""
    r = rule(metric="error_rate")
    state, _ = feed(r, [Decimal(0)] * 30)
    wrong = []
    for calls in range(10, 200):
        at = T0 + 30 * MINUTE
        fired = [
            bool(observe(r, "search", state, at, at + MINUTE, Decimal(k) / calls, calls=calls)[1])
            for k in (4, 5)
        ]
        if fired != [False, True]:
            wrong.append(calls)
    assert wrong == []


def test_a_model_failing_a_call_now_and_then_pages_no_one_but_an_outage_does() -> None:
    """A healthy model's error rate is 0 in most windows: its Qn was 0, so its scale
    1e-9, and each window with one failed call of 20 fired, critical (~110 pages a
    day); kept out of the history as an outlier, the failure never taught it
    otherwise. Judged against its sampling noise, one call of 20 is a z of 1."""

    rule = SpikeRule(
        name="errors", dimension="model", metric="error_rate", min_value=Decimal("0.05")
    )
    detector = Detector([rule], 1, timedelta(seconds=13))
    series: SeriesKey = ("model", "", "gpt-4o")
    rng = random.Random(7)

    def window(i: int, failed: int) -> list[Alert]:
        counts = Aggregate(requests=20, errors=failed)
        counts.errors_by_class["upstream_error"] = failed
        event = counts.to_event(series, T0 + i * M, M, [0])
        return judged(detector, wire.encode(event), event.window_end + 14 * S, 0) or []

    day = 24 * 60
    failing = [i for i in range(day) if rng.random() < 0.08]
    assert len(failing) > 100
    assert [a for i in range(day) for a in window(i, 1 if i in failing else 0)] == []
    [fired] = window(day, 10)  # half the calls fail
    assert (fired.state, fired.severity, fired.threshold) == ("firing", "critical", Decimal("0.25"))
    [back] = window(day + 1, 1)
    assert back.state == "resolved"


def test_an_outlier_in_the_history_does_not_move_the_baseline() -> None:
    values = [Decimal(v) for v in (10, 11, 9, 1000, 10, 10, 9, 11, 10, 10, 11, 9)]
    baseline = robust(values, Decimal("0.05"))
    assert baseline.center == Decimal(10)
    assert baseline.scale < Decimal(3)  # a mean/stdev baseline would say ~290
    # Fed during warm-up (before anything is judged, so it is learned as is), the
    # outlier still does not hide a doubling later on.
    r = rule()
    state, alerts = feed(r, values + noisy(20, 10, 0.05, seed=1))
    assert alerts == []
    _, alerts = feed(r, [Decimal(20)], state=state, first=len(values) + 20)
    assert len(firing(alerts)) == 1


def test_qn_estimates_a_gaussian_sigma() -> None:
    rng = random.Random(5)
    estimates = [
        float(qn([Decimal(str(rng.gauss(100, 10))) for _ in range(30)])) for _ in range(300)
    ]
    assert statistics.mean(estimates) == pytest.approx(10, rel=0.05)


def test_nothing_is_judged_before_min_history() -> None:
    r = rule(min_history=5)
    state, alerts = feed(r, [Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(100)])
    assert alerts == []
    assert baseline_for(r, state, T0 + 5 * MINUTE) is not None


# -- the floors ----------------------------------------------------------------------


def test_min_value_stops_an_alert_on_a_tenth_of_a_cent_to_a_cent() -> None:
    history = [Decimal("0.001")] * 30
    values = [*history, Decimal("0.01")]
    # Statistically it is a spike (10x)...
    _, alerts = feed(rule(), values)
    assert firing(alerts) == [30]
    # ...but not one worth waking anyone for.
    _, alerts = feed(rule(min_value=Decimal("1.00")), values)
    assert alerts == []
    # The same 10x on a series that matters does fire, above the floor: its threshold.
    _, alerts = feed(rule(min_value=Decimal("10.00")), [Decimal(2)] * 30 + [Decimal(20)])
    assert firing(alerts) == [30]
    assert alerts[0][1].threshold == Decimal(10) and "alert above 10," in alerts[0][1].message


def test_min_increase_is_an_absolute_floor_over_the_baseline() -> None:
    values = [Decimal("0.50")] * 30 + [Decimal("1.20")]
    _, alerts = feed(rule(min_increase=Decimal("1")), values)
    assert alerts == []
    _, alerts = feed(rule(min_increase=Decimal("0.5")), values)
    assert firing(alerts) == [30]
    assert alerts[0][1].threshold == Decimal("1.00")  # the baseline and the increase


# -- firing, resolving, cooldown ---------------------------------------------------------


def test_a_spike_fires_once_and_resolved_follows_when_it_ends() -> None:
    base = noisy(40, 100, 0.05, seed=2)
    spike = [Decimal(400), Decimal(420), Decimal(390)]
    after = noisy(10, 100, 0.05, seed=3)
    _, alerts = feed(rule(), base + spike + after)
    assert [(i, a.state) for i, a in alerts] == [(40, "firing"), (43, "resolved")]
    fire, done = alerts[0][1], alerts[1][1]
    assert fire.severity == "critical"  # 4x on 5% noise: z far past 2 x sensitivity
    assert done.severity == fire.severity
    assert fire.first_seen == done.first_seen == T0 + 40 * MINUTE
    assert (fire.window_start, fire.window_end) == (T0 + 40 * MINUTE, T0 + 41 * MINUTE)
    assert fire.observed == Decimal(400)
    # The spike was kept out of the history: the baseline at its end is the one before.
    assert done.baseline == fire.baseline
    assert fire.baseline is not None and abs(fire.baseline - 100) < 5
    # The level it had to pass: sensitivity robust deviations above the baseline.
    assert fire.threshold is not None and fire.baseline < fire.threshold < fire.observed
    assert done.threshold == fire.threshold and f"alert above {fire.threshold.normalize():f}" in (
        fire.message
    )
    assert (fire.alert_type, fire.rule, fire.dimension, fire.value, fire.metric) == (
        "spike",
        "cost-spike",
        "team",
        "search",
        "cost",
    )
    assert "cost spike on team=search" in fire.message


def test_a_resolved_alert_says_why_without_its_message() -> None:
    """A receiver closing an incident on a resolve can tell a series back within its
    level from one that went quiet (no calls) or is no longer judged (no window with a
    value): both of those say ``observed`` 0, which the series never measured. A firing
    alert says none, and its payload is as before."""
    r = rule(metric="error_rate", cooldown_windows=5, min_value=Decimal("0.1"))
    calm = [Decimal("0.01"), Decimal("0.02")] * 10
    state, alerts = feed(r, [*calm, Decimal("0.9")])
    [(_, fire)] = alerts
    assert fire.resolution is None and "resolution" not in fire.model_dump_json()
    _, [(_, normal)] = feed(r, [Decimal("0.01")], state=state, first=21)
    _, [(_, quiet)] = feed(r, [Decimal("0.01")], state=state, first=27)  # 21..26: none
    held, _ = feed(r, [None] * 30, state=state, first=21)
    _, [(_, unjudged)] = feed(r, [None] * 20, state=held, first=51)
    assert [(a.state, a.resolution) for a in (normal, quiet, unjudged)] == [
        ("resolved", "normal"),
        ("resolved", "quiet"),
        ("resolved", "unjudged"),
    ]
    for alert in (normal, quiet, unjudged):
        assert Alert.model_validate_json(alert.model_dump_json()) == alert


def test_severity_is_warning_just_past_the_threshold() -> None:
    state, _ = feed(rule(), [Decimal(100)] * 30)  # scale floored at 5: threshold 125
    _, alerts = feed(rule(), [Decimal(130)], state=state, first=30)
    assert [a.severity for _, a in alerts] == ["warning"]
    _, alerts = feed(rule(), [Decimal(160)], state=state, first=30)
    assert [a.severity for _, a in alerts] == ["critical"]


def test_a_window_at_its_threshold_fires_whichever_level_set_it() -> None:
    """A window exactly at the threshold min_value set fired; one exactly at the
    threshold the sensitivity set did not (z > 5, not >= 5)."""
    state, _ = feed(rule(), [Decimal(100)] * 30)  # 100 + 5 x 5
    _, alerts = feed(rule(), [Decimal("124.999")], state=state, first=30)
    assert alerts == []
    _, alerts = feed(rule(), [Decimal(125)], state=state, first=30)
    assert [(a.state, a.threshold) for _, a in alerts] == [("firing", Decimal(125))]
    floored = rule(min_value=Decimal(130))
    _, alerts = feed(floored, [Decimal(130)], state=state, first=30)
    assert [(a.state, a.threshold) for _, a in alerts] == [("firing", Decimal(130))]


def test_severity_is_warning_just_past_a_floor_that_set_the_threshold() -> None:
    """Critical is a rise twice the one needed to fire, whichever set it: a z-score of
    twice the sensitivity was critical at $2.50 against $1 with min_increase $1."""

    floored = rule(min_increase=Decimal(1))
    state, _ = feed(floored, [Decimal(1)] * 30)  # scale 0.05: z 10 is $1.50
    _, alerts = feed(floored, [Decimal("2.5")], state=state, first=30)
    assert [(a.severity, a.threshold) for _, a in alerts] == [("warning", Decimal(2))]
    _, alerts = feed(floored, [Decimal(3)], state=state, first=30)
    assert [a.severity for _, a in alerts] == ["critical"]


def test_a_warning_that_grows_critical_fires_once_more_in_its_episode() -> None:
    """A spike first seen at +30% and then at +70% stayed a warning: nothing told the
    receivers it had grown. It fires once more, critical, the same episode."""

    state, _ = feed(rule(), [Decimal(100)] * 30)  # threshold 125, critical from 150
    values = [Decimal(v) for v in (130, 140, 170, 180, 135, 100)]
    _, alerts = feed(rule(), values, state=state, first=30)
    assert [(i, a.state, a.severity) for i, a in alerts] == [
        (30, "firing", "warning"),
        (32, "firing", "critical"),
        (35, "resolved", "critical"),
    ]
    grown = alerts[1][1]
    assert grown.first_seen == T0 + 30 * MINUTE
    assert grown.message.endswith(f"grew to critical, spike since {grown.first_seen.isoformat()}")
    assert len({a.event_id for _, a in alerts}) == 3


def test_cooldown_allows_one_firing_alert_per_cooldown() -> None:
    r = rule(cooldown_windows=10)
    values: list[Decimal] = [Decimal(100)] * 80
    for at in (40, 45, 50, 62):
        values[at] = Decimal(500)
    _, alerts = feed(r, values)
    # 40 fires and resolves at 41; 45 is within 10 windows of 40: quiet (and, as it
    # raised nothing, nothing to resolve); 50 is 10 windows on: fires again; so does 62.
    assert firing(alerts) == [40, 50, 62]
    assert resolved(alerts) == [41, 51, 63]


def test_cooldown_counts_time_not_observations() -> None:
    r = rule(cooldown_windows=10)
    state, alerts = feed(r, [Decimal(100)] * 40 + [Decimal(500), Decimal(100)])
    assert firing(alerts) == [40]
    # No windows at all for 20 minutes (no traffic), then a spike: past the cooldown.
    _, alerts = feed(r, [Decimal(500)], state=state, first=62)
    assert firing(alerts) == [62]


def test_a_series_that_went_quiet_while_firing_fires_at_its_next_spike() -> None:
    """A runaway job stopped: its series has no windows, so none ends its episode.
    The first window after a gap does, with a resolved for the quiet window, before it
    is judged itself: the next spike, twenty minutes later, fires (it raised nothing
    before). (A day later, the series is forgotten: it learns afresh, as a restarted
    worker would.)"""
    r = rule(cooldown_windows=10)
    state, alerts = feed(r, noisy(40, 100, 0.05, seed=2) + [Decimal(500)] * 3)
    assert firing(alerts) == [40] and state.firing
    fired = alerts[0][1]
    quiet, [ended] = went_quiet(r, "search", state, MINUTE)  # what a sweep raises
    assert not quiet.firing
    day = 60  # within the rule's look-back (31 windows) of the last window, 42
    state, alerts = feed(r, [Decimal(500), Decimal(100)], state=state, first=day)
    assert [(i, a.state) for i, a in alerts] == [
        (day, "resolved"),
        (day, "firing"),
        (day + 1, "resolved"),
    ]
    resolved_quiet = alerts[0][1]
    assert resolved_quiet.window_start == T0 + 43 * MINUTE  # the first window with no calls
    assert resolved_quiet.first_seen == T0 + 40 * MINUTE
    assert resolved_quiet.observed == 0 and "no calls" in resolved_quiet.message
    assert resolved_quiet.event_id == ended.event_id  # whoever finds it: one alert
    # A series not firing, or a window right after the last, has no quiet to end.
    assert went_quiet(r, "search", quiet, MINUTE) == (quiet, [])
    # Its level is the firing one's; with no baseline to give one (here: its history
    # forgotten), none, rather than one in no unit of the metric.
    assert ended.threshold is not None and ended.threshold == fired.threshold
    blind = state.model_copy(update={"firing": True, "history": ()})
    _, [unknown] = went_quiet(r, "search", blind, MINUTE)
    assert unknown.threshold is None


def test_an_error_rate_spike_resolved_with_no_value_keeps_the_firing_threshold() -> None:
    """An error rate's level is floored by its window's sampling noise: a series at 0
    fired at 5 failed calls of 20 (0.25). Resolved ``quiet`` or ``unjudged`` (no window
    with calls to judge), its ``threshold`` dropped the floor (0.000000005): a receiver
    saw the level jump within the episode. It is the firing one's, of the firing
    window's calls."""
    r = rule(metric="error_rate", cooldown_windows=5)
    state: SeriesState | None = None
    fired: list[Alert] = []
    for i, failed in enumerate([0] * 20 + [6]):
        at = T0 + i * MINUTE
        state, raised = observe(r, "search", state, at, at + MINUTE, Decimal(failed) / 20, calls=20)
        fired += raised
    assert state is not None
    [fire] = fired
    assert (fire.state, fire.severity, fire.threshold) == ("firing", "warning", Decimal("0.25"))
    _, [swept] = went_quiet(r, "search", state, MINUTE)  # what a sweep raises
    at = T0 + 27 * MINUTE  # 21..26: no calls, as long as the cooldown
    _, [quiet] = observe(r, "search", state, at, at + MINUTE, None)
    held, _ = feed(r, [None] * 30, state=state, first=21)
    _, [(_, unjudged)] = feed(r, [None] * 20, state=held, first=51)
    assert [(a.resolution, a.threshold) for a in (swept, quiet, unjudged)] == [
        ("quiet", fire.threshold),
        ("quiet", fire.threshold),
        ("unjudged", fire.threshold),
    ]


def test_a_rate_or_a_latency_is_not_back_to_normal_for_a_gap_in_its_traffic() -> None:
    """Without calls an error rate has no value: a minute without traffic in a failing
    service is not its recovery (a resolved, then a second page). A gap as long as the
    cooldown ends the episode."""
    r = rule(metric="error_rate", cooldown_windows=5, min_value=Decimal("0.1"))
    calm = [Decimal("0.01"), Decimal("0.02")] * 10
    state, alerts = feed(r, calm + [Decimal("0.9")] * 12)
    assert firing(alerts) == [20]
    after_gap, alerts = feed(r, [Decimal("0.9")] * 2, state=state, first=33)  # 32 empty
    assert alerts == [] and after_gap.firing
    _, alerts = feed(r, [Decimal("0.9")], state=state, first=38)  # 32..37: 6 empty
    assert [(i, a.state) for i, a in alerts] == [(38, "resolved"), (38, "firing")]
    assert alerts[0][1].window_start == T0 + 32 * MINUTE


def test_a_window_with_calls_but_no_value_is_no_evidence_either_way() -> None:
    """An error rate of calls the guards all refused, or of fewer than min_requests: the
    window has calls but no value (None). It neither resolves a firing spike, nor lets
    it be found quiet (the series had calls), nor fires, nor enters the history; the
    quiet that ends an episode is counted from the first window with no calls at all."""
    r = rule(metric="error_rate", cooldown_windows=5, min_value=Decimal("0.1"))
    calm = [Decimal("0.01"), Decimal("0.02")] * 10
    state, alerts = feed(r, [*calm, Decimal("0.9")])
    assert firing(alerts) == [20]
    held, alerts = feed(r, [None] * 12, state=state, first=21)
    assert alerts == [] and held.firing
    assert (held.history, held.last_window) == (state.history, T0 + 32 * MINUTE)
    assert feed(r, [None], state=held, first=32) == (held, [])  # a replay: nothing
    _, alerts = feed(r, [Decimal("0.01")], state=held, first=33)
    assert [(i, a.state) for i, a in alerts] == [(33, "resolved")]
    assert "no calls" not in alerts[0][1].message
    _, alerts = feed(r, [Decimal("0.01")], state=held, first=39)  # 33..38: 6 empty
    assert [(i, a.state) for i, a in alerts] == [(39, "resolved")]
    assert alerts[0][1].window_start == T0 + 33 * MINUTE
    assert "no calls" in alerts[0][1].message
    # Calm, it stays calm; seasonal, an hour's values still go to its profile when the
    # next hour starts with such a window.
    quiet, alerts = feed(r, [None] * 3, state=SeriesState(history=(Decimal("0.01"),) * 20))
    assert alerts == [] and not quiet.firing
    seasonal = rule(metric="error_rate", seasonality="hour_of_day")
    hour, _ = feed(seasonal, [Decimal("0.01")] * 60)
    rolled, _ = feed(seasonal, [None], state=hour, first=60)
    assert (rolled.hour_values, [s[1] for s in rolled.profile[0]]) == ((), [Decimal("0.01")])


def test_a_spike_held_by_windows_with_no_value_is_resolved_once_past_the_look_back() -> None:
    """Windows with calls but no value hold a firing spike only as long as the rule
    looks back (history_windows + 1 windows from its last window with a value: what a
    restarted worker reads back). The window that reaches it resolves the spike, once,
    saying why; it had held for good (a tenant at its hard cap for a month, a month)."""
    r = rule(metric="error_rate", cooldown_windows=5, min_value=Decimal("0.1"))
    calm = [Decimal("0.01"), Decimal("0.02")] * 10
    state, alerts = feed(r, [*calm, Decimal("0.9")])
    assert firing(alerts) == [20]
    held, alerts = feed(r, [None] * 30, state=state, first=21)  # to 50: 30 windows
    assert alerts == [] and held.firing and held.history == state.history
    done, alerts = feed(r, [None] * 20, state=held, first=51)
    assert resolved(alerts) == [51] and not done.firing and done.history == ()
    [(_, alert)] = alerts
    assert alert.event_id == stable_id(
        "spike", r.name, "team", "search", (T0 + 51 * MINUTE).isoformat(), "resolved"
    )
    assert alert.message == (
        "error_rate no longer judged on team=search: no window of 10 calls the guards let "
        f"through since the one from {(T0 + 20 * MINUTE).isoformat()}; "
        f"spike since {(T0 + 20 * MINUTE).isoformat()}"
    )
    assert feed(r, [None], state=held, first=51)[1] == alerts  # a replay: the same id
    # Calls back: nothing to resolve again, and a baseline learned afresh.
    back, alerts = feed(r, [Decimal("0.9")] * 5, state=done, first=71)
    assert alerts == [] and back.history == (Decimal("0.9"),) * 5


def test_a_calm_series_with_no_value_past_the_look_back_learns_afresh() -> None:
    """A calm series whose windows keep having no value forgets its recent baseline once
    the rule's look-back holds none with a value (a restarted worker would not know
    it), instead of judging its next value against history of any age; its hour-of-day
    profile goes after the rule's whole horizon (its days), as a series' with no windows."""
    r = rule(metric="error_rate", min_value=Decimal("0.1"))
    calm = [Decimal("0.01"), Decimal("0.02")] * 10
    state, _ = feed(r, calm)
    kept, _ = feed(r, [None] * 30, state=state, first=20)
    assert kept.history == state.history
    fresh, alerts = feed(r, [None], state=kept, first=50)
    assert alerts == [] and fresh.history == () and not fresh.firing
    _, alerts = feed(r, [Decimal("0.9")], state=kept, first=50)
    assert firing(alerts) == [50]  # judged against the old history until then
    _, alerts = feed(r, [Decimal("0.9")], state=fresh, first=51)
    assert alerts == []  # learned afresh: no baseline yet
    # A state from before last_valued was kept counts from its last window.
    old = SeriesState(history=state.history, last_window=T0 + 19 * MINUTE)
    assert feed(r, [None] * 30, state=old, first=20)[0].history == state.history
    assert feed(r, [None] * 31, state=old, first=20)[0].history == ()
    # Seasonal: hourly windows, a profile of the 9 o'clock hour.
    hour = timedelta(hours=1)
    seasonal = rule(metric="error_rate", seasonality="hour_of_day", window_s=3600)
    learned, _ = feed(seasonal, [Decimal("0.01")] * 48, window=hour)
    state, _ = feed(seasonal, [None] * 31, state=learned, first=48, window=hour)
    profile = state.profile  # two days of every hour (the last one's at the first None)
    assert [len(profile[h]) for h in range(24)] == [2] * 24
    assert state.history == () and learned.history != ()
    state, _ = feed(seasonal, [None] * 160, state=state, first=79, window=hour)
    assert state.profile == profile  # 7 days + 1, less an hour, since the last value
    state, _ = feed(seasonal, [None], state=state, first=239, window=hour)
    assert state.profile == {}


def test_a_long_spike_stays_one_episode_and_a_level_shift_is_learned() -> None:
    values = noisy(40, 100, 0.05, seed=4) + noisy(80, 300, 0.05, seed=5)
    state, alerts = feed(rule(cooldown_windows=0), values)
    assert firing(alerts) == [40]
    # Kept out of the history for history_windows // 2 windows, then admitted; the
    # median moves once they are half the history: resolved about 30 windows in.
    (done,) = resolved(alerts)
    assert 40 + 15 < done <= 40 + 35
    assert not state.firing


def test_an_outage_does_not_drag_the_baseline_down() -> None:
    values = noisy(40, 100, 0.05, seed=6) + [Decimal(0)] * 10 + noisy(20, 100, 0.05, seed=7)
    _, alerts = feed(rule(), values)
    assert alerts == []  # recovery from the outage is not a spike


# -- replays and ids -------------------------------------------------------------------


def test_alert_ids_are_deterministic_and_replays_change_nothing() -> None:
    values = [*noisy(40, 100, 0.05, seed=8), Decimal(600), Decimal(100)]
    state_a, alerts_a = feed(rule(), values)
    state_b, alerts_b = feed(rule(), values)
    assert alerts_a == alerts_b
    assert state_a == state_b
    fire, done = alerts_a[0][1], alerts_a[1][1]
    assert fire.event_id == stable_id(
        "spike", "cost-spike", "team", "search", (T0 + 40 * MINUTE).isoformat(), "firing"
    )
    assert fire.event_id != done.event_id
    # Another series, the same windows: other ids.
    _, alerts_c = feed(rule(), values, series="ads")
    assert {a.event_id for _, a in alerts_c}.isdisjoint({a.event_id for _, a in alerts_a})
    # Replaying windows the state has already seen: ignored, state unchanged.
    again, raised = feed(rule(), values[38:], state=state_a, first=38)
    assert raised == [] and again == state_a


def test_state_is_small_and_json_round_trips() -> None:
    values = [*noisy(200, 100, 0.1, seed=9), Decimal(900)]
    state, _ = feed(rule(seasonality="hour_of_day"), values)
    data = state.model_dump_json()
    assert SeriesState.model_validate_json(data) == state
    assert len(state.history) == 30
    assert len(data) < 4_000


def test_windows_must_be_utc_and_not_empty() -> None:
    with pytest.raises(ValueError, match="UTC"):
        observe(rule(), "search", None, datetime(2025, 1, 1), datetime(2025, 1, 1, 0, 1), 1)
    with pytest.raises(ValueError, match="end after"):
        observe(rule(), "search", None, T0, T0, 1)


def test_floats_are_taken_exactly_as_written() -> None:
    state, alerts = feed(rule(metric="error_rate"), [0.01] * 30 + [0.2])
    assert state.history[0] == Decimal("0.01")
    assert alerts[0][1].observed == Decimal("0.2")
    assert alerts[0][1].baseline == Decimal("0.01")


# -- seasonality -----------------------------------------------------------------------

HOUR = timedelta(hours=1)


def daily(days: int, seed: int) -> list[Decimal]:
    """Hourly values: busy 09:00-17:59 UTC (about 100), quiet otherwise (about 10)."""
    rng = random.Random(seed)
    out = []
    for h in range(days * 24):
        level = 100 if 9 <= h % 24 < 18 else 10
        out.append(Decimal(str(round(rng.gauss(level, level * 0.05), 3))))
    return out


def test_an_hour_s_profile_learns_every_minute_of_it() -> None:
    """Busy for the first 40 minutes of 09:00 every day, quiet the rest: 09:00's usual
    level is the busy one, and from the third day on its mornings raise nothing. The
    profile kept only each hour's last history_windows (30) minutes: quiet, so every
    morning fired."""
    seasonal = rule(metric="requests", seasonality="hour_of_day", min_value=Decimal(10))
    state, fired = None, []
    for minute in range(4 * 24 * 60):
        start = T0 + minute * MINUTE
        busy = start.hour == 9 and start.minute < 40
        state, alerts = observe(
            seasonal, "search", state, start, start + MINUTE, 100 if busy else 10
        )
        fired += [start for a in alerts if a.state == "firing"]
    assert state is not None and [s[1] for s in state.profile[9]] == [Decimal(100)] * 4
    assert [at for at in fired if at >= T0 + timedelta(days=2)] == []


def test_hour_of_day_seasonality_learns_the_working_day() -> None:
    values = daily(6, seed=10)
    learned = 2 * 24  # seasonal_min_days earlier days are needed per hour
    _, plain_alerts = feed(rule(cooldown_windows=0), values, window=HOUR)
    seasonal, seasonal_alerts = feed(
        rule(seasonality="hour_of_day", cooldown_windows=0), values, window=HOUR
    )
    # Without seasonality every morning looks like a spike.
    mornings = [i for i in firing(plain_alerts) if i >= learned]
    assert mornings and all(i % 24 == 9 for i in mornings)
    # With it, once two days are known, the working day is normal.
    assert [i for i in firing(seasonal_alerts) if i >= learned] == []
    # A busy hour in the middle of the night is unusual *for that hour*: it fires with
    # seasonality (the recent windows would call it normal right after a busy evening).
    night = len(values) + 2  # 02:00 on day 6
    spike_at_night = [Decimal(100)]
    filler = daily(7, seed=10)[len(values) : night]
    seasonal, _ = feed(
        rule(seasonality="hour_of_day", cooldown_windows=0),
        filler,
        state=seasonal,
        window=HOUR,
        first=len(values),
    )
    _, alerts = feed(
        rule(seasonality="hour_of_day", cooldown_windows=0),
        spike_at_night,
        state=seasonal,
        window=HOUR,
        first=night,
    )
    assert firing(alerts) == [night]
    assert alerts[0][1].baseline is not None and alerts[0][1].baseline < 20
    assert len(seasonal.profile) == 24 and all(len(p) <= 7 for p in seasonal.profile.values())


# -- the labelled evaluation -----------------------------------------------------------

WINDOWS = 400
SPIKY_SERIES = 20
RAMP_SERIES = 6
SIZES = (3, 5, 10)


@dataclass
class Series:
    name: str
    metric: SpikeMetric
    values: list[Decimal]
    spikes: list[tuple[int, int, int]] = field(default_factory=list)  # onset, windows, size
    ramp: bool = False


def poisson(rng: random.Random, lam: float) -> int:
    if lam < 30:  # Knuth
        limit, k, p = math.exp(-lam), 0, 1.0
        while True:
            p *= rng.random()
            if p <= limit:
                return k
            k += 1
    return max(0, round(rng.gauss(lam, math.sqrt(lam))))


def synthetic_traffic(seed: int) -> list[Series]:
    """Steady one-minute traffic with noise; labelled spikes; ramps with no spike.

    Every series has a request rate of 30-300 a minute (Poisson). Even series are cost:
    each request costs $0.001-$0.05 on average with a per-request spread (coefficient of
    variation 0.3-1.0), summed per window (Gaussian by the central limit theorem); odd
    series are request counts. Twenty series carry three spikes each, one of each
    size (3x, 5x, 10x the rate) lasting 1 to 5 windows, at least 45 windows apart and
    not before window 40. Six more series ramp their rate up by +100% over windows
    100-300 and hold it, with no spike.
    """
    rng = random.Random(seed)
    out: list[Series] = []
    for i in range(SPIKY_SERIES + RAMP_SERIES):
        ramp = i >= SPIKY_SERIES
        metric: SpikeMetric = "cost" if i % 2 == 0 else "requests"
        rate, price, spread = rng.uniform(30, 300), rng.uniform(0.001, 0.05), rng.uniform(0.3, 1)
        mult = [1.0] * WINDOWS
        spikes: list[tuple[int, int, int]] = []
        if ramp:
            mult = [1.0 + min(max(w - 100, 0), 200) / 200 for w in range(WINDOWS)]
        else:
            onsets: list[int] = []
            while len(onsets) < len(SIZES):
                o = rng.randrange(40, WINDOWS - 10)
                if all(abs(o - p) >= 45 for p in onsets):
                    onsets.append(o)
            sizes = list(SIZES)
            rng.shuffle(sizes)
            for onset, size in zip(sorted(onsets), sizes, strict=True):
                length = rng.randint(1, 5)
                spikes.append((onset, length, size))
                for w in range(onset, onset + length):
                    mult[w] = size
        values = []
        for w in range(WINDOWS):
            n = poisson(rng, rate * mult[w])
            if metric == "requests":
                values.append(Decimal(n))
            else:
                usd = rng.gauss(n * price, math.sqrt(n) * price * spread) if n else 0.0
                values.append(Decimal(str(round(max(0.0, usd), 9))))
        out.append(Series(f"s{i:02d}", metric, values, spikes, ramp))
    return out


@dataclass
class Score:
    labelled: int = 0
    detected: int = 0
    true_alerts: int = 0
    false_alerts: int = 0
    ramp_alerts: int = 0
    delays: list[int] = field(default_factory=list)
    resolve_lags: list[int] = field(default_factory=list)  # windows after the spike's end
    by_size: dict[int, list[int]] = field(default_factory=dict)  # size -> [detected, total]

    @property
    def precision(self) -> float:
        alerts = self.true_alerts + self.false_alerts
        return self.true_alerts / alerts if alerts else 1.0

    @property
    def recall(self) -> float:
        return self.detected / self.labelled if self.labelled else 1.0


def evaluate(series: list[Series], sensitivity: Decimal) -> Score:
    """Run the detector over every series and score its firing alerts.

    A firing alert is *true* when it is raised on a window inside a labelled spike
    (onset <= window < onset + length), *false* otherwise (ramp series have no spike,
    so every alert on one is false). Precision = true / all firing alerts. A labelled
    spike is *detected* when a firing alert is raised inside it; recall = detected /
    labelled; its delay = the alert's window - the onset window, in windows (0: the
    alert is raised as the spike's first window closes). The resolve lag of a detected
    spike = the window of the resolved alert that follows - the first window after it.
    """
    score = Score()
    for s in series:
        r = rule(name="eval", metric=s.metric, sensitivity=sensitivity, cooldown_windows=10)
        _, alerts = feed(r, s.values, series=s.name)
        fired, done = firing(alerts), resolved(alerts)
        for w in fired:
            inside = any(onset <= w < onset + n for onset, n, _ in s.spikes)
            score.true_alerts += inside
            score.false_alerts += not inside
            score.ramp_alerts += s.ramp
        for onset, n, size in s.spikes:
            score.labelled += 1
            tally = score.by_size.setdefault(size, [0, 0])
            tally[1] += 1
            hits = [w for w in fired if onset <= w < onset + n]
            if hits:
                score.detected += 1
                tally[0] += 1
                score.delays.append(hits[0] - onset)
                later = [w for w in done if w > hits[0]]
                if later:
                    score.resolve_lags.append(later[0] - (onset + n))
    return score


def report(title: str, scores: dict[str, Score]) -> None:
    print(f"\n{title}")
    print(
        f"{'sensitivity':>11} {'alerts':>6} {'false':>5} {'precision':>9} {'recall':>6} "
        f"{'3x':>5} {'5x':>5} {'10x':>5} {'delay p50':>9} {'delay max':>9} "
        f"{'ramp':>4} {'resolve lag max':>15}"
    )
    for name, s in scores.items():
        sizes = " ".join(f"{s.by_size[k][0]:>2}/{s.by_size[k][1]:<2}" for k in SIZES)
        print(
            f"{name:>11} {s.true_alerts + s.false_alerts:>6} {s.false_alerts:>5} "
            f"{s.precision:>9.3f} {s.recall:>6.3f} {sizes} "
            f"{statistics.median(s.delays):>9g} {max(s.delays):>9} {s.ramp_alerts:>4} "
            f"{max(s.resolve_lags):>15}"
        )


def test_labelled_evaluation_on_synthetic_traffic() -> None:
    traffic = synthetic_traffic(seed=2025)
    scores = {str(k): evaluate(traffic, Decimal(k)) for k in (4, 5, 6)}
    report(
        f"spike detection, {SPIKY_SERIES} series with {SPIKY_SERIES * len(SIZES)} labelled "
        f"spikes + {RAMP_SERIES} ramp series, {WINDOWS} one-minute windows each",
        scores,
    )
    default = scores["5"]  # SpikeRule's default sensitivity
    assert default.precision >= 0.9
    assert default.recall >= 0.9
    assert statistics.median(default.delays) == 0  # the first closed window after onset
    assert default.ramp_alerts == 0
    # Every detected spike is resolved as soon as it ends.
    assert len(default.resolve_lags) == default.detected
    assert max(default.resolve_lags) == 0
    # The neighbouring sensitivities meet the recall target too.
    assert all(s.recall >= 0.9 for s in scores.values())


def test_a_cost_spike_no_longer_judged_says_its_costs_are_unknown() -> None:
    """A cost spike whose team's calls then go on, but all to a model not priced yet:
    windows with calls and no cost to judge. Resolved past the look-back, its message
    says why: no window of known cost (a cost has no min_requests; the windows had
    calls), not "no window of 10 calls", which sends on-call looking for lost traffic."""
    r = rule(cooldown_windows=10)
    state, alerts = feed(r, [*noisy(30, 100, 0.05, seed=2), Decimal(500)])
    assert firing(alerts) == [30]
    _, alerts = feed(r, [None] * 40, state=state, first=31)
    [(i, alert)] = alerts
    assert (i, alert.state) == (61, "resolved")
    assert alert.message == (
        "cost no longer judged on team=search: no window of known cost since the one "
        f"from {(T0 + 30 * MINUTE).isoformat()}; spike since {(T0 + 30 * MINUTE).isoformat()}"
    )


def test_a_window_of_more_tokens_than_the_default_context_quantizes_is_judged() -> None:
    """A provider reporting 2**64-1 tokens (a -1 sentinel) made a tokens rule's window
    raise InvalidOperation (28-digit quantize), crashing the spikes stage on it again at
    each restart. It fires, its value exact."""

    rule = SpikeRule(name="tok", dimension="model", metric="tokens")
    detector = Detector([rule], 1, timedelta(seconds=13))
    alerts: list[Alert] = []
    for i in range(11):
        tokens = 2**64 - 1 if i == 10 else 5000 + i
        series: SeriesKey = ("model", "", "llama")
        window = Aggregate(requests=10, input_tokens=tokens).to_event(series, T0 + i * M, M, [0])
        alerts += judged(detector, wire.encode(window), window.window_end + 11 * S, 0) or []
    [fired] = alerts
    assert fired.state == "firing"
    assert fired.observed == Decimal(2**64 - 1)


def test_a_window_whose_sketch_cannot_be_read_is_passed_over() -> None:
    """A window that decodes but whose latency sketch does not add up (a foreign or
    corrupt producer's) raised out of the stage; it is logged and passed over, and the
    series is judged on."""

    rule = SpikeRule(name="lat", dimension="model", metric="p95_latency")
    detector = Detector([rule], 1, timedelta(seconds=13))
    series: SeriesKey = ("model", "", "gpt")
    bad = json.loads(wire.encode(Aggregate(requests=10).to_event(series, T0, M, [0])))
    bad["latency_ms"]["count"] = 3  # its bins say otherwise
    assert judged(detector, json.dumps(bad).encode(), T0 + M + 11 * S, 0) is None
    good = Aggregate(requests=10).to_event(series, T0 + M, M, [0])
    assert judged(detector, wire.encode(good), T0 + 2 * M + 11 * S, 0) == []
