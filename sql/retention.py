"""Retention: how long raw calls and rollups are kept (TTLs), from the settings.

Applied at every start after the migrations, and only where the configured number of
days differs from the table's current TTL, so a restart costs one small query a table.
"""

from __future__ import annotations

import logging
import re

from sql.store import Store, render

log = logging.getLogger(__name__)

_TTL_DAYS = re.compile(r"TTL .*?toIntervalDay\((?:_CAST\()?'?(\d+)")


def current_ttl_days(store: Store, table: str) -> int | None:
    rows = store.rows(render("table_engine"), {"table": table})
    match = _TTL_DAYS.search(rows[0]["engine_full"]) if rows else None
    return int(match[1]) if match else None


def apply_retention(store: Store, *, raw_days: int, rollup_days: int) -> list[str]:
    """Set each table's TTL to its configured days; return the tables changed."""
    wanted = {
        "calls": ("ts_end", raw_days),
        "windows": ("window_start", rollup_days),
        # The analytics rollups (migration 0005).
        "analytics_by_model_hourly": ("bucket", rollup_days),
        "analytics_by_model_daily": ("bucket", rollup_days),
        "analytics_by_team_daily": ("bucket", rollup_days),
        "analytics_by_user_daily": ("bucket", rollup_days),
        # ... and those of migration 0007.
        "analytics_by_property_daily": ("bucket", rollup_days),
        "analytics_by_provider_hourly": ("bucket", rollup_days),
        # ... and of migration 0008.
        "analytics_by_tenant_hourly": ("bucket", rollup_days),
        "analytics_by_user_provider_daily": ("bucket", rollup_days),
    }
    changed = []
    for table, (column, days) in wanted.items():
        if current_ttl_days(store, table) == days:
            continue
        store.command(render("set_ttl", table=table, column=column), {"days": days})
        log.info("retention of %s set to %d days", table, days)
        changed.append(table)
    return changed
