"""POST /api/v1/sql: one read-only query on ClickHouse, for admin keys, as JSON or CSV.

Three lines of defence, each enough on its own for what it covers:

1. Before ClickHouse sees the text: exactly one statement (a ``;`` may only end it),
   and no ``INTO OUTFILE`` (which chDB, running in this process, would write).
2. ClickHouse's own parser: ``EXPLAIN AST <query>`` (parsing only, nothing runs) gives
   the syntax tree, which must be one SELECT (or WITH ... SELECT), SHOW TABLES /
   COLUMNS / CREATE TABLE, DESCRIBE or EXPLAIN of a SELECT, without a FORMAT clause;
   it may not name a ``system`` or ``information_schema`` table, a table function
   other than the generators in :data:`TABLE_FUNCTIONS`, or any function that reads
   files, the network or dictionaries (:data:`DENIED_FUNCTIONS`).
3. The query runs on its own ClickHouse session, opened with ``readonly=1`` and the
   limits (time, result rows and bytes, memory) as session settings: ClickHouse
   itself refuses any write, DDL or settings change, whatever got past 1 and 2.

The answer is bounded in this process too (it is the store's): a SELECT's rows are read
a block at a time and encoded as they come, and the query is cancelled once the answer
holds ``max_rows`` rows or ``max_answer_bytes`` bytes of them; the answer says which.

That session is a second client on the store's DSN (for chDB, a second handle on the
same engine), so a long query never holds the store's lock (the writer and the
analytics endpoints go on), and the writer's session never carries these settings.
SQL is admin-only: chDB has no users or row policies, so a query cannot be confined
to one tenant by the server; virtual keys use the analytics endpoints instead.
"""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import math
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any, Literal
from uuid import UUID

import orjson
from aiohttp import web
from clickhouse_connect.driver.exceptions import (
    ClickHouseError,
    DatabaseError,
    OperationalError,
    StreamFailureError,
)

from sql.params import BadParameter
from sql.store import Store, connect

FORMATS = ("json", "csv")


@dataclass(frozen=True)
class SqlLimits:
    """What one query may take. The time, row and memory limits are ClickHouse's."""

    timeout_s: float = 30.0  # max_execution_time
    max_rows: int = 10_000  # the most rows a request may ask for
    default_rows: int = 1_000  # when it does not say
    max_query_chars: int = 100_000
    max_memory_bytes: int = 2 * 1024**3  # max_memory_usage (chDB runs in this process)
    # The most bytes of rows an answer holds, as encoded for the response. The store
    # process (writer and API) holds the answer: without this, 10,000 wide rows could
    # take gigabytes of it. Rows are read a block at a time and the answer stops short.
    max_answer_bytes: int = 64 * 1024**2

    def session_settings(self) -> dict[str, Any]:
        """The read-only session's settings; ``readonly`` last (it freezes the rest)."""
        return {
            "max_execution_time": self.timeout_s,
            "timeout_overflow_mode": "throw",
            # One row more than any request may ask for: more than that, and the
            # answer says truncated. "break" stops reading once it is exceeded.
            "max_result_rows": self.max_rows + 1,
            "result_overflow_mode": "break",
            "max_memory_usage": self.max_memory_bytes,
            # A ClickHouse server stops sending past this (chDB: the stream is cancelled
            # once the answer is full). ClickHouse counts a row's bytes in memory, which
            # for rows wide enough to matter is about what they take encoded: four times
            # the answer's limit is never reached first.
            "max_result_bytes": 4 * self.max_answer_bytes,
            # No max_block_size: the answer is read a block at a time, so a block is what
            # is held beyond it, but smaller blocks slow every query down (2,048: GROUP
            # BY over 50M rows ~1.9x). ClickHouse's own are 65,409 rows, and rows read
            # from a table come in blocks of about 1 MB (preferred_block_size_bytes).
            "session_timezone": "UTC",
            "readonly": 1,
        }


# -- refusals ---------------------------------------------------------------------------


class SqlError(BadParameter):
    """A query that is refused or failed: 400, naming the ``query`` field, with a code."""

    def __init__(self, code: str, message: str, status: int = 400, param: str = "query") -> None:
        super().__init__(param, message)
        self.code = code
        self.status = status


ALLOWED = (
    "SELECT (or WITH ... SELECT), SHOW TABLES, SHOW COLUMNS, SHOW CREATE TABLE, DESCRIBE, EXPLAIN"
)

