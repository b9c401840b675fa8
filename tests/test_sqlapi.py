"""POST /api/v1/sql on a real chDB store: answers as JSON and CSV, row and time limits,
every class of refusal, and ClickHouse's own read-only mode behind the checks."""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.compression_utils import HAS_ZSTD
from aiohttp.test_utils import TestClient, TestServer
from clickhouse_connect.driver.exceptions import DatabaseError
from pydantic import ValidationError

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.events import Attribution, Cost, CostedEvent
from sinks.clickhouse.decode import Batch
from sinks.clickhouse.write import write_batch
from sinks.webhooks.records import Attempt, record, store_batch
from sql import analytics, sqlapi, sqlguard, sqlnames, sqlrun, sqltree
from sql import store as sql_store
from sql.params import SqlError
from sql.store import Store
from tests import sample, test_analytics
from tests.test_analytics import Call

ADMIN_KEY = "admin-key-for-sql-tests"
OUTFILE = Path("/tmp/llmtap-sql-test-outfile.txt")  # chDB would write it, were it allowed
H = timedelta(hours=1)
CALLS = [
    Call(1 * H, "gpt-4o", "openai", "alice", "search", tenant="acme", cost=("0.001", "0.002")),
    Call(2 * H, "gpt-4o-mini", "openai", "bob", "search", tenant="acme", cost=("0.0001", "0")),
    Call(3 * H, "llama-3-70b", "groq", "zed", "core", tenant="globex", cost=None),
]

Client = TestClient[Any, Any]
ServeFn = Callable[..., AbstractAsyncContextManager[tuple[Client, web.Application]]]


@pytest.fixture
def virtual_key(tmp_path: Path) -> str:
    """A virtual key of tenant acme, in the key file the app reads."""
    secret, _ = create_key(tmp_path / "keys.yaml", tenant="acme")
    return secret


@pytest.fixture
def serve(store: Store, tmp_path: Path, virtual_key: str) -> ServeFn:
    """The API app on ``store`` (holding CALLS), with an admin key; SQL limits as given."""
    assert write_batch(store, Batch(events=[c.event() for c in CALLS])) == len(CALLS)
    settings = Settings(
        data_dir=tmp_path, admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]
    )
    assert settings.key_file == tmp_path / "keys.yaml"

    @asynccontextmanager
    async def serving(
        limits: sqlguard.SqlLimits | None = None,
    ) -> AsyncIterator[tuple[Client, web.Application]]:
        app = web.Application(middlewares=[analytics.api_errors])
        app[analytics.STORE] = store
        analytics.add_routes(app, settings, sql_limits=limits)
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with TestClient(TestServer(app, host="127.0.0.1"), headers=headers) as client:
            yield client, app

    return serving


@pytest.fixture
async def api(serve: ServeFn) -> AsyncIterator[Client]:
    async with serve() as (client, _):
        yield client


async def sql(api: Client, query: str, expect: int = 200, **body: Any) -> Any:
    async with api.post("/api/v1/sql", json={"query": query, **body}) as response:
        answer = await response.json() if body.get("format") != "csv" or expect != 200 else None
        if answer is None:
            text = await response.text()
            assert response.status == expect, text
            assert response.content_type == "text/csv"
            return text, response.headers
        assert response.status == expect, answer
        return answer


async def refused(api: Client, query: str, code: str) -> str:
    body = await sql(api, query, expect=400)
    error = body["error"]
    assert error["param"] == "query"
    assert error["code"] == code, error
    message: str = error["message"]
    return message


# -- answers ----------------------------------------------------------------------------


async def test_a_select_as_json(api: Client) -> None:
    body = await sql(
        api,
        "SELECT tenant, user, cost_total, ts_end, ttft_ms, properties "
        "FROM calls ORDER BY ts_end DESC",
    )
    assert body["columns"] == [
        {"name": "tenant", "type": "LowCardinality(String)"},
        {"name": "user", "type": "String"},
        {"name": "cost_total", "type": "Nullable(Decimal(18, 9))"},
        {"name": "ts_end", "type": "DateTime64(3, 'UTC')"},
        {"name": "ttft_ms", "type": "Nullable(Float64)"},
        {"name": "properties", "type": "Map(LowCardinality(String), String)"},
    ]
    assert body["rows"] == [
        ["acme", "alice", "0.003000000", "2026-03-15T11:30:00Z", None, {}],
        ["acme", "bob", "0.000100000", "2026-03-15T10:30:00Z", None, {}],
        ["globex", "zed", None, "2026-03-15T09:30:00Z", None, {}],
    ]
    assert body["rows_returned"] == 3
    assert body["truncated"] is False
    assert body["elapsed_ms"] >= 0


async def test_values_of_many_types_as_json(api: Client) -> None:
    body = await sql(
        api,
        "SELECT toDecimal128('123456789.123456789', 9) AS d, toUInt64(18446744073709551615) AS u,"
        " toInt128('-170141183460469231731687303715884105728') AS big, [1, 2] AS a,"
        " map(1, 'x') AS m, tuple(1, 'b') AS t, toUUID('00000000-0000-0000-0000-000000000001')"
        " AS id, toIPv4('10.0.0.1') AS ip, toDate('2026-01-02') AS day,"
        " toDateTime('2026-01-02 03:04:05', 'Asia/Tokyo') AS tokyo, NULL AS n, true AS b,"
        " nan AS f",
    )
    assert body["rows"] == [
        [
            "123456789.123456789",
            18446744073709551615,
            "-170141183460469231731687303715884105728",
            [1, 2],
            {"1": "x"},
            [1, "b"],
            "00000000-0000-0000-0000-000000000001",
            "10.0.0.1",
            "2026-01-02",
            "2026-01-01T18:04:05Z",  # 03:04:05 in Tokyo, in UTC
            None,
            True,
            None,
        ]
    ]


async def test_a_time_in_a_zone_of_its_own_is_given_in_utc(api: Client) -> None:
    """As every time is, also in an array, and in the JSON answer's fast path (no value
    that needs the slow one): it kept its zone's offset there."""
    body = await sql(
        api,
        "SELECT toTimeZone(ts_end, 'Europe/Berlin') AS berlin,"
        " [toDateTime64(ts_end, 3, 'Asia/Tokyo')] AS tokyo FROM calls"
        " WHERE user = 'alice'",
    )
    assert body["rows"] == [["2026-03-15T11:30:00Z", ["2026-03-15T11:30:00Z"]]]


NS = "toDateTime64('2026-01-01 00:00:00.123456789', 9)"


