"""Running a vetted query on its own read-only ClickHouse session, the third line of
POST /api/v1/sql's defence: :class:`SqlRunner` parses it (``EXPLAIN AST``, judged by
sql/sqlguard.py), runs it with the limits as session settings, reads its rows a block
at a time, encodes them as they come and stops once the answer is full; ClickHouse's
errors become :class:`~sql.params.SqlError`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal

from clickhouse_connect.datatypes.container import Array, Map, Nested, Tuple
from clickhouse_connect.datatypes.dynamic import TypedVariant
from clickhouse_connect.datatypes.registry import get_from_name
from clickhouse_connect.datatypes.special import SimpleAggregateFunction
from clickhouse_connect.driver.exceptions import (
    ClickHouseError,
    DatabaseError,
    NotSupportedError,
    OperationalError,
    StreamFailureError,
)

from sql.params import SqlError
from sql.sqlguard import SqlLimits, check_totals, check_tree, precheck
from sql.sqlnames import (
    Databases,
    check_names,
    check_resolved,
    settings_refusal,
    unresolved_refusal,
    unresolved_tables,
    without_hints,
)
from sql.sqltree import Node, parse_ast
from sql.store import Handle, render

Encode = Callable[[Sequence[Any]], bytes]  # one row, as the answer's format writes it
TruncatedBy = Literal["max_rows", "max_answer_bytes"]


@dataclass(frozen=True)
class Answer:
    columns: list[dict[str, str]]
    rows: list[bytes]  # each row encoded (Encode), in order
    truncated_by: TruncatedBy | None  # which limit cut the answer short, if one did
    elapsed_ms: float

    @property
    def truncated(self) -> bool:
        return self.truncated_by is not None


class SqlRunner:
    """The read-only session (a :class:`~sql.store.Handle`), opened on first use; one
    query at a time."""

    def __init__(self, dsn: str, limits: SqlLimits) -> None:
        self.dsn = dsn
        self.limits = limits
        embedded = dsn.startswith("chdb://")
        # Held per thread too (its lock): a request cancelled mid-query leaves its
        # thread running.
        self._session = Handle(dsn, limits.session_settings(embedded=embedded))
        self._lock = asyncio.Lock()

    def _connection(self) -> Any:
        return self._session.client()

    def explain(self, text: str, databases: Databases, lead: str = "") -> Node:
        """``text``'s tree; a syntax error's positions are given in the query it was
        trimmed from (``lead``: what was trimmed before it). Its quoted names are checked
        (:func:`check_names`) before its lines are read as a tree: a line break in one
        prints as more lines."""
        # Not query(): it would append "FORMAT Native", which the parser may attach to
        # the statement inside the EXPLAIN. The answer is TabSeparated (escaping only
        # inside a line: one line per node).
        try:
            # Raw bytes: command() gives a tree holding a literal that is no UTF-8
            # ('\xc3') as the repr of its bytes, on one line.
            raw = self._connection().raw_query(EXPLAIN + text)
        except DatabaseError as exc:
            message = _clickhouse_error(exc).message
            if _SETTING_REFUSED.search(message):
                # A SETTINGS clause applies to the EXPLAIN too: ClickHouse refused a
                # change of the read-only session's. The same answer as a value equal
                # to the session's, which passes here (no test of guesses).
                raise settings_refusal() from None
            placed = _in_query(message, lead)
            if placed == message:
                raise
            raise SqlError("clickhouse_error", placed) from None
        check_names(self.formatted(text), databases)
        body = raw.decode("utf-8", "backslashreplace").removesuffix("\n")
        return parse_ast(body.split("\n"))

    def query_tree(self, text: str, root: Node, databases: Databases) -> str:
        """``text`` as ClickHouse's analyzer resolves it (``EXPLAIN QUERY TREE``, its
        first pass: names resolved, nothing run but constant expressions, scalar
        subqueries among them), for :func:`check_resolved`. Its error is not told for a
        query naming tables that may not be the store's (:func:`unresolved_tables`): a
        scalar subquery of a file, evaluated here, could put what it holds in the message (a
        red-team pass read a file through a "Maybe you meant" hint of a column named by
        a folded constant), or in which error it is (another, by its code): the answer
        is :func:`unresolved_refusal`, as when the tree resolves a file."""
        try:
            raw = self._connection().raw_query(QUERY_TREE + text)
        except DatabaseError as exc:
            connection_lost = isinstance(exc, OperationalError) and exc.code is None
            if connection_lost or not unresolved_tables(root, databases):
                raise  # told: no file can be read (a bare name's function is not folded)
            raise unresolved_refusal(root, databases) from None
        return str(raw.decode("utf-8", "backslashreplace"))

    def formatted(self, text: str) -> str:
        """``text`` as ClickHouse formats it on one line (parsed, not run; the text is
        a bound value): its quoted names with their escapes, for :func:`check_names`."""
        try:
            raw = self._connection().raw_query(
                render("sql_format"), parameters={"query": text}, fmt="RowBinary"
            )
            formatted = _row_binary_string(raw)
        except (DatabaseError, ValueError) as exc:  # parsed by EXPLAIN AST already
            raise SqlError("bad_query", f"the query's names could not be checked: {exc}") from None
        return formatted.decode("utf-8", "backslashreplace")

    def databases(self) -> Databases:
        """The session's database and the others it can see, as they are now (one made
        since the last query is among them)."""
        query = self._connection().query(render("sql_databases"))
        current, names, tables = query.result_rows[0]
        # Case-sensitive, as ClickHouse's names are: `Default` is another database.
        others = frozenset(str(name) for name in names if str(name) != current)
        return Databases(str(current), others, frozenset(str(table) for table in tables))

    def execute(
        self,
        text: str,
        *,
        select: bool,
        encode: Encode,
        max_rows: int,
        precise: bool = False,
        hiding: bool = False,
    ) -> tuple[list[dict[str, str]], list[bytes], TruncatedBy | None]:
        """Run ``text`` as is (the checks are the caller's): its columns, and its rows
        encoded until ``max_rows`` rows or the answer's bytes (``max_answer_bytes``)
        would be passed. A SELECT is read a block at a time and cancelled there; the
        other statements (SHOW, DESCRIBE, EXPLAIN: small answers, which chDB does not
        stream) are read whole. ``precise``: the SELECT may answer a DateTime64 finer
        than a microsecond, so its DateTime64s are read as ticks (:func:`_written`);
        ``hiding``: it also names a type that may hold one where ticks cannot be found."""
        client = self._connection()
        if not select:
            result = client.query(text, query_tz="UTC")
            columns = _columns(result.column_names, result.column_types)
            return (columns, *_encoded([result.result_rows], encode, max_rows, self.limits))
        # The answer's own types say where its times are: no DESCRIBE, which runs the
        # query's scalar subqueries once more (each under its own time limit); but for
        # a query naming a type that may hide them (_HIDING), which would run twice.
        by_column = self.in_ticks(text) if precise and hiding else None
        formats = {**_READ, **(_AS_TICKS if precise and by_column is None else {})}
        while True:
            with client.query_row_block_stream(
                text, query_tz="UTC", query_formats=formats, column_formats=by_column
            ) as stream:
                names, types = stream.source.column_names, stream.source.column_types
                if by_column is None and precise and not all(map(_walkable, types)):
                    # Ticks in a Dynamic could not be told from integers: once more,
                    # ticks only in the columns where they are found (a Variant no
                    # query names: a UNION's common type; its first block run twice).
                    formats, by_column = dict(_READ), _in_ticks(names, types)
                    continue
                columns = _columns(names, types)
                fixes: list[tuple[int, Callable[[Any], Any]]] = []
                for i, (name, t) in enumerate(zip(names, types, strict=True)):
                    ticks = precise and (by_column is None or name in by_column)
                    walked = _CLOCKS.search(t.name) or _HIDING.search(t.name)  # _written
                    if walked or (ticks and _TICKS.search(t.name)):
                        fixes.append((i, partial(_written, t)))  # first: ticks until then
                    fixes += [(i, fix) for pattern, fix in _FIXES if pattern.search(t.name)]
                blocks = stream if not fixes else ((_fixed(r, fixes) for r in b) for b in stream)
                rows, truncated_by = _encoded(blocks, encode, max_rows, self.limits)
                break
        if not columns:
            # No rows, and chDB's Native output then has no columns either: ask for them.
            columns = [{"name": name, "type": kind} for name, kind in self.described(text)]
        return columns, rows, truncated_by

    def described(self, text: str) -> list[tuple[str, str]]:
        """The columns a SELECT answers, each its name and type, as ClickHouse
        describes them (without running it, but for its scalar subqueries)."""
        described = self._connection().query(f"DESCRIBE TABLE (\n{text}\n)")
        return [(str(row[0]), str(row[1])) for row in described.result_rows]

    def in_ticks(self, text: str) -> dict[str, str | dict[str, str]]:
        """:func:`_in_ticks` of the columns of ``text`` as ClickHouse describes them;
        none when it cannot be described (read as before: microseconds)."""
        try:
            described = self.described(text)
            # a type the client does not know: InternalError
            types = [get_from_name(kind) for _, kind in described]
        except DatabaseError:
            return {}
        return _in_ticks([name for name, _ in described], types)

    def answer(self, query: str, max_rows: int, encode: Encode) -> Answer:
        text = precheck(query, self.limits)
        with self._session.lock:
            return self._answer(text, max_rows, encode, query[: len(query) - len(query.lstrip())])

    def _answer(self, text: str, max_rows: int, encode: Encode, lead: str = "") -> Answer:
        databases = NO_DATABASES
        try:
            databases = self.databases()
            root = self.explain(text, databases, lead)
            check_tree(root, text, databases)
            select = root.kind == "SelectWithUnionQuery"
            precise = hiding = False
            if select:  # every SELECT: as ClickHouse reads it
                tree = self.query_tree(text, root, databases)
                check_resolved(tree, root, databases)
                check_totals(tree)
                precise = _PRECISE.search(tree) is not None  # its columns' types are there
                hiding = _HIDING.search(tree) is not None
            started = time.perf_counter()
            columns, rows, truncated_by = self.execute(
                text,
                select=select,
                encode=encode,
                max_rows=max_rows,
                precise=precise,
                hiding=hiding,
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
        except StreamFailureError as exc:  # ClickHouse failed with part of the rows sent
            raise _clickhouse_error(exc, databases) from None
        except OperationalError as exc:
            if getattr(exc, "code", None) is not None:
                raise _clickhouse_error(exc, databases) from None
            raise SqlError("unavailable", f"ClickHouse is unavailable: {exc}", 503) from None
        except NotSupportedError as exc:  # the client's: a type it cannot decode?
            if "deserialization not supported" not in str(exc):
                raise _clickhouse_error(exc, databases) from None  # as before
            state = "AggregateFunction" in str(exc)
            raise SqlError(
                "unreadable_result",
                f"the result could not be read: {exc}"
                + (
                    " (an aggregate function's state: select its value instead, with "
                    "sumMerge(...) or finalizeAggregation(...))"
                    if state
                    else ""
                ),
            ) from None
        except ClickHouseError as exc:
            raise _clickhouse_error(exc, databases) from None
        except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as exc:
            # what the client could not make of an answer (a value it cannot convert)
            raise SqlError(
                "unreadable_result", f"the result could not be read: {type(exc).__name__}: {exc}"
            ) from None
        return Answer(columns, rows, truncated_by, round(elapsed_ms, 3))

    async def run(self, query: str, max_rows: int, encode: Encode) -> Answer:
        """The answer, its rows encoded with ``encode`` (in the query's thread: a large
        answer takes seconds to encode, and the event loop serves the writer meanwhile)."""
        async with self._lock:  # one query at a time on the session; others wait here
            return await asyncio.to_thread(self.answer, query, max_rows, encode)

    def close(self) -> None:
        self._session.close()


# 128- and 256-bit integers: JSON numbers past 64 bits are written as strings, so such a
# column is written as strings throughout, not a number in one row and a string in the
# next (ClickHouse's own JSON quotes them all too).
_WIDE_INT = re.compile(r"\bU?Int(?:128|256)\b")
# A time in a zone of its own (toTimeZone(ts, 'Europe/Berlin')): read in that zone.
_ZONED = re.compile(r"\bDateTime(?:64)?\([^)]*'(?!UTC')[^']*'")


# A DateTime64 finer than a microsecond, which a Python datetime cannot hold: when a
# query names one, every DateTime64 is read as ticks, and written by _written; in a
# column where ticks could not be found (a Dynamic's), none: _in_ticks.
_PRECISE = re.compile(r"\bDateTime64\([7-9]\b")
_AS_TICKS = {"DateTime64": "int"}
_TICKS = re.compile(r"\bDateTime64\b")
# A Time or Time64 (-999:59:59 to 999:59:59, past a Python time, and a timedelta's text
# is "1 day, 1:00:00"), read as text: ClickHouse's but for the hours' digits, three
# from clickhouse-connect ("-001:00:00.5"), which _written sets as ClickHouse prints them.
_TIME_TEXT = {"Time": "string", "Time64": "string"}
_CLOCKS = re.compile(r"\bTime(?:64)?\b")
_HOURS = re.compile(r"^(-?)0(?=\d\d:)")
# A Variant's values tagged with their member's type (TypedVariant), so _written finds
# a Time in one as in any column. A Dynamic's or JSON's values carry no type.
_READ = {**_TIME_TEXT, "Variant": "typed"}
_REWRITTEN = re.compile(r"Time|Variant|Dynamic|JSON|Object")  # what _written may change
_OPAQUE = frozenset({"Dynamic", "JSON", "Object"})  # any type inside
# A query naming a type that may hold one (as ClickHouse's analyzer resolves it: every
# expression's type is in its tree), whose columns are then described before it runs.
_HIDING = re.compile(r"\b(?:Variant|Dynamic|JSON|Object)\b")
_EPOCH = datetime(1970, 1, 1)


def _walkable(t: Any) -> bool:
    """Whether every DateTime64 a value of type ``t`` holds is where :func:`_written`
    finds it: in the type's arrays, maps, tuples and nested columns (or a
    SimpleAggregateFunction's), not in a Variant, Dynamic or JSON."""
    if t.base_type in _AS_TICKS:
        return True
    if isinstance(t, (Array, SimpleAggregateFunction)):
        return _walkable(t.element_type)
    if isinstance(t, Map):
        return _walkable(t.key_type) and _walkable(t.value_type)
    if isinstance(t, (Tuple, Nested)):
        return all(map(_walkable, t.element_types))
    return t.base_type not in _OPAQUE and not _TICKS.search(t.name)


def _in_ticks(names: Sequence[str], types: Sequence[Any]) -> dict[str, str | dict[str, str]]:
    """The ``column_formats`` reading as ticks the columns (by name) holding a DateTime64
    finer than a microsecond, each where :func:`_written` finds it; not a column whose
    times may be in a Variant, Dynamic or JSON (ticks there could not be told from
    integers): those stay microseconds."""
    kinds: dict[str, list[Any]] = {}
    for name, t in zip(names, types, strict=True):
        kinds.setdefault(name, []).append(t)
    return {
        name: dict(_AS_TICKS)
        for name, ts in kinds.items()
        if any(_PRECISE.search(t.name) for t in ts) and all(map(_walkable, ts))
    }


def _written(t: Any, value: Any) -> Any:
    """``value`` of type ``t`` as every other value is written: a DateTime64 read as
    ticks (:data:`_AS_TICKS`) to a microsecond as the datetime clickhouse-connect would
    have made (encoded as before, to the byte), a finer one as text in the same form
    with nine digits after the second (nanoseconds), in UTC (``Z``); a Time or Time64
    (read as text, :data:`_TIME_TEXT`) as ClickHouse prints it: ``-25:00:00.500``."""
    if value is None:
        return None
    if isinstance(value, TypedVariant):  # a Variant's (_READ): as its member's type
        return _member(value)
    if t.base_type in _OPAQUE:
        return _loose(value)
    if t.base_type == "DateTime64":
        if not isinstance(value, int):  # not read as ticks (_in_ticks)
            return value
        seconds, ticks = divmod(value, 10**t.scale)
        moment = _EPOCH + timedelta(seconds=seconds)
        if t.scale <= 6:
            return moment + timedelta(microseconds=ticks * 10 ** (6 - t.scale))
        return f"{moment.isoformat()}{_nanoseconds(ticks, t.scale)}Z"
    if t.base_type in _TIME_TEXT:
        return _HOURS.sub(r"\1", value, count=1)
    if isinstance(t, Array):
        return [_written(t.element_type, v) for v in value]
    if isinstance(t, SimpleAggregateFunction):
        return _written(t.element_type, value)
    if isinstance(t, Map):
        return {_written(t.key_type, k): _written(t.value_type, v) for k, v in value.items()}
    if isinstance(t, Nested):
        return [
            {k: _written(e, d[k]) for k, e in zip(t.element_names, t.element_types, strict=True)}
            for d in value
        ]
    if isinstance(t, Tuple):
        if isinstance(value, dict):  # a named tuple
            return {
                k: _written(e, value[k])
                for k, e in zip(t.element_names, t.element_types, strict=True)
            }
        return tuple(_written(e, v) for e, v in zip(t.element_types, value, strict=True))
    return value


def _member(value: TypedVariant) -> Any:
    """A Variant's value as its member's type is written: as read, unless that type may
    hold a time (or another Variant, Dynamic or JSON) to write."""
    if _REWRITTEN.search(value.type_name) is None:
        return value.value
    return _written(get_from_name(value.type_name), value.value)


def _loose(value: Any) -> Any:
    """``value`` of a Dynamic or JSON with the Variants inside it (:data:`_READ`) written
    as their members' types. A Time there that no Variant types is clickhouse-connect's
    text, three hour digits: it cannot be told from a String that reads the same."""
    if isinstance(value, TypedVariant):  # a JSON's path typed as a Variant
        return _member(value)
    if isinstance(value, list):
        return [_loose(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_loose(v) for v in value)
    if isinstance(value, dict):
        return {_loose(k): _loose(v) for k, v in value.items()}
    return value


def _nanoseconds(ticks: int, scale: int) -> str:
    """The fraction of a second past the whole ones, as nine digits (none if none)."""
    return f".{ticks * 10 ** (9 - scale):09d}" if ticks else ""


def _fixed(row: Sequence[Any], fixes: list[tuple[int, Callable[[Any], Any]]]) -> list[Any]:
    out = list(row)
    for i, fix in fixes:
        out[i] = fix(out[i])
    return out


def _times_in_utc(value: Any) -> Any:
    if isinstance(value, datetime):
        return value if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, (list, tuple)):
        return [_times_in_utc(v) for v in value]
    if isinstance(value, dict):  # a map's keys too: Map(DateTime('Asia/Tokyo'), ...)
        return {_times_in_utc(k): _times_in_utc(v) for k, v in value.items()}
    return value


def _ints_as_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_ints_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints_as_text(v) for k, v in value.items()}
    return value