# The root node of each statement this endpoint runs, as EXPLAIN AST names it.
READ_ROOTS = frozenset(
    {"SelectWithUnionQuery", "Explain", "DescribeQuery", "ShowTables", "ShowColumns",
     "ShowCreateTableQuery"}
)  # fmt: skip
# "SHOW DATABASES", "SHOW SETTINGS"... share ShowTables' node: only these forms pass.
SHOW_FORMS = re.compile(r"\s*SHOW\s+(?:(?:FULL|EXTENDED)\s+)*(?:TABLES|COLUMNS|CREATE)\b", re.I)
SYSTEM_WORD = re.compile(r"\b(?:system|information_schema)\b", re.I)
SYSTEM_DATABASES = frozenset({"system", "information_schema"})

# Table functions that only generate rows (no files, network, other tables' engines).
TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries",
     "values", "generaterandom", "view"}
)  # fmt: skip
# Functions that read files, the network, other servers or dictionaries: refused
# wherever they appear (as a table function or in an expression).
DENIED_FUNCTIONS = frozenset(
    name.lower()
    for name in (
        "file", "fileCluster", "url", "urlCluster", "s3", "s3Cluster", "gcs", "oss", "cosn",
        "hdfs", "hdfsCluster", "azureBlobStorage", "azureBlobStorageCluster", "remote",
        "remoteSecure", "cluster", "clusterAllReplicas", "mysql", "postgresql", "jdbc",
        "odbc", "mongodb", "redis", "sqlite", "input", "executable", "executablePool",
        "dictionary", "iceberg", "icebergS3", "icebergAzure", "icebergHDFS",
        "icebergLocal", "icebergS3Cluster", "icebergAzureCluster", "icebergHDFSCluster",
        "deltaLake", "deltaLakeS3", "deltaLakeAzure", "deltaLakeLocal", "deltaLakeCluster",
        "hudi", "hudiCluster", "paimon", "arrowFlight", "ytsaurus",
        "catboostEvaluate", "filesystemAvailable", "filesystemCapacity", "filesystemUnreserved",
    )
)  # fmt: skip
DENIED_PREFIXES = ("dict",)  # dictGet, dictHas, dictGetOrDefault, dictGetHierarchy...


def _refuse(code: str, message: str) -> SqlError:
    return SqlError(code, message)


def precheck(query: str, limits: SqlLimits) -> str:
    """The statement to parse: one, trimmed of whitespace and a final ``;``."""
    if len(query) > limits.max_query_chars:
        raise _refuse("too_long", f"the query is longer than {limits.max_query_chars} characters")
    if "\x00" in query:
        raise _refuse("bad_query", "the query contains a NUL character")
    text = query.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise _refuse("bad_query", "the query is empty")
    if ";" in text:  # even inside a string: one statement per request, no guessing
        raise _refuse(
            "multiple_statements",
            "one statement per request: a ';' may only end the query "
            "(inside a string, write char(59))",
        )
    if _OUTFILE.search(text):  # even inside a string, as ";" above
        raise _refuse(
            "not_read_only",
            "INTO OUTFILE is not allowed: the answer is the response (the word OUTFILE is "
            "refused anywhere; in a string, write concat('out', 'file'))",
        )
    return text


# The word OUTFILE, wherever it is: after a SHOW, INTO OUTFILE is only a literal in the
# syntax tree, and ClickHouse takes characters Python's \s does not (U+200B...) as
# spaces between INTO and OUTFILE, so no pattern of the two words is safe. Only the
# word: "outfile_count" or 'into_outfile' are other words.
_OUTFILE = re.compile(r"\boutfile\b", re.IGNORECASE)


