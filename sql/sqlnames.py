"""The names of a query sent to POST /api/v1/sql, and what they resolve to: the store's
tables only (:class:`Databases`), named so that the checks read them as ClickHouse does
(:func:`check_names`); and, for a SELECT, as ClickHouse's analyzer resolves them
(:func:`check_resolved`, over ``EXPLAIN QUERY TREE``). A table or IN set only the
analyzer can resolve (:func:`unresolved_tables`) makes its answer one refusal,
whatever the analyzer does (:func:`unresolved_refusal`). Part of the endpoint's second
line of defence, whose syntax checks are sql/sqlguard.py's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sql.params import SqlError
from sql.sqlfunctions import BARE_FUNCTIONS, FUNCTIONS
from sql.sqltree import Node


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
        reads as a file, nor another database's table. Exact: ClickHouse's database
        names are case-sensitive (``Default.calls`` is another database's table)."""
        return qualified.startswith(f"{self.current}.")

    def qualifies(self, identifier: str) -> bool:
        """Whether an identifier as the syntax tree prints it (``db.table``, or
        ``db.table.column``, unquoted: a name may hold spaces and dots) begins with one of
        the others."""
        lowered = identifier.lower()
        return any(lowered.startswith(f"{name.lower()}.") for name in self.others)


# Functions whose second argument, a bare name, is a table whose rows are the set.
IN_FUNCTIONS = frozenset(
    {"in", "notin", "globalin", "globalnotin", "nullin", "notnullin", "globalnullin",
     "globalnotnullin"}
)  # fmt: skip


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
# What the analyzer's tree prints after a table's name read with FINAL or SAMPLE
# (check_resolved reads past it): in a name, a file `calls, final: 1` read as calls.
_FORGED_MODIFIERS = re.compile(r", (?:final|sample_size|sample_offset): ")


def _plain(name: str) -> bool:
    """A quoted name the tree prints as it is: ``EXPLAIN AST`` prints names unescaped (a
    line break in one adds lines that read as nodes of the tree), and its TabSeparated
    answer escapes a tab, a backslash or a quote; a name with leading or trailing spaces
    reads as another once its line is trimmed, one with "(alias" or "(children" once
    parse_ast strips its line's end, one with ", final: " (a table's modifiers) once
    check_resolved reads past them."""
    return (
        name == name.strip()
        and "\\" not in name
        and "'" not in name
        and not _FORGED_SUFFIX.search(name)
        and not _FORGED_MODIFIERS.search(name)
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
            raise SqlError(
                "bad_query",
                f"the name `{name}` is not allowed here: a quoted name may not hold a line "
                "break, a tab or another control character, a backslash, a single quote, "
                '"(alias", "(children" or ", final: ", nor begin or end with a space',
            )
        if "." in name:
            raise SqlError(
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


def not_ours(name: str, databases: Databases) -> SqlError:
    return SqlError(
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
    return SqlError(
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
# What the tree prints after a table's name when it is read with FINAL or SAMPLE (its
# modifiers: "table_name: default.analytics_by_model_daily, final: 1"), at the line's
# end. Only ClickHouse's own: a quoted name may not hold it (check_names).
_MODIFIERS = re.compile(
    r", final: [01](?:, sample_size: \d+ / \d+)?(?:, sample_offset: \d+ / \d+)?$"
)
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
            raise SqlError("forbidden_function", bare_message(bare_calls(root)))
    for line in _RESOLVED_TABLE.findall(tree):
        table = _MODIFIERS.sub("", line)
        if table != _NO_TABLE and not databases.table(table):
            raise unresolved_refusal(root, databases) if tables else not_ours(table, databases)


def unresolved_refusal(root: Node, databases: Databases) -> SqlError:
    """The one answer to a query naming tables the analyzer may resolve to a file
    (:func:`unresolved_tables`), when it fails on the query or resolves one to what is
    not the store's: built from the query's names alone. The analyzer evaluates scalar
    subqueries as it resolves names, so whether it fails, with which error, or what it
    resolves could tell what a file holds (red team, rounds 6 and 7: a whole file,
    through a hint, then by its error's code)."""
    names = unresolved(root, databases)
    bare = bare_calls(root)
    return SqlError(
        "forbidden_table",
        f"{', '.join(sorted(names))}: not one of llmtap's tables "
        f"({', '.join(sorted(databases.tables))}), or ClickHouse could not resolve the "
        "query. A query naming a WITH's name, an alias named like a table, or what is not "
        "the store's table is refused alike whatever ClickHouse says of it (its answer "
        "could tell what such a name holds): write a WITH as a subquery to see "
        "ClickHouse's own error" + (f"; {bare_message(bare)}" if bare else ""),
    )


def bare_message(bare: set[str]) -> str:
    names = ", ".join(sorted(bare))
    return (
        f"{names}: where no column or alias of the query has the name, ClickHouse reads "
        "it as a function (user as currentUser()), which is not allowed here; for a "
        "column, name it with its table (calls.user)"
    )
