"""The spike alerts open at a restart, and the detector's states rebuilt from windows.

A restarted worker rebuilds its series' states from the windows it reads back, within
its rules' horizon (stream/warmup.py). What the receivers were told is another record:
the firing alerts published with no resolve after them (per rule and series), read
back from the alerts topic, where the store publishes again at its start the ones
ClickHouse holds open (sinks/spike_seed.py: the embedded broker keeps nothing over a
full restart). The two disagree when a spike fired longer ago than the read-back
reaches, when the worker was down longer than that, or when the rules changed:

- an open alert whose series the rebuilt states do not hold firing is resolved
  (``resolution: unjudged``, observed 0): nothing judges its episode any more. Its
  rule may be gone, or changed so that it no longer judges that series (another
  metric, dimension or window length), and its message says so. Left alone, the spike
  stayed firing at every receiver for good. An open alert of a window the read-back
  did not reach although it is within the horizon (published, its window's offset not
  committed yet: a crash between the two) is left to the stage, which judges that
  window again;
- a series the rebuilt states hold firing with no open alert (the replay under rules
  made more sensitive fired where the live worker did not) is not firing: its next
  normal window resolved an episode nobody heard of, and a real spike meanwhile raised
  nothing;
- one held firing with an open alert keeps the receivers' episode (its first window,
  severity and cooldown).

A resolve's id is derived from the open alert's, so two workers reconciling the same
alert, or a worker restarted twice before it is stored, raise it once downstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal

from llmtap.config_sections import SpikeRule
from llmtap.events import Alert, of_tenant, stable_id
from stream.spikes import SeriesState

SeriesOf = tuple[str, str, str, str]  # an alert's series: (rule, tenant, dimension, value)
StateKey = tuple[str, str, str]  # the detector's: (rule, tenant, value)


def series_of(alert: Alert) -> SeriesOf:
    return (alert.rule, alert.tenant, alert.dimension, alert.value)


def open_alerts(alerts: Iterable[Alert]) -> dict[SeriesOf, Alert]:
    """The spike alerts still open: per rule and series, the latest alert (by its
    window; of one window, the later in ``alerts``' order, the alerts topic's per
    series) when it is a firing one. By window, not only by order: the store publishes
    an open alert again at its start, maybe after the resolve it had not stored yet."""
    latest: dict[SeriesOf, Alert] = {}
    for alert in alerts:
        if alert.alert_type != "spike":
            continue
        key = series_of(alert)
        known = latest.get(key)
        if known is None or alert.window_start >= known.window_start:
            latest[key] = alert
    return {key: alert for key, alert in latest.items() if alert.state == "firing"}


def judges(rule: SpikeRule | None, alert: Alert) -> bool:
    """Whether ``rule`` (the one of the alert's name now, if any) judges the alert's
    series: same dimension, metric and window length."""
    return (
        rule is not None
        and rule.dimension == alert.dimension
        and rule.metric == alert.metric
        and timedelta(seconds=rule.window_s) == alert.window_end - alert.window_start
    )


def resolved_at_restart(alert: Alert, rule_gone: bool) -> Alert:
    """The resolve of an open spike alert nothing judges any more: for the window after
    the alert's, observed 0 (not measured), its id the same whoever raises it."""
    length = alert.window_end - alert.window_start
    where = f"{alert.dimension}={alert.value}"
    if alert.tenant and alert.dimension != "tenant":
        where += f" of tenant {alert.tenant}"
    why = (
        f"rule {alert.rule!r} was removed, or no longer judges this series (its metric, "
        "dimension or window changed)"
        if rule_gone
        else "the restarted worker does not find it firing in the windows it read back"
    )
    return Alert(
        event_id=stable_id(
            *of_tenant("spike", alert.tenant),
            alert.rule,
            alert.dimension,
            alert.value,
            "restart",
            str(alert.event_id),
            "resolved",
        ),
        alert_type="spike",
        state="resolved",
        severity=alert.severity,
        rule=alert.rule,
        dimension=alert.dimension,
        value=alert.value,
        tenant=alert.tenant,
        metric=alert.metric,
        observed=Decimal(0),
        baseline=alert.baseline,
        threshold=alert.threshold,
        window_start=alert.window_end,
        window_end=alert.window_end + length,
        first_seen=alert.first_seen,
        message=(
            f"{alert.metric} no longer judged on {where}: {why}; "
            f"spike since {alert.first_seen.isoformat()}"
        ),
        resolution="unjudged",
    )


def reconciled(
    rules: Iterable[SpikeRule],
    states: Mapping[StateKey, SeriesState],
    opened: Mapping[SeriesOf, Alert],
    since: datetime,
) -> tuple[dict[StateKey, SeriesState], list[Alert]]:
    """The states rebuilt from windows read back from ``since`` (the start of the
    horizon), squared with the spike alerts open (:func:`open_alerts`): the states
    changed, and the resolves to publish (see the module's docstring)."""
    named = {rule.name: rule for rule in rules}
    changed: dict[StateKey, SeriesState] = {}
    resolves: list[Alert] = []
    for alert in opened.values():
        rule = named.get(alert.rule)
        key = (alert.rule, alert.tenant, alert.value)
        state = states.get(key)
        if not judges(rule, alert):
            resolves.append(resolved_at_restart(alert, rule_gone=True))
            continue
        if state is not None and state.firing:  # the receivers' episode goes on
            changed[key] = state.model_copy(
                update={
                    "severity": alert.severity if alert.severity != "info" else state.severity,
                    "first_seen": alert.first_seen,
                    "last_fired": max(alert.window_start, state.last_fired or alert.window_start),
                }
            )
            continue
        covered = (
            state is not None
            and state.last_window is not None
            and state.last_window >= alert.window_start
        )
        if alert.window_start >= since and not covered:
            continue  # its window is past what was read back: the stage judges it again
        resolves.append(resolved_at_restart(alert, rule_gone=False))
        if state is not None:  # its cooldown runs from the episode the receivers had
            last = max(alert.window_start, state.last_fired or alert.window_start)
            changed[key] = state.model_copy(update={"last_fired": last})
    for key, state in states.items():
        rule = named.get(key[0])
        if not state.firing or rule is None:
            continue
        if (key[0], key[1], rule.dimension, key[2]) not in opened:
            # Fired in the replay only: no alert says so, so no cooldown runs either.
            changed[key] = state.model_copy(update={"firing": False, "last_fired": None})
    return changed, resolves