@dataclass
class Node:
    """One node of ``EXPLAIN AST``'s tree: its kind, the rest of its line, its children."""

    kind: str
    detail: str
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A Function's or Identifier's name (the detail's first word)."""
        return self.detail.split(" ", 1)[0] if self.detail else ""

    def walk(self) -> list[Node]:
        nodes, stack = [], [self]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(reversed(node.children))
        return nodes


_NODE = re.compile(r" *[A-Za-z]")
_SUFFIX = re.compile(r"\s*\((?:children \d+|alias [^)]*)\)\s*$")


def parse_ast(lines: Sequence[str]) -> Node:
    """The tree printed by ``EXPLAIN AST``: one node per line, one space of indent per level.

    An alias or identifier holding a newline prints as more than one line, which reads
    as extra nodes. They can only add to the tree (a second root, more children: both
    refused), never hide a real node or come between a TableExpression and its table,
    which is always the very next line: a crafted name makes the checks stricter only.
    """
    root: Node | None = None
    stack: list[Node] = []
    for line in lines:
        if not line.strip():
            continue
        if not _NODE.match(line):  # not a tree (EXPLAIN options can change its form)
            raise _refuse("bad_query", "ClickHouse's syntax tree of this query is unreadable")
        depth = len(line) - len(line.lstrip(" "))
        text = line.strip()
        while True:  # drop "(children N)" and "(alias x)", in whichever order
            stripped = _SUFFIX.sub("", text)
            if stripped == text:
                break
            text = stripped
        kind, _, detail = text.partition(" ")
        del stack[depth:]
        parent = stack[-1] if stack else None
        node = Node(kind, detail.strip(), parent)
        if parent is None:
            if root is not None:
                raise _refuse("multiple_statements", "one statement per request")
            root = node
        else:
            parent.children.append(node)
        stack.append(node)
    if root is None:
        raise _refuse("bad_query", "the query is empty")
    return root


_LEADING = re.compile(r"\s+|--[^\n]*|#[^\n]*|/\*.*?\*/", re.S)


def _first_word(text: str) -> str:
    """The statement's first keyword, past comments (for messages only)."""
    at = 0
    while match := _LEADING.match(text, at):
        if match.end() == at:
            break
        at = match.end()
    word = re.match(r"[A-Za-z]+", text[at:])
    return word[0].upper() if word else ""


def check_tree(root: Node, text: str) -> None:
    """Refuse (:class:`SqlError`) anything but one read-only statement on user tables."""
    first = _first_word(text)
    if root.kind not in READ_ROOTS:
        raise _refuse(
            "not_read_only",
            f"only read-only statements run here ({ALLOWED}); this one is {first or root.kind}",
        )
    if root.kind.startswith("Show"):
        if not SHOW_FORMS.match(text):
            raise _refuse(
                "not_read_only",
                "of the SHOW statements, only SHOW TABLES, SHOW COLUMNS and SHOW CREATE TABLE "
                "run here",
            )
        if SYSTEM_WORD.search(text):
            raise _refuse(
                "forbidden_table", "system and information_schema tables are not available"
            )
        if "\\" in text:  # a name spelled with escapes could hide the word from the check
            raise _refuse("forbidden_table", "escape sequences are not allowed in SHOW statements")
    for node in root.walk():
        if node.kind == "Function":
            name = node.name.lower()
            in_from = node.parent is not None and node.parent.kind == "TableExpression"
            if name in DENIED_FUNCTIONS or name.startswith(DENIED_PREFIXES):
                raise _refuse(
                    "forbidden_function",
                    f"function {node.name!r} is not allowed: it reads files, the network, "
                    "other servers or dictionaries",
                )
            if in_from and name not in TABLE_FUNCTIONS:
                raise _refuse(
                    "forbidden_function",
                    f"table function {node.name!r} is not allowed; only "
                    "numbers, zeros, generate_series, values, generateRandom and view are",
                )
        elif node.kind in ("TableIdentifier", "Identifier"):
            database = node.name.strip('`"').split(".", 1)[0].strip('`"').lower()
            if database in SYSTEM_DATABASES:
                raise _refuse(
                    "forbidden_table",
                    f"{node.name!r}: system and information_schema tables are not available",
                )
    # EXPLAIN [kind] [options] SELECT: its options (indexes = 1, header = 1...) are a Set.
    if root.kind == "Explain" and [c.kind for c in root.children if c.kind != "Set"] != [
        "SelectWithUnionQuery"
    ]:
        raise _refuse("not_read_only", "EXPLAIN runs here for a SELECT only, without FORMAT")
    if root.kind in ("SelectWithUnionQuery", "DescribeQuery") and len(root.children) != 1:
        raise _refuse(
            "bad_query",
            "FORMAT and INTO OUTFILE clauses are not allowed: choose the output with the "
            'request\'s "format" field',
        )


# -- running ----------------------------------------------------------------------------


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
    """The read-only session, opened on first use; one query at a time."""

    def __init__(self, dsn: str, limits: SqlLimits) -> None:
        self.dsn = dsn
        self.limits = limits
        self._client: Any = None
        self._lock = asyncio.Lock()
        # Also per thread: a request cancelled mid-query leaves its thread running.
        self._session = threading.Lock()

    def _connection(self) -> Any:
        if self._client is None:
            self._client = connect(self.dsn, self.limits.session_settings())
        return self._client

    def explain(self, text: str, lead: str = "") -> Node:
        """``text``'s tree; a syntax error's positions are given in the query it was
        trimmed from (``lead``: what was trimmed before it)."""
        # A command, not a query: query() would append "FORMAT Native", which the
        # parser may attach to the statement inside the EXPLAIN. The answer is
        # TabSeparated (escaping only inside a line: one line per node).
        try:
            result = self._connection().command(EXPLAIN + text)
        except DatabaseError as exc:
            message = _clickhouse_error(exc).message
            placed = _in_query(message, lead)
            if placed == message:
                raise
            raise SqlError("clickhouse_error", placed) from None
        body = "\t".join(map(str, result)) if isinstance(result, list) else str(result)
        return parse_ast(body.split("\n"))

    def execute(
        self, text: str, *, select: bool, encode: Encode, max_rows: int
    ) -> tuple[list[dict[str, str]], list[bytes], TruncatedBy | None]:
        """Run ``text`` as is (the checks are the caller's): its columns, and its rows
        encoded until ``max_rows`` rows or the answer's bytes (``max_answer_bytes``)
        would be passed. A SELECT is read a block at a time and cancelled there; the
        other statements (SHOW, DESCRIBE, EXPLAIN: small answers, which chDB does not
        stream) are read whole."""
        client = self._connection()
        if not select:
            result = client.query(text, query_tz="UTC")
            columns = _columns(result.column_names, result.column_types)
            return (columns, *_encoded([result.result_rows], encode, max_rows, self.limits))
        with client.query_row_block_stream(text, query_tz="UTC") as stream:
            columns = _columns(stream.source.column_names, stream.source.column_types)
            wide = [i for i, c in enumerate(columns) if _WIDE_INT.search(c["type"])]
            blocks = stream if not wide else ([_text_ints(r, wide) for r in b] for b in stream)
            rows, truncated_by = _encoded(blocks, encode, max_rows, self.limits)
        if not columns:
            # No rows, and chDB's Native output then has no columns either: ask for them.
            described = client.query(f"DESCRIBE TABLE (\n{text}\n)")
            columns = [{"name": str(r[0]), "type": str(r[1])} for r in described.result_rows]
        return columns, rows, truncated_by

    def answer(self, query: str, max_rows: int, encode: Encode) -> Answer:
        text = precheck(query, self.limits)
        with self._session:
            return self._answer(text, max_rows, encode, query[: len(query) - len(query.lstrip())])

    def _answer(self, text: str, max_rows: int, encode: Encode, lead: str = "") -> Answer:
        try:
            root = self.explain(text, lead)
            check_tree(root, text)
            started = time.perf_counter()
            columns, rows, truncated_by = self.execute(
                text, select=root.kind == "SelectWithUnionQuery", encode=encode, max_rows=max_rows
            )
            elapsed_ms = (time.perf_counter() - started) * 1000
        except StreamFailureError as exc:  # ClickHouse failed with part of the rows sent
            raise _clickhouse_error(exc) from None
        except OperationalError as exc:
            if getattr(exc, "code", None) is not None:
                raise _clickhouse_error(exc) from None
            raise SqlError("unavailable", f"ClickHouse is unavailable: {exc}", 503) from None
        except ClickHouseError as exc:
            raise _clickhouse_error(exc) from None
        except (ValueError, TypeError, KeyError, IndexError, NotImplementedError) as exc:
            # e.g. a column type the client cannot decode (AggregateFunction states)
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
        with self._session:
            if self._client is not None:
                self._client.close()
                self._client = None


# 128- and 256-bit integers: JSON numbers past 64 bits are written as strings, so such a
# column is written as strings throughout, not a number in one row and a string in the
# next (ClickHouse's own JSON quotes them all too).
_WIDE_INT = re.compile(r"\bU?Int(?:128|256)\b")


def _text_ints(row: Sequence[Any], wide: list[int]) -> list[Any]:
    out = list(row)
    for i in wide:
        out[i] = _ints_as_text(out[i])
    return out


def _ints_as_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_ints_as_text(v) for v in value]
    if isinstance(value, dict):
        return {k: _ints_as_text(v) for k, v in value.items()}
    return value


