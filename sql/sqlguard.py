"""What a query sent to POST /api/v1/sql may be, judged before it runs: the first two
of the endpoint's three lines of defence (sql/sqlapi.py).

1. Before ClickHouse sees the text (:func:`precheck`): exactly one statement (a ``;``
   may only end it), and no ``INTO OUTFILE`` (which chDB, running in this process,
   would write).
2. ClickHouse's own parser (:func:`check_tree`, over ``EXPLAIN AST``'s tree, read by
   sql/sqltree.py): one SELECT (or WITH ... SELECT), SHOW TABLES / COLUMNS /
   CREATE TABLE (in the plain forms of :data:`SHOW_FORM` only), DESCRIBE or EXPLAIN of
   a SELECT, without a FORMAT clause; no ``system`` or ``information_schema`` table, no
   table of a database but the store's own, nor of the store's database one its
   system.tables does not list (sql/sqlnames.py: a ClickHouse server may hold other
   applications' data, chDB reads files as tables), no
   table function but the generators in :data:`TABLE_FUNCTIONS`, no function but those
   of the allowlist in sql/sql_functions.txt (:data:`FUNCTIONS`): those that compute
   on values, none that reads files, the network, dictionaries or the server's state.
   A SELECT is judged on the analyzer's resolution too (sql/sqlnames.py, over
   ``EXPLAIN QUERY TREE``): a bare name it calls as a function off the list (``user``),
   a table not the store's. A table or IN set only the analyzer can resolve makes its
   answer one refusal, whatever it does; such a name, or a bare one
   (:func:`~sql.sqlnames.unresolved`), refuses an EXPLAIN or DESCRIBE.

And what a query may take (:class:`SqlLimits`), which the read-only session it runs on
sets as ClickHouse settings (the third line, sql/sqlrun.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sql.params import SqlError
from sql.sqlfunctions import FUNCTIONS
from sql.sqlnames import (
    IN_FUNCTIONS,
    Databases,
    bare_calls,
    bare_message,
    not_ours,
    settings_refusal,
    unresolved,
)
from sql.sqltree import Node
from sql.store import READ_MAX_MEMORY_BYTES


@dataclass(frozen=True)
class SqlLimits:
    """What one query may take. The time, row and memory limits are ClickHouse's."""

    timeout_s: float = 30.0  # max_execution_time
    max_rows: int = 10_000  # the most rows a request may ask for
    default_rows: int = 1_000  # when it does not say
    max_query_chars: int = 100_000
    max_memory_bytes: int = READ_MAX_MEMORY_BYTES  # max_memory_usage: the API's reads' too
    # The most bytes of rows an answer holds, as encoded for the response. The store
    # process (writer and API) holds the answer: without this, 10,000 wide rows could
    # take gigabytes of it. Rows are read a block at a time and the answer stops short.
    max_answer_bytes: int = 64 * 1024**2

    def session_settings(self, *, embedded: bool) -> dict[str, Any]:
        """The read-only session's settings on chDB (``embedded``) or a ClickHouse
        server; ``readonly`` last (it freezes the rest)."""
        settings: dict[str, Any] = {
            "max_execution_time": self.timeout_s,
            "timeout_overflow_mode": "throw",
            # One row more than any request may ask for: more than that, and the
            # answer says truncated. "break" stops reading once it is exceeded.
            "max_result_rows": self.max_rows + 1,
            "result_overflow_mode": "break",
            "max_memory_usage": self.max_memory_bytes,
            # No max_block_size: the answer is read a block at a time, so a block is what
            # is held beyond it, but smaller blocks slow every query down (2,048: GROUP
            # BY over 50M rows ~1.9x). ClickHouse's own are 65,409 rows, and rows read
            # from a table come in blocks of about 1 MB (preferred_block_size_bytes).
            "session_timezone": "UTC",
            "allow_introspection_functions": 0,
        }
        if not embedded:
            # What a server sends past a full answer is read and dropped (clickhouse-
            # connect drains the response it closes): it stops sending past this. It
            # counts rows as they are in memory, and "break" stops without a word, so a
            # few rows far wider in memory than encoded (NULLs of a wide Nullable tuple)
            # can end an answer here that says it is whole. chDB has no such limit: its
            # stream is cancelled at once, and this one cut 8,000 such rows to 4,500.
            settings["max_result_bytes"] = 4 * self.max_answer_bytes
        return {**settings, "readonly": 1}