async def test_a_time_finer_than_a_microsecond_keeps_its_digits(api: Client, store: Store) -> None:
    """A DateTime64(7..9) or Time64(7..9) holds more than a Python datetime or timedelta
    (which cut it to microseconds): it is written with nine digits after the second, in
    UTC as every time; in a column of its own, a zone of its own, NULL, an array, a map,
    a tuple beside a coarser time (written as before), a table; JSON and CSV alike."""
    store.command(
        "CREATE TABLE precise (at DateTime64(9, 'Asia/Kolkata'), maybe Nullable(DateTime64(9)),"
        " seen Array(DateTime64(7))) ENGINE = MergeTree ORDER BY at"
    )
    store.command(f"INSERT INTO precise VALUES ({NS}, NULL, [{NS}]), ({NS} + 1, {NS}, [])")
    body = await sql(
        api,
        f"SELECT {NS} AS utc, toTimeZone({NS}, 'Asia/Kolkata') AS kolkata,"
        f" [toNullable({NS}), NULL] AS many, map('k', {NS}) AS m,"
        f" tuple(toDateTime64('2026-01-02 03:04:05.25', 3, 'Asia/Tokyo'), {NS}) AS pair,"
        " toDateTime64('2026-01-01 00:00:00', 9) AS whole,"
        " toTime64('12:34:56.123456789', 9) AS span, toDateTime64('2026-01-01 00:00:00.5', 3)"
        " AS coarse",
    )
    at = "2026-01-01T00:00:00.123456789Z"
    assert body["rows"] == [
        [
            at,
            at,  # 05:30:00.123456789 in Kolkata, in UTC
            [at, None],
            {"k": at},
            ["2026-01-01T18:04:05.250000Z", at],  # a DateTime64(3): as before
            "2026-01-01T00:00:00Z",  # a whole second: no fraction, as every time
            "12:34:56.123456789",
            "2026-01-01T00:00:00.500000Z",
        ]
    ]
    assert body["columns"][1] == {"name": "kolkata", "type": "DateTime64(9, 'Asia/Kolkata')"}
    text, _ = await sql(api, "SELECT * FROM precise ORDER BY at", format="csv")
    assert list(csv.reader(io.StringIO(text))) == [
        ["at", "maybe", "seen"],
        [at, "", '["2026-01-01T00:00:00.123456700Z"]'],
        ["2026-01-01T00:00:01.123456789Z", at, "[]"],
    ]
    body = await sql(api, "SELECT now64(9) AS t, toUnixTimestamp64Nano(t) AS ns")
    [[written, ns]] = body["rows"]
    whole, _, fraction = written.removesuffix("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    assert int(seconds) * 10**9 + int(fraction.ljust(9, "0")) == ns


async def test_a_time_of_day_is_written_as_clickhouse_prints_it(api: Client, store: Store) -> None:
    """A Time or Time64 is a span of -999:59:59 to 999:59:59, not a Python timedelta's
    text ("1 day, 1:00:00", "-1 day, 23:00:00"): hours in two digits or more, a sign,
    as many digits after the second as its precision (0 to 9), as ClickHouse prints it;
    in a column of its own, NULL, an array, a map's keys and values, a tuple; JSON and
    CSV alike."""
    body = await sql(
        api,
        "SELECT toTime64('25:00:00', 3) AS a, toTime64('-01:00:00', 3) AS b,"
        " toTime('25:00:00') AS c, toTime('-01:00:00') AS d, toTime('01:02:03') AS e,"
        " toTime64('01:00:00.5', 1) AS f, toTime64('-00:00:00.000000001', 9) AS g,"
        " toTime64('999:59:59.999999999', 9) AS h, [toTime64('25:00:00.5', 2), NULL] AS many,"
        " toNullable(toTime('-02:00:00')) AS maybe, map('k', toTime('100:00:00')) AS m,"
        " map(toTime64('-30:00:00', 0), 1) AS keyed, tuple(toTime('-25:00:00'), 1) AS pair",
    )
    row = [
        "25:00:00.000",
        "-01:00:00.000",
        "25:00:00",
        "-01:00:00",
        "01:02:03",
        "01:00:00.5",
        "-00:00:00.000000001",
        "999:59:59.999999999",
        ["25:00:00.50", None],
        "-02:00:00",
        {"k": "100:00:00"},
        {"-30:00:00": 1},
        ["-25:00:00", 1],
    ]
    assert body["rows"] == [row]
    text, _ = await sql(
        api, "SELECT a, c, g, many, keyed FROM (" + _TIMES_QUERY + ")", format="csv"
    )
    assert list(csv.reader(io.StringIO(text)))[1] == [
        "25:00:00.000",
        "25:00:00",
        "-00:00:00.000000001",
        '["25:00:00.50",null]',
        '{"-30:00:00":1}',
    ]
    # Every precision, as ClickHouse's own text of the same value.
    spans = ", ".join(f"toTime64('-25:00:00.123456789', {p}) AS p{p}" for p in range(10))
    body = await sql(api, f"SELECT {spans}")
    assert body["rows"] == [
        [store.command(f"SELECT toString(toTime64('-25:00:00.123456789', {p}))") for p in range(10)]
    ]


async def test_a_time_inside_a_variant_is_written_as_at_the_top(api: Client) -> None:
    """Inside a Variant (in an array or a tuple of one too, and one a Dynamic or a JSON
    path holds) a Time or Time64 is written as one in a column of its own:
    clickhouse-connect's text has three hour digits ("005:03:01"). A Variant's String
    that reads like that text is left as it is (a Variant's values are read with their
    member's type); a Time a Dynamic holds as itself keeps clickhouse-connect's text,
    as the README says (it cannot be told from a String there)."""
    time = "toTime('05:03:01')"
    body = await sql(
        api,
        f"SELECT {time} AS t, {time}::Variant(Time, String) AS v,"
        f" tuple({time}, 1)::Variant(Tuple(Time, UInt8), String) AS pair,"
        " [toTime64('01:00:00', 3)::Variant(Time64(3), String), 'x'] AS vs,"
        f" [{time}::Variant(Time, String)]::Dynamic AS held, {time}::Dynamic AS d,"
        " CAST('{\"t\": \"01:00:00\"}', 'JSON(t Variant(Time, UInt8))') AS j",
    )
    assert body["rows"] == [
        [
            "05:03:01",
            "05:03:01",
            ["05:03:01", 1],
            ["01:00:00.000", "x"],
            ["05:03:01"],
            "005:03:01",
            {"t": "01:00:00"},
        ]
    ]
    query = (
        f"SELECT t FROM (SELECT {time} AS t UNION ALL SELECT '005:03:01') ORDER BY toString(t) DESC"
    )
    body = await sql(api, query)
    assert body["columns"] == [{"name": "t", "type": "Variant(String, Time)"}]
    assert body["rows"] == [["05:03:01"], ["005:03:01"]]
    text, _ = await sql(api, query, format="csv")
    assert list(csv.reader(io.StringIO(text)))[1:] == [["05:03:01"], ["005:03:01"]]


_TIMES_QUERY = (
    "SELECT toTime64('25:00:00', 3) AS a, toTime('25:00:00') AS c,"
    " toTime64('-00:00:00.000000001', 9) AS g, [toTime64('25:00:00.5', 2), NULL] AS many,"
    " map(toTime64('-30:00:00', 0), 1) AS keyed"
)


async def test_a_nine_digit_time_is_read_without_a_describe(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its columns' types are the answer's own: no DESCRIBE, which ran the query's scalar
    subqueries once more (each under its own time limit). A column that may hold such a
    time where it cannot be found (a Dynamic, a Variant) has its times to the microsecond,
    the others nine digits still: described first when the query names such a type, read
    once more when only the answer does (a UNION's common type)."""
    described: list[str] = []
    describe = sqlrun.SqlRunner.described

    def spy(runner: sqlrun.SqlRunner, text: str) -> list[tuple[str, str]]:
        described.append(text)
        return describe(runner, text)

    monkeypatch.setattr(sqlrun.SqlRunner, "described", spy)
    body = await sql(api, f"SELECT (SELECT count() FROM calls) AS n, {NS} AS t")
    assert body["rows"] == [[3, "2026-01-01T00:00:00.123456789Z"]]
    assert described == []
    body = await sql(
        api,
        f"SELECT {NS} AS t, {NS}::Dynamic AS d, [toDateTime64('2026-01-01 00:00:00.5', 3)] AS a",
    )
    assert body["rows"] == [
        [
            "2026-01-01T00:00:00.123456789Z",
            "2026-01-01T00:00:00.123456Z",
            ["2026-01-01T00:00:00.500000Z"],
        ]
    ]
    assert len(described) == 1
    body = await sql(api, f"SELECT {NS} AS t UNION ALL SELECT 'a'")
    assert body["columns"] == [{"name": "t", "type": "Variant(DateTime64(9), String)"}]
    assert sorted(body["rows"]) == [["2026-01-01T00:00:00.123456Z"], ["a"]]
    assert len(described) == 1


async def test_a_map_keyed_by_a_time_in_a_zone_gives_its_keys_in_utc(api: Client) -> None:
    body = await sql(api, "SELECT map(toDateTime('2026-01-02 03:04:05', 'Asia/Tokyo'), 1) AS m")
    assert body["rows"] == [[{"2026-01-01T18:04:05Z": 1}]]


async def test_a_map_key_is_written_alike_in_a_row_that_needs_the_slow_path(api: Client) -> None:
    """A key orjson cannot write (a Decimal, a tuple) sends its whole JSON row to the
    slow path (sqlapi._deep): the other maps' keys are written there as in any other row
    (a time in ISO-8601 UTC, true), and as in CSV, not as Python's text of them."""
    query = (
        "SELECT map(toDecimal32(1.5, 2), 1) AS d, map(toDateTime('2026-01-01 00:00:00'), 1) AS t,"
        " [map(toDateTime64('2026-01-01 00:00:00.5', 3, 'Asia/Tokyo'), 1)] AS many,"
        " map(true, 1) AS b, map(toDate32('2026-01-02'), 1) AS day, map(tuple(1, 'a'), 1) AS pair"
    )
    row = [
        {"1.50": 1},
        {"2026-01-01T00:00:00Z": 1},
        [{"2025-12-31T15:00:00.500000Z": 1}],
        {"true": 1},
        {"2026-01-02": 1},
        {'[1,"a"]': 1},
    ]
    assert (await sql(api, query))["rows"] == [row]
    text, _ = await sql(api, query, format="csv")
    assert list(csv.reader(io.StringIO(text)))[1] == [
        orjson.dumps(v, option=orjson.OPT_NON_STR_KEYS).decode() for v in row
    ]


async def test_a_literal_that_is_no_utf_8_is_read_only_still(api: Client) -> None:
    body = await sql(api, "SELECT count() AS n FROM calls WHERE position(user, '\\xc3') > 0")
    assert body["rows"] == [[0]]


async def test_a_128_bit_column_is_strings_in_every_row(api: Client) -> None:
    """Past 64 bits a JSON number would lose digits: such a column is strings throughout,
    small values too, so a client reads one type per column."""
    body = await sql(
        api,
        "SELECT toInt128(number) * if(number = 1, toInt128('10000000000000000000000'), 1)"
        " AS big, [toUInt256(number)] AS many, toUInt64(number) AS small"
        " FROM numbers(2)",
    )
    assert body["rows"] == [["0", ["0"], 0], ["10000000000000000000000", ["1"], 1]]


async def test_a_select_as_csv(api: Client) -> None:
    text, headers = await sql(
        api,
        "SELECT tenant, user, cost_total, ts_end FROM calls ORDER BY ts_end DESC",
        format="csv",
    )
    rows = list(csv.reader(io.StringIO(text)))
    assert rows == [
        ["tenant", "user", "cost_total", "ts_end"],
        ["acme", "alice", "0.003000000", "2026-03-15T11:30:00Z"],
        ["acme", "bob", "0.000100000", "2026-03-15T10:30:00Z"],
        ["globex", "zed", "", "2026-03-15T09:30:00Z"],
    ]
    assert headers["X-Rows-Returned"] == "3"
    assert headers["X-Truncated"] == "false"


async def test_csv_tells_nan_and_infinity_from_null(api: Client) -> None:
    text, _ = await sql(
        api, "SELECT nan AS a, inf AS b, -inf AS c, NULL AS d, 1.5 AS e", format="csv"
    )
    assert list(csv.reader(io.StringIO(text)))[1] == ["nan", "inf", "-inf", "", "1.5"]


async def test_an_empty_answer_still_names_its_columns(api: Client) -> None:
    body = await sql(
        api, "SELECT tenant, count() AS n FROM calls WHERE tenant = 'nobody' GROUP BY tenant"
    )
    assert body["columns"] == [
        {"name": "tenant", "type": "LowCardinality(String)"},
        {"name": "n", "type": "UInt64"},
    ]
    assert body["rows"] == [] and body["rows_returned"] == 0
    text, _ = await sql(api, "SELECT tenant FROM calls WHERE 0", format="csv")
    assert text == "tenant\r\n"


@pytest.mark.parametrize(
    "query",
    [
        "WITH per AS (SELECT tenant, count() AS n FROM calls GROUP BY tenant) "
        "SELECT * FROM per ORDER BY tenant",
        "SELECT tenant, count() AS n FROM calls GROUP BY tenant ORDER BY tenant;",
        "  -- the count per tenant\n  select tenant, count() as n from calls group by tenant "
        "order by tenant ;; ",
        "(SELECT tenant, count() AS n FROM calls GROUP BY tenant ORDER BY tenant)",
        "SELECT tenant, count() AS n FROM calls WHERE tenant IN (SELECT tenant FROM calls) "
        "GROUP BY tenant ORDER BY tenant",
        # "outfile" in a longer name or value (the word OUTFILE is refused)
        "SELECT tenant, count() AS outfile_count FROM calls WHERE feature != 'into_outfile' "
        "GROUP BY tenant ORDER BY tenant",
        # an alias or WITH's name spelled like a system database is no table of it
        "SELECT tenant AS system, count() AS n FROM calls GROUP BY system ORDER BY system",
        "WITH tenant AS information_schema SELECT information_schema, count() AS n FROM calls "
        "GROUP BY information_schema ORDER BY information_schema",
    ],
)
async def test_read_only_forms_run(api: Client, query: str) -> None:
    body = await sql(api, query)
    assert body["rows"] == [["acme", 2], ["globex", 1]]


async def test_sql_syntax_written_as_functions_runs(api: Client) -> None:
    """What the parser turns into function calls passes the function list: EXISTS,
    grouping(), untuple() and lambdas are not in system.functions, and were refused
    until added by name; the rest (CASE, BETWEEN, ::, INTERVAL, AT TIME ZONE...) are."""
    body = await sql(
        api,
        "SELECT tenant, grouping(tenant) AS g, EXISTS (SELECT 1) AS e, 1 = ANY (SELECT 1)"
        " AS a, CASE WHEN count() > 1 THEN 'many' ELSE 'one' END AS c,"
        " count() BETWEEN 1 AND 2 AS b, untuple((1, 2)), arrayMap(x -> x * 2, [count()]) AS m,"
        " toDate('2026-01-02') - INTERVAL 1 DAY AS d, 1::String AS s,"
        " EXTRACT(DAY FROM d) AS day, now() AT TIME ZONE 'UTC' IS NOT NULL AS z"
        " FROM calls GROUP BY GROUPING SETS ((tenant), ()) ORDER BY tenant",
    )
    columns = [column["name"] for column in body["columns"]]
    rows = [dict(zip(columns, row, strict=True)) for row in body["rows"]]
    assert [(row["tenant"], row["m"], row["c"], row["e"]) for row in rows] == [
        ("", [6], "many", True),
        ("acme", [4], "many", True),
        ("globex", [2], "one", True),
    ]


@pytest.mark.parametrize(
    ("query", "first_column"),
    [
        ("SHOW TABLES", "name"),
        ("DESCRIBE TABLE calls", "name"),
        ("DESC calls", "name"),
        ("SHOW COLUMNS FROM calls", "field"),
        ("SHOW CREATE TABLE calls", "statement"),
        ("show full tables from default like 'call%' limit 2", "name"),
        ("SHOW COLUMNS IN default.calls NOT ILIKE 'ts%'", "field"),
        # a pattern is not a name: the words system and '/' in it refuse nothing
        ("SHOW TABLES NOT LIKE '%system%'", "name"),
        ("SHOW COLUMNS FROM calls NOT ILIKE '%information_schema/%'", "field"),
        ("SHOW CREATE `calls`", "statement"),
        ("EXPLAIN SELECT count() FROM calls", "explain"),
        ("EXPLAIN indexes = 1 SELECT count() FROM calls", "explain"),  # with options
        ("EXPLAIN PLAN header = 1 SELECT 1", "explain"),
        ("SELECT sum(number) AS s FROM numbers(10)", "s"),
        # an aggregate function by name, bare: allowed
        ("SELECT arrayReduce('sumIf', [1, 2, 3], [1, 0, 1]) AS s", "s"),
        ("SELECT finalizeAggregation(initializeAggregation('uniqState', 7)) AS u", "u"),
    ],
)
async def test_show_describe_explain(api: Client, query: str, first_column: str) -> None:
    body = await sql(api, query)
    assert body["columns"][0]["name"] == first_column
    assert body["rows"]


# -- limits -----------------------------------------------------------------------------


async def test_limit_and_the_row_limit(api: Client) -> None:
    body = await sql(api, "SELECT number FROM numbers(100) LIMIT 5")
    assert body["rows"] == [[0], [1], [2], [3], [4]] and body["truncated"] is False
    assert body["truncated_by"] is None
    body = await sql(api, "SELECT number FROM numbers(100)", max_rows=10)
    assert body["rows"] == [[n] for n in range(10)]
    assert (body["rows_returned"], body["truncated"]) == (10, True)
    assert body["truncated_by"] == "max_rows"
    body = await sql(api, "SELECT number FROM numbers(10)", max_rows=10)
    assert (body["rows_returned"], body["truncated"]) == (10, False)
    body = await sql(api, "SELECT number FROM numbers(50000)")  # the default, 1000
    assert (body["rows_returned"], body["truncated"]) == (1000, True)
    body = await sql(api, "SELECT number FROM numbers(100000000)", max_rows=10_000)
    assert (body["rows_returned"], body["truncated"]) == (10_000, True)
    assert body["rows"][-1] == [9999]
    text, headers = await sql(api, "SELECT number FROM numbers(100)", format="csv", max_rows=3)
    assert text == "number\r\n0\r\n1\r\n2\r\n"
    assert (headers["X-Truncated"], headers["X-Truncated-By"]) == ("true", "max_rows")


@pytest.mark.parametrize("fmt", ["json", "csv"])
async def test_an_answer_stops_at_its_byte_limit(serve: ServeFn, fmt: str) -> None:
    """Wide rows: the answer holds whole rows up to max_answer_bytes as encoded, says
    which limit cut it, and the store goes on (10,000 rows of 100 kB would be 1 GB)."""
    limit = 1024 * 1024
    wide = "SELECT number, repeat('x', 100000) AS wide FROM numbers(10000)"
    async with serve(sqlguard.SqlLimits(max_answer_bytes=limit)) as (api, _):
        async with api.post(
            "/api/v1/sql", json={"query": wide, "max_rows": 10_000, "format": fmt}
        ) as response:
            assert response.status == 200
            raw = await response.read()
            headers = response.headers
        assert (headers["X-Truncated"], headers["X-Truncated-By"]) == ("true", "max_answer_bytes")
        if fmt == "json":
            body = orjson.loads(raw)
            rows = body["rows"]
            assert (body["truncated"], body["truncated_by"]) == (True, "max_answer_bytes")
            assert body["rows_returned"] == len(rows)
        else:
            header, *rows = list(csv.reader(io.StringIO(raw.decode())))
            assert header == ["number", "wide"]
        row_bytes = 100_000 + len('[0,""]')  # about: the number's digits vary
        assert len(rows) == int(headers["X-Rows-Returned"])
        # Whole rows, in order, as many as fit and not one more.
        assert [int(r[0]) for r in rows] == list(range(len(rows)))
        assert all(r[1] == "x" * 100_000 for r in rows)
        assert limit // row_bytes - 1 <= len(rows) <= limit // row_bytes
        assert len(raw) < limit + 1000
        # Narrow rows under the same limit are not cut; the session is fine afterwards.
        body = await sql(api, "SELECT number FROM numbers(5000)", max_rows=10_000)
        assert (body["rows_returned"], body["truncated_by"]) == (5000, None)


async def test_rows_wide_in_memory_but_not_encoded_are_all_answered(
    serve: ServeFn, store: Store
) -> None:
    """8,000 NULLs of a 32 x UInt256 tuple: ~8 MB as ClickHouse holds them, ~90 kB as
    encoded. A result limit counted in memory (max_result_bytes, 4 MB here) cut them at
    4,500 and the answer said it was whole: the answer's own limit is what cuts."""
    wide = "Nullable(Tuple(" + ", ".join(["UInt256"] * 32) + "))"
    store.command(f"CREATE TABLE wide (n UInt32, a {wide}) ENGINE = MergeTree ORDER BY n")
    store.command("SYSTEM STOP MERGES wide")  # 16 parts: more than one block
    for part in range(16):
        store.command(
            "INSERT INTO wide SELECT number, NULL FROM numbers({start:UInt32}, 500)",
            {"start": part * 500},
        )
    async with serve(sqlguard.SqlLimits(max_answer_bytes=1024 * 1024)) as (api, _):
        body = await sql(api, "SELECT n, a FROM wide ORDER BY n", max_rows=10_000)
    assert (body["rows_returned"], body["truncated"], body["truncated_by"]) == (8000, False, None)
    assert [row[0] for row in body["rows"]] == list(range(8000))


async def test_a_query_past_its_time_limit_is_a_clear_400(serve: ServeFn) -> None:
    async with serve(sqlguard.SqlLimits(timeout_s=1)) as (api, _):
        started = time.monotonic()
        message = await refused(api, "SELECT count() FROM numbers(1e11)", "timeout")
        assert time.monotonic() - started < 15
        assert "time limit" in message and "Timeout exceeded" in message
        # The session is fine afterwards.
        assert (await sql(api, "SELECT 1 AS one"))["rows"] == [[1]]


async def test_a_long_query_does_not_hold_the_store(serve: ServeFn, store: Store) -> None:
    """The SQL session is its own: the writer and the analytics go on meanwhile."""
    async with serve(sqlguard.SqlLimits(timeout_s=2)) as (api, _):
        heavy = asyncio.create_task(refused(api, "SELECT count() FROM numbers(1e11)", "timeout"))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        assert (await store.arows("SELECT count() AS n FROM calls"))[0]["n"] == len(CALLS)
        async with api.get("/api/v1/analytics/usage") as response:
            assert response.status == 200
        assert time.monotonic() - started < 1.5
        assert not heavy.done()
        await heavy


# -- bad bodies -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"not json", "body"),
        (b"[1, 2]", "body"),
        (b'"SELECT 1"', "body"),
        (b"{}", "query"),
        (b'{"query": ""}', "query"),
        (b'{"query": "   "}', "query"),
        (b'{"query": 1}', "query"),
        (b'{"query": "SELECT 1", "format": "xml"}', "format"),
        (b'{"query": "SELECT 1", "max_rows": 0}', "max_rows"),
        (b'{"query": "SELECT 1", "max_rows": 10001}', "max_rows"),
        (b'{"query": "SELECT 1", "max_rows": "5"}', "max_rows"),
        (b'{"query": "SELECT 1", "max_rows": true}', "max_rows"),
        (b'{"query": "SELECT 1", "max_rows": 2.5}', "max_rows"),
        (b'{"query": "SELECT 1", "max_rows": 1e400}', "body"),  # not JSON orjson reads
        (b'{"query": "SELECT 1", "tenant": "acme"}', "tenant"),
        (b'{"query": "SELECT 1", "query": "SELECT 2"}', "query"),  # not one silently
        (b'{"query": "SELECT 1", "max_rows": 5, "max_rows": 5}', "max_rows"),
        (b'{"query": ' + b"[" * 1000 + b"]" * 1000 + b', "query": "SELECT 1"}', "body"),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(api: Client, body: bytes, param: str) -> None:
    async with api.post(
        "/api/v1/sql", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["param"], error["code"]) == (param, "bad_request")


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b'{"query": "SELECT 1"}'),  # not gzip at all
        ("gzip", gzip.compress(b'{"query": "SELECT 1"}', mtime=0)[:12] + b"cut, garbled"),
        ("deflate", b"xx"),
        pytest.param(
            "zstd",
            b"not zstd",
            marks=pytest.mark.skipif(not HAS_ZSTD, reason="aiohttp has no zstd decoder here"),
        ),
    ],
)
async def test_a_body_that_is_not_its_content_encoding_is_400_naming_it(
    api: Client, caplog: pytest.LogCaptureFixture, encoding: str, body: bytes
) -> None:
    """aiohttp inflates a body as it is read, and raised out of read_request for one that
    is not what its Content-Encoding says: a bare text 500 and a traceback at ERROR.
    Now the endpoint's own 400 naming the body; the connection closes with it (its
    parser is broken), and the next request is answered."""
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
    with caplog.at_level(logging.ERROR):
        async with api.post("/api/v1/sql", data=body, headers=headers) as response:
            assert response.status == 400, await response.text()
            assert response.headers["Connection"] == "close"
            error = (await response.json())["error"]
        assert await sql(api, "SELECT 1") is not None  # on a new connection
    assert (error["param"], error["code"]) == ("body", "bad_request")
    assert f"it is not {encoding} as its Content-Encoding says" in error["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    compressed = gzip.compress(b'{"query": "SELECT 1 AS one"}')  # a gzip body still works
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with api.post("/api/v1/sql", data=compressed, headers=headers) as response:
        assert response.status == 200
        assert (await response.json())["rows"] == [[1]]


async def test_a_body_over_1_mib_is_413(api: Client) -> None:
    query = "SELECT 1 -- " + "x" * (1024 * 1024)
    async with api.post("/api/v1/sql", json={"query": query}) as response:
        assert response.status == 413
        error = (await response.json())["error"]
    assert error["code"] == "too_long" and "1048576 bytes" in error["message"]
    assert error["param"] == "body"


async def test_the_answer_headers_come_with_json_too(api: Client) -> None:
    async with api.post("/api/v1/sql", json={"query": "SELECT 1", "max_rows": 5.0}) as response:
        assert response.status == 200
        assert response.headers["X-Rows-Returned"] == "1"
        assert response.headers["X-Truncated"] == "false"
        assert float(response.headers["X-Elapsed-Ms"]) >= 0


async def test_a_clickhouse_error_is_a_400_with_its_message(api: Client) -> None:
    message = await refused(api, "SELEC 1", "clickhouse_error")
    assert "Syntax error" in message
    message = await refused(api, "SELECT nope FROM calls", "clickhouse_error")
    assert "nope" in message
    message = await refused(api, "SELECT {x:String}", "clickhouse_error")
    assert "x" in message


async def test_a_result_the_client_cannot_read_says_so(api: Client) -> None:
    """An aggregate function's state is a type clickhouse-connect does not decode: the
    endpoint's unreadable_result, saying how to read its value (it was reported as
    ClickHouse's error, clickhouse_error)."""
    digest = "SELECT quantilesTDigestState(0.5)(number) FROM numbers(9)"
    for query in ("SELECT sumState(1)", digest):
        message = await refused(api, query, "unreadable_result")
        assert "deserialization not supported" in message and "finalizeAggregation" in message
    assert (await sql(api, "SELECT finalizeAggregation(sumState(2))"))["rows"] == [[2]]


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code", "words"),
    [
        # writes and DDL
        ("INSERT INTO calls (tenant) VALUES ('evil')", "not_read_only", "INSERT"),
        ("insert into calls select * from calls", "not_read_only", "INSERT"),
        ("CREATE TABLE evil (x Int8) ENGINE = Memory", "not_read_only", "CREATE"),
        ("DROP TABLE calls", "not_read_only", "DROP"),
        ("ALTER TABLE calls DELETE WHERE 1", "not_read_only", "ALTER"),
        ("TRUNCATE TABLE calls", "not_read_only", "TRUNCATE"),
        ("OPTIMIZE TABLE calls FINAL", "not_read_only", "OPTIMIZE"),
        ("RENAME TABLE calls TO evil", "not_read_only", "RENAME"),
        ("SET readonly = 0", "not_read_only", "SET"),
        ("SYSTEM DROP DNS CACHE", "not_read_only", "SYSTEM"),
        ("KILL QUERY WHERE 1", "not_read_only", "KILL"),
        ("USE system", "not_read_only", "USE"),
        ("EXPLAIN PIPELINE INSERT INTO calls SELECT * FROM calls", "not_read_only", "EXPLAIN"),
        ("SHOW DATABASES", "not_read_only", "SHOW"),
        ("SHOW PROCESSLIST", "not_read_only", "SHOW"),
        ("SHOW GRANTS", "not_read_only", "SHOW"),
        # more than one statement
        ("SELECT 1; SELECT 2", "multiple_statements", "one statement"),
        ("SELECT 1; DROP TABLE calls", "multiple_statements", "one statement"),
        ("SELECT 1 /* ; */", "multiple_statements", "one statement"),
        ("SELECT ';' AS x; DROP TABLE calls", "multiple_statements", "one statement"),
        # comments alone: ClickHouse's error named the endpoint's own EXPLAIN (fuzzing)
        ("-- x", "bad_query", "the query is empty"),
        ("/* x */ \n # y", "bad_query", "the query is empty"),
        ("/* a /* b */ c */", "bad_query", "the query is empty"),  # they nest
        # system tables, however spelled or nested
        ("SELECT * FROM system.tables", "forbidden_table", "system"),
        ("SELECT * FROM `system`.`tables`", "forbidden_table", "system"),
        ('SELECT * FROM "system"."one"', "forbidden_table", "system"),
        ("SELECT * FROM calls WHERE tenant IN (SELECT name FROM system.tables)",
         "forbidden_table", "system"),
        ("SELECT * FROM calls AS c JOIN system.one AS o ON 1", "forbidden_table", "system"),
        ("WITH t AS (SELECT * FROM system.one) SELECT * FROM t", "forbidden_table", "system"),
        ("SELECT 1 WHERE 1 IN system.one", "forbidden_table", "system"),
        ("SELECT 1 WHERE 1 IN system", "forbidden_table", "system"),  # a table of the store's
        ("EXPLAIN SELECT 1 WHERE 1 IN system", "forbidden_table", "by name and database"),
        ("SELECT * FROM INFORMATION_SCHEMA.TABLES", "forbidden_table", "information_schema"),
        ("SELECT * FROM information_schema.columns", "forbidden_table", "information_schema"),
        ("DESCRIBE system.one", "forbidden_table", "system"),
        ("SHOW TABLES FROM system", "forbidden_table", "system"),
        ("SHOW TABLES FROM system LIKE 'calls'", "forbidden_table", "system"),
        ("SHOW COLUMNS FROM system.one", "forbidden_table", "system"),
        # An escape in a quoted name spells "system" without the word (\x73 is "s").
        ("SHOW COLUMNS FROM `\\x73ystem`.`one`", "forbidden_table", "escape"),
        ("SHOW TABLES FROM `\\x73ystem`", "forbidden_table", "escape"),
        ("SHOW CREATE TABLE system.one", "forbidden_table", "system"),
        ("EXPLAIN SELECT * FROM system.one", "forbidden_table", "system"),
        # files, the network, other servers, dictionaries
        ("SELECT * FROM file('/etc/passwd', 'LineAsString')", "forbidden_function", "file"),
        ("SELECT file('/etc/hostname')", "forbidden_function", "file"),
        ("SELECT * FROM url('http://127.0.0.1:1/', CSV, 'a String')", "forbidden_function", "url"),
        ("SELECT * FROM remote('127.0.0.1', default.calls)", "forbidden_function", "remote"),
        ("SELECT * FROM remoteSecure('127.0.0.1', default.calls)", "forbidden_function",
         "remoteSecure"),
        ("SELECT * FROM s3('http://127.0.0.1:1/x.csv')", "forbidden_function", "s3"),
        ("SELECT * FROM mysql('h:3306', 'd', 't', 'u', 'p')", "forbidden_function", "mysql"),
        ("SELECT * FROM postgresql('h:5432', 'd', 't', 'u', 'p')", "forbidden_function",
         "postgresql"),
        ("SELECT * FROM cluster('default', default.calls)", "forbidden_function", "cluster"),
        ("SELECT * FROM executable('x.sh', CSV, 'a String')", "forbidden_function",
         "executable"),
        ("SELECT * FROM merge(REGEXP('sys'), '.*')", "forbidden_function", "merge"),
        ("SELECT * FROM dictionary('d')", "forbidden_function", "dictionary"),
        ("SELECT dictGet('d', 'x', toUInt64(1))", "forbidden_function", "dictGet"),
        ("SELECT getServerSetting('path')", "forbidden_function", "getServerSetting"),
        ("SELECT hasColumnInTable('system', 'users', 'name')", "forbidden_function",
         "hasColumnInTable"),
        ("SELECT aiGenerate('hello')", "forbidden_function", "aiGenerate"),
        ("SELECT getMergeTreeSetting('index_granularity')", "forbidden_function",
         "getMergeTreeSetting"),
        ("SELECT logTrace('written to the server log')", "forbidden_function", "logTrace"),
        ("SELECT demangle('_Z1fv')", "forbidden_function", "demangle"),
        ("SELECT toString(number) FROM numbers(2) AS t WHERE AIFilter(toString(number))",
         "forbidden_function", "AIFilter"),
        ("SELECT * FROM input('a String')", "forbidden_function", "input"),
        ("SELECT * FROM calls WHERE tenant IN (SELECT * FROM url('http://x/', CSV, 'a String'))",
         "forbidden_function", "url"),
        ("DESCRIBE file('/etc/passwd', 'LineAsString')", "forbidden_function", "file"),
        ("SELECT * FROM loop(numbers(3))", "forbidden_function", "loop"),
        ("SELECT * FROM null('a Int8')", "forbidden_function", "null"),
        # the server's details and the session's settings: off the function list
        ("SELECT hostName(), uptime()", "forbidden_function", "hostName"),
        ("SELECT getOSKernelVersion()", "forbidden_function", "getOSKernelVersion"),
        ("SELECT getSetting('max_memory_usage')", "forbidden_function", "getSetting"),
        ("SELECT currentUser()", "forbidden_function", "currentUser"),
        ("SELECT arrayReduce('naiveBayesClassifier', [1])", "forbidden_function",
         "naiveBayesClassifier"),
        # a file named as a table (chDB's default database reads it)
        ("SELECT * FROM '/etc/hostname'", "forbidden_table", "file"),
        ("SELECT * FROM default.`/etc/hostname`", "forbidden_table", "file"),
        # output elsewhere than the response
        (f"SELECT 1 INTO OUTFILE '{OUTFILE}'", "not_read_only", "OUTFILE"),
        (f"SELECT 1 into /* x */ -- y\n outfile '{OUTFILE}'", "not_read_only", "OUTFILE"),
        (f"SHOW TABLES INTO OUTFILE '{OUTFILE}'", "not_read_only", "OUTFILE"),
        # characters ClickHouse reads as spaces and Python's \s does not
        *[(f"SHOW TABLES INTO{gap}OUTFILE '{OUTFILE}'", "not_read_only", "OUTFILE")
          for gap in ("\u200b", "\ufeff", "\u2060", "\u180e", "\u200c", "\u200d")],
        (f"SELECT 1 INTO\u200bOUTFILE '{OUTFILE}'", "not_read_only", "OUTFILE"),
        ("EXPLAIN indexes = 1 SELECT 1 FORMAT JSON", "not_read_only", "EXPLAIN"),
        ("SELECT 1 FORMAT JSON", "bad_query", "format"),
        ("EXPLAIN SELECT 1 FORMAT JSON", "not_read_only", "EXPLAIN"),
    ],
)  # fmt: skip
async def test_refused_before_it_runs(api: Client, query: str, code: str, words: str) -> None:
    message = await refused(api, query, code)
    assert words.lower() in message.lower(), message