def _columns(names: Sequence[str], types: Sequence[Any]) -> list[dict[str, str]]:
    return [{"name": n, "type": t.name} for n, t in zip(names, types, strict=True)]


def _encoded(
    blocks: Iterable[Sequence[Sequence[Any]]], encode: Encode, max_rows: int, limits: SqlLimits
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


def _clickhouse_error(exc: ClickHouseError) -> SqlError:
    # chDB may give the code twice ("Code: 164. DB::Exception: Code: 164. DB::...").
    message = _REPEATED_CODE.sub(r"\1", str(exc).strip()) or type(exc).__name__
    if len(message) > 2000:
        message = message[:2000] + "…"
    if timed_out(exc):
        return SqlError("timeout", f"the query ran past its time limit: {message}")
    return SqlError("clickhouse_error", message)


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
    return SqlRequest(query=query, format=fmt, max_rows=max_rows)


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
        return {str(_deep(k)): _deep(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_deep(v) for v in value]
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, bool | float | str | date) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    return _plain(value)


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
    store: web.AppKey[Store], limits: SqlLimits
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the app's :class:`SqlRunner` on the DSN of ``app[store]``."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        runner = app[SQL] = SqlRunner(app[store].dsn, limits)
        yield
        await asyncio.to_thread(runner.close)

    return context