ALLOWED = (
    "SELECT (or WITH ... SELECT), SHOW TABLES, SHOW COLUMNS, SHOW CREATE TABLE, DESCRIBE, EXPLAIN"
)

# The root node of each statement this endpoint runs, as EXPLAIN AST names it.
READ_ROOTS = frozenset(
    {"SelectWithUnionQuery", "Explain", "DescribeQuery", "ShowTables", "ShowColumns",
     "ShowCreateTableQuery"}
)  # fmt: skip
# The SHOW statements that run, whole: names, a LIKE pattern and a LIMIT number, nothing
# else. "SHOW DATABASES", "SHOW SETTINGS"... share ShowTables' node, and EXPLAIN AST
# leaves out a SHOW's WHERE and LIMIT, so an expression there (file(...) in
# "SHOW TABLES WHERE ...") would not be checked: the text itself is held to this form.
_NAME = r"(?:`[^`\\]*`|\"[^\"\\]*\"|[A-Za-z_][A-Za-z0-9_]*)"
_TABLE = rf"{_NAME}(?:\s*\.\s*{_NAME})?"
_IN = r"\s+(?:FROM|IN)\s+"
SHOW_FORM = re.compile(
    rf"""\s*SHOW\s+(?:(?:FULL|EXTENDED)\s+)*
    (?:TABLES(?:{_IN}(?P<tables_db>{_NAME}))?
      |COLUMNS{_IN}(?P<columns_of>{_TABLE})(?:{_IN}(?P<columns_db>{_NAME}))?
      |CREATE\s+(?:TEMPORARY\s+)?(?:TABLE\s+|VIEW\s+)?(?P<create_of>{_TABLE}))
    (?:\s+(?:NOT\s+)?I?LIKE\s+(?P<pattern>'[^'\\]*'))?
    (?:\s+LIMIT\s+[0-9]+)?\s*""",
    re.I | re.X,
)
SHOW_FORMS_TEXT = (
    "SHOW TABLES [FROM db] [[NOT] [I]LIKE 'pattern'] [LIMIT n], "
    "SHOW COLUMNS FROM table [FROM db] [[NOT] [I]LIKE 'pattern'] [LIMIT n] "
    "and SHOW CREATE TABLE table"
)
SYSTEM_WORD = re.compile(r"\b(?:system|information_schema)\b", re.I)
SYSTEM_DATABASES = frozenset({"system", "information_schema"})
_TABLE_PARTS = re.compile(rf"({_NAME})(?:\s*\.\s*({_NAME}))?")


def _unquoted(name: str) -> str:
    return name[1:-1] if name[:1] in '`"' and name[-1:] == name[:1] and len(name) > 1 else name


def _show_databases(show: re.Match[str]) -> list[str]:
    """The databases a SHOW statement (held to SHOW_FORM) names: a table named with a
    dot (`secret.csv`, a file to chDB's default database) is read as database.table,
    as the tree prints it."""
    named = [_unquoted(name) for name in (show["tables_db"], show["columns_db"]) if name]
    for table in (show["columns_of"], show["create_of"]):
        parts = _TABLE_PARTS.fullmatch(table) if table else None
        if parts is None:
            continue
        if parts[2] is not None:  # database.table
            named.append(_unquoted(parts[1]))
        elif "." in _unquoted(parts[1]):
            named.append(_unquoted(parts[1]).split(".", 1)[0])
    return named


