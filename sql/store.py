"""The one way llmtap talks to ClickHouse: a client, a query renderer, and a lock.

The same clickhouse-connect client serves a ClickHouse server (``http://...``) and the
embedded chDB engine (``chdb:///path``). chDB has no async client and one process owns
one chDB path, so calls run in a thread and one lock serialises them; the API's reads
run on a handle of their own (:class:`Handle`), not behind the writer's lock.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import clickhouse_connect
import jinja2
from clickhouse_connect.driver.compression import get_compressor

from llmtap.data_dir import chdb_held
from llmtap.dsn import chdb_location

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


def _interface(dsn: str) -> str | None:
    """The DSN's scheme as the client's interface: clickhouse-connect reads host, port
    and credentials from a DSN but not its scheme, and takes TLS only from port 8443 or
    443, so ``https://host/db`` would send the password in clear to port 8123."""
    scheme = urlsplit(dsn).scheme
    return scheme if scheme in ("http", "https") else None


def connect(dsn: str, settings: dict[str, Any]) -> Any:
    """A clickhouse-connect client for ``dsn``, over TLS when its scheme is https
    (:func:`_interface`): every client llmtap makes, the store's and each :class:`Handle`'s
    (on chDB, one more handle on the engine the store's started: :func:`engine_start`)."""
    return clickhouse_connect.get_client(dsn=dsn, interface=_interface(dsn), settings=settings)