# What a column of such a type needs before it is encoded: a 128- or 256-bit integer
# as text (a JSON number would lose digits), a time in UTC as every other.
_FIXES: tuple[tuple[re.Pattern[str], Callable[[Any], Any]], ...] = (
    (_WIDE_INT, _ints_as_text),
    (_ZONED, _times_in_utc),
)


def _columns(names: Sequence[str], types: Sequence[Any]) -> list[dict[str, str]]:
    return [{"name": n, "type": t.name} for n, t in zip(names, types, strict=True)]


def _encoded(
    blocks: Iterable[Iterable[Sequence[Any]]], encode: Encode, max_rows: int, limits: SqlLimits
) -> tuple[list[bytes], TruncatedBy | None]:
    """The rows of ``blocks`` encoded, up to ``max_rows`` of them and
    ``limits.max_answer_bytes`` bytes; and which limit cut them short, if one did."""
    room = limits.max_answer_bytes
    rows: list[bytes] = []
    for block in blocks:
        for row in block:
            if len(rows) == max_rows:
                return rows, "max_rows"
            line = encode(row)
            room -= len(line)
            if room < 0:
                return rows, "max_answer_bytes"
            rows.append(line)
    return rows, None


TIMEOUT_EXCEEDED = 159


def timed_out(exc: ClickHouseError) -> bool:
    """Whether the store stopped ``exc``'s query at its time limit (code 159; chDB gives
    the code only in the message)."""
    return getattr(exc, "code", None) == TIMEOUT_EXCEEDED or "TIMEOUT_EXCEEDED" in str(exc)


