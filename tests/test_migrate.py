"""The migration runner on a store holding calls: its projection mutations waited for by
polling, not by a statement; one process migrating at a time."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from llmtap.stopping import Stopped, stopped_at_once
from sql import migrate as migrate_module
from sql import migration_lock
from sql.migrate import Migration, available, migrate
from sql.migration_lock import QUERY_ID_PREFIX, TABLE
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


SESSION_IS_LOCKED = 373
NOTHING_TO_KILL = 1000  # a stand-in code: the double raises it, nothing reads it
LEFT = (
    f"SELECT (SELECT count() FROM system.tables WHERE name = '{TABLE}') AS locks, "
    f"(SELECT count() FROM system.processes WHERE query_id LIKE '{QUERY_ID_PREFIX}%') AS ours"
)


class StoppedOnALockedSession(Store):
    """A store whose client's session is a ClickHouse server's as a stop leaves it (the
    double: chDB has no sessions to lock). The first backfill (INSERT ... SELECT) runs,
    and a SIGTERM comes while its answer is awaited; the server still runs the
    statement, so every later query on the session fails with SESSION_IS_LOCKED."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.locked = False
        self.query_ids: list[str | None] = []  # each migration statement's

    def command(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Any:
        if self.locked:
            raise DatabaseError("Session is locked by a concurrent client", code=SESSION_IS_LOCKED)
        answer = super().command(sql, parameters, settings)
        if sql.startswith("INSERT INTO") and "SELECT" in sql:
            self.query_ids.append((settings or {}).get("query_id"))
            self.locked = True
            signal.raise_signal(signal.SIGTERM)  # handled here, as in a socket's read
        return answer


def test_a_stop_mid_statement_releases_the_lock_on_a_session_of_its_own(
    tmp_path: Path,
) -> None:
    """Stopped during a backfill on a server, the holder dropped the lock on the store's
    client, whose session still ran the backfill: the DROP failed (SESSION_IS_LOCKED),
    that error replaced the stop, and the lock stayed for good (every later start that
    must migrate waited). Now each statement has a query_id of this process's, and the
    lock is released on a client of its own (real chDB), after killing what still runs
    with that prefix; the stop is what the run ends with."""
    made = calls_before_0005(tmp_path)
    made.close()
    stopped = StoppedOnALockedSession(made.dsn)
    try:
        with pytest.raises(Stopped), stopped_at_once():
            migrate(stopped)
        [query_id] = stopped.query_ids  # the backfill stopped, its query_id this process's
        assert query_id is not None and query_id.startswith(QUERY_ID_PREFIX)
    finally:
        stopped.close()
    store = Store(made.dsn)
    try:
        assert store.rows(LEFT) == [{"locks": 0, "ours": 0}]
        done = sorted(row["version"] for row in store.rows("SELECT version FROM schema_migrations"))
        assert done == [1, 2, 3, 4]  # 0005's backfill was stopped
        assert migrate(store) == list(range(5, NEWEST + 1))
        counted_once(store)
    finally:
        store.close()


def test_a_release_that_fails_after_a_stop_says_how_to_clear_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A release that fails too (the server gone) is logged, naming the command that
    clears the lock; the stop, not the release's error, is what the run ends with."""

    def unreachable(dsn: str, settings: dict[str, Any]) -> Any:  # the server gone
        raise OSError("connection refused")

    monkeypatch.setattr(migration_lock, "connect", unreachable)
    store = StoppedOnALockedSession(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        schema_before(5, store)
        with pytest.raises(Stopped), stopped_at_once():
            migrate(store)
    finally:
        store.close()
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.name == "sql.migration_lock"
    assert f"DROP TABLE default.{TABLE}" in record.getMessage()
    assert QUERY_ID_PREFIX in record.getMessage()


SLOW = Migration(
    1,
    "slow",
    (
        "CREATE TABLE IF NOT EXISTS slow (n UInt64) ENGINE = MergeTree ORDER BY n",
        "INSERT INTO slow SELECT number FROM numbers(100) WHERE sleepEachRow(0.02) = 0 "
        "SETTINGS max_block_size = 1",
    ),
)


def test_a_migration_stopped_while_a_statement_runs_leaves_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real stop (SIGTERM) while a slow statement runs on chDB: the run ends stopped,
    no lock and nothing of its statements is left, and the next run applies the
    migrations. (On chDB the statement ends before the stop is taken: the kill of one a
    server still runs is the double's above.)"""
    monkeypatch.setattr(migrate_module, "available", lambda: [SLOW])
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    watcher = connect(store.dsn, {})
    running = "SELECT count() FROM system.processes WHERE query LIKE 'INSERT INTO slow%'"

    def stop_once_it_runs() -> None:
        until(lambda: watcher.command(running), 60, "the slow statement runs")
        os.kill(os.getpid(), signal.SIGTERM)

    stopping = threading.Thread(target=stop_once_it_runs)
    try:
        stopping.start()
        with pytest.raises(Stopped), stopped_at_once():
            migrate(store)
        stopping.join(60)
        assert store.rows(LEFT) == [{"locks": 0, "ours": 0}]
        assert watcher.command(running) == 0
        assert store.rows("SELECT version FROM schema_migrations") == []
        monkeypatch.undo()
        assert migrate(store) == list(range(1, NEWEST + 1))
    finally:
        watcher.close()
        store.close()


def test_a_stopped_holder_kills_its_statements_still_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server goes on with the statement of a client the stop cut short: the release
    kills it (KILL QUERY by this process's query_id prefix, SYNC) before the lock is
    dropped, or a start right after would run its backfill alongside it. On chDB, which
    takes no query_id, a statement running on another handle stands for it, its query_id
    (the engine's) as the prefix."""
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    server = connect(store.dsn, {})  # the session still running the statement
    slow = "SELECT count() FROM numbers(1000) WHERE sleepEachRow(0.05) = 0"
    failed: list[DatabaseError] = []

    def run() -> None:
        try:
            server.command(f"{slow} SETTINGS max_block_size = 1")
        except DatabaseError as exc:
            failed.append(exc)

    running = threading.Thread(target=run)
    running.start()
    [row] = until(
        lambda: store.rows(
            "SELECT query_id FROM system.processes WHERE startsWith(query, {slow:String})",
            {"slow": slow},
        ),
        60,
        "the statement runs",
    )
    try:
        monkeypatch.setattr(migration_lock, "QUERY_ID_PREFIX", row["query_id"])
        with pytest.raises(Stopped), migration_lock.migration_lock(store):
            raise Stopped("SIGTERM")
        running.join(10)  # killed, not run to its end (50 s)
        assert not running.is_alive()
        assert [exc.code for exc in failed] == [394]  # QUERY_WAS_CANCELLED
        assert store.command(f"EXISTS TABLE {TABLE}") == 0
    finally:
        store.command("KILL QUERY WHERE query_id = {id:String} SYNC", {"id": row["query_id"]})
        running.join(60)
        server.close()
        store.close()


class StoppedWhileNamingItself(StoppedOnALockedSession):
    """A stop while the holder writes its name into the lock it just made: the server
    still runs that insert on the session, which refuses anything else."""

    def insert(self, table: str, rows: Any, columns: Any) -> None:
        super().insert(table, rows, columns)
        if table == TABLE:
            self.locked = True
            signal.raise_signal(signal.SIGTERM)


def test_a_stop_while_the_lock_is_named_releases_it_on_a_session_of_its_own(
    tmp_path: Path,
) -> None:
    """The lock made, its row being written when the stop came: released as a stop
    mid-statement is (on a client of its own), the stop what the run ends with. It was
    released on the store's session: SESSION_IS_LOCKED replaced the stop, the lock stayed."""
    store = StoppedWhileNamingItself(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        schema_before(5, store)
        with pytest.raises(Stopped), stopped_at_once():
            migrate(store)
    finally:
        store.close()
    again = Store(store.dsn)
    try:
        assert again.rows(LEFT) == [{"locks": 0, "ours": 0}]
    finally:
        again.close()


def test_a_kill_that_matches_nothing_and_fails_still_releases_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server with kill_throw_if_noop on (newer than 26.9) fails a KILL QUERY that
    matched nothing: with none of this process's statements running, the lock is
    released all the same (it stayed, and every start that must migrate waited)."""

    def strict(dsn: str, settings: dict[str, Any]) -> Any:
        client = connect(dsn, settings)
        plain = client.command

        def command(sql: str, *args: Any, **kwargs: Any) -> Any:
            if "KILL QUERY" in sql:
                raise DatabaseError("Nothing to kill", code=NOTHING_TO_KILL)
            return plain(sql, *args, **kwargs)

        client.command = command
        return client

    monkeypatch.setattr(migration_lock, "connect", strict)
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        with pytest.raises(RuntimeError, match="failed mid-way"):
            with migration_lock.migration_lock(store):
                raise RuntimeError("failed mid-way")
        assert store.rows(LEFT) == [{"locks": 0, "ours": 0}]
    finally:
        store.close()
