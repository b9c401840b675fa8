"""The SQL endpoint's function allowlist (sql/sql_functions.txt, read by
sql/sqlfunctions.py) held to chDB's own catalogue of functions: every name on it is a
function ClickHouse has, no function off it passes, by its case or by combinators, and
the names ClickHouse calls bare are those it calls."""

from __future__ import annotations

from importlib import resources

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from sql import sqlguard
from sql.sqlfunctions import BARE_FUNCTIONS, FUNCTIONS
from sql.store import Store


def catalogue(store: Store, table: str) -> set[str]:
    return {row["name"] for row in store.rows(f"SELECT name FROM system.{table}")}


def test_every_listed_function_is_one_of_clickhouses(store: Store) -> None:
    known = {name.lower() for name in catalogue(store, "functions")}
    syntax = {"lambda", "exists", "grouping", "untuple"}  # the parser's, not listed there
    assert FUNCTIONS.names - syntax <= known, FUNCTIONS.names - syntax - known
    assert FUNCTIONS.aggregates <= FUNCTIONS.names
    assert len(FUNCTIONS.aggregates) > 200  # the section was read, not lost


def test_no_function_off_the_list_passes(store: Store) -> None:
    """Case (hostname for hostName) or a combinator's suffix (an aggregate's name and
    If, State...) never turns a function off the list into one on it."""
    listed = {
        word
        for line in resources.files("sql").joinpath("sql_functions.txt").read_text().splitlines()
        if not line.startswith("#")
        for word in line.split()
    }
    off = {name for name in catalogue(store, "functions") if name not in listed}
    assert len(off) > 100
    assert sorted(name for name in off if FUNCTIONS.allows(name)) == []


@pytest.mark.parametrize(
    "name",
    [
        # files, settings, the server, Keeper, other tables, dictionaries, models, an LLM
        "file", "getSetting", "getSettingOrDefault", "getServerSetting", "getClientHTTPHeader",
        "currentUser", "hostName", "HOSTNAME", "uptime", "version", "getOSKernelVersion",
        "serverUUID", "sleep", "sleepEachRow", "joinGet", "dictGet", "dictGetString",
        "regionToName", "aiGenerate", "AIGenerate", "naiveBayesClassifier",
        "naiveBayesClassifierWithProb", "evalMLMethod", "catboostEvaluate", "hasColumnInTable",
        "structureToProtobufSchema", "formatQuery", "logTrace", "demangle", "generateSerialID",
        "globalInIgnoreSet", "filesystemAvailable", "zookeeperSessionUptime",
        # combinators on a function off the list
        "fileIf", "hostNameState", "naiveBayesClassifierIf", "stochasticLinearRegressionState",
    ],
)  # fmt: skip
def test_functions_that_read_beyond_the_query_are_off_the_list(name: str) -> None:
    assert not FUNCTIONS.allows(name)


@pytest.mark.parametrize(
    "name",
    ["sum", "SUM", "count", "sumIf", "countIf", "uniqArrayIf", "quantilesStateMerge",
     "sumSimpleState", "countOrNull", "avgForEach", "argMaxIf", "sumMapMerge",
     "quantileTDigestResample", "multiIf", "toStartOfHour", "formatReadableSize",
     "JSONExtractString", "lambda", "row_number", "lagInFrame", "caseWithExpression"],
)  # fmt: skip
def test_what_analytics_need_is_on_the_list(name: str) -> None:
    assert FUNCTIONS.allows(name)


def test_the_bare_names_clickhouse_calls_are_known(store: Store) -> None:
    """Which function names ClickHouse calls when written bare (SELECT user): each
    name, in its case, lower and upper, tried alone, as the red team found them."""
    names = catalogue(store, "functions")
    called = set()
    for name in sorted(
        {spelled for known in names for spelled in (known, known.lower(), known.upper())}
    ):
        try:
            store.command(f"SELECT `{name}`")
        except DatabaseError:
            continue
        called.add(name.lower())
    assert called == BARE_FUNCTIONS


def test_combinators_stacked_thousands_deep_are_judged() -> None:
    assert FUNCTIONS.allows("sum" + "If" * 5_000)  # not a RecursionError (a 500)
    assert not FUNCTIONS.allows("hostName" + "If" * 5_000)


def test_no_table_function_but_the_generators(store: Store) -> None:
    table_functions = {name.lower() for name in catalogue(store, "table_functions")}
    assert sqlguard.TABLE_FUNCTIONS <= table_functions
    assert {"file", "url", "s3", "remote", "mysql", "executable", "dictionary", "merge",
            "input", "python", "eval", "values", "generaterandom"} <= table_functions - \
        sqlguard.TABLE_FUNCTIONS  # fmt: skip