async def test_a_quoted_name_cannot_add_nodes_to_the_tree(api: Client) -> None:
    """EXPLAIN AST prints a name as it is: a line break in an alias added lines the
    checks read as nodes, and these hid arrayReduce's real first argument (SQL that
    ClickHouse runs) behind a fake 'sum': the first query read system.databases. Quoted
    names holding a line break, another control character, a backslash, a quote, or
    spaces at either end are refused (the tree would print them otherwise than the
    checks compare). Found by a red-team pass."""
    fake = "\n     ExpressionList\n      Literal 'sum'\n      Literal x"
    for query in (
        "SELECT arrayReduce('groupConcat((SELECT toString(groupArray(name)) FROM "
        f"system.databases))', ['<', '>']) AS `q{fake}`",
        f"SELECT initializeAggregation('groupConcat((SELECT 1))', 1) AS \"q{fake}\"",
        "SELECT 1 AS `a\tb`",
        "SELECT 1 AS `a\\\\b`",
        "SELECT * FROM ` lead`.secret",
        "SELECT * FROM `o'app`.secret",
        "SELECT * FROM `\u00a0nbsp`.secret",
        "SELECT 1 AS `x\\`y`",
    ):
        message = await refused(api, query, "bad_query")
        assert "is not allowed here: a quoted name" in message, (query, message)
    for query in ("SELECT 1 AS `a b`, 'it''s\n\\t' AS `ünï`", "SELECT `tenant` FROM `calls`"):
        assert (await sql(api, query))["rows"], query


