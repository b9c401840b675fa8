"""The ClickHouse side of alert delivery: rows of ``alerts`` and ``webhook_deliveries``.

Sync functions, run in a thread (the Store serialises calls). ``durably`` retries one
until ClickHouse takes it: nothing moves on (no offset commit, no next attempt) before
its record is stored.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, ParamSpec, TypeVar

from pydantic import ValidationError

from llmtap.events import Alert, utcnow
from sinks.clickhouse.decode import DeadLetter
from sinks.clickhouse.rows import DEAD_LETTER_COLUMNS
from sinks.clickhouse.write import new_dead_letters
from sql.store import Store, render

log = logging.getLogger(__name__)

Outcome = Literal["pending", "retrying", "delivered", "dead_lettered", "refused", "gone"]
FINAL: tuple[Outcome, ...] = ("delivered", "dead_lettered", "refused", "gone")

ALERT_COLUMNS = (
    "event_id",
    "schema_version",
    "alert_type",
    "state",
    "severity",
    "rule",
    "dimension",
    "value",
    "tenant",
    "metric",
    "observed",
    "baseline",
    "threshold",
    "window_start",
    "window_end",
    "first_seen",
    "message",
    "period",  # 0018
    "resolution",  # 0018
    "payload",
    "stored_at",
)


@dataclass(frozen=True)
class Attempt:
    """One row of webhook_deliveries (fields in column order)."""

    alert_id: uuid.UUID
    endpoint: str
    attempt: int  # 0: recorded as pending; 1..N: HTTP requests
    ts: datetime
    status_code: int | None
    error: str
    outcome: Outcome
    # The alerts-topic partition its alert was read from: its owner delivers it (-1:
    # not known, recorded before deliveries had one).
    alert_partition: int = -1
    # When the next attempt is due, on a `retrying` row (its backoff or retry-after).
    retry_at: datetime | None = None
    redelivery: int = 0  # 0: the first sending; each `llmtap alerts redeliver` one more


DELIVERY_COLUMNS = tuple(f.name for f in fields(Attempt))


@dataclass(frozen=True)
class Job:
    """One alert to deliver to one endpoint, after ``attempts`` attempts already made."""

    alert: Alert
    attempts: int = 0
    partition: int = -1  # the alerts-topic partition it belongs to (Attempt.alert_partition)
    not_before: datetime | None = None  # the last failed attempt's retry_at
    redelivery: int = 0  # Attempt.redelivery


@dataclass
class Stored:
    """What storing a batch of alerts left to deliver."""

    new: list[tuple[str, Alert]]  # (endpoint, alert) recorded as pending just now
    unfinished: list[tuple[str, uuid.UUID]]  # recorded earlier, not finished yet


# Decimal(38, 9) holds 29 digits before the point.
_DECIMAL_LIMIT = Decimal(10) ** 29


def out_of_range(alert: Alert) -> str:
    """Why an alert's numbers do not fit its columns, or "" if they do."""
    for name in ("observed", "baseline", "threshold"):
        value = getattr(alert, name)
        if value is not None and abs(value) >= _DECIMAL_LIMIT:
            return f"{name} {value} does not fit Decimal(38, 9)"
    return ""


def alert_row(alert: Alert) -> tuple[Any, ...]:
    a = alert
    return (
        a.event_id,
        a.schema_version,
        a.alert_type,
        a.state,
        a.severity,
        a.rule,
        a.dimension,
        a.value,
        a.tenant,
        a.metric,
        a.observed,
        a.baseline,
        a.threshold,
        a.window_start,
        a.window_end,
        a.first_seen,
        a.message,
        a.period or "",
        a.resolution or "",
        a.model_dump_json(),
        utcnow(),
    )


def record(store: Store, attempts: Sequence[Attempt]) -> None:
    if attempts:
        store.insert("webhook_deliveries", [astuple(a) for a in attempts], DELIVERY_COLUMNS)


def store_batch(
    store: Store,
    alerts: list[Alert],
    wanted: list[tuple[str, Alert]],
    dead_letters: list[DeadLetter],
    partitions: Mapping[uuid.UUID, int] | None = None,
) -> Stored:
    """Store new alerts (insert-if-absent) and a pending row per new delivery wanted,
    with the partition each alert was read from (``partitions``; -1 if not given)."""
    partitions = partitions or {}
    unique = list({a.event_id: a for a in alerts}.values())
    ids = [a.event_id for a in unique]
    if ids:
        stored = {r["event_id"] for r in store.rows(render("alerts_existing"), {"alert_ids": ids})}
        fresh = [alert_row(a) for a in unique if a.event_id not in stored]
        if fresh:
            store.insert("alerts", fresh, ALERT_COLUMNS)
    states: dict[tuple[uuid.UUID, str], bool] = {}
    if wanted:
        rows = store.rows(
            render("webhook_delivery_states"), {"alert_ids": ids, "final": list(FINAL)}
        )
        states = {(r["alert_id"], r["endpoint"]): bool(r["finished"]) for r in rows}
    new = list(
        {(e, a.event_id): (e, a) for e, a in wanted if (a.event_id, e) not in states}.values()
    )
    now = utcnow()
    pending = [
        Attempt(a.event_id, e, 0, now, None, "", "pending", partitions.get(a.event_id, -1))
        for e, a in new
    ]
    record(store, pending)
    letters = new_dead_letters(store, dead_letters) if dead_letters else []
    if letters:
        store.insert("dead_letters", [astuple(d) for d in letters], DEAD_LETTER_COLUMNS)
        log.error("%d undecodable alerts sent to dead_letters", len(letters))
    left = [(e, alert_id) for (alert_id, e), done in states.items() if not done]
    return Stored(new, left)


