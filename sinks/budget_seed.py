"""Budget states rebuilt from ClickHouse when the store starts.

The stream keeps each budget's period-to-date spend and publishes it on the compacted
budgets topic. The embedded broker forgets everything when it stops, and a budget must
never silently reset to zero: so the store, the one process that can read ClickHouse in
embedded mode, sums each budget's calls since its period started and publishes that
state first. The stream worker (started after it by `llmtap up`) and the ingress load
the topic and keep, per period, the largest spend seen.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from decimal import Decimal

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from llmtap.config import BudgetConfig
from llmtap.events import BudgetState
from llmtap.kafka import Kafka
from sql.store import Store, render
from stream.budgets import fresh, status_of

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
    crossed = tuple(t for t in sorted(budget.thresholds) if spent * 100 >= budget.limit_usd * t)
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


async def publish_states(kafka: Kafka, states: list[BudgetState]) -> None:
    producer = AIOKafkaProducer(
        **kafka.producer_options("store-budgets"), request_timeout_ms=10_000
    )
    try:
        await producer.start()
        for state in states:
            await producer.send_and_wait(
                kafka.names.budgets, state.model_dump_json().encode(), key=state.budget.encode()
            )
    except KafkaError as exc:
        log.error("could not publish rebuilt budget states: %s", exc)
    finally:
        await producer.stop()