# Table functions that only generate rows (no files, network, other tables' engines).
# Not values() or generateRandom(): their structure string declares columns, and a
# column's ALIAS or DEFAULT is an expression ClickHouse evaluates that the syntax tree
# holds only as a string ('b String ALIAS file(...)'), possibly built by a function.
# Not view(): its query is what a subquery in FROM does, but the analyzer's tree
# (check_resolved) leaves it unresolved, so what its names are could not be told (a
# red-team pass read a file as the set of an IN inside one).
TABLE_FUNCTIONS = frozenset(
    {"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series", "generateseries"}
)  # fmt: skip
# The syntax tree's nodes a query may hold: each of these prints every expression under
# it. A node that does not (or a syntax added by a later ClickHouse) is refused, not
# trusted: "* APPLY file" shows as a bare ColumnsApplyTransformer, its function, lambda
# (and any subquery in it) and parameters left out. Found by running EXPLAIN AST over
# llmtap's own analytics queries and over a battery of every SELECT clause.
ALLOWED_NODES = frozenset(
    {
        # roots (READ_ROOTS)
        "SelectWithUnionQuery", "Explain", "DescribeQuery", "ShowTables", "ShowColumns",
        "ShowCreateTableQuery",
        # query structure
        "SelectQuery", "SelectIntersectExceptQuery", "Subquery", "WithElement",
        "ExpressionList", "TablesInSelectQuery", "TablesInSelectQueryElement",
        "TableExpression", "TableIdentifier", "TableJoin", "ArrayJoin", "SampleRatio",
        "OrderByElement", "InterpolateElement", "WindowDefinition", "WindowListElement",
        # SETTINGS and EXPLAIN's options: values only (readonly=1 refuses any change)
        "Set",
        # expressions
        "Function", "Identifier", "Literal", "Asterisk", "QualifiedAsterisk",
        "ColumnsRegexpMatcher", "QualifiedColumnsRegexpMatcher", "ColumnsListMatcher",
        "QualifiedColumnsListMatcher", "ColumnsTransformerList", "ColumnsExceptTransformer",
        "ColumnsReplaceTransformer", "ColumnsReplaceTransformer::Replacement",
    }
)  # fmt: skip
NODE_REFUSALS = {
    "ColumnsApplyTransformer": "APPLY is not allowed (ClickHouse's syntax tree does not show "
    "the function it applies): write the function around each column instead",
}
# Functions that take an aggregate function as a string and parse it when they run, its
# parameters with it (arrayReduce('groupConcat(file(...))', ...) read the file): only a
# bare name is allowed ('sum', 'uniqIf'), as a literal.
AGGREGATE_BY_NAME = frozenset({"arrayreduce", "arrayreduceinranges", "initializeaggregation"})
_BARE_NAME = re.compile(r"\\'[A-Za-z_][A-Za-z0-9_]*\\'")  # as EXPLAIN AST prints 'sum'


def _aggregate_named(node: Node) -> bool:
    """Whether an arrayReduce-like call's first argument is a bare name, literally, and
    the call has no parameters (a second list, which would hold the string instead)."""
    if len(node.children) != 1:
        return False
    args = node.children[0].children
    return bool(args) and args[0].kind == "Literal" and bool(_BARE_NAME.fullmatch(args[0].detail))


def _refuse(code: str, message: str) -> SqlError:
    return SqlError(code, message)


# A SELECT ... WITH TOTALS, as the analyzer's tree says it (its syntax tree does not):
# ClickHouse sends the totals row apart from the rows, and an answer holds the rows
# only, so the total was left out of an answer that said it was whole.
_WITH_TOTALS = re.compile(r"\bis_group_by_with_totals: 1\b")


def check_totals(tree: str) -> None:
    """Refuse a SELECT with WITH TOTALS (``tree``: its ``EXPLAIN QUERY TREE``)."""
    if _WITH_TOTALS.search(tree):
        raise _refuse(
            "bad_query",
            "WITH TOTALS is not answered here: ClickHouse sends its totals apart from the "
            "rows, and the answer holds rows only; for a total as a row, GROUP BY "
            "ROLLUP(...) (or GROUPING SETS, or a UNION ALL of the total)",
        )