async def test_a_database_named_as_the_stores_but_for_case_is_not_read(
    serve: ServeFn, store: Store
) -> None:
    """ClickHouse's database names are case-sensitive: `Default` is another database
    than `default`, whose table of the same name as the store's was read (the checks
    compared names without case), its tables listed and its schema shown."""
    try:
        store.command("CREATE DATABASE IF NOT EXISTS Default")
        store.command(
            "CREATE TABLE IF NOT EXISTS Default.calls (secret String) "
            "ENGINE = MergeTree ORDER BY secret"
        )
        store.command("INSERT INTO Default.calls VALUES ('OTHER-APP-SECRET')")
        async with serve() as (api, _):
            for query in (
                "SELECT * FROM Default.calls",
                "SHOW TABLES FROM Default",
                "SHOW CREATE TABLE Default.calls",
                "SELECT tenant FROM calls WHERE tenant IN (SELECT secret FROM Default.calls)",
            ):
                message = await refused(api, query, "forbidden_table")
                assert "OTHER-APP-SECRET" not in message and "meant" not in message, message
            assert await sql(api, "SELECT count() AS n FROM default.calls")
    finally:
        store.command("DROP DATABASE IF EXISTS Default SYNC")


async def test_only_the_stores_own_database_is_read(serve: ServeFn, store: Store) -> None:
    """A ClickHouse server may hold other applications' databases, which the store's user
    can read: however a query names one of their tables (joined, in IN, a SHOW or
    DESCRIBE, quoted), it is refused. With the check bypassed, the same session
    reads it. The store's own tables still run, qualified by its database too."""
    try:
        store.command("CREATE DATABASE IF NOT EXISTS other_app")
        store.command(
            "CREATE TABLE IF NOT EXISTS other_app.secret (x String) ENGINE = MergeTree ORDER BY x"
        )
        store.command("CREATE DATABASE IF NOT EXISTS `other app.v2`")
        store.command("CREATE TABLE IF NOT EXISTS `other app.v2`.secret (x String) ENGINE = Memory")
        store.command("INSERT INTO other_app.secret VALUES ('TOPSECRET')")
        async with serve() as (api, app):
            for query in (
                "SELECT * FROM other_app.secret",
                "SELECT * FROM `other_app`.`secret`",
                'SELECT * FROM "OTHER_APP"."secret"',
                "SELECT * FROM other_app . secret",
                "SELECT tenant FROM calls WHERE tenant IN other_app.secret",
                "SELECT tenant FROM calls WHERE tenant IN (SELECT x FROM other_app.secret)",
                "SELECT 1 FROM calls AS c JOIN other_app.secret AS s ON c.tenant = s.x",
                "WITH t AS (SELECT * FROM other_app.secret) SELECT * FROM t",
                "SELECT other_app.secret.x FROM calls",
                "DESCRIBE other_app.secret",
                "EXPLAIN SELECT * FROM other_app.secret",
                "SHOW TABLES FROM other_app",
                "SHOW TABLES IN `other_app` LIKE 'sec%'",
                "SHOW COLUMNS FROM secret FROM other_app",
                "SHOW COLUMNS FROM other_app.secret",
                "SHOW CREATE TABLE other_app.secret",
                # a name with a space and a dot (the tree prints it unquoted)
                "SELECT * FROM `other app.v2`.secret AS t",
                "SELECT 1 WHERE 1 IN `other app.v2`.secret",
                "SHOW TABLES FROM `other app.v2`",
                # a database the session does not see, or a file by a dotted name: one
                # answer for all (no oracle of which databases exist)
                "SELECT * FROM no_such_db.t",
                "SHOW TABLES FROM no_such_db",
                "SHOW CREATE TABLE secret.csv",
                "SHOW COLUMNS FROM `secret.csv`",
                "SELECT 1 WHERE 'x' IN `secret.csv`",
                "SELECT 1 WHERE 'x' NOT IN other_app.secret",
            ):
                message = await refused(api, query, "forbidden_table")
                assert "own database ('default')" in message, (query, message)
            for query in ("SELECT * FROM secret", "SELECT * FROM secrets"):
                message = await refused(api, query, "forbidden_table")  # not the store's
                assert "other_app" not in message and "meant" not in message, message
            message = await refused(api, "SELECT tenantt FROM calls", "clickhouse_error")
            assert "Maybe you meant" in message and "tenant" in message  # its own: kept
            runner = app[sqlapi.SQL]
            _, rows, _ = runner.execute(
                "SELECT * FROM other_app.secret", select=True, encode=sqlapi.json_row, max_rows=10
            )
            assert b"TOPSECRET" in b"".join(rows)  # what the check keeps from the endpoint
            for query in ("SELECT count() FROM default.calls", "SHOW TABLES FROM default"):
                assert (await sql(api, query))["rows"], query
            assert (await sql(api, "SELECT c.tenant FROM calls AS c LIMIT 1"))["rows"]
    finally:
        store.command("DROP DATABASE IF EXISTS other_app SYNC")
        store.command("DROP DATABASE IF EXISTS `other app.v2` SYNC")


