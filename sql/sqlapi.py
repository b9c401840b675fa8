"""POST /api/v1/sql: one read-only query on ClickHouse, for admin keys, as JSON or CSV.

Three lines of defence, each enough on its own for what it covers (1 and 2 in
sql/sqlguard.py with sql/sqlnames.py, 3 in sql/sqlrun.py; this module reads the
request and writes the answer):

1. Before ClickHouse sees the text: exactly one statement (a ``;`` may only end it),
   and no ``INTO OUTFILE`` (which chDB, running in this process, would write).
2. ClickHouse's own parser: ``EXPLAIN AST <query>`` (parsing only, nothing runs) gives
   the syntax tree, which must be one SELECT (or WITH ... SELECT), SHOW TABLES /
   COLUMNS / CREATE TABLE, DESCRIBE or EXPLAIN of a SELECT, without a FORMAT clause;
   it may not name a ``system`` or ``information_schema`` table, a table of another
   database than the store's, a table function other than the generators in
   ``TABLE_FUNCTIONS``, or any function off the allowlist in sql/sql_functions.txt
   (those that compute on values; none that reads files, the network, dictionaries or
   the server's state), nor a table of its database that system.tables does not list;
   and a SELECT as the analyzer resolves it (``EXPLAIN QUERY TREE``) may not call a
   function off the list by a bare name (``user``) nor read another table; its quoted
   names may not hold line breaks (they would add lines to the tree), nor dots.
3. The query runs on its own ClickHouse session, opened with ``readonly=1`` and the
   limits (time, result rows and bytes, memory) as session settings: ClickHouse
   itself refuses any write, DDL or settings change, whatever got past 1 and 2.

The answer is bounded in this process too (it is the store's): a SELECT's rows are read
a block at a time and encoded as they come, and the query is cancelled once the answer
holds ``max_rows`` rows or ``max_answer_bytes`` bytes of them; the answer says which.

That session is a second client on the store's DSN (for chDB, a second handle on the
same engine), or on ``sql_dsn`` (a ClickHouse user of its own) when set, so a long
query never holds the store's lock (the writer and the analytics endpoints go on), and
the writer's session never carries these settings.
SQL is admin-only: chDB has no users or row policies, so a query cannot be confined
to one tenant by the server; virtual keys use the analytics endpoints instead.
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import json
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web

from sql.params import BadParameter, SqlError
from sql.sqlguard import SqlLimits
from sql.sqlrun import Answer, Encode, SqlRunner
from sql.store import Store

FORMATS = ("json", "csv")


# -- the request and the response -------------------------------------------------------

SQL = web.AppKey("sql_runner", SqlRunner)
SQL_LIMITS = web.AppKey("sql_limits", SqlLimits)
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class SqlRequest:
    query: str
    format: str
    max_rows: int


def _bad_body(param: str, message: str) -> BadParameter:
    """A request body the endpoint cannot take: a 400 naming the field, code bad_request."""
    error = BadParameter(param, message)
    error.code = "bad_request"
    return error


async def read_request(request: web.Request, limits: SqlLimits) -> SqlRequest:
    too_long = SqlError("too_long", f"the body is larger than {MAX_BODY_BYTES} bytes", 413, "body")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_long
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_long from None
    except web.RequestPayloadError as exc:
        # aiohttp could not read it whole: one that is not what its Content-Encoding
        # says (gzip, deflate, zstd: inflated as it is read), a broken chunked encoding.
        # It raised out of the handler: a bare text 500, with a traceback at ERROR.
        # Ended here (aiohttp would read on after the answer, and log the error again
        # as unhandled), and the connection with the answer: its parser is broken.
        stop_reading(request)
        raise _bad_body("body", _unreadable(request, exc)) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # 1e400 too: orjson reads no infinite number
        raise _bad_body(
            "body", f'the body is not JSON ({exc}): send {{"query": "SELECT ..."}}'
        ) from None
    if not isinstance(body, dict):
        raise _bad_body("body", 'the body must be a JSON object: {"query": "SELECT ..."}')
    for name in body:
        if name not in ("query", "format", "max_rows"):
            raise _bad_body(name, f"unknown field {name!r}: the body takes query, format, max_rows")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _bad_body("query", "'query' must be a non-empty string of SQL")
    fmt = body.get("format", "json")
    if fmt not in FORMATS:
        raise _bad_body("format", f"invalid 'format' {fmt!r}: expected one of json, csv")
    max_rows = body.get("max_rows", limits.default_rows)
    if isinstance(max_rows, float) and max_rows.is_integer():
        max_rows = int(max_rows)  # 100.0 is an integer to JSON Schema
    if (
        isinstance(max_rows, bool)
        or not isinstance(max_rows, int)
        or not (1 <= max_rows <= limits.max_rows)
    ):
        raise _bad_body(
            "max_rows", f"invalid 'max_rows' {max_rows!r}: expected an integer 1..{limits.max_rows}"
        )
    repeated = _repeated(raw)
    if repeated is not None:
        raise _bad_body(repeated, f"field {repeated!r} is given more than once")
    return SqlRequest(query=query, format=fmt, max_rows=max_rows)


def _repeated(raw: bytes) -> str | None:
    """The first field the body's object gives more than once, or None: orjson keeps the
    last value without a word. Asked of a body whose fields checked out (scalars), so
    it is read again cheaply; a value nested past Python's depth can only be a field's
    other value, one given twice (``body``: which one is not told)."""
    try:
        pairs: list[tuple[str, Any]] = json.loads(raw, object_pairs_hook=lambda pairs: pairs)
    except RecursionError:
        return "body"
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            return name
        seen.add(name)
    return None


UNREADABLE = web.RequestKey("sql_body_unreadable", bool)


def stop_reading(request: web.Request) -> None:
    """A request whose body could not be read (``RequestPayloadError``) is answered by
    its handler: no more of it is read, and the answer closes its connection
    (:func:`close_if_unreadable`)."""
    request.content.feed_eof()
    request[UNREADABLE] = True


async def close_if_unreadable(request: web.Request, response: web.StreamResponse) -> None:
    """An ``on_response_prepare`` signal: the answer to a request whose body could not be
    read closes its connection (the next request on it would wait on a broken parser)."""
    if request.get(UNREADABLE):
        response.force_close()
        # Its headers are made by now (aiohttp 3.14 signals after): said here too.
        response.headers["Connection"] = "close"


def _unreadable(request: web.Request, exc: web.RequestPayloadError) -> str:
    why = getattr(exc.__cause__, "message", "") or str(exc)
    message = f"the body could not be read ({' '.join(str(why).split())})"
    encoding = request.headers.get("Content-Encoding")
    if encoding is None:
        return message
    return (
        f"{message}: it is not {encoding} as its Content-Encoding says; send it so, or "
        "uncompressed without Content-Encoding"
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is None else value.astimezone(UTC)


def _plain(value: Any) -> Any:
    """A value orjson cannot write as is, as JSON can hold it."""
    if isinstance(value, Decimal):
        return f"{value:f}"  # exact, never a float
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, UUID)):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, int):  # past 64 bits (Int128, UInt256): a decimal string
        return str(value)
    if isinstance(value, (set, frozenset)):
        return list(value)
    return str(value)


_JSON = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def _deep(value: Any) -> Any:
    """The slow path: every value made plain by hand (big integers, odd keys)."""
    if isinstance(value, dict):
        return {_key(k): _deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep(v) for v in value]
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, bool | float | str | date) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    return _plain(value)


def _key(value: Any) -> str:
    """A map's key on the slow path, as the fast path writes it (a time ISO-8601 UTC,
    ``true``: orjson's ``OPT_NON_STR_KEYS``), or one it cannot write: a tuple's as JSON."""
    plain = _deep(value)
    if isinstance(plain, str):
        return plain
    if isinstance(plain, list):
        return dumps(plain).decode()
    (key,) = orjson.loads(orjson.dumps({plain: None}, option=_JSON))
    return str(key)


def dumps(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload, default=_plain, option=_JSON)
    except (orjson.JSONEncodeError, TypeError):
        return orjson.dumps(_deep(payload), default=_plain, option=_JSON)


def _cell(value: Any) -> str:
    """One CSV cell: as in the JSON answer, nested values as JSON text, NULL empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return dumps(_utc(value)).decode()[1:-1]
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf, as ClickHouse writes them (JSON has only null)
    if isinstance(value, (int, float)):
        return dumps(value).decode()
    if isinstance(value, (list, tuple, dict)):
        return dumps(value).decode()
    return str(_plain(value))