def precheck(query: str, limits: SqlLimits) -> str:
    """The statement to parse: one, trimmed of whitespace and a final ``;``."""
    if len(query) > limits.max_query_chars:
        raise _refuse("too_long", f"the query is longer than {limits.max_query_chars} characters")
    if "\x00" in query:
        raise _refuse("bad_query", "the query contains a NUL character")
    text = query.strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text or _past_comments(text) == len(text):  # ClickHouse would say less
        raise _refuse("bad_query", "the query is empty (comments alone are no statement)")
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


_LEADING = re.compile(r"\s+|--[^\n]*|#[^\n]*")


def _past_comments(text: str) -> int:
    """Where the statement begins: past leading whitespace and comments (ClickHouse's
    ``/* */`` nest)."""
    at = 0
    while True:
        if text.startswith("/*", at):
            start, depth, at = at, 1, at + 2
            while depth and at < len(text):
                if text.startswith("/*", at):
                    depth, at = depth + 1, at + 2
                elif text.startswith("*/", at):
                    depth, at = depth - 1, at + 2
                else:
                    at += 1
            if depth:
                return start  # unclosed: ClickHouse says so
            continue
        match = _LEADING.match(text, at)
        if match is None or match.end() == at:
            return at
        at = match.end()


def _first_word(text: str) -> str:
    """The statement's first keyword, past comments (for messages only)."""
    word = re.match(r"[A-Za-z]+", text[_past_comments(text) :])
    return word[0].upper() if word else ""


