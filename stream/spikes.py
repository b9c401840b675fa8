"""Spike detection over closed windows: rules, per-series state, alerts. Pure functions.

A *series* is one rule's metric for one value of its dimension (the cost of team
``search``, the p95 latency of model ``gpt-4o``...). The spikes stage calls
:func:`observe` once per closed window of a series, with the state it keeps for that
series (a small pydantic model, JSON-ready for a Faust table), and publishes the
alerts it returns.

How a window is judged (see :mod:`stream.baselines` for the statistics):

1. The baseline is learned from the series' own recent closed windows: the median of
   the last ``history_windows`` values, with a robust scale (Qn, an outlier-proof
   standard deviation, widened for short histories) floored at ``min_relative_scale``
   of the median, so a flat series does not fire on noise. An error rate's scale is
   also at least its window's sampling noise at the baseline's rate, and at least one
   call's worth (``calls``: see :func:`stream.baselines.sampling_noise`), so a series
   at 0 in most windows is not infinitely surprised by a failed call.
   With ``seasonality: hour_of_day`` and at least ``seasonal_min_days`` earlier days
   known for the window's UTC hour, the baseline is that hour's usual level on
   previous days instead (falling back to the recent windows until then). Until
   ``min_history`` windows are known nothing is judged.
2. A window is *anomalous* when all hold: its robust z-score
   ``(value - baseline) / scale`` reaches ``sensitivity``; ``value >= min_value``; and
   ``value - baseline >= min_increase`` (it reaches :func:`alert_level`). The two
   absolute floors are what stop an alert on a move from $0.001 to $0.01.
3. An anomalous window of a series that is not firing raises a ``firing`` alert,
   unless the series fired less than ``cooldown_windows`` windows ago (cooldown is
   measured in time, ``cooldown_windows`` x the window's length, so gaps count). A
   series fires once per episode, not once per window; its alert's severity is
   ``critical`` when the window rose over the baseline at least twice as far as it had
   to (to :func:`alert_level`: with no floor above it, a z-score of twice
   ``sensitivity``), else ``warning``. A ``warning`` episode that grows ``critical``
   fires once more, ``critical``, with its ``first_seen`` (no cooldown: the same
   episode).
4. The first window of a firing series that is no longer anomalous raises a
   ``resolved`` alert (same severity and ``first_seen`` as the firing one).
5. An *outlier* (``|z| > sensitivity``, whatever the floors and the cooldown) does not
   enter the history the baseline learns from, so during a spike the baseline stays
   the pre-spike one, and an outage's zeros do not drag it down. Only
   ``history_windows // 2`` consecutive outliers are kept out: from the next one on a
   run of outliers is taken for a level shift and admitted, so a new normal is learned
   (and its alert resolved) about ``history_windows`` windows after it began. A slow
   ramp is tracked by the median and never fires as long as the median's lag (the
   ramp's rise over about ``history_windows / 2`` windows) stays well inside
   ``sensitivity x scale``.

Alert ids are ``stable_id("spike", rule, dimension, value, window_start, state)``
(a tenant's series: ``events.of_tenant`` in place of ``"spike"``): a
replay of the same windows yields the same alerts with the same ids, and a window at
or before the last one a state has seen is ignored (a duplicate changes nothing).

Missing windows are not filled in: a series with no traffic in a window simply has no
value for it. A caller that wants "no calls" to count as 0 (cost, requests,
tokens) must pass the 0. A window with calls but no value (an error rate of calls the
guards all refused, a rate or a p95 of fewer than ``min_requests`` calls) is observed
as ``None``: no evidence either way, it neither fires, resolves nor enters the history,
but the series had calls, so it is not quiet either. That holds for as long as the
rule looks back (:func:`look_back` windows from the series' last window with a value),
no longer: a restarted worker reads back only that much (:func:`horizon`), so it would
not know the series. Then a firing series is resolved ("no longer judged"), and its
recent baseline forgotten, firing or not: it learns afresh once windows have a value
again. Its hour-of-day profile is forgotten after the rule's whole :func:`horizon`
(its days), as a series with no windows at all is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmtap.amounts import plain
from llmtap.config_sections import SpikeRule
from llmtap.events import Alert, UtcDatetime, of_tenant, stable_id
from stream.baselines import (
    Baseline,
    HourSummary,
    robust,
    sampling_noise,
    seasonal,
    summarise_hour,
)

Severity = Literal["warning", "critical"]

# Alert values go to ClickHouse as Decimal(38, 9).
QUANTUM = Decimal("0.000000001")


class SeriesState(BaseModel):
    """What the detector remembers about one series between windows (JSON-ready)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The values of the last history_windows closed windows, outliers left out.
    history: tuple[Decimal, ...] = ()
    last_window: UtcDatetime | None = None  # the latest window_start observed
    # The latest window_start observed with a value (None: none yet, or a state from
    # before it was kept: last_window stands in).
    last_valued: UtcDatetime | None = None
    firing: bool = False
    severity: Severity | None = None  # the current (or last) episode's
    first_seen: UtcDatetime | None = None  # the current (or last) episode's first window
    last_fired: UtcDatetime | None = None  # window_start of the last firing alert
    # A rate's: the calls of the last firing alert's window, whose sampling noise floors
    # the level a resolve with no window to judge gives (None: fired before it was kept).
    fired_calls: int | None = None
    outliers: int = 0  # consecutive outlier windows up to now (kept out of the history)
    # hour_of_day only: the values of the current UTC hour (outliers against a seasonal
    # baseline left out), and per UTC hour the (day, median, scale) of recent days.
    hour_values: tuple[Decimal, ...] = ()
    profile: dict[int, tuple[tuple[date, Decimal, Decimal], ...]] = Field(default_factory=dict)