class CsvRow:
    """Encode: one CSV line (RFC 4180, CRLF), cells as :func:`_cell` writes them."""

    def __init__(self) -> None:
        self._out = io.StringIO()
        self._writer = csv.writer(self._out, lineterminator="\r\n")

    def __call__(self, row: Sequence[Any]) -> bytes:
        self._writer.writerow([_cell(v) for v in row])
        line = self._out.getvalue()
        self._out.seek(0)
        self._out.truncate()
        return line.encode("utf-8", "replace")


def json_row(row: Sequence[Any]) -> bytes:
    """Encode: one row as a JSON array."""
    return dumps(row)


def csv_body(answer: Answer) -> bytes:
    """The header line, then the rows (encoded by :class:`CsvRow`)."""
    return CsvRow()([c["name"] for c in answer.columns]) + b"".join(answer.rows)


def json_body(answer: Answer) -> bytes:
    """The JSON answer around the rows (encoded by :func:`json_row`)."""
    tail = dumps(
        {
            "rows_returned": len(answer.rows),
            "truncated": answer.truncated,
            "truncated_by": answer.truncated_by,
            "elapsed_ms": answer.elapsed_ms,
        }
    )
    return b"".join(
        (b'{"columns":', dumps(answer.columns), b',"rows":[', b",".join(answer.rows), b"],",
         tail[1:])
    )  # fmt: skip


async def run_sql(request: web.Request) -> web.Response:
    """The handler (admin-only: sql/analytics.py checks the key before it runs)."""
    limits = request.app[SQL_LIMITS]
    asked = await read_request(request, limits)
    csv_out = asked.format == "csv"
    encode: Encode = CsvRow() if csv_out else json_row
    answer = await request.app[SQL].run(asked.query, asked.max_rows, encode)
    headers = {
        "X-Rows-Returned": str(len(answer.rows)),
        "X-Truncated": "true" if answer.truncated else "false",
        "X-Elapsed-Ms": f"{answer.elapsed_ms:.3f}",
    }
    if answer.truncated_by is not None:
        headers["X-Truncated-By"] = answer.truncated_by
    # Put together in a thread, as the rows were encoded: an answer can be 64 MiB.
    if csv_out:
        body = await asyncio.to_thread(csv_body, answer)
        return web.Response(body=body, headers=headers, content_type="text/csv", charset="utf-8")
    body = await asyncio.to_thread(json_body, answer)
    return web.Response(body=body, headers=headers, content_type="application/json")


def sql_runner(
    store: web.AppKey[Store], limits: SqlLimits, dsn: str = ""
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the app's :class:`SqlRunner` on ``dsn`` (the ``sql_dsn``
    setting), or, without one, on the DSN of ``app[store]``."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        runner = app[SQL] = SqlRunner(dsn or app[store].dsn, limits)
        yield
        await asyncio.to_thread(runner.close)

    return context