EXPLAIN = "EXPLAIN AST "
_SETTING_REFUSED = re.compile(r"Cannot modify '[^']*' setting in readonly mode")
QUERY_TREE = "EXPLAIN QUERY TREE passes = 1 "
# What ClickHouse's parser says of where it failed (bytes from the start of what it
# parsed, 1-based): each said once, before or after the query text it echoes.
_FAILED_AT = re.compile(r"(Syntax error: failed at position )(\d+)")
_NEVER_CLOSED = re.compile(r"('.' at position )(\d+)( is never closed)")
_LINE_COL = re.compile(r"\(line (\d+), col (\d+)\)")


def _in_query(message: str, lead: str) -> str:
    """A parser error's positions, lines and columns in the query as sent: not counting
    llmtap's ``EXPLAIN AST`` before it, counting what was trimmed (``lead``)."""
    shift = len(lead.encode()) - len(EXPLAIN)
    first_line = len(lead[lead.rfind("\n") + 1 :].encode()) - len(EXPLAIN)
    newlines = lead.count("\n")

    def line_col(m: re.Match[str]) -> str:
        line, col = int(m[1]), int(m[2])
        return f"(line {line + newlines}, col {col + first_line if line == 1 else col})"

    message = _FAILED_AT.sub(lambda m: f"{m[1]}{int(m[2]) + shift}", message, count=1)
    message = _NEVER_CLOSED.sub(lambda m: f"{m[1]}{int(m[2]) + shift}{m[3]}", message, count=1)
    return _LINE_COL.sub(line_col, message, count=1)


_REPEATED_CODE = re.compile(r"^(Code: \d+\. DB::Exception: )(?:\1)+")


def _row_binary_string(raw: bytes) -> bytes:
    """The one String of a one-row RowBinary answer (its length, LEB128, then bytes);
    ValueError for anything else (none, or cut short)."""
    length, shift = 0, 0
    for at, byte in enumerate(raw[:10]):
        length |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            if len(raw) != at + 1 + length:
                break
            return raw[at + 1 :]
    raise ValueError(f"not one String in RowBinary ({len(raw)} bytes)")


NO_DATABASES = Databases("", frozenset())  # before they are known: no hint is dropped


def _clickhouse_error(exc: ClickHouseError, databases: Databases = NO_DATABASES) -> SqlError:
    # chDB may give the code twice ("Code: 164. DB::Exception: Code: 164. DB::...").
    message = _REPEATED_CODE.sub(r"\1", str(exc).strip()) or type(exc).__name__
    message = without_hints(message, databases)
    if len(message) > 2000:
        message = message[:2000] + "…"
    if timed_out(exc):
        return SqlError("timeout", f"the query ran past its time limit: {message}")
    return SqlError("clickhouse_error", message)
