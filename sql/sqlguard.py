"""What a query sent to POST /api/v1/sql may be, judged before it runs: the first two
of the endpoint's three lines of defence (sql/sqlapi.py).

1. Before ClickHouse sees the text (:func:`precheck`): exactly one statement (a ``;``
   may only end it), and no ``INTO OUTFILE`` (which chDB, running in this process,
   would write).
2. ClickHouse's own parser (:func:`check_tree`, over ``EXPLAIN AST``'s tree, read by
   :func:`parse_ast`): one SELECT (or WITH ... SELECT), SHOW TABLES / COLUMNS /
   CREATE TABLE (in the plain forms of :data:`SHOW_FORM` only), DESCRIBE or EXPLAIN of
   a SELECT, without a FORMAT clause; no ``system`` or ``information_schema`` table, no
   table of a database but the store's own, nor of the store's database one its
   system.tables does not list (:class:`Databases`: a ClickHouse server may hold other
   applications' data, chDB reads files as tables), no
   table function but the generators in :data:`TABLE_FUNCTIONS`, no function but those
   of the allowlist in sql/sql_functions.txt (:data:`FUNCTIONS`): those that compute
   on values, none that reads files, the network, dictionaries or the server's state.
   A SELECT is judged on the analyzer's resolution too (:func:`check_resolved`, over
   ``EXPLAIN QUERY TREE``): a bare name it calls as a function off the list (``user``),
   a table not the store's. A table or IN set only the analyzer can resolve
   (:func:`unresolved_tables`) makes its answer one refusal, whatever it does; such a
   name, or a bare one (:func:`unresolved`), refuses an EXPLAIN or DESCRIBE.

And what a query may take (:class:`SqlLimits`), which the read-only session it runs on
sets as ClickHouse settings (the third line, sql/sqlrun.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sql.params import BadParameter
from sql.sqlfunctions import BARE_FUNCTIONS, FUNCTIONS


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
    (?:\s+(?:NOT\s+)?I?LIKE\s+'[^'\\]*')?
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


@dataclass(frozen=True)
class Databases:
    """The store's database (``current``) and the others the session can see: a query
    may name tables of the store's database only. On a ClickHouse server the store's
    user may read other applications' databases; the endpoint is for llmtap's tables."""

    current: str
    others: frozenset[str]
    # The tables of the store's database, as system.tables lists them: on chDB, its
    # default database also reads the files of the process's directory as tables
    # (default.`.env`), which no check but readonly would stop otherwise.
    tables: frozenset[str] = frozenset()

    def table(self, qualified: str) -> bool:
        """Whether a name with a dot is one of the store's tables (``default.calls``)."""
        return self.ours(qualified) and qualified[len(self.current) + 1 :] in self.tables

    def ours(self, qualified: str) -> bool:
        """Whether a name with a dot (as the tree prints it) is a table of the store's
        database: ``default.calls``; not ``secret.csv``, which chDB's default database
        reads as a file, nor another database's table."""
        return qualified.lower().startswith(f"{self.current.lower()}.")

    def qualifies(self, identifier: str) -> bool:
        """Whether an identifier as the syntax tree prints it (``db.table``, or
        ``db.table.column``, unquoted: a name may hold spaces and dots) begins with one of
        the others."""
        lowered = identifier.lower()
        return any(lowered.startswith(f"{name.lower()}.") for name in self.others)


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
# Functions whose second argument, a bare name, is a table whose rows are the set.
IN_FUNCTIONS = frozenset(
    {"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin",
     "globalnotnullin"}
)  # fmt: skip
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
    alias: str = ""  # "(alias x)": the name it is given

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
_SUFFIX = re.compile(r"\s*\((?:children \d+|alias (?P<alias>[^)]*))\)\s*$")


def parse_ast(lines: Sequence[str]) -> Node:
    """The tree printed by ``EXPLAIN AST``: one node per line, one space of indent per level.

    An alias or identifier holding a newline prints as more than one line, which reads
    as extra nodes of the query's choosing: enough to hide a real one (a red-team pass
    hid an arrayReduce's SQL argument behind a fake 'sum'). So a query's quoted names
    are checked first (:func:`check_names`): none holds a line break.
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
        alias = ""
        while suffix := _SUFFIX.search(text):  # "(children N)", "(alias x)", either order
            alias = suffix["alias"] if suffix["alias"] is not None else alias
            text = text[: suffix.start()]
        kind, _, detail = text.partition(" ")
        del stack[depth:]
        parent = stack[-1] if stack else None
        node = Node(kind, detail.strip(), parent, alias=alias)
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


def _quoted_names(formatted: str) -> list[str]:
    """The backquoted names of a query as ``formatQuerySingleLine`` gives it (strings in
    single quotes, names in backquotes, each with backslash escapes; no comments)."""
    names: list[str] = []
    at, end = 0, len(formatted)
    while at < end:
        quote = formatted[at]
        if quote not in "'`":
            at += 1
            continue
        start = at = at + 1
        while at < end and formatted[at] != quote:
            at += 2 if formatted[at] == "\\" else 1
        if quote == "`":
            names.append(formatted[start:at])
        at += 1
    return names


# What parse_ast strips from the end of a node's line: in a name, it would read as
# another name (`calls (alias x)`, a file, read as the table calls).
_FORGED_SUFFIX = re.compile(r"\((?:children|alias)\b")


def _plain(name: str) -> bool:
    """A quoted name the tree prints as it is: ``EXPLAIN AST`` prints names unescaped (a
    line break in one adds lines that read as nodes of the tree), and its TabSeparated
    answer escapes a tab, a backslash or a quote; a name with leading or trailing spaces
    reads as another once its line is trimmed, one with "(alias" or "(children" once
    parse_ast strips its line's end."""
    return (
        name == name.strip()
        and "\\" not in name
        and "'" not in name
        and not _FORGED_SUFFIX.search(name)
        and all(ch == " " or (ch.isprintable() and not ch.isspace()) for ch in name)
    )