def as_decimal(value: Decimal | int | float) -> Decimal:
    """A metric value as an exact decimal; floats go through their shortest repr."""
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, bool):
        raise TypeError("a metric value cannot be a bool")
    elif isinstance(value, int):
        result = Decimal(value)
    else:
        if not math.isfinite(value):
            raise ValueError(f"a metric value must be finite, got {value!r}")
        result = Decimal(str(value))
    if not result.is_finite():
        raise ValueError(f"a metric value must be finite, got {value!r}")
    return result


MAX_HOUR_VALUES = 120  # as history_windows' most


def _hour(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def _roll_profile(rule: SpikeRule, state: SeriesState, window_start: datetime) -> SeriesState:
    """Once a later hour starts, summarise the values of the last one into its profile."""
    last = state.last_window
    if last is None or _hour(last) == _hour(window_start):
        return state
    if not state.hour_values:
        return state
    summary = summarise_hour(last.date(), state.hour_values)
    kept = [s for s in state.profile.get(last.hour, ()) if s[0] != summary.day]
    kept.append((summary.day, summary.median, summary.scale))
    kept = sorted(kept)[-rule.seasonal_days :]
    return state.model_copy(
        update={"hour_values": (), "profile": {**state.profile, last.hour: tuple(kept)}}
    )


def baseline_for(rule: SpikeRule, state: SeriesState, window_start: datetime) -> Baseline | None:
    """The baseline a window starting at ``window_start`` is judged against, if any."""
    if rule.seasonality == "hour_of_day":
        summaries = [HourSummary(d, m, s) for d, m, s in state.profile.get(window_start.hour, ())]
        found = seasonal(
            summaries, window_start.date(), rule.seasonal_min_days, rule.min_relative_scale
        )
        if found is not None:
            return found
    if len(state.history) < rule.min_history:
        return None
    return robust(state.history, rule.min_relative_scale)


# Room for any value an alert stores (Decimal(38, 9)): the default context's 28 digits
# refused to quantize 10^19 tokens, and the worker crashed on that window again and again.
_WIDE = Context(prec=60)


def _q(value: Decimal) -> Decimal:
    return value.quantize(QUANTUM, rounding=ROUND_HALF_EVEN, context=_WIDE)


def _fmt(value: Decimal) -> str:
    return plain(_q(value))


def alert_level(rule: SpikeRule, baseline: Baseline) -> Decimal:
    """The level a window of the series must pass to fire: the baseline's upper bound
    at the rule's sensitivity, or the rule's floors (``min_value``, ``min_increase``
    over the baseline) where they are higher."""
    return max(
        baseline.upper(rule.sensitivity), rule.min_value, baseline.center + rule.min_increase
    )


def noise_floored(baseline: Baseline, calls: int | None) -> Baseline:
    """``baseline`` as a rate's window of ``calls`` calls is judged against: its scale at
    least the rate's sampling noise there (no calls: as it is)."""
    return baseline.at_least(sampling_noise(baseline.center, calls)) if calls else baseline


def severity_of(baseline: Baseline, value: Decimal, level: Decimal) -> Severity:
    """``critical`` when ``value`` rose over the baseline at least twice as far as it had
    to (to ``level``, the :func:`alert_level`, whichever of the sensitivity or a floor
    set it), else ``warning``."""
    needed = level - baseline.center
    return "critical" if value - baseline.center >= 2 * needed else "warning"


def _alert(
    rule: SpikeRule,
    series: str,
    state: Literal["firing", "resolved"],
    severity: Severity,
    *,
    window_start: datetime,
    window_end: datetime,
    first_seen: datetime,
    value: Decimal,
    baseline: Baseline,
    level: Decimal,  # alert_level at ``baseline``
    tenant: str,
    quiet: bool = False,
    unjudged: datetime | None = None,  # held past look_back since this valued window
    learned: bool = True,  # False: ``baseline`` stands in for none (no level to give)
) -> Alert:
    where = f"{rule.dimension}={series}"
    if tenant and rule.dimension != "tenant":
        where += f" of tenant {tenant}"
    resolution: Literal["normal", "quiet", "unjudged"] = "normal"
    if state == "firing":
        message = (
            f"{rule.metric} spike on {where}: {_fmt(value)} against a baseline of "
            f"{_fmt(baseline.center)} (alert above {_fmt(level)}, "
            f"robust z {baseline.z(value):.1f})"
        )
        if first_seen != window_start:
            message += f"; grew to {severity}, spike since {first_seen.isoformat()}"
    elif unjudged is not None:
        resolution = "unjudged"
        let_through = " the guards let through" if rule.metric == "error_rate" else ""
        # A cost has no min_requests: its windows had calls, none of a known cost.
        lacking = (
            "of known cost"
            if rule.metric == "cost"
            else f"of {rule.min_requests} calls{let_through}"
        )
        message = (
            f"{rule.metric} no longer judged on {where}: no window {lacking} "
            f"since the one from {unjudged.isoformat()}; "
            f"spike since {first_seen.isoformat()}"
        )
    elif quiet:
        resolution = "quiet"
        message = (
            f"{rule.metric} back to normal on {where}: no calls in the window from "
            f"{window_start.isoformat()}; spike since {first_seen.isoformat()}"
        )
    else:
        message = (
            f"{rule.metric} back to normal on {where}: {_fmt(value)} against a baseline of "
            f"{_fmt(baseline.center)}; spike since {first_seen.isoformat()}"
        )
    return Alert(
        event_id=stable_id(
            *of_tenant("spike", tenant),
            rule.name,
            rule.dimension,
            series,
            window_start.isoformat(),
            state,
        ),
        alert_type="spike",
        state=state,
        severity=severity,
        rule=rule.name,
        dimension=rule.dimension,
        value=series,
        tenant=tenant,
        metric=rule.metric,
        observed=_q(value),
        baseline=_q(baseline.center),
        threshold=_q(level) if learned else None,
        window_start=window_start,
        window_end=window_end,
        first_seen=first_seen,
        message=message,
        resolution=None if state == "firing" else resolution,
    )


def observe(
    rule: SpikeRule,
    series: str,
    state: SeriesState | None,
    window_start: datetime,
    window_end: datetime,
    value: Decimal | int | float | None,
    *,
    tenant: str = "",
    calls: int | None = None,
) -> tuple[SeriesState, list[Alert]]:
    """Judge one closed window of ``series`` (the dimension's value, e.g. a team name,
    of ``tenant``: WindowEvent.tenant). ``calls``: for a rate, the calls it is of (its
    sampling noise floors the scale).

    Returns the series' new state and the alerts to publish (none, one firing, or one
    resolved). A window not after the last one observed changes nothing. ``value``
    None: the window had calls but no value (see the module's docstring); it is only
    the series' latest window, so a firing one is not found quiet for it, until the
    series has had no value for :func:`look_back` windows (:func:`unjudged`).
    """
    if window_start.utcoffset() != timedelta(0) or window_end.utcoffset() != timedelta(0):
        raise ValueError("window bounds must be timezone-aware UTC")
    if window_end <= window_start:
        raise ValueError("a window must end after it starts")
    state = state or SeriesState()
    if state.last_window is not None and window_start <= state.last_window:
        return state, []
    quieted: list[Alert] = []
    if state.firing and state.last_window is not None:
        length = window_end - window_start
        if window_start > state.last_window + quiet_span(rule) * length:
            state, quieted = went_quiet(rule, series, state, length, tenant=tenant)
    if state.last_window is not None and window_start - state.last_window > idle_span(
        rule, window_end - window_start
    ):
        # Idle past what its rule looks back: forgotten, as the detector's sweep forgets
        # it once other series' windows move on, and as a restarted worker, reading back
        # no further, never knew it. Not judged against history of any age.
        state = SeriesState()
    if rule.seasonality == "hour_of_day":
        state = _roll_profile(rule, state, window_start)
    if value is None:
        valued = state.last_valued or state.last_window  # kept from here on
        if valued is None:
            return state.model_copy(update={"last_window": window_start}), quieted
        held = state.model_copy(update={"last_window": window_start, "last_valued": valued})
        held, capped = unjudged(rule, series, held, valued, window_end, tenant=tenant)
        return held, quieted + capped
    observed = as_decimal(value)
    baseline = baseline_for(rule, state, window_start)
    if baseline is not None:
        baseline = noise_floored(baseline, calls)
    update: dict[str, object] = {"last_window": window_start, "last_valued": window_start}
    alerts: list[Alert] = []
    if baseline is None:
        admit = True
    else:
        z = baseline.z(observed)
        outlier = abs(z) > rule.sensitivity
        # A long enough run of outliers is a new level: admitted, so it is learned.
        admit = not outlier or state.outliers >= rule.history_windows // 2
        update["outliers"] = state.outliers + 1 if outlier else 0
        # Reaching the alert's threshold, whichever of the three set it: a window at a
        # threshold the sensitivity set fired no more than one at min_value's did.
        level = alert_level(rule, baseline)
        anomalous = observed >= level
        severity = severity_of(baseline, observed, level)
        cooldown = cooldown_span(rule, window_end - window_start)
        cooled = state.last_fired is None or window_start - state.last_fired >= cooldown
        # A new episode (once cooled down), or a firing warning grown critical: the same
        # episode, told once more.
        fires = (cooled and not state.firing) or (
            state.firing and state.severity == "warning" and severity == "critical"
        )
        if anomalous and fires:
            first_seen = (state.first_seen if state.firing else None) or window_start
            alerts.append(
                _alert(
                    rule,
                    series,
                    "firing",
                    severity,
                    window_start=window_start,
                    window_end=window_end,
                    first_seen=first_seen,
                    value=observed,
                    baseline=baseline,
                    level=level,
                    tenant=tenant,
                )
            )
            update |= {
                "firing": True,
                "severity": severity,
                "first_seen": first_seen,
                "last_fired": window_start,
                "fired_calls": calls,
            }
        elif not anomalous and state.firing:
            alerts.append(
                _alert(
                    rule,
                    series,
                    "resolved",
                    state.severity or "warning",
                    window_start=window_start,
                    window_end=window_end,
                    first_seen=state.first_seen or window_start,
                    value=observed,
                    baseline=baseline,
                    level=level,
                    tenant=tenant,
                )
            )
            update["firing"] = False
    if admit:
        update["history"] = (*state.history, observed)[-rule.history_windows :]
    if rule.seasonality == "hour_of_day" and (admit or baseline is None or not baseline.seasonal):
        # Until an hour has a seasonal baseline, its profile learns every value: the
        # recent baseline is no judge of what is usual at this hour.
        # Every window of the hour (not history_windows of them: with minute windows, a
        # profile learned only each hour's last 30 minutes), up to 120 (the scale is
        # O(n^2 log n) at each hour's end: windows under 30 s learn its last 120).
        per_hour = min(max(1, math.ceil(3600 / rule.window_s)), MAX_HOUR_VALUES)
        update["hour_values"] = (*state.hour_values, observed)[-per_hour:]
    return state.model_copy(update=update), quieted + alerts


# Metrics a window without calls has as 0 (below any spike): the others have no value.
COUNTS = frozenset({"cost", "requests", "tokens"})


def look_back(rule: SpikeRule) -> int:
    """How many windows a rule looks back (its history, its cooldown, and one more); at
    most :func:`horizon`, so a restarted worker reads back what it judges."""
    return max(rule.history_windows, rule.cooldown_windows) + 1


def unjudged(
    rule: SpikeRule,
    series: str,
    state: SeriesState,
    valued: datetime,
    window_end: datetime,
    *,
    tenant: str = "",
) -> tuple[SeriesState, list[Alert]]:
    """A series observed a window with no value (``state.last_window``, ending at
    ``window_end``), its last with one starting at ``valued``. Held as it is while
    that is within :func:`look_back` windows; past it, a firing series is resolved at
    this window (its id as any resolve's) and the recent baseline is forgotten, and
    past the rule's :func:`horizon` the hour-of-day profile too: a restarted worker
    reading back that far would not know them. Otherwise a tenant at its hard cap for a
    month kept its spike firing for the month, and a restart lost it for good (the
    warmup leaves out the windows with no value of a series it does not know)."""
    start = state.last_window or valued
    since = start - valued
    if since < look_back(rule) * (window_end - start):
        return state, []
    alerts: list[Alert] = []
    if state.firing:
        alerts.append(
            _ended(rule, series, state, start, window_end, valued, tenant=tenant, unjudged=valued)
        )
    update: dict[str, object] = {"firing": False, "history": (), "outliers": 0}
    if since >= horizon([rule]):
        update |= {"hour_values": (), "profile": {}}
    return state.model_copy(update=update), alerts


def _ended(
    rule: SpikeRule,
    series: str,
    state: SeriesState,
    start: datetime,
    end: datetime,
    since: datetime,
    *,
    tenant: str,
    quiet: bool = False,
    unjudged: datetime | None = None,
) -> Alert:
    """The ``resolved`` of a firing series' episode at the window from ``start`` to
    ``end``, which had no value to judge (no calls: ``quiet``; none judged for the
    look-back: ``unjudged``): observed 0, against the baseline learned if any, and a
    rate's at the level its last firing alert's window of calls had there (``since``:
    the episode's first window, if the state does not say)."""
    learned = baseline_for(rule, state, start)
    if learned is not None:
        learned = noise_floored(learned, state.fired_calls)
    baseline = learned or Baseline(Decimal(0), Decimal(1), 0)
    return _alert(
        rule,
        series,
        "resolved",
        state.severity or "warning",
        window_start=start,
        window_end=end,
        first_seen=state.first_seen or since,
        value=Decimal(0),
        baseline=baseline,
        level=alert_level(rule, baseline),
        tenant=tenant,
        quiet=quiet,
        unjudged=unjudged,
        learned=learned is not None,
    )


def quiet_span(rule: SpikeRule) -> int:
    """How many windows without calls end a firing episode: one for a count (none is 0:
    normal); for an error rate or a latency, which have no value without calls, the
    rule's cooldown (a gap in a failing service's traffic is not its recovery)."""
    return 1 if rule.metric in COUNTS else max(rule.cooldown_windows, 1)


def went_quiet(
    rule: SpikeRule, series: str, state: SeriesState, window: timedelta, *, tenant: str = ""
) -> tuple[SeriesState, list[Alert]]:
    """End the episode of a firing series whose next windows had no calls (a runaway
    job stopped; :func:`quiet_span` of them): a ``resolved`` alert for the first of
    them, whose id is the same whoever
    finds it (the detector's sweep, or :func:`observe` at the series' next window).
    Otherwise the series stayed firing, and its next spike, days later, raised nothing.
    A series not firing is returned as it is."""
    if not state.firing or state.last_window is None:
        return state, []
    start = state.last_window + window
    resolved = _ended(
        rule, series, state, start, start + window, state.last_window, tenant=tenant, quiet=True
    )
    return state.model_copy(update={"firing": False}), [resolved]


def idle_span(rule: SpikeRule, window: timedelta) -> timedelta:
    """How long a series of windows of ``window`` may have none before it is forgotten:
    :func:`horizon`, for windows of that length."""
    back = look_back(rule) * window
    if rule.seasonality == "hour_of_day":
        back = max(back, timedelta(days=rule.seasonal_days + 1))
    return back


def horizon(rules: Iterable[SpikeRule]) -> timedelta:
    """How far back the rules look: every rule's history and cooldown, its days of
    hour-of-day profile when seasonal, and one window more."""
    longest = timedelta(0)
    for rule in rules:
        back = timedelta(seconds=rule.window_s * look_back(rule))
        if rule.seasonality == "hour_of_day":
            back = max(back, timedelta(days=rule.seasonal_days + 1))
        longest = max(longest, back)
    return longest


def cooldown_span(rule: SpikeRule, window: timedelta) -> timedelta:
    """How long after a firing alert the rule stays quiet, for windows of ``window``."""
    return window * rule.cooldown_windows