async def test_no_statement_reads_a_file_of_the_store_process(api: Client, tmp_path: Path) -> None:
    """Where ClickHouse would evaluate an expression the syntax tree does not show: a
    SHOW's WHERE and LIMIT (EXPLAIN AST leaves them out), a column's ALIAS or DEFAULT
    in a structure string. readonly=1 does not stop file() as a function: each of these
    read the file (or told whether it holds a word) before they were refused."""
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET\n")
    for query, code in (
        (f"SHOW TABLES WHERE file('{secret}') LIKE '%TOP%'", "not_read_only"),
        (f"SHOW TABLES FROM default WHERE file('{secret}') != ''", "not_read_only"),
        (f"SHOW TABLES LIMIT length(file('{secret}'))", "not_read_only"),
        (f"SHOW COLUMNS FROM calls WHERE file('{secret}') != ''", "not_read_only"),
        (f"SELECT b FROM generateRandom('a Int8, b String ALIAS file(''{secret}'')') LIMIT 1",
         "forbidden_function"),
        (f"SELECT b FROM generateRandom(concat('a Int8, b String ALIAS fi', 'le(''{secret}'')'))"
         " LIMIT 1", "forbidden_function"),
        (f"SELECT * FROM values('a Int8, b String DEFAULT file(''{secret}'')', 1)",
         "forbidden_function"),
        (f"SHOW COLUMNS FROM `{secret}`", "forbidden_table"),
        (f"SHOW CREATE TABLE `{secret}`", "forbidden_table"),
        ("SHOW TABLES /* WHERE */", "not_read_only"),
        # APPLY's function, lambda and parameters are not in the tree
        (f"SELECT * APPLY file FROM (SELECT '{secret}' AS p)", "forbidden_function"),
        (f"SELECT t.* APPLY(x -> file(x)) FROM (SELECT '{secret}' AS p) AS t",
         "forbidden_function"),
        (f"SELECT COLUMNS('p') APPLY(file) FROM (SELECT '{secret}' AS p)", "forbidden_function"),
        (f"SELECT * APPLY(quantile(if(startsWith(file('{secret}'), 'X'), 0.5, 2)))"
         " FROM numbers(3)", "forbidden_function"),
        ("SELECT * APPLY(x -> (SELECT count() FROM system.tables)) FROM (SELECT 1 AS p)",
         "forbidden_function"),
        # an aggregate function named by a string is parsed, parameters and all, as it runs
        (f"SELECT arrayReduce('groupConcat(file(''{secret}''))', ['<', '>'])",
         "forbidden_function"),
        (f"SELECT arrayReduce(concat('groupConcat(fi', 'le(''{secret}''))'), ['<', '>'])",
         "forbidden_function"),
        (f"SELECT arrayReduceInRanges('groupConcat(file(''{secret}''))', [(1, 2)], ['<', '>'])",
         "forbidden_function"),
        (f"SELECT initializeAggregation('groupConcatState(file(''{secret}''))', '')",
         "forbidden_function"),
        ("SELECT arrayReduce('groupConcat((SELECT groupConcat(name) FROM system.databases))',"
         " ['<', '>'])", "forbidden_function"),
        # ... or in its parameters, where the check read a bare 'sum' (red team, round 2)
        (f"SELECT arrayReduce('groupConcat(file(''{secret}''))', ['<'])('sum')",
         "forbidden_function"),
        # a column list whose DEFAULT ClickHouse evaluates to build a schema: the file
        # came back as an Enum's name in it (red team, round 2)
        (f"SELECT structureToProtobufSchema('x DEFAULT CAST(1, concat(''Enum8('''''', "
         f"replaceRegexpAll(file(''{secret}'', ''LineAsString''), ''[^A-Z]'', ''''), "
         "'''''' = 1)''))')", "forbidden_function"),
        (f"SELECT structureToCapnProtoSchema('x UInt8 DEFAULT toUInt8(file(''{secret}''))')",
         "forbidden_function"),
        # a file named as the set of an IN, or by a relative name with a dot (chDB reads
        # its default database's files so; readonly also refuses them)
        (f"SELECT 'TOPSECRET' IN `{secret}`", "forbidden_table"),
        (f"SELECT * FROM `{secret.name}`", "forbidden_table"),
    ):  # fmt: skip
        async with api.post("/api/v1/sql", json={"query": query}) as response:
            text = await response.text()
            assert response.status == 400, (query, text)
        assert "TOPSECRET" not in text
        assert orjson.loads(text)["error"]["code"] == code, (query, text)