@dataclass
class Resumed:
    """What a rescan read: the deliveries to send, and those dead-lettered unsent."""

    jobs: list[Job]
    read: int  # unfinished deliveries read: the limit reached, more may be left
    given_up: int = 0  # dead-lettered here: expired, or their alert no longer decodes


def unfinished(
    store: Store,
    endpoint: str,
    limit: int,
    partitions: Collection[int],
    max_age: timedelta = timedelta.max,
) -> Resumed:
    """One endpoint's deliveries with no final outcome, of alerts read from
    ``partitions`` (and those of no known partition, with partition 0), oldest first.
    One whose sending began more than ``max_age`` ago is dead-lettered, not resumed:
    said in one WARNING per call."""
    if not partitions:
        return Resumed([], 0)
    values = {
        "endpoint": endpoint,
        "final": list(FINAL),
        "limit": limit,
        "partitions": sorted(partitions),
    }
    rows = store.rows(render("webhook_unfinished"), values)
    now = utcnow()
    jobs, given_up, expired = [], [], []
    for row in rows:
        age = now - _utc(row["since"])
        if age > max_age:
            error = (
                f"expired: not sent, its sending began {_ago(age)} ago, more than max_age_s "
                f"{max_age.total_seconds():g} (`llmtap alerts redeliver` sends it)"
            )
            given_up.append(_dead_lettered(row, endpoint, now, error))
            expired.append(age)
            continue
        try:
            alert = Alert.model_validate_json(row["payload"])
        except ValidationError as exc:
            log.error("stored alert %s no longer decodes; dead-lettered", row["alert_id"])
            error = f"stored alert does not decode: {exc}"
            given_up.append(_dead_lettered(row, endpoint, now, error))
            continue
        due = row["retry_at"]
        due = _utc(due) if due is not None else None
        partition, redelivery = int(row["alert_partition"]), int(row["redelivery"])
        jobs.append(Job(alert, int(row["attempts"]), partition, due, redelivery))
    record(store, given_up)
    if expired:
        log.warning(
            "webhook %s: %d unfinished deliveries expired, begun more than max_age_s %g ago "
            "(the oldest %s ago): dead-lettered unsent; `llmtap alerts redeliver "
            "--endpoint %s` sends them",
            endpoint,
            len(expired),
            max_age.total_seconds(),
            _ago(max(expired)),
            endpoint,
        )
    return Resumed(jobs, len(rows), len(given_up))


def _utc(ts: datetime) -> datetime:
    """A timestamp read from the store: naive when read in its own time zone, UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _ago(age: timedelta) -> str:
    return str(timedelta(seconds=int(age.total_seconds())))  # "21 days, 0:00:00"


def _dead_lettered(row: Mapping[str, Any], endpoint: str, now: datetime, error: str) -> Attempt:
    """A resumed delivery's final row, recorded instead of sending it."""
    return Attempt(
        row["alert_id"],
        endpoint,
        row["attempts"],
        now,
        None,
        error,
        "dead_lettered",
        row["alert_partition"],
        redelivery=row["redelivery"],
    )


def gone_since(store: Store, endpoint: str, since: datetime) -> uuid.UUID | None:
    """The alert whose delivery to ``endpoint`` got its latest 410 Gone at or after
    ``since`` (recorded by any store process), or None."""
    rows = store.rows(render("webhook_gone"), {"endpoint": endpoint, "since": since})
    return uuid.UUID(str(rows[0]["alert_id"])) if rows else None


def orphaned(store: Store, configured: Collection[str]) -> dict[str, int]:
    """How many unfinished deliveries each endpoint not ``configured`` has."""
    values = {"endpoints": sorted(configured), "final": list(FINAL)}
    rows = store.rows(render("webhook_orphaned"), values)
    return {r["endpoint"]: int(r["deliveries"]) for r in rows}


T = TypeVar("T")
P = ParamSpec("P")


async def durably(what: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` in a thread until it succeeds, backing off up to 30 s."""
    backoff = 0.5
    while True:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except Exception as exc:
            log.error("%s failed (%s); retrying in %.1fs", what, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
