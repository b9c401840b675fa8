"""Retention: how long every stored table keeps rows (TTLs), from the settings.

Applied at every start after the migrations, and by ``llmtap migrate``. A table's TTL
is set where the configured days differ from it, and its stored parts are then brought
to it (MATERIALIZE TTL, a mutation that rewrites them, run in the background): a part
keeps the expiry it was written with, so without it a cut from 90 to 30 days deleted
nothing stored for 60 more days, and a raise from 30 to 90 still deleted what was stored
at 30. Only parts whose expiry is not the configured one are counted, so the same
mutation also runs, once, where a table has the right TTL but parts written under
another (a start stopped between the two statements; a TTL set by an earlier llmtap,
which did not materialize), unless one is running already. A start with nothing to do
costs one small query a table (of dead_letters and alerts, a read of their time columns:
see UNPARTITIONED) and rewrites nothing.
"""

from __future__ import annotations

import logging
import re

from llmtap.config import MAX_RETENTION_DAYS
from sql.store import Store, render

log = logging.getLogger(__name__)

_TTL_DAYS = re.compile(r"TTL .*?toIntervalDay\((?:_CAST\()?'?(\d+)")

# The tables whose TTL follows the settings, and the time their rows expire by: a column
# of each (DateTime64, not Nullable: a TTL needs a time), or an expression of its columns.
# raw_retention_days: the raw events, and those that could not be decoded or stored
# (raw bytes: as many and as large as the calls under a buggy producer).
RAW_TABLES = {"calls": "ts_end", "dead_letters": "ts"}
# rollup_retention_days: the rollups and windows...
ROLLUP_TABLES = {
    "windows": "window_start",
    # The analytics rollups (migration 0005).
    "analytics_by_model_hourly": "bucket",
    "analytics_by_model_daily": "bucket",
    "analytics_by_team_daily": "bucket",
    "analytics_by_user_daily": "bucket",
    # ... and those of migration 0007.
    "analytics_by_property_daily": "bucket",
    "analytics_by_provider_hourly": "bucket",
    # ... and of migration 0008.
    "analytics_by_tenant_hourly": "bucket",
    "analytics_by_user_provider_daily": "bucket",
    # ... and of migration 0017.
    "analytics_by_key_daily": "bucket",
}
# ... and the alert history, which an operator reads over as long (few rows): the alerts
# and each step of their webhook deliveries. An alert expires that long after it was
# stored, never sooner (a delivery resumed after a restart renders the stored alert,
# webhook_unfinished.sql; a resolved spike's first_seen can be older than any
# retention), and a budget alert no sooner than that after its period ends (window_end):
# a store starting within the period raises again each threshold alert of it it does
# not find stored (sinks/budget_seed.py, unraised), so one gone early is sent twice.
ALERT_TABLES = {"alerts": "greatest(stored_at, window_end)", "webhook_deliveries": "ts"}
# The tables not partitioned by the month of the time their rows expire by (all others
# are): system.parts keeps no latest time of their parts, so ttl_state.sql reads it from
# their rows.
UNPARTITIONED = frozenset({"dead_letters", "alerts"})


def _ttl_days(engine_full: str | None) -> int | None:
    match = _TTL_DAYS.search(engine_full) if engine_full else None
    return int(match[1]) if match else None


def current_ttl_days(store: Store, table: str) -> int | None:
    rows = store.rows(render("table_engine"), {"table": table})
    return _ttl_days(rows[0]["engine_full"]) if rows else None


def apply_retention(store: Store, *, raw_days: int, rollup_days: int) -> list[str]:
    """Set each table's TTL to its configured days and start bringing its stored parts to
    it; return the tables where either was done (the rewrite goes on in the background:
    system.mutations)."""
    for days in (raw_days, rollup_days):
        if not 1 <= days <= MAX_RETENTION_DAYS:  # past it, a TTL wraps: every row expired
            raise ValueError(f"a retention is 1 to {MAX_RETENTION_DAYS} days, not {days}")
    wanted = {table: (column, raw_days) for table, column in RAW_TABLES.items()}
    wanted |= {
        table: (column, rollup_days) for table, column in (ROLLUP_TABLES | ALERT_TABLES).items()
    }
    applied = []
    for table, (column, days) in wanted.items():
        by_month = table not in UNPARTITIONED
        query = render("ttl_state", table=table, column=column, partitioned=by_month)
        [state] = store.rows(query, {"table": table, "days": days})
        changed = _ttl_days(state["engine_full"]) != days
        if changed:
            store.command(render("set_ttl", table=table, column=column), {"days": days})
            log.info("retention of %s set to %d days", table, days)
        # Parts written under another expiry, this TTL's set now or not. After a change,
        # one more rewrite even if one runs: it may have rewritten parts to the TTL before.
        stale = state["stale_parts"]
        rewrite = stale > 0 and (changed or not state["materializing"])
        if rewrite:
            store.command(render("materialize_ttl", table=table))
            log.info("%s: %d parts being rewritten to a TTL of %d days", table, stale, days)
        if changed or rewrite:
            applied.append(table)
    return applied