def check_tree(root: Node, text: str, databases: Databases) -> None:
    """Refuse (:class:`SqlError`) anything but one read-only statement on the tables of
    the store's database (``databases``)."""
    first = _first_word(text)
    if root.kind not in READ_ROOTS:
        raise _refuse(
            "not_read_only",
            f"only read-only statements run here ({ALLOWED}); this one is {first or root.kind}",
        )
    if root.kind.startswith("Show"):
        if "\\" in text:  # a name spelled with escapes could hide a word from the checks
            raise _refuse("forbidden_table", "escape sequences are not allowed in SHOW statements")
        show = SHOW_FORM.fullmatch(text)
        if show is None:
            raise _refuse(
                "not_read_only",
                f"of the SHOW statements, only {SHOW_FORMS_TEXT} run here (no WHERE, no "
                "expressions, no comments; for more, SELECT from the table)",
            )
        # The names, not the LIKE pattern: a pattern only filters the store's own tables
        # by name ('%system%' lists none of ClickHouse's, which are not in its database).
        names = text
        if show["pattern"] is not None:
            names = text[: show.start("pattern")] + text[show.end("pattern") :]
        if SYSTEM_WORD.search(names):
            raise _refuse(
                "forbidden_table", "system and information_schema tables are not available"
            )
        if "/" in names:  # a name with a '/' is a file in chDB's default database
            raise _refuse("forbidden_table", "a file is not a table here")
        for database in _show_databases(show):  # a database it names: the store's only
            if database != databases.current:  # case-sensitive, as ClickHouse's names
                raise not_ours(database, databases)
    # EXPLAIN [kind] [options] SELECT: its options (indexes = 1, header = 1...) are a Set.
    if root.kind == "Explain" and [c.kind for c in root.children if c.kind != "Set"] != [
        "SelectWithUnionQuery"
    ]:
        raise _refuse("not_read_only", "EXPLAIN runs here for a SELECT only, without FORMAT")
    for node in root.walk():
        if node.kind in NODE_REFUSALS:
            raise _refuse("forbidden_function", NODE_REFUSALS[node.kind])
        if node.kind not in ALLOWED_NODES:
            raise _refuse(
                "bad_query", f"this syntax ({node.kind} in ClickHouse's tree) is not allowed here"
            )
        if node.kind == "Set" and node.parent is not root:
            # EXPLAIN's options are its root's; a SETTINGS clause changes nothing on the
            # read-only session, but a value equal to the session's is accepted, another
            # refused: a test of guesses at its settings (red team, round 7)
            raise settings_refusal()
        if node.kind == "Function":
            name = node.name.lower()
            if name in AGGREGATE_BY_NAME and not _aggregate_named(node):
                raise _refuse(
                    "forbidden_function",
                    f"{node.name}'s aggregate function must be a bare name in a string literal "
                    "('sum', 'uniqIf'), without parameters: ClickHouse runs that string as SQL",
                )
            if name in AGGREGATE_BY_NAME:  # the name in the string: on the list too
                named = node.children[0].children[0].detail[2:-2]
                if not FUNCTIONS.allows(named):
                    raise _refuse(
                        "forbidden_function",
                        f"{node.name}'s aggregate function {named!r} is not allowed here "
                        "(sql/sql_functions.txt)",
                    )
            in_from = node.parent is not None and node.parent.kind == "TableExpression"
            args = node.children[0].children if node.children else []
            if name in IN_FUNCTIONS and len(args) == 2 and args[1].kind == "Identifier":
                table = args[1].detail  # x IN t: a table's rows are the set
                if "." in table and not databases.table(table):
                    raise not_ours(table, databases)
            if in_from:
                if name not in TABLE_FUNCTIONS:
                    raise _refuse(
                        "forbidden_function",
                        f"table function {node.name!r} is not allowed; only "
                        "numbers, zeros and generate_series are (for view(...), write the "
                        "subquery itself: FROM (SELECT ...))",
                    )
            elif not FUNCTIONS.allows(node.name):
                raise _refuse(
                    "forbidden_function",
                    f"function {node.name!r} is not allowed here: the SQL endpoint runs the "
                    "functions of its list (sql/sql_functions.txt), which compute on values; "
                    "none that reads files, the network, other servers, dictionaries or the "
                    "server's state",
                )
        elif node.kind in ("TableIdentifier", "Identifier"):
            if "/" in node.detail:
                # chDB's default database reads a file named as a table ('/etc/hostname'),
                # in FROM or as the set of an IN
                raise _refuse("forbidden_table", f"{node.detail!r}: a file is not a table here")
            qualified = node.name.strip('`"')
            database = qualified.split(".", 1)[0].strip('`"')
            # In an expression, a name without a dot is a column, an alias or a WITH's
            # name, never a database (`provider AS system ... GROUP BY system`); as an
            # IN's set, a table of the store's database (unresolved_tables, the analyzer).
            a_table = node.kind == "TableIdentifier" or "." in qualified
            if a_table and database.lower() in SYSTEM_DATABASES:
                raise _refuse(
                    "forbidden_table",
                    f"{node.name!r}: system and information_schema tables are not available",
                )
            # A table named with a dot is database.table: the store's database only (the
            # tree prints a table named `a.b` so too, and chDB reads 'secret.csv' in its
            # default database as a file). In an expression, database.table.column of
            # another database is refused too. The whole detail: `other app`.t prints as
            # "other app.t".
            if node.kind == "TableIdentifier" and "." in node.detail:
                if not databases.table(node.detail):
                    raise not_ours(node.detail, databases)
            elif databases.qualifies(node.detail):
                raise not_ours(node.detail, databases)
    if root.kind != "SelectWithUnionQuery" and unresolved(root, databases):
        # An EXPLAIN (PLAN, QUERY TREE...) or DESCRIBE: the analyzer's check
        # (check_resolved) runs on a SELECT only.
        if bare := bare_calls(root):
            raise _refuse("forbidden_function", bare_message(bare))
        raise _refuse(
            "forbidden_table",
            f"{first or root.kind} here names the store's tables by name and database only "
            "(SHOW TABLES), not a WITH's name, an alias or a file: to explain or describe "
            "more, SELECT it",
        )
    if root.kind in ("SelectWithUnionQuery", "DescribeQuery") and len(root.children) != 1:
        raise _refuse(
            "bad_query",
            "FORMAT and INTO OUTFILE clauses are not allowed: choose the output with the "
            'request\'s "format" field',
        )
