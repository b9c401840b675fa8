"""The one way llmtap talks to ClickHouse: a client, a query renderer, and a lock.

The same clickhouse-connect client serves a ClickHouse server (``http://...``) and the
embedded chDB engine (``chdb:///path``). chDB has no async client and one process owns
one chDB path, so calls run in a thread and one lock serialises them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from functools import cache
from importlib import resources
from typing import Any

import clickhouse_connect
import jinja2
from clickhouse_connect.driver.insert import InsertContext

_env = jinja2.Environment(
    loader=jinja2.FunctionLoader(
        lambda name: resources.files("sql").joinpath("queries", f"{name}.sql").read_text()
    ),
    undefined=jinja2.StrictUndefined,
    autoescape=False,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


@cache
def _template(name: str) -> jinja2.Template:
    return _env.get_template(name)


def render(name: str, **structure: object) -> str:
    """Render ``sql/queries/<name>.sql``.

    Jinja decides structure only (optional filters, identifiers); every value is a
    ClickHouse query parameter (``{name:Type}``) bound by the client, never formatted in.
    """
    return _template(name).render(**structure)


class Store:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        # No insert is deduplicated unless it asks to be, with its own token (the
        # writer's inserts into `calls`, sinks/clickhouse/replay.py): a table with a
        # deduplication window would otherwise drop a block equal to a recent one.
        self._client = clickhouse_connect.get_client(dsn=dsn, settings={"insert_deduplicate": 0})
        self._lock = threading.Lock()
        self._insert_contexts: dict[tuple[str, tuple[str, ...]], InsertContext] = {}

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters)

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            result = self._client.query(sql, parameters=parameters)
        return list(result.named_results())

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        """One insert, sent column by column (the rows are transposed here, in C)."""
        data = [list(column) for column in zip(*rows, strict=True)]
        with self._lock:
            self._client.insert(table, data, column_names=list(columns), column_oriented=True)

    def insert_columns(
        self,
        table: str,
        columns: Sequence[Sequence[Any]],
        names: Sequence[str],
        send_as: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """One insert of data already in columns (``names`` order). ``send_as`` names
        columns sent as another type than the table's, for ClickHouse to convert (a
        Decimal column sent as the String of each value: parsed in the engine, exactly,
        instead of scaled in Python value by value). The table's column types are read
        once per table and column list, not before every insert: run migrations before
        writers start (they do). ``settings``: the insert's own query settings."""
        key = (table, tuple(names))
        with self._lock:
            context = self._insert_contexts.get(key)
            if context is None:
                context = self._client.create_insert_context(
                    table, list(names), column_oriented=True
                )
                if send_as:
                    table_types = zip(names, context.column_types, strict=True)
                    types = [send_as.get(name, kind.name) for name, kind in table_types]
                    context = self._client.create_insert_context(
                        table,
                        list(names),
                        column_oriented=True,
                        column_type_names=types,
                    )
                self._insert_contexts[key] = context
            context.settings = settings or {}  # a context's settings are its inserts'
            self._client.insert(data=columns, context=context)

    async def arows(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.rows, sql, parameters)

    def close(self) -> None:
        with self._lock:
            self._client.close()
