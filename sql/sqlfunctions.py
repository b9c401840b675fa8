"""The functions a query sent to POST /api/v1/sql may call (sql/sqlguard.py judges a
query with them): the allowlist in sql/sql_functions.txt, and the names ClickHouse
calls as functions when written bare."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

# Aggregate function combinators, as system.aggregate_function_combinators lists them:
# sumIf, uniqArrayIf, quantilesStateMerge, countOrNull...
COMBINATORS = (
    "SimpleState", "OrDefault", "Distinct", "Resample", "ForEach", "ArgMax", "ArgMin",
    "OrNull", "Tuple", "Merge", "State", "Array", "Null", "Map", "If",
)  # fmt: skip
_SUFFIXES = tuple(combinator.lower() for combinator in COMBINATORS)


@dataclass(frozen=True)
class Functions:
    """The functions a query may call (sql/sql_functions.txt), an allowlist: each name
    lowercased, and which of them are aggregates (those a combinator may follow)."""

    names: frozenset[str]
    aggregates: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> Functions:
        names: set[str] = set()
        aggregates: set[str] = set()
        category = ""
        for line in text.splitlines():
            if line.startswith("## "):
                category = line[3:].strip()
            elif not line.startswith("#"):
                words = {word.lower() for word in line.split()}
                names |= words
                if category == "Aggregate Functions":
                    aggregates |= words
        return cls(frozenset(names), frozenset(aggregates))

    def allows(self, name: str) -> bool:
        """Whether ``name`` is on the list, or is an aggregate on it with combinators."""
        lowered = name.lower()
        return lowered in self.names or self._combined(lowered)

    def _combined(self, lowered: str) -> bool:
        """Whether taking combinators off the end leaves an aggregate on the list
        (sumIfArray, or sum and If 5,000 times: by a loop, not recursion)."""
        bases, seen = [lowered], {lowered}
        while bases:
            name = bases.pop()
            for suffix in _SUFFIXES:
                if name.endswith(suffix) and len(name) > len(suffix):
                    base = name[: -len(suffix)]
                    if base in self.aggregates:
                        return True
                    if base not in seen:
                        seen.add(base)
                        bases.append(base)
        return False


FUNCTIONS = Functions.parse(resources.files("sql").joinpath("sql_functions.txt").read_text())
# Names ClickHouse calls as a function when written bare, without parentheses, where no
# column, alias or lambda argument of the query has the name: ``SELECT user`` is
# ``currentUser()``, yet the syntax tree shows an Identifier, not a Function. Found by
# trying each function's name as a bare identifier (a red-team pass found the first);
# tests/test_sql_functions.py holds this to chDB's answer. Those off the list are checked
# on the query as ClickHouse's analyzer resolves it (:func:`sql.sqlnames.check_resolved`).
BARE_FUNCTIONS = frozenset(
    {"curdate", "current_database", "current_date", "current_timestamp", "current_user",
     "currentdatabase", "currenthandler", "currentrequesturl", "currentuser", "database",
     "localtime", "localtimestamp", "now", "schema", "session_user", "today", "user"}
)  # fmt: skip