async def test_nothing_refused_was_done(api: Client, store: Store) -> None:
    for query in ("DROP TABLE calls", "SELECT 1; DROP TABLE calls", "TRUNCATE TABLE calls",
                  "INSERT INTO calls (tenant) VALUES ('evil')"):  # fmt: skip
        await sql(api, query, expect=400)
    assert not await asyncio.to_thread(OUTFILE.exists)
    assert (await store.arows("SELECT count() AS n FROM calls"))[0]["n"] == len(CALLS)


async def test_a_syntax_error_gives_its_position_in_the_query_sent(api: Client) -> None:
    """ClickHouse's parser counts from the start of what it parsed (llmtap's EXPLAIN
    before the query): the message gives positions in the caller's query."""
    for query, position in (("SELEC 1", 7), ("SELECT 1 +", 11), ("  SELECT 1 +", 13)):
        message = await refused(api, query, "clickhouse_error")
        assert f"failed at position {position} " in message, message
        assert "EXPLAIN" not in message and message.count("DB::Exception") == 1
    message = await refused(api, " SELECT (1 ", "clickhouse_error")
    assert "'(' at position 9 is never closed" in message, message
    # The query's own text, echoed back, is left alone.
    message = await refused(api, "SELECT 1 1 'at position 5'", "clickhouse_error")
    assert "failed at position 10 " in message and "'at position 5'" in message, message
    # Lines and columns agree with the position, counting the lines trimmed before it.
    message = await refused(api, "SELECT 1 1\nFROM calls", "clickhouse_error")
    assert "failed at position 10 " in message and "(line 1, col 10)" in message, message
    message = await refused(api, "\n\nSELECT 1\nFROM calls\nWHERE", "clickhouse_error")
    assert "failed at position 28 " in message and "(line 5, col 6)" in message, message


def test_a_node_the_checks_do_not_know_is_refused() -> None:
    """A syntax ClickHouse adds later, or one whose tree hides what it runs: refused by
    the list of nodes the checks know, not trusted."""
    root = sqltree.parse_ast(
        ["SelectWithUnionQuery (children 1)", " ExpressionList (children 1)",
         "  SelectQuery (children 1)", "   ExpressionList (children 1)",
         "    SomethingNew (children 1)", "     Literal UInt64_1"]
    )  # fmt: skip
    with pytest.raises(SqlError, match="SomethingNew") as refused:
        sqlguard.check_tree(root, "SELECT new", sqlnames.Databases("default", frozenset()))
    assert refused.value.code == "bad_query"


async def test_a_bare_name_clickhouse_calls_as_a_function_off_the_list(api: Client) -> None:
    """ClickHouse reads some bare names as function calls where no column, alias or
    lambda argument has the name (SELECT user is currentUser()): the syntax tree shows
    an Identifier, so the function list never saw them, and each of these answered with
    the session's user (red team, round 3). They are judged on the query as the
    analyzer resolves it, so a column named so still reads."""
    for query in (
        "SELECT CURRENT_USER",
        "SELECT currentUser, user, session_user",
        "SELECT `currentUser` AS u, currentHandler AS h, currentRequestURL AS url",
        "SELECT upper(current_user) FROM numbers(1) WHERE user = 'default'",
        "SELECT * FROM calls WHERE user = currentUser",
        "EXPLAIN SELECT user",
        "DESCRIBE (SELECT user)",
    ):
        message = await refused(api, query, "forbidden_function")
        assert "calls.user" in message, message
    body = await sql(api, "SELECT user, count() AS n FROM calls GROUP BY user ORDER BY user")
    assert body["rows"] == [["alice", 1], ["bob", 1], ["zed", 1]]
    for query in (
        "SELECT calls.user FROM calls WHERE user = 'alice'",
        "SELECT user FROM (SELECT 'alice' AS user)",
        "WITH 'alice' AS user SELECT user",
        "SELECT arrayJoin(arrayMap(user -> 'alice', [1])) AS user",
    ):
        assert (await sql(api, query))["rows"] == [["alice"]], query
    assert (await sql(api, "SELECT now = now(), today = today()"))["rows"] == [[True, True]]