def check_names(formatted: str, databases: Databases) -> None:
    """Refuse a query with a quoted name that is not :func:`_plain` (``formatted``: the
    query as ClickHouse formats it on one line), or that holds a dot. Such a name let a
    query add nodes of its own to the tree the checks read, and hide an arrayReduce's
    real argument; the tree prints `default.calls`, one name (a file of chDB's
    directory, to ClickHouse), as it prints default.calls, the store's table."""
    for name in _quoted_names(formatted):
        if not _plain(name):
            raise _refuse(
                "bad_query",
                f"the name `{name}` is not allowed here: a quoted name may not hold a line "
                "break, a tab or another control character, a backslash, a single quote, "
                '"(alias" or "(children", nor begin or end with a space',
            )
        if "." in name:
            raise _refuse(
                "forbidden_table",
                f"the name `{name}` is not allowed here: a quoted name may not hold a dot "
                "(ClickHouse reads it as one name, the checks as database.table); only the "
                f"tables of llmtap's own database ({databases.current!r}) are available, by "
                "their names",
            )


# Up to the error's name, "(UNKNOWN_TABLE)", which a server follows with its version.
_HINT = re.compile(r"\s*Maybe you meant\b")
# An error's name, "(UNKNOWN_TABLE)": the real one is the message's last (a query's own
# text, in a hint or in "In scope ...", comes before it, so a "(A)" of its choosing
# cannot end a hint early).
_ERROR_NAME = re.compile(r"\s*\([A-Z_]+\)")


def without_hints(message: str, databases: Databases) -> str:
    """A ClickHouse error's message without its "Maybe you meant ..." hint when the hint
    names another database (or a table of one): an error would tell what other databases
    hold. A hint of a column or of the store's own tables stays. The hint runs to the
    error's name, the last "(NAME)"."""
    hint = _HINT.search(message)
    if hint is None or not databases.others:
        return message
    names = [found.start() for found in _ERROR_NAME.finditer(message, hint.end())]
    end = names[-1] if names else len(message)
    told = message[hint.start() : end].lower()
    if any(other.lower() in told for other in databases.others):
        return message[: hint.start()] + message[end:]
    return message


def _not_ours(name: str, databases: Databases) -> SqlError:
    return _refuse(
        "forbidden_table",
        f"{name!r}: only the tables of llmtap's own database ({databases.current!r}) are "
        "available here, by their names (SHOW TABLES), not files (a table alias named like "
        "another database is refused too: rename it)",
    )


def unresolved(root: Node, databases: Databases) -> set[str]:
    """The query's names only ClickHouse's analyzer can resolve, which may resolve to
    what the checks refuse: a bare name it may call as a function off the list
    (:func:`bare_calls`), or a table or IN's set named without a database that is not
    one of the store's tables (a WITH's name, an alias; or, on chDB, a file of the
    process's directory), or that an alias of the query shadows (``WITH noext AS calls
    ... IN calls``: the set of an IN is an expression first, here a file)."""
    return bare_calls(root) | unresolved_tables(root, databases)


def settings_refusal() -> SqlError:
    """The answer to a SETTINGS clause, whatever its values."""
    return _refuse(
        "not_read_only", "SETTINGS is not allowed here: the session's settings are fixed"
    )


def unresolved_tables(root: Node, databases: Databases) -> set[str]:
    """:func:`unresolved`'s tables and IN sets: those through which a file may be read."""
    names: set[str] = set()
    nodes = root.walk()
    aliases = {node.alias for node in nodes if node.alias}
    for node in nodes:
        if node.kind == "TableIdentifier" and "." not in node.detail:
            if node.detail not in databases.tables or node.detail in aliases:
                names.add(node.detail)
        elif node.kind == "Function" and node.name.lower() in IN_FUNCTIONS and node.children:
            args = node.children[0].children
            if len(args) == 2 and args[1].kind == "Identifier" and "." not in args[1].detail:
                if args[1].detail not in databases.tables or args[1].detail in aliases:
                    names.add(args[1].detail)
    return names


