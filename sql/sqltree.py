"""ClickHouse's syntax tree of a query, as ``EXPLAIN AST`` prints it, read into nodes
(:func:`parse_ast`) for the SQL endpoint's checks (sql/sqlguard.py, sql/sqlnames.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from sql.params import SqlError


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
            raise SqlError("bad_query", "ClickHouse's syntax tree of this query is unreadable")
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
                raise SqlError("multiple_statements", "one statement per request")
            root = node
        else:
            parent.children.append(node)
        stack.append(node)
    if root is None:
        raise SqlError("bad_query", "the query is empty")
    return root
