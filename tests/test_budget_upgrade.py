"""An upgrade within a budget's period sends none of its threshold alerts again.

llmtap before 2026-12-01 gave a threshold alert the id of its budget's name, period and
threshold only (no scope, value, tenant nor limit). Those alerts are stored and were
delivered; the store's rebuild at the first start of a newer llmtap must count them as
raised, or every webhook receives each threshold of the period again, under new ids it
cannot tell are repeats (seen upgrading from c3adadf: 10%, 20% and 50% sent twice).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from llmtap.config_sections import BudgetConfig
from llmtap.events import Alert
from sinks.budget_seed import rebuilt_state, unraised
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.webhooks.records import store_batch
from sql.store import Store
from stream.budgets import threshold_alert, threshold_alert_id_before_owners
from tests.test_budgets import budget, costed


def test_the_id_is_the_one_alerts_had_before_they_named_their_owner() -> None:
    """As llmtap c3adadf raised it (read back from its store): acme-monthly, December
    2026, 10%."""
    b = BudgetConfig.model_validate(
        {"name": "acme-monthly", "scope": "tenant", "value": "acme", "limit_usd": "0.05"}
    )
    period_start = datetime(2026, 12, 1, tzinfo=UTC)
    assert threshold_alert_id_before_owners(b, period_start, 10) == UUID(
        "38636265-c975-5d1a-a783-d40f1796c2b8"
    )


def test_an_alert_stored_before_ids_named_the_owner_is_not_raised_again(store: Store) -> None:
    """Stored under the oldest id, of the same scope, value and limit: raised already.
    Of another value (the name was another budget's) or another limit: raised now."""
    b = budget(name="from-november", limit_usd=Decimal("4"), period="day")
    now = datetime.now(UTC)
    write_batch(store, Batch(events=[costed("3.9", now - timedelta(minutes=1))]))
    state = rebuilt_state(store, b, now)
    assert state.crossed == (50, 80)
    assert [a.threshold for a in unraised(store, b, state)] == [Decimal(50), Decimal(80)]

    def stored_before(threshold: int, **update: object) -> Alert:
        alert = threshold_alert(b, state, threshold, now)
        return alert.model_copy(
            update={
                "event_id": threshold_alert_id_before_owners(b, state.period_start, threshold),
                "tenant": "",  # alerts had no tenant then (migration 0013)
                **update,
            }
        )

    store_batch(store, [stored_before(50)], [], [])
    assert [a.threshold for a in unraised(store, b, state)] == [Decimal(80)]

    store_batch(store, [stored_before(80, value="globex")], [], [])
    assert [a.threshold for a in unraised(store, b, state)] == [Decimal(80)]


def test_an_oldest_id_of_another_limit_is_raised_again(store: Store) -> None:
    b = budget(name="limit-changed", limit_usd=Decimal("4"), period="day")
    now = datetime.now(UTC)
    write_batch(store, Batch(events=[costed("2.5", now - timedelta(minutes=1))]))
    state = rebuilt_state(store, b, now)
    assert state.crossed == (50,)
    alert = threshold_alert(b, state, 50, now)
    old = alert.model_copy(
        update={
            "event_id": threshold_alert_id_before_owners(b, state.period_start, 50),
            "baseline": Decimal("10"),
        }
    )
    store_batch(store, [old], [], [])
    assert [a.threshold for a in unraised(store, b, state)] == [Decimal(50)]
