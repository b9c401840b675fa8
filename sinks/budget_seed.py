"""Budget states rebuilt from ClickHouse when the store starts.

The stream keeps each budget's period-to-date spend and publishes it on the compacted
budgets topic. The embedded broker forgets everything when it stops, and a budget must
never silently reset to zero: so the store, the one process that can read ClickHouse in
embedded mode, sums each budget's calls since its period started and publishes that
state first. The stream worker (started after it by `llmtap up`) and the ingress load
the topic and keep, per period, the largest spend seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from llmtap import topics
from llmtap.config_sections import BudgetConfig
from llmtap.events import Alert, BudgetState
from llmtap.kafka import Kafka
from sql.store import Store, render
from stream.budgets import (
    fresh,
    passed,
    period_time,
    status_of,
    threshold_alert,
    threshold_alert_id_before_limits,
    threshold_alert_id_before_owners,
)

log = logging.getLogger(__name__)

# Which calls column each budget scope is matched on (structure, not values).
SCOPE_COLUMN = {
    "tenant": "tenant",
    "team": "team",
    "key": "key_id",
    "user": "user",
    "feature": "feature",
}


def rebuilt_state(store: Store, budget: BudgetConfig, now: datetime) -> BudgetState:
    state = fresh(budget, now, now)
    rows = store.rows(
        render("budget_spend", column=SCOPE_COLUMN[budget.scope], tenant=bool(budget.tenant)),
        {"period_start": state.period_start, "value": budget.value, "tenant": budget.tenant},
    )
    spent = Decimal(rows[0]["spent"] or 0) if rows else Decimal(0)
    if not spent:
        return state
    crossed = passed(budget, spent)  # of the limit configured now
    last: datetime = rows[0]["last_event_at"]
    # Validated (not model_copy): what every reader of the topic will validate too.
    return BudgetState.model_validate(
        {
            **state.model_dump(),
            "spent_usd": spent,
            "crossed": crossed,
            "status": status_of(spent, budget.limit_usd, crossed),
            # ClickHouse answers DateTime64(3, 'UTC') without a zone: it is UTC.
            "last_event_at": last if last.tzinfo else last.replace(tzinfo=UTC),
        }
    )


def unraised(store: Store, budget: BudgetConfig, state: BudgetState) -> list[Alert]:
    """The alerts of thresholds a rebuilt state has crossed that were never raised: a
    budget added to the configuration (or its limit changed) when its spend was already
    past them. The stream raises a threshold only as a call crosses it, and a hard cap
    refuses the calls that would: without these, a budget could refuse every call and
    nobody hear of it. Each has the id the stream would give it, so one raised twice
    (the stream too, or one not stored yet) is stored and delivered once. One stored
    with the id alerts had before ids named the limit counts as raised if it was of the
    same limit (its baseline), and one stored with the id they had before they named the
    budget's owner if of the same scope, value and limit: an upgrade sends none of the
    period's alerts again."""
    # Seen when the last call counted ended, or now if a clock ahead stamped it later: a
    # call ending after midnight by its ingress's clock counts in the day the store is
    # in (as in the stream: stream.budgets.period_time), and so is its alert seen.
    at = period_time(state.last_event_at or state.updated_at, state.updated_at)
    alerts = [threshold_alert(budget, state, t, at) for t in state.crossed]
    if not alerts:
        return []
    earlier = {
        threshold_alert_id_before_limits(budget, state.period_start, t): alert.event_id
        for t, alert in zip(state.crossed, alerts, strict=True)
    }
    # Before ids named the owner either: stored by the name alone, so of this budget
    # only if of its scope and value (and limit) too.
    earliest = {
        threshold_alert_id_before_owners(budget, state.period_start, t): alert.event_id
        for t, alert in zip(state.crossed, alerts, strict=True)
    }
    ids = [alert.event_id for alert in alerts] + list(earlier) + list(earliest)
    stored = set()
    for row in store.rows(render("alerts_baselines"), {"alert_ids": ids}):
        same_limit = row["baseline"] is not None and Decimal(row["baseline"]) == budget.limit_usd
        if row["event_id"] in earliest:
            if same_limit and (row["dimension"], row["value"]) == (budget.scope, budget.value):
                stored.add(earliest[row["event_id"]])
        elif row["event_id"] in earlier:
            if same_limit:
                stored.add(earlier[row["event_id"]])
        else:
            stored.add(row["event_id"])
    return [alert for alert in alerts if alert.event_id not in stored]


async def publish_states(
    kafka: Kafka, states: list[BudgetState], alerts: Sequence[Alert] = ()
) -> bool:
    """Publish rebuilt states to the budgets topic (first: hard caps follow them), then
    ``alerts`` to the alerts topic; whether all were published. Publishing them again is
    harmless: readers keep a period's largest spend, and an alert's id is the stream's."""
    producer = AIOKafkaProducer(
        **kafka.producer_options("store-budgets"), request_timeout_ms=10_000
    )
    try:
        await producer.start()
        for state in states:
            await producer.send_and_wait(
                kafka.names.budgets, state.model_dump_json().encode(), key=state.budget.encode()
            )
        for alert in alerts:
            await producer.send_and_wait(
                kafka.names.alerts, alert.model_dump_json().encode(), key=topics.alert_key(alert)
            )
            log.warning("%s", alert.message)
    except KafkaError as exc:
        log.error("could not publish rebuilt budget states or their alerts: %s", exc)
        return False
    finally:
        await producer.stop()
    return True


async def publish_until_sent(
    kafka: Kafka,
    states: list[BudgetState],
    alerts: Sequence[Alert],
    backoff: float = 1.0,
    max_backoff: float = 30.0,
) -> None:
    """:func:`publish_states` again, with backoff, until all are published: the broker
    was down when the store started (with ClickHouse up, calls can still be refused by
    a hard cap whose threshold alerts nobody would otherwise hear of)."""
    while not await publish_states(kafka, states, alerts):
        log.info("publishing rebuilt budget states again in %.0fs", backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, max_backoff)