@pytest.fixture
def files_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with files that look like secrets, the process's own, and the one
    chDB's engine starts in: its default database reads them as tables. llmtap starts
    the engine in an empty directory (sql.store.files_root); this puts files there, as
    a store started from this directory before that change had them, so that the
    endpoint's checks are tested on their own."""
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "noext").write_text("TOPSECRET\n")
    (here / ".env").write_text("OPENAI_API_KEY=TOPSECRET\n")
    (here / "default.calls").write_text("TOPSECRET\n")  # one name, with a dot
    (here / "calls (alias x)").write_text("TOPSECRET\n")  # read as calls by the tree
    (here / "calls, x").write_text("TOPSECRET\n")  # "table_name: default.calls, x"
    monkeypatch.chdir(here)
    monkeypatch.setattr(sql_store, "files_root", lambda dsn: here)
    return here


def test_chdb_starts_in_a_directory_with_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chDB's default database reads the files of the directory its engine started in
    as tables, the store's own client and readonly sessions alike once one had: the
    process's working directory, wherever llmtap was started (a project's .env, say).
    The engine starts in an empty directory of its own; the process's stays its own."""
    here = tmp_path / "project"
    here.mkdir()
    (here / "noext").write_text("TOPSECRET\n")
    (here / ".env").write_text("OPENAI_API_KEY=TOPSECRET\n")
    monkeypatch.chdir(here)
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        assert Path.cwd() == here
        for name in ("noext", "`.env`", "default.noext"):
            with pytest.raises(DatabaseError, match="UNKNOWN_TABLE"):
                store.command(f"SELECT * FROM {name}")
        root = sql_store.files_root(store.dsn)
        assert root == tmp_path / "clickhouse" / "no_files"
        assert list(root.iterdir()) == [] and root.stat().st_mode & 0o777 == 0o700
    finally:
        store.close()


def test_a_relative_store_path_is_the_process_directory_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chdb://data names data in the process's directory: the engine starts in another
    (no_files), so the store names it absolutely, and the SQL endpoint's client with it
    (it opened a second store's path before, and failed)."""
    monkeypatch.chdir(tmp_path)
    store = Store("chdb://data")
    try:
        assert store.dsn == f"chdb://{tmp_path / 'data'}"
        assert (tmp_path / "data" / "no_files").is_dir()
        runner = sqlrun.SqlRunner(store.dsn, sqlguard.SqlLimits())
        assert runner.answer("SELECT 1 AS one", 1, lambda row: repr(row).encode()).rows == [b"(1,)"]
    finally:
        store.close()


async def test_files_of_the_process_directory_are_not_tables(
    files_here: Path, api: Client, store: Store
) -> None:
    """chDB's default database reads the files of the process's directory as tables
    (default.`.env`, or plain noext): readonly stopped them only until chDB had read one
    as a table (here the store's own client does first), and the endpoint then answered
    with it (red team, rounds 3 and 4). The store's tables are named as system.tables
    lists them, by names the checks read as ClickHouse does; others are refused."""
    for name in ("noext", "`default.calls`", "`calls (alias x)`", "`calls, x`"):
        assert "TOPSECRET" in str(store.command(f"SELECT * FROM {name}"))  # a table, to chDB
    for query in (
        "SELECT * FROM default.noext",
        "SELECT * FROM `.env`",
        "SELECT * FROM default.`.env`",
        "SELECT 'TOPSECRET' IN default.noext",
        "SELECT * FROM `default.calls`",  # printed as default.calls in the tree
        "SELECT 1 WHERE 'TOPSECRET' IN `default.calls`",
        "DESCRIBE `default.calls`",
        "SHOW COLUMNS FROM `default.calls`",
        "DESCRIBE noext",
        "EXPLAIN SELECT * FROM noext",
        # an alias shadows a table's name: an IN's set is an expression first, here
        # the file (red team, round 5: a yes or no a guess, a million guesses a query)
        "WITH noext AS calls SELECT 'TOPSECRET' IN calls",
        "EXPLAIN SYNTAX run_query_tree_passes = 1 WITH noext AS calls SELECT 'x' IN calls",
        "SELECT * FROM `calls, x`",  # its line: "table_name: default.calls, x"
    ):
        await refused(api, query, "forbidden_table")
    # The analyzer evaluates scalar subqueries: a query naming what may not be the
    # store's gets one answer, whether it fails, how, or what it resolves. A red-team
    # pass read the whole file through a hint (round 6: a column named by the file's
    # text, folded into a type string, and a near miss of that name; a "(A)" in it
    # ended the hint's cut early), then by the error's code (round 7: which type
    # string a byte of the file picks).
    pad = "P" * 150 + " (A) "
    inner = (
        f"SELECT untuple(CAST(tuple('{pad}'), concat('Tuple(`', ifNull((SELECT "
        "arrayStringConcat(groupArray(toString(tuple(*))), '|') FROM noext), ''), "
        "'` String)')))"
    )
    near = (
        f"tupleElement(CAST((_{pad}_), concat(_Tuple(__, ifNull(_subquery_2, __), __ "
        "String)_)), __)"
    )
    for query in (f"SELECT `{near}` FROM ({inner})", "SELECT sum(c1) FROM noext",
                  "SELECT c2 FROM noext"):  # fmt: skip
        message = await refused(api, query, "forbidden_table")
        assert "refused alike" in message and "noext" in message, message
        assert "TOPSECRET" not in message and "c1" not in message, message
    answers = set()
    for guess in "TX":  # the file's first byte is T: Foo, an unknown type, else UInt8
        first = "substring((SELECT c1 FROM noext), 1, 1)"
        query = f"SELECT CAST(1, if({first} = '{guess}', 'Foo', 'UInt8'))"
        answers.add(await refused(api, query, "forbidden_table"))
    assert len(answers) == 1, answers
    message = await refused(api, "SELECT tenantt FROM calls", "clickhouse_error")
    assert "Maybe you meant" in message, message  # the store's own: told as ever
    for query in ("SELECT * FROM `calls (alias x)`", "SELECT 1 IN `calls (alias x)`"):
        await refused(api, query, "bad_query")  # parse_ast would strip " (alias x)"
    # view()'s query is left unresolved by the analyzer's tree: an IN's set there read
    # the file, a yes or no a guess (red team, round 4); view() is refused
    await refused(api, "SELECT * FROM view(SELECT 1 AS hit WHERE 'TOPSECRET' IN noext)",
                  "forbidden_function")  # fmt: skip
    for query in ("SELECT * FROM noext", "SELECT 'TOPSECRET' IN noext"):
        body = await sql(api, query, expect=400)  # readonly, in the analyzer's check
        assert "TOPSECRET" not in str(body), body
    # ... and the check itself refuses what the analyzer resolves to a file
    for query in ("SELECT * FROM noext", "SELECT 'TOPSECRET' IN noext"):
        root = sqltree.parse_ast(store.command(f"EXPLAIN AST {query}").split("\n"))
        tree = store.command(f"EXPLAIN QUERY TREE passes = 1 {query}")
        databases = sqlnames.Databases("default", frozenset(), frozenset({"calls"}))
        assert sqlnames.unresolved(root, databases)
        with pytest.raises(SqlError, match="noext") as refusal:
            sqlnames.check_resolved(tree, root, databases)
        assert refusal.value.code == "forbidden_table"
    # WITH's names, aliases and the store's own tables still read
    for query in (
        "WITH per AS (SELECT count() AS n FROM calls) SELECT n FROM per",
        "WITH [3] AS arr SELECT count() AS n FROM default.calls WHERE 3 IN arr",
        "SELECT count() AS n FROM calls WHERE tenant IN (SELECT tenant FROM calls)",
    ):
        assert (await sql(api, query))["rows"] == [[3]], query


def test_a_code_chdb_gives_twice_is_said_once() -> None:
    twice = DatabaseError("Code: 164. DB::Exception: Code: 164. DB::Exception: readonly. (X)")
    assert sqlrun._clickhouse_error(twice).message == "Code: 164. DB::Exception: readonly. (X)"


async def test_settings_cannot_be_changed_from_the_query(api: Client) -> None:
    """Refused by the checks (ClickHouse refuses a change itself: the session is
    readonly=1, test_clickhouse_itself_refuses_writes_on_the_session), and a value
    equal to the session's too: it was accepted where another was refused, a test of
    guesses at the session's settings (red team, round 7)."""
    for query in (
        "SELECT 1 SETTINGS readonly = 0",
        "SELECT count() FROM numbers(1e11) SETTINGS max_execution_time = 0",
        "SELECT number FROM numbers(100000) SETTINGS max_result_rows = 0",
        "SELECT 1 SETTINGS max_execution_time = 30",  # the session's own value
        "SELECT 1 SETTINGS readonly = 1",
    ):
        assert await refused(api, query, "not_read_only") == sqlnames.settings_refusal().message
    assert (await sql(api, "EXPLAIN indexes = 1 SELECT count() FROM calls"))["rows"]


async def test_clickhouse_itself_refuses_writes_on_the_session(
    serve: ServeFn, store: Store
) -> None:
    """The second line of defence, with the checks bypassed: run straight on the session."""
    async with serve() as (api, app):
        await sql(api, "SELECT 1")
        runner = app[sqlapi.SQL]
        for statement in (
            "INSERT INTO calls (tenant) VALUES ('evil')",
            "CREATE TABLE evil (x Int8) ENGINE = Memory",
            "DROP TABLE calls",
            "SET readonly = 0",
            "SELECT 1 SETTINGS readonly = 0",
            "SELECT count() FROM numbers(10) SETTINGS max_execution_time = 0",
            "SELECT * FROM file('/etc/hostname', 'LineAsString')",
        ):
            with pytest.raises(DatabaseError, match=r"readonly|READONLY"):
                runner.execute(
                    statement,
                    select=statement.startswith("SELECT"),
                    encode=sqlapi.json_row,
                    max_rows=10,
                )
    assert (await store.arows("SELECT count() AS n FROM calls"))[0]["n"] == len(CALLS)
    # ... and the store's own session was never made read-only.
    store.command("CREATE TABLE scratch (x Int8) ENGINE = Memory")
    store.command("DROP TABLE scratch")


async def test_sql_dsn_is_the_sql_endpoints_own_connection(store: Store, tmp_path: Path) -> None:
    """With sql_dsn (a reading user on the ClickHouse server), the SQL endpoint connects
    there and nowhere else: here a server that is down, so it answers 503 naming the
    server's address and no password, while the analytics endpoints read the store as
    ever. (No ClickHouse server runs here to grant a user on; chDB has no users.)"""
    assert write_batch(store, Batch(events=[c.event() for c in CALLS])) == len(CALLS)
    settings = Settings(
        data_dir=tmp_path,
        admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()],
        clickhouse_dsn="http://llmtap:store-secret@127.0.0.1:1/llmtap",
        sql_dsn="http://reader:reader-secret@127.0.0.1:1/llmtap",
    )
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store  # the store's own client: chDB, as in every test here
    analytics.add_routes(app, settings)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=headers) as api:
        assert app[sqlapi.SQL].dsn == settings.sql_dsn
        async with api.post("/api/v1/sql", json={"query": "SELECT 1"}) as response:
            assert response.status == 503
            error = (await response.json())["error"]
        assert error["code"] == "unavailable" and "unavailable" in error["message"]
        assert "secret" not in error["message"], error
        async with api.get("/api/v1/analytics/usage") as response:
            assert response.status == 200, await response.text()