def bare_calls(root: Node) -> set[str]:
    """The query's bare names that ClickHouse may call as a function off the list
    (``user``: a column of ``calls``, or ``currentUser()`` where no column has the name)."""
    return {
        node.detail
        for node in root.walk()
        if node.kind == "Identifier"
        and node.detail.lower() in BARE_FUNCTIONS
        and not FUNCTIONS.allows(node.detail)
    }


# A function the analyzer calls, or a name it left unresolved (as it prints a view()'s
# query, were one to get here), as EXPLAIN QUERY TREE prints them; and each table it
# reads, database.table: the last field of its line, read to the line's end (a file
# named `calls, x` printed as "table_name: default.calls, x").
_RESOLVED = re.compile(r"\b(?:function_name|identifier): ([^,\s]+)")
_RESOLVED_TABLE = re.compile(r"\btable_name: (.+)$", re.M)
_NO_TABLE = "system.one"  # what a SELECT without FROM reads


def check_resolved(tree: str, root: Node, databases: Databases) -> None:
    """Refuse a query whose tree as the analyzer resolves it (``tree``: ``EXPLAIN QUERY
    TREE``'s text, of the query whose syntax tree is ``root``) calls a function off the
    list for a bare name (:func:`bare_calls`), or leaves one unresolved (what it will
    be cannot be told), or reads a table that is not one of the store's (a file, one
    an alias shadows). The analyzer names the functions it calls and the tables it
    reads, and does not evaluate these functions (they are not constant-folded): their
    value is never computed. A query that names tables the analyzer may resolve to a
    file (:func:`unresolved_tables`) gets one answer, :func:`unresolved_refusal`."""
    tables = unresolved_tables(root, databases)
    for name in _RESOLVED.findall(tree):
        if name.lower() in BARE_FUNCTIONS and not FUNCTIONS.allows(name):
            if tables:
                raise unresolved_refusal(root, databases)
            raise _refuse("forbidden_function", _bare_message(bare_calls(root)))
    for table in _RESOLVED_TABLE.findall(tree):
        if table != _NO_TABLE and not databases.table(table):
            raise unresolved_refusal(root, databases) if tables else _not_ours(table, databases)


def unresolved_refusal(root: Node, databases: Databases) -> SqlError:
    """The one answer to a query naming tables the analyzer may resolve to a file
    (:func:`unresolved_tables`), when it fails on the query or resolves one to what is
    not the store's: built from the query's names alone. The analyzer evaluates scalar
    subqueries as it resolves names, so whether it fails, with which error, or what it
    resolves could tell what a file holds (red team, rounds 6 and 7: a whole file,
    through a hint, then by its error's code)."""
    names = unresolved(root, databases)
    bare = bare_calls(root)
    return _refuse(
        "forbidden_table",
        f"{', '.join(sorted(names))}: not one of llmtap's tables "
        f"({', '.join(sorted(databases.tables))}), or ClickHouse could not resolve the "
        "query. A query naming a WITH's name, an alias named like a table, or what is not "
        "the store's table is refused alike whatever ClickHouse says of it (its answer "
        "could tell what such a name holds): write a WITH as a subquery to see "
        "ClickHouse's own error" + (f"; {_bare_message(bare)}" if bare else ""),
    )


def _bare_message(bare: set[str]) -> str:
    names = ", ".join(sorted(bare))
    return (
        f"{names}: where no column or alias of the query has the name, ClickHouse reads "
        "it as a function (user as currentUser()), which is not allowed here; for a "
        "column, name it with its table (calls.user)"
    )


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
        if SYSTEM_WORD.search(text):
            raise _refuse(
                "forbidden_table", "system and information_schema tables are not available"
            )
        if "/" in text:  # a name with a '/' is a file in chDB's default database
            raise _refuse("forbidden_table", "a file is not a table here")
        for database in _show_databases(show):  # a database it names: the store's only
            if database.lower() != databases.current.lower():
                raise _not_ours(database, databases)
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
                    raise _not_ours(table, databases)
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
            database = node.name.strip('`"').split(".", 1)[0].strip('`"')
            if database.lower() in SYSTEM_DATABASES:
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
                    raise _not_ours(node.detail, databases)
            elif databases.qualifies(node.detail):
                raise _not_ours(node.detail, databases)
    if root.kind != "SelectWithUnionQuery" and unresolved(root, databases):
        # An EXPLAIN (PLAN, QUERY TREE...) or DESCRIBE: the analyzer's check
        # (check_resolved) runs on a SELECT only.
        if bare := bare_calls(root):
            raise _refuse("forbidden_function", _bare_message(bare))
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
