"""The migration runner on a store holding calls: its projection mutations waited for by
polling, not by a statement; one process migrating at a time."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sql import migration_lock
from sql.migrate import available, migrate
from sql.migration_lock import TABLE
from sql.store import Store, connect
from tests.test_storage import schema_before

CALLS = 50_000
NEWEST = max(m.version for m in available())
MATERIALIZING = (
    "SELECT count() FROM system.mutations WHERE table = 'calls' AND NOT is_done "
    "AND command LIKE '%MATERIALIZE PROJECTION%'"
)
ALTERING = "SELECT count() FROM system.processes WHERE query LIKE 'ALTER TABLE calls%'"


def calls_before_0005(tmp_path: Path) -> Store:
    """A store an llmtap before migration 0005 made, holding CALLS calls in two parts."""
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    schema_before(5, store)
    for half in range(2):
        store.command(
            "INSERT INTO calls (event_id, request_id, ts_start, ts_end, tenant, provider, "
            "model, user, status, input_tokens, output_tokens, latency_ms, cost_total, "
            "properties) SELECT generateUUIDv4(), generateUUIDv4(), "
            "toDateTime64('2026-10-01 00:00:00', 3) + number, "
            "toDateTime64('2026-10-01 00:00:00', 3) + number, 'acme', 'openai', "
            "['m1', 'm2'][number % 2 + 1], toString(number % 100), 'ok', 10, 5, 1, "
            "toDecimal64(0.001, 9), map('app', 'chat') "
            f"FROM numbers({half * CALLS // 2}, {CALLS // 2})"
        )
    return store


def until(check: Callable[[], Any], seconds: float, what: str) -> Any:
    """Poll ``check`` until it answers truthy; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (answer := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return answer


def counted_once(store: Store) -> None:
    """Every call counted once in each backfilled rollup, each migration recorded once,
    the projection on every part of `calls`, no mutation left, no lock left."""
    [row] = store.rows(
        "SELECT (SELECT sum(requests) FROM analytics_by_model_daily) AS by_model, "
        "(SELECT sum(requests) FROM analytics_by_property_daily) AS by_property, "
        "(SELECT sum(requests) FROM analytics_by_provider_hourly) AS by_provider, "
        "(SELECT sum(requests) FROM analytics_by_tenant_hourly) AS by_tenant, "
        "(SELECT count() = uniqExact(version) FROM schema_migrations) AS recorded_once, "
        "(SELECT count() FROM system.parts WHERE database = currentDatabase() "
        "AND table = 'calls' AND active) AS parts, "
        "(SELECT count() FROM system.projection_parts WHERE database = currentDatabase() "
        "AND table = 'calls' AND name = 'by_time' AND active) AS projected, "
        "(SELECT count() FROM system.mutations WHERE NOT is_done) AS unfinished, "
        f"(SELECT count() FROM system.tables WHERE name = '{TABLE}') AS locks"
    )
    assert row == {
        "by_model": CALLS,
        "by_property": CALLS,
        "by_provider": CALLS,
        "by_tenant": CALLS,
        "recorded_once": True,
        "parts": row["parts"],
        "projected": row["parts"],
        "unfinished": 0,
        "locks": 0,
    }


def test_a_projection_is_materialized_with_no_statement_waiting_on_its_mutation(
    tmp_path: Path,
) -> None:
    """0005 and 0007 materialize `calls`' projection, a mutation rewriting every part.
    The ALTER waited for it (mutations_sync = 1) and, sending nothing meanwhile, a
    server's client over HTTP gave up after its receive timeout (300 s) while the
    mutation went on: `llmtap migrate` failed, and the next start materialized every part
    again. Now the ALTER returns once the mutation is recorded and the runner polls
    system.mutations; migrate returns once it is done. (Merges are stopped here, which
    holds a mutation, so the wait can be seen: chDB has no HTTP timeout to run into.)"""
    store = calls_before_0005(tmp_path)
    watcher = connect(store.dsn, {})  # a second session on the engine
    store.command("SYSTEM STOP MERGES calls")
    applied: list[int] = []
    migrating = threading.Thread(target=lambda: applied.extend(migrate(store)))
    migrating.start()
    try:
        try:
            until(
                lambda: watcher.command(MATERIALIZING),
                60,
                "0005 materializes the projection",
            )
            until(
                lambda: not watcher.command(ALTERING),
                10,
                "the ALTER waits on its mutation",
            )
            assert migrating.is_alive()  # waiting for the mutation, between statements
        finally:
            watcher.command("SYSTEM START MERGES calls")
            migrating.join(120)
        assert not migrating.is_alive()
        assert applied == list(range(1, NEWEST + 1))
        counted_once(store)
    finally:
        watcher.close()
        store.close()


def test_two_stores_migrating_at_once_apply_each_migration_once(tmp_path: Path) -> None:
    """Every store process migrates at its start, and several may share a server (and
    compose starts them together): two on a store with backfills pending both ran them,
    and each call was counted twice in those rollups for good. Now one migrates, the
    other waits for it and applies nothing."""
    first = calls_before_0005(tmp_path)
    second = Store(first.dsn)  # another client of the store, as another process's
    start = threading.Barrier(2)
    applied: dict[int, list[int]] = {}

    def run(index: int, store: Store) -> None:
        start.wait()
        applied[index] = migrate(store)

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    try:
        assert sorted(applied.values()) == [[], list(range(1, NEWEST + 1))]
        counted_once(first)
    finally:
        second.close()
        first.close()


def test_a_wait_for_the_lock_says_who_holds_it_and_how_to_clear_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a server a killed holder cannot be told from one migrating for hours: the
    others wait, and say how to clear a lock left behind. A store with nothing to apply
    does not wait."""
    monkeypatch.setattr(migration_lock, "NOTICE_S", 0.0)
    caplog.set_level(logging.INFO, logger="sql.migration_lock")
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    applied: list[int] = []
    try:
        with migration_lock.migration_lock(store):
            waiting = threading.Thread(target=lambda: applied.extend(migrate(store)))
            waiting.start()
            until(
                lambda: f"clear its lock: DROP TABLE default.{TABLE}" in caplog.text,
                30,
                "the wait says how to clear the lock",
            )
            assert waiting.is_alive() and not applied
        waiting.join(60)
        assert not waiting.is_alive()
        assert applied == list(range(1, NEWEST + 1))
        assert " pid " in caplog.text  # the holder, named
        again: list[list[int]] = []
        with migration_lock.migration_lock(store):  # up to date: not held up by it
            up_to_date = threading.Thread(target=lambda: again.append(migrate(store)), daemon=True)
            up_to_date.start()
            up_to_date.join(30)
            assert again == [[]]
    finally:
        store.close()


# Takes the migration lock of the store at argv[1] and is killed holding it; with
# argv[2] "half", killed after making it, before naming itself.
KILLED_HOLDING_THE_LOCK = """
import os, sys
from sql.migration_lock import migration_lock
from sql.store import Store, render

store = Store(f"chdb:///{sys.argv[1]}")
if sys.argv[2] == "half":
    store.command(render("migration_lock_take"))
else:
    with migration_lock(store):
        os._exit(0)
os._exit(0)
"""


@pytest.mark.parametrize("made", ["named", "half"])
def test_a_lock_a_killed_process_left_on_chdb_is_taken_over(
    made: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """chDB opens a data directory in one process at a time: a lock another process made
    is one it left when it was killed, and would otherwise stop every start."""
    data = tmp_path / "clickhouse"
    subprocess.run(
        [sys.executable, "-c", KILLED_HOLDING_THE_LOCK, str(data), made], check=True, timeout=120
    )
    store = Store(f"chdb:///{data}")
    try:
        assert store.command(f"EXISTS TABLE {TABLE}") == 1
        assert migrate(store) == list(range(1, NEWEST + 1))
        assert store.command(f"EXISTS TABLE {TABLE}") == 0
    finally:
        store.close()
    assert "taking over the migration lock left by" in caplog.text