def test_sql_dsn_needs_a_clickhouse_server() -> None:
    with pytest.raises(ValidationError, match="sql_dsn needs clickhouse_dsn"):
        Settings(sql_dsn="http://reader:pw@127.0.0.1:8123/llmtap")
    with pytest.raises(ValidationError, match="chDB has no users"):
        Settings(clickhouse_dsn="http://h:8123/db", sql_dsn="chdb:///tmp/x")
    with pytest.raises(ValidationError, match="must name the store's database"):
        Settings(clickhouse_dsn="http://h:8123/llmtap", sql_dsn="http://r:pw@h:8123/")
    assert Settings(clickhouse_dsn="https://h:8443/llmtap", sql_dsn="https://r:p@h:8443/llmtap/")


def test_a_servers_hint_is_left_out_to_the_error_name() -> None:
    """A server follows the error's name with its version: the hint ends before it."""
    databases = sqlnames.Databases("llmtap", frozenset({"billing"}))
    told = (
        "Code: 60. DB::Exception: Unknown table expression identifier 'invoices'. Maybe you "
        "meant billing.invoices?. (UNKNOWN_TABLE) (version 24.8.14.39 (official build))"
    )
    kept = sqlnames.without_hints(told, databases)
    assert "billing" not in kept and "(UNKNOWN_TABLE) (version 24.8" in kept, kept
    column = "Unknown expression identifier `tenantt`. Maybe you meant: ['tenant']. (X)"
    assert sqlnames.without_hints(column, databases) == column
    # a "(A)" of the query's own in the hint does not end it: the error's name, last, does
    forged = "Unknown identifier `x`. Maybe you meant: ['x (A) billing.invoices']. (Y)"
    assert sqlnames.without_hints(forged, databases) == "Unknown identifier `x`. (Y)"


def test_the_formatted_query_is_read_whole_or_not_at_all() -> None:
    assert sqlrun._row_binary_string(b"\x03abc") == b"abc"
    assert sqlrun._row_binary_string(b"\x80\x01" + b"x" * 128) == b"x" * 128
    for cut in (b"", b"\x05hel", b"\x03abcd", b"\x80"):
        with pytest.raises(ValueError, match="not one String"):
            sqlrun._row_binary_string(cut)


async def test_a_virtual_key_is_403(api: Client, virtual_key: str) -> None:
    headers = {"Authorization": f"Bearer {virtual_key}"}
    async with api.post("/api/v1/sql", json={"query": "SELECT 1"}, headers=headers) as response:
        assert response.status == 403
        message = (await response.json())["error"]["message"]
    assert "admin keys only" in message and "chDB" in message


async def test_the_sql_endpoint_is_post_only(api: Client) -> None:
    async with api.get("/api/v1/sql") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert "POST" in (await response.json())["error"]["message"]


def readme_examples() -> list[str]:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("\n## Read-only SQL\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, re.S)


@pytest.mark.parametrize("query", readme_examples())
async def test_the_readme_examples_run(api: Client, query: str) -> None:
    body = await sql(api, query)
    assert body["columns"]


def readme_example(title: str) -> str:
    """The README's SQL example whose first line is the comment ``-- <title>``."""
    (query,) = [q for q in readme_examples() if q.startswith(f"-- {title}\n")]
    return query


async def test_the_readme_examples_answer_what_they_say(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On calls and alerts of now (the examples read the last day, week, month...): a
    team is its tenant's, an unknown cost stays null in the rollup's sum, and each
    webhook endpoint's delivery is told by its latest step, none for an alert without."""
    now = datetime.now(UTC)
    at = max(now - timedelta(minutes=10), now.replace(day=1, hour=0, minute=0, second=0))

    def call(tenant: str, priced: Cost | None) -> CostedEvent:
        who = Attribution(tenant=tenant, team="search", user="alice")
        return sample.costed(sample.response(at, attribution=who), priced)

    calls = [call("acme", sample.cost("0.001", "0.002")), call("globex", None)]
    assert write_batch(store, Batch(events=calls)) == 2
    monkeypatch.setattr(test_analytics, "NOW", now)
    told, untold = test_analytics.alert("cost-spike", H), test_analytics.alert("quiet", 2 * H)
    hook = "https://hooks.example/a"
    store_batch(store, [told, untold], [(hook, told)], [])
    record(
        store,
        [
            Attempt(told.event_id, hook, 1, now, 503, "", "retrying"),
            Attempt(told.event_id, hook, 2, now, 200, "", "delivered"),
        ],
    )
    settings = Settings(
        data_dir=tmp_path, admin_key_hashes=[hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]
    )
    app = web.Application(middlewares=[analytics.api_errors])
    app[analytics.STORE] = store
    analytics.add_routes(app, settings)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with TestClient(TestServer(app, host="127.0.0.1"), headers=headers) as api:

        async def answer(title: str) -> list[dict[str, Any]]:
            body = await sql(api, readme_example(title))
            names = [c["name"] for c in body["columns"]]
            return [dict(zip(names, row, strict=True)) for row in body["rows"]]

        teams = await answer("Spend and calls per team this month (UTC)")
        assert [(r["tenant"], r["team"], r["requests"], r["cost"]) for r in teams] == [
            ("acme", "search", 1, "0.003000000"),
            ("globex", "search", 1, None),
        ]
        daily = await answer("90 days per tenant from the daily rollup, latency quantiles merged")
        assert [(r["tenant"], r["requests"], r["cost"]) for r in daily] == [
            ("acme", 1, "0.003000000"),
            ("globex", 1, None),  # unpriced: unknown, not $0
        ]
        alerts = await answer("The latest alerts, and whether their webhooks were delivered")
        assert [(r["rule"], r["deliveries"]) for r in alerts] == [
            ("cost-spike", [[hook, "delivered"]]),
            ("quiet", []),
        ]


@pytest.mark.parametrize(
    "query",
    [
        "graph = 1 SELECT * FROM system.one",  # EXPLAIN AST's options: a DOT graph
        "json = 1 SELECT * FROM system.one",
    ],
)
async def test_text_that_changes_the_explain_itself_is_refused(api: Client, query: str) -> None:
    body = await sql(api, query, expect=400)
    assert body["error"]["code"] in ("bad_query", "clickhouse_error")


@pytest.mark.parametrize(
    "query",
    [
        # Names holding newlines print as extra lines of EXPLAIN AST: refused before the
        # tree is read (test_a_quoted_name_cannot_add_nodes_to_the_tree: one was a way
        # past it).
        "SELECT * FROM merge(REGEXP('sys'), '.*') AS \"t\n      Literal x\"",
        'SELECT 1 AS "a\nSelectWithUnionQuery"',
        'SELECT * FROM system.one AS "o\n TableIdentifier calls"',
        'SELECT * FROM numbers(1) AS "n\n     TableExpression\n      Function numbers"'
        " WHERE 1 IN (SELECT * FROM system.one)",
    ],
)
async def test_names_that_forge_lines_of_the_tree_are_still_refused(
    api: Client, query: str
) -> None:
    body = await sql(api, query, expect=400)
    assert body["error"]["code"] == "bad_query", body
    assert "a quoted name may not hold a line break" in body["error"]["message"]
