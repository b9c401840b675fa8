"""The SQL endpoint as an analyst uses it. FINAL on a rollup, whose merged
rows are the rollup's answer: its table line in the analyzer's tree ends in the
modifiers ClickHouse prints after the name (``table_name: default.t, final: 1``), and
was refused as not the store's table. WITH TOTALS, whose totals row the answer left
out while it said it was whole."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sql.store import Store
from tests.test_sqlapi import (  # noqa: F401
    Client,
    ServeFn,
    files_here,
    refused,
    serve,
    sql,
    virtual_key,
)


@pytest.fixture
async def api(serve: ServeFn) -> AsyncIterator[Client]:  # noqa: F811
    async with serve() as (client, _):
        yield client


@pytest.mark.parametrize(
    "query",
    [
        "SELECT tenant, sum(requests) AS requests FROM analytics_by_model_daily FINAL"
        " GROUP BY tenant ORDER BY tenant",
        "SELECT d.tenant, sum(d.requests) AS requests FROM default.analytics_by_model_daily"
        " AS d FINAL GROUP BY d.tenant ORDER BY d.tenant",
        "SELECT c.tenant, any(d.requests) AS requests FROM calls AS c"
        " JOIN (SELECT tenant, sum(requests) AS requests FROM analytics_by_tenant_hourly FINAL"
        " GROUP BY tenant) AS d ON d.tenant = c.tenant GROUP BY c.tenant ORDER BY c.tenant",
    ],
)
async def test_final_on_a_rollup_answers(api: Client, query: str) -> None:
    body = await sql(api, query)
    assert body["rows"] == [["acme", 2], ["globex", 1]]


async def test_a_name_like_the_modifiers_is_still_refused(
    files_here: Path,  # noqa: F811
    api: Client,
    store: Store,
) -> None:
    # A file chDB's default database reads as a table (files_here: the engine's
    # directory, as before it was an empty one of its own), named like a rollup and its
    # modifiers: its line, "table_name: default.analytics_by_model_daily, final: 1",
    # would read as the rollup's.
    (files_here / "analytics_by_model_daily, final: 1").write_text("TOPSECRET\n")
    name = "`analytics_by_model_daily, final: 1`"
    assert "TOPSECRET" in str(store.command(f"SELECT * FROM {name}"))  # a table, to chDB
    for query in (
        f"SELECT * FROM {name}",
        f"SELECT * FROM {name} FINAL",
        f"SELECT * FROM default.{name}",
        f"SELECT 1 WHERE 'TOPSECRET' IN {name}",
        f"WITH {name} AS x SELECT * FROM x",
    ):
        body = await sql(api, query, expect=400)
        assert body["error"]["code"] in ("bad_query", "forbidden_table"), query
        assert "TOPSECRET" not in str(body)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT tenant, count() AS calls FROM calls GROUP BY tenant WITH TOTALS",
        "SELECT * FROM (SELECT tenant, count() AS n FROM calls GROUP BY tenant WITH TOTALS)",
        "SELECT tenant, count() FROM calls GROUP BY tenant WITH ROLLUP WITH TOTALS",
    ],
)
async def test_with_totals_is_refused_not_answered_without_its_row(api: Client, query: str) -> None:
    # ClickHouse sends the totals apart from the rows: the answer, rows only, left them
    # out and said it was whole (2 rows, truncated false, no total).
    message = await refused(api, query, "bad_query")
    assert "WITH TOTALS" in message and "ROLLUP" in message


async def test_a_total_as_a_row_answers(api: Client) -> None:
    body = await sql(
        api, "SELECT tenant, count() AS n FROM calls GROUP BY ROLLUP(tenant) ORDER BY n, tenant"
    )
    assert body["rows"] == [["globex", 1], ["acme", 2], ["", 3]]
    assert not body["truncated"]
