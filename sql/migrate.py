"""Numbered schema migrations (sql/migrations/NNNN_name.sql), applied once each, in order.

Applied versions are recorded in ``schema_migrations``. Every statement is written to
be re-runnable (``IF NOT EXISTS``), so a migration interrupted half-way is simply
applied again. The same files run on chDB and on a ClickHouse server. One process
migrates a store at a time (sql/migration_lock.py).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import resources

import jinja2

from llmtap.events import utcnow
from sql.migration_lock import migration_lock, statement_settings
from sql.store import Store, render

log = logging.getLogger(__name__)

# A later migration may import an earlier one's macros (`{% from "0005_....sql" import
# rollup_table %}`): the loader reads the migrations folder.
_jinja = jinja2.Environment(
    loader=jinja2.FunctionLoader(
        lambda name: resources.files("sql").joinpath("migrations", name).read_text()
    ),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
)
_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")
# A statement that starts a mutation building or dropping a projection, which it does not
# wait for (mutations_sync = 0: a statement waiting on its mutation sends nothing, and a
# client over HTTP gives up after its receive timeout, the mutation going on; the next
# start then waited for it and ran the migration again, materializing every part again):
# the runner waits for it, polling.
_STARTS_PROJECTION_MUTATION = re.compile(r"^ALTER TABLE \w+ (MATERIALIZE|DROP) PROJECTION\b")

_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    name String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY version
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def _statements(text: str) -> tuple[str, ...]:
    """Split a migration file on semicolons that end a line; drop comment-only parts."""
    parts = re.split(r";\s*$", text, flags=re.MULTILINE)
    cleaned = (
        "\n".join(line for line in part.splitlines() if not line.strip().startswith("--"))
        for part in parts
    )
    return tuple(stmt.strip() for stmt in cleaned if stmt.strip())


def available() -> list[Migration]:
    """Every migration file, rendered (Jinja, for repeated structure only) and split."""
    folder = resources.files("sql").joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            text = _jinja.get_template(entry.name).render()
            found.append(Migration(int(match[1]), match[2], _statements(text)))
    return sorted(found, key=lambda m: m.version)


class SchemaAhead(Exception):
    """The store holds migrations this llmtap does not know: a newer llmtap's schema."""


class MutationFailed(Exception):
    """A projection mutation a migration waits for fails (its own, or one an earlier run
    left unfinished)."""


def _wait_for_projection_mutations(store: Store, why: str, poll_s: float = 0.2) -> None:
    """Wait for the projection mutations not done: those a migration's statement started
    (:data:`_STARTS_PROJECTION_MUTATION`), or what a run killed while it materialized a
    projection (0005, 0007) left, kept on disk and resumed in the background. A
    projection a mutation still builds cannot be dropped, so 0007 applied again failed
    ("affected by mutation ... not finished yet") at every start; on chDB, whose mutations
    run only while a process holds the store, each start exited before giving it the
    time to finish."""
    waiting = False
    while unfinished := store.rows(render("projection_mutations")):
        if failed := [row for row in unfinished if row["latest_fail_reason"]]:
            row = failed[0]
            raise MutationFailed(
                f"{row['table']}: mutation {row['mutation_id']} ({row['command']}) fails: "
                f"{row['latest_fail_reason']}"
            )
        if not waiting:
            log.info("waiting for a projection mutation (%s)", why)
            waiting = True
        time.sleep(poll_s)


def migrate(store: Store) -> list[int]:
    """Apply every migration not applied yet; return the versions applied now (none for
    a process that waited while another applied them). Raises :class:`SchemaAhead` for a
    store a newer llmtap migrated (a downgrade): this one's writes would miss its columns
    and tables, or fail on what it dropped. A store with nothing to apply is not locked:
    a lock a killed process left on a server holds up only a start that must migrate."""
    store.command(_VERSION_TABLE)
    if not _pending(store):
        return []
    with migration_lock(store):
        return _apply(store, _pending(store))  # read again: another may have applied them


def _pending(store: Store) -> list[Migration]:
    """The migrations not applied yet, in order; raises :class:`SchemaAhead`."""
    done = {row["version"] for row in store.rows("SELECT version FROM schema_migrations")}
    migrations = available()
    newest = max((m.version for m in migrations), default=0)
    if ahead := sorted(v for v in done if v > newest):
        raise SchemaAhead(
            f"the store's schema has migrations up to {ahead[-1]:04d}, this llmtap's only up "
            f"to {newest:04d}: a newer llmtap wrote it. Run that version (or newer): "
            "llmtap does not migrate a store back"
        )
    return [m for m in migrations if m.version not in done]


def _apply(store: Store, pending: list[Migration]) -> list[int]:
    if pending:
        _wait_for_projection_mutations(store, "one an earlier run left, before migrating")
    applied = []
    for migration in pending:
        for statement in migration.statements:
            store.command(statement, settings=statement_settings())
            if _STARTS_PROJECTION_MUTATION.match(statement):
                _wait_for_projection_mutations(store, f"migration {migration.version:04d}")
        store.insert(
            "schema_migrations",
            [(migration.version, migration.name, utcnow())],
            ("version", "name", "applied_at"),
        )
        log.info("applied migration %04d_%s", migration.version, migration.name)
        applied.append(migration.version)
    return applied
