"""One process migrating a store at a time (sql/migrate.py's runs).

Every store process migrates at its start, and several may share one ClickHouse server:
two starting together both ran a pending backfill (TRUNCATE, then INSERT ... SELECT
FROM calls), and each call was counted twice in that rollup for good. The lock is a
table, ``schema_migrations_lock``, made without IF NOT EXISTS: of several processes
making it at once exactly one succeeds (the others get TABLE_ALREADY_EXISTS); its row
names the holder, and it is dropped when the holder is done, stopped or failed.

A holder killed outright (SIGKILL, out of memory, its host gone) leaves it. On chDB,
whose data directory one process opens at a time, a lock another process made is left
by a dead one: taken over at once. On a server a live holder cannot be told from a dead
one, and a migration may take hours: the others wait, saying who holds it and, every
minute, how to clear it if no llmtap is migrating.

A holder stopped (SIGTERM cuts the read of a server's answer short) or failed mid-way
releases the lock on a client of its own: on a server the store's client's session still
runs the statement cut short (its client gone unnoticed for minutes), and refuses any
other query on it (SESSION_IS_LOCKED). Each migration statement has a query_id of this
process's (:func:`statement_settings`): those still running are killed first, or a start
right after would run the same backfill alongside it and count its calls twice.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from clickhouse_connect.driver.exceptions import DatabaseError

from llmtap.dsn import dsn_database
from llmtap.events import utcnow
from sql.store import Store, connect, render

log = logging.getLogger(__name__)

TABLE = "schema_migrations_lock"
TABLE_ALREADY_EXISTS = 57
UNKNOWN_TABLE = 60
NOTICE_S = 60.0  # how often a wait says how to clear a lock its holder left

_PROCESS = uuid.uuid4().hex  # this process's: a chDB lock of another was left by a dead one
# The query_ids of this process's migration statements begin so (no LIKE wildcard in it).
QUERY_ID_PREFIX = f"llmtap-migrate-{_PROCESS}-"
_statement = itertools.count()
# A process's attempts one at a time: on chDB, a lock seen while none of this process's
# is half-made (made, not yet named) is another process's.
_taking = threading.Lock()


@dataclass(frozen=True)
class Holder:
    database: str
    named: bool  # False: made, its holder not written yet (or it died in between)
    holder: str
    process: str
    started_at: datetime

    def __str__(self) -> str:
        if not self.named:
            return "an llmtap that had not named itself yet"
        return f"{self.holder} (since {self.started_at:%Y-%m-%d %H:%M:%S} UTC)"


def _holder(store: Store) -> Holder | None:
    """Who holds the lock; None if it is gone (released since it was found)."""
    try:
        [row] = store.rows(render("migration_lock_holder"))
    except DatabaseError as exc:
        if exc.code == UNKNOWN_TABLE:
            return None
        raise
    return Holder(**row)


def _take(store: Store) -> Holder | None:
    """Take the lock: None once taken, else who holds it."""
    with _taking:
        while True:
            try:
                store.command(render("migration_lock_take"))
            except DatabaseError as exc:
                if exc.code != TABLE_ALREADY_EXISTS:
                    raise
                holder = _holder(store)
                if holder is None:
                    continue  # released meanwhile
                if not store.dsn.startswith("chdb:") or holder.process == _PROCESS:
                    return holder
                log.warning(
                    "taking over the migration lock left by %s: it stopped while it migrated",
                    holder,
                )
                store.command(render("migration_lock_release"))
                continue
            try:
                store.insert(
                    TABLE,
                    [(f"{socket.gethostname()} pid {os.getpid()}", _PROCESS, utcnow())],
                    ("holder", "process", "started_at"),
                )
            except BaseException:  # a stop while it named itself, or a failure
                _release_or_say(store)
                raise
            return None


def statement_settings() -> dict[str, str]:
    """A migration statement's query settings: a query_id of its own, of this process's,
    which a holder stopped while it runs kills it by. (chDB has no query_id to set: its
    client drops it, and there a statement ends before the exception its thread meets.)"""
    return {"query_id": f"{QUERY_ID_PREFIX}{next(_statement)}"}


def _release_after_stop(store: Store) -> None:
    """Kill this process's migration statements still running, then release the lock,
    on a client of its own (a session of its own; on chDB one more handle on the
    engine): the store's client's session may still run the statement cut short."""
    ours = {"prefix": f"{QUERY_ID_PREFIX}%"}
    client = connect(store.dsn, {})
    try:
        try:
            client.command(render("migration_lock_kill"), parameters=ours)
        except DatabaseError:
            # A server with kill_throw_if_noop on (newer than 26.9) fails a KILL that
            # matched nothing: released all the same if none of ours runs.
            if client.command(render("migration_lock_running"), parameters=ours):
                raise
        client.command(render("migration_lock_release"))
    finally:
        client.close()


def _release_or_say(store: Store) -> None:
    """:func:`_release_after_stop`, or, failing, an ERROR saying how to clear the lock:
    never an exception of its own (the stop or failure that came is what is raised)."""
    try:
        _release_after_stop(store)
    except BaseException:
        database = "default" if store.dsn.startswith("chdb:") else dsn_database(store.dsn)
        log.exception(
            "could not release the migration lock after the migration stopped. Once no "
            "query whose query_id begins %s runs on this ClickHouse (system.processes), "
            "clear the lock, or every start that must migrate waits: DROP TABLE %s.%s",
            QUERY_ID_PREFIX,
            database,
            TABLE,
        )


@contextmanager
def migration_lock(store: Store, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the store's migration lock for the block, waiting for another holder first."""
    noticed: float | None = None
    while (holder := _take(store)) is not None:
        now = time.monotonic()
        if noticed is None:
            log.info("waiting for the migrations %s is applying", holder)
            noticed = now
        elif now - noticed >= NOTICE_S:
            log.warning(
                "still waiting for the migrations %s is applying. If no llmtap migrate or "
                "llmtap store is running on this ClickHouse (one was killed while it "
                "migrated), clear its lock: DROP TABLE %s.%s",
                holder,
                holder.database,
                TABLE,
            )
            noticed = now
        time.sleep(poll_s)
    try:
        yield
    except BaseException:  # a stop (stopping.py's is a BaseException) or a failure
        _release_or_say(store)
        raise  # the stop or the failure, never the release's error
    store.command(render("migration_lock_release"))