def named_rows(
    client: Any,
    sql: str,
    parameters: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """``sql``'s rows on ``client``, each a dict by column name, its times in UTC."""
    result = client.query(sql, parameters=parameters, settings=settings, query_tz="UTC")
    return list(result.named_results())


class Handle:
    """A client of its own on ``dsn`` with ``settings`` as its session's, opened at first
    use: the SQL endpoint's session (sql/sqlrun.py) and the API's reads (:class:`Store`),
    so that neither waits for the writer's lock, nor the writer for them. On a ClickHouse
    server, an HTTP session of its own; on chDB, one more handle on the engine the store's
    client started (:func:`engine_start`), which runs its queries alongside the others'.
    ``lock``: held around each use, one at a time (a ClickHouse server refuses a second
    query on a session while one runs; the SQL endpoint's checks and query are one use)."""

    def __init__(self, dsn: str, settings: dict[str, Any]) -> None:
        self.dsn = dsn
        self.settings = settings
        self.lock = threading.Lock()
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            self._client = connect(self.dsn, self.settings)
        return self._client

    def close(self) -> None:
        with self.lock:
            if self._client is not None:
                self._client.close()
                self._client = None


# chDB's default database is clickhouse-local's: it also reads the files of the
# directory the engine started in as tables (`SELECT * FROM noext`, `` `.env` ``): the
# process's working directory then, wherever llmtap was run from. The SQL endpoint's
# checks refuse such names, and its read-only session stops a read of a file chDB has
# not read before; with nothing there, there is no file to read at all.
_engine_start = threading.Lock()
FILES_ROOT = "no_files"  # in a chDB data directory


@contextmanager
def engine_start(dsn: str) -> Iterator[None]:
    """Around the store's client's start: on chDB, in :func:`files_root`, the
    directory the engine then reads as its default database's files. The working
    directory is the process's (the store's start is before it serves, or a command's);
    this one change of it is serialised and undone at once, even to a directory since
    removed."""
    if not dsn.startswith("chdb:"):
        yield
        return
    with _engine_start:
        # O_PATH: the way back, even from a directory that may be entered, not listed
        back = os.open(".", getattr(os, "O_PATH", os.O_RDONLY))
        try:
            os.chdir(files_root(dsn))
            yield
        finally:
            os.fchdir(back)
            os.close(back)


_IN_MEMORY = ("", "memory", ":memory:")


def absolute(dsn: str) -> str:
    """``dsn`` with an embedded store's data directory made absolute (a relative one is
    the process's directory's), as every client of the store names it: the engine
    starts in another directory (:func:`engine_start`), where a relative path would
    name another store."""
    if not dsn.startswith("chdb:"):
        return dsn
    location = chdb_location(dsn)
    if location in _IN_MEMORY:
        return dsn
    path = "/" + os.path.abspath(location).lstrip("/")  # chdb:////abs, as made of a Path
    query = urlsplit(dsn).query
    return f"chdb://{path}" + (f"?{query}" if query else "")


def files_root(dsn: str) -> Path:
    """The empty directory chDB's engine starts in, so its default database holds no
    file: ``no_files`` in the data directory of ``dsn`` (an absolute one: :func:`absolute`),
    made private (0700) and left empty; for a store in memory, one in the system's
    temporary directory, the process's, removed as it exits."""
    location = chdb_location(dsn)
    if location in _IN_MEMORY:
        return _memory_root()
    root = Path(location) / FILES_ROOT
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    return root


@functools.cache
def _memory_root() -> Path:
    root = tempfile.mkdtemp(prefix="llmtap-chdb-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return Path(root)


# The API's reads (Store.arows): on how many threads they queue (one runs at a time, on
# the store's read handle), how long one may take, and how much memory. chDB runs in this
# process, with the writer and the API: a read grouping a million users or request ids
# must not crowd them out, or have the process killed.
# The SQL endpoint's limit too (sql/sqlguard.py, SqlLimits.max_memory_bytes); past
# half of it, a GROUP BY goes on on disk (the engine's temporary files), not in memory.
READERS = 2
READ_TIMEOUT_S = 30.0
READ_MAX_MEMORY_BYTES = 2 * 1024**3
READ_SETTINGS = {
    "max_execution_time": READ_TIMEOUT_S,
    "timeout_overflow_mode": "throw",
    "max_memory_usage": READ_MAX_MEMORY_BYTES,
    "max_bytes_before_external_group_by": READ_MAX_MEMORY_BYTES // 2,
}


class StoreInUse(RuntimeError):
    """The embedded ClickHouse's data directory is another process's: chDB opens one in
    one process at a time (a running ``llmtap up``'s store process, say)."""


# No insert is deduplicated unless it asks to be, with its own token (the writer's
# inserts into `calls`, sinks/clickhouse/replay.py): a table with a deduplication window
# would otherwise drop a block equal to a recent one. UTC whatever the server's (or
# chDB's process's) time zone: what a date function without a zone of its own buckets
# by, and (query_tz) the zone of every time read. An insert may touch any number of
# monthly partitions: past ClickHouse's default (100), a batch of calls spanning more
# months (a backfill, a clock gone wrong) failed every time it was written.
SESSION_SETTINGS = {
    "insert_deduplicate": 0,
    "session_timezone": "UTC",
    "max_partitions_per_insert_block": 0,
}


class Store:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn = absolute(dsn)
        try:
            with engine_start(dsn):
                self._client = connect(dsn, SESSION_SETTINGS)
        except Exception as exc:
            if not chdb_held(dsn):
                raise
            raise StoreInUse(
                f"the embedded ClickHouse at {dsn.removeprefix('chdb://')} is in use by "
                "another process (a running llmtap up?): chDB opens a data directory in "
                "one process at a time"
            ) from exc
        self._lock = threading.Lock()
        self._reads = Handle(dsn, SESSION_SETTINGS)  # arows's, opened at its first use
        self._column_types: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        self._readers: ThreadPoolExecutor | None = None  # arows's, made at its first use

    def command(
        self,
        sql: str,
        parameters: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
    ) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters, settings=settings)

    def rows(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return named_rows(self._client, sql, parameters)

    def read(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """A read for the API, held to READ_SETTINGS, on the store's read handle: it
        waits for the API's other reads, never for the writer's lock, nor the writer
        for it."""
        with self._reads.lock:
            return named_rows(self._reads.client(), sql, parameters, READ_SETTINGS)

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        """One insert, sent column by column (the rows are transposed here, in C)."""
        data = [list(column) for column in zip(*rows, strict=True)]
        with self._lock:
            self._client.insert(table, data, column_names=list(columns), column_oriented=True)

    def column_types(self, table: str, names: Sequence[str]) -> tuple[str, ...]:
        """The types of ``table``'s columns ``names``, read once per table and column
        list, not before every insert: run migrations before writers start (they do)."""
        key = (table, tuple(names))
        with self._lock:
            types = self._column_types.get(key)
            if types is None:
                context = self._client.create_insert_context(
                    table, list(names), column_oriented=True
                )
                types = self._column_types[key] = tuple(t.name for t in context.column_types)
            return types

    def insert_native(
        self,
        table: str,
        names: Sequence[str],
        body: bytes,
        settings: dict[str, Any] | None = None,
    ) -> None:
        """One insert of a ``Native`` body (sql/native.py) of ``names``; ``settings``:
        the insert's own query settings. Compressed as the client's own inserts are (a
        server over HTTP: lz4 or zstd, as negotiated; chDB: none)."""
        compression = self._client.write_compression
        if compression in ("lz4", "zstd"):
            body = bytes(get_compressor(compression).compress_block(body))
        else:
            compression = None
        with self._lock:
            self._client.raw_insert(
                table,
                list(names),
                insert_block=body,
                settings=settings or {},
                fmt="Native",
                compression=compression,
            )

    async def arows(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """A read for the API (the analytics endpoints, the dashboard): :meth:`read`, on
        the store's own reader threads. Reads queue there, not in the event loop's
        default executor where the writer's inserts run, and run on a handle of their
        own, so the writer never waits for one; each is stopped after READ_TIMEOUT_S
        (ClickHouse error 159) or past READ_MAX_MEMORY_BYTES (error 241)."""
        if self._readers is None:
            prefix = f"store-read-{id(self):x}"  # this store's, among others' (tests)
            self._readers = ThreadPoolExecutor(READERS, thread_name_prefix=prefix)
        read = functools.partial(self.read, sql, parameters)
        return await asyncio.get_running_loop().run_in_executor(self._readers, read)

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=False, cancel_futures=True)
        self._reads.close()
        with self._lock:
            self._client.close()
