"""ClickHouse storage on real chDB: rollups, retention, and a store that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import astuple
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import trustme
from clickhouse_connect.driver.exceptions import OperationalError
from pydantic import ValidationError

from llmtap.config import Settings
from llmtap.events import Attribution, CostedEvent, Usage, utcnow
from sinks.clickhouse.decode import Batch, DeadLetter, decode_batch, runs_of
from sinks.clickhouse.rows import DEAD_LETTER_COLUMNS
from sinks.clickhouse.write import calls_types, write_batch
from sinks.clickhouse.writer import ClickHouseWriter
from sinks.webhooks.records import ALERT_COLUMNS, Attempt, alert_row, record, store_batch
from sql.migrate import SchemaAhead, available, migrate
from sql.params import SqlError
from sql.retention import (
    ALERT_TABLES,
    RAW_TABLES,
    ROLLUP_TABLES,
    UNPARTITIONED,
    apply_retention,
    current_ttl_days,
)
from sql.sqlapi import json_row
from sql.sqlguard import SqlLimits
from sql.sqlrun import SqlRunner
from sql.store import Store, connect
from tests import sample
from tests.conftest import Broker
from tests.test_clickhouse_writer import produce, wait_for
from tests.test_webhooks import make_alert

RETAINED = RAW_TABLES | ROLLUP_TABLES | ALERT_TABLES  # every table a setting bounds


def call(
    at: datetime, *, user: str, model: str, cost: str | None, latency_ms: float, ok: bool = True
) -> CostedEvent:
    response = sample.response(
        at,
        model_requested=model,
        status="ok" if ok else "upstream_error",
        http_status=200 if ok else 500,
        usage=Usage(input_tokens=100, output_tokens=10, cached_input_tokens=20),
        latency_ms=latency_ms,
        ttft_ms=latency_ms / 2,
        proxy_overhead_ms=0.2,
        attribution=Attribution(tenant="acme", team="search", user=user),
    )
    return sample.costed(response, None if cost is None else sample.cost(cost))


def test_rollups_agree_with_the_raw_calls(store: Store) -> None:
    start = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    events = [
        call(
            start + timedelta(minutes=25 * i),
            user=f"u{i % 3}",
            model=("gpt-4o", "o3-mini")[i % 2],
            cost=None if i % 7 == 0 else f"0.00{i + 1}",
            latency_ms=100.0 + i,
            ok=i % 5 != 0,
        )
        for i in range(60)
    ]
    # Written in three batches, as the writer would: the rollups merge across inserts.
    for part in (events[:20], events[20:45], events[45:]):
        assert write_batch(store, Batch(events=part)) == len(part)

    for table, start_of in (
        ("analytics_by_model_hourly", "toStartOfHour"),
        ("analytics_by_user_daily", "toStartOfDay"),
    ):
        rolled = store.rows(
            f"SELECT bucket, model, sum(requests) AS requests, sum(errors) AS errors, "
            f"sum(input_tokens) AS input_tokens, sum(cost) AS cost, sum(priced) AS priced, "
            f"sum(unpriced) AS unpriced FROM {table} GROUP BY bucket, model ORDER BY bucket, model"
        )
        raw = store.rows(
            f"SELECT {start_of}(ts_end) AS bucket, model, count() AS requests, "
            f"countIf(status != 'ok') AS errors, sum(input_tokens) AS input_tokens, "
            f"sum(ifNull(cost_total, 0)) AS cost, countIf(cost_total IS NOT NULL) AS priced, "
            f"countIf(unpriced) AS unpriced "
            f"FROM calls GROUP BY bucket, model ORDER BY bucket, model"
        )
        assert rolled == raw, table
    total = sum((e.cost.total for e in events if e.cost is not None), Decimal(0))
    assert store.rows("SELECT sum(cost) AS c FROM analytics_by_model_daily")[0]["c"] == total
    merged = store.rows(
        "SELECT quantilesTDigestMerge(0.5, 0.95, 0.99)(latency_ms_quantiles) AS q "
        "FROM analytics_by_model_daily"
    )[0]["q"]
    assert 100 <= merged[0] <= merged[1] <= merged[2] <= 160
    # 0003's wider rollups are gone (0006): nothing read them, and their views cost ingest.
    gone = "SELECT count() FROM system.tables WHERE name IN ('calls_hourly', 'calls_daily')"
    assert int(store.command(gone)) == 0


def test_reads_are_in_utc_whatever_the_servers_time_zone(tmp_path: Path) -> None:
    """A store whose ClickHouse runs in New York (chDB takes the process's TZ) buckets a
    day from UTC midnight and reads times as UTC: it bucketed New York's days, and read
    times with an offset of -05:00, which the analytics answers then carried."""
    script = (
        "import sys\n"
        "from sql.store import Store\n"
        "store = Store(sys.argv[1])\n"
        # 03:00 UTC on 2026-03-14: 23:00 on the 13th in New York
        "[row] = store.rows('SELECT toDateTime(1773457200) AS t, toStartOfDay(t) AS day')\n"
        "print(row['t'].isoformat(), row['day'].isoformat())\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script, f"chdb://{tmp_path / 'ny'}"],
        env={**os.environ, "TZ": "America/New_York"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert ran.stdout.split() == ["2026-03-14T03:00:00", "2026-03-14T00:00:00"]


def test_retention_follows_the_settings(store: Store) -> None:
    assert apply_retention(store, raw_days=90, rollup_days=400) == [
        "calls",
        "dead_letters",
        "windows",
        "alerts",
        "webhook_deliveries",
    ]  # the analytics rollups are made with 400 days already
    assert current_ttl_days(store, "calls") == 90
    assert current_ttl_days(store, "dead_letters") == 90
    assert current_ttl_days(store, "analytics_by_model_daily") == 400
    assert current_ttl_days(store, "windows") == 400
    assert current_ttl_days(store, "alerts") == 400
    assert current_ttl_days(store, "webhook_deliveries") == 400
    assert apply_retention(store, raw_days=90, rollup_days=400) == []  # nothing to change
    assert apply_retention(store, raw_days=30, rollup_days=400) == ["calls", "dead_letters"]
    assert current_ttl_days(store, "calls") == 30
    assert current_ttl_days(store, "dead_letters") == 30
    changed = apply_retention(store, raw_days=30, rollup_days=200)
    assert "analytics_by_key_daily" in changed and len(changed) == 12
    assert current_ttl_days(store, "analytics_by_model_hourly") == 200
    assert current_ttl_days(store, "alerts") == 200
    assert current_ttl_days(store, "webhook_deliveries") == 200


def test_every_table_is_bounded(store: Store) -> None:
    """After the retention is applied, every table of the store has a TTL: none grows
    forever (dead_letters, alerts and webhook_deliveries had none). Only the record of
    the migrations, a row each, is kept whole."""
    apply_retention(store, raw_days=90, rollup_days=400)
    tables = store.rows(
        "SELECT name, engine_full FROM system.tables "
        "WHERE database = currentDatabase() AND engine LIKE '%MergeTree'"
    )
    unbounded = sorted(t["name"] for t in tables if " TTL " not in t["engine_full"])
    assert unbounded == ["schema_migrations"]
    assert {"dead_letters", "alerts", "webhook_deliveries"} <= {t["name"] for t in tables}


def test_the_tables_partitioned_by_the_month_their_rows_expire_in_are_known(
    store: Store,
) -> None:
    """ttl_state.sql finds a part's latest time in system.parts only where the table is
    partitioned by its month; UNPARTITIONED names the others, whose rows it reads."""
    keys = {
        row["name"]: row["partition_key"]
        for row in store.rows(
            "SELECT name, partition_key FROM system.tables WHERE database = currentDatabase()"
        )
    }
    for table, column in RETAINED.items():
        assert keys[table] == ("" if table in UNPARTITIONED else f"toYYYYMM({column})"), table


def store_alert(store: Store, stored_at: datetime, **changes: object) -> uuid.UUID:
    """An alert stored at that time (a spike of a window that ended then, unless
    ``changes`` say otherwise), and the first step of its delivery, recorded then."""
    alert = make_alert(window_start=stored_at, window_end=stored_at, first_seen=stored_at)
    alert = alert.model_copy(update=changes)
    store.insert("alerts", [(*alert_row(alert)[:-1], stored_at)], ALERT_COLUMNS)
    record(store, [Attempt(alert.event_id, "ops", 0, stored_at, None, "", "pending")])
    return alert.event_id


def store_days_ago(store: Store, days_ago: list[int]) -> None:
    """A call, and so a row of every rollup, a window, a dead letter and an alert with
    its delivery, stored (or ended) that many days ago."""
    now = datetime.now(UTC)
    for days in days_ago:
        at = now - timedelta(days=days)
        attribution = Attribution(tenant="acme", properties={"app": "chat"})  # of every rollup
        event = sample.costed(sample.response(at, attribution=attribution), sample.cost("1"))
        write_batch(store, Batch(events=[event]))
        store.command(
            "INSERT INTO windows (event_id, size_s, dimension, value, window_start, window_end) "
            "SELECT generateUUIDv4(), 60, 'team', 't', {at:DateTime64(3)}, {at:DateTime64(3)}",
            {"at": at},
        )
        letter = DeadLetter(at, "llmtap.responses", 0, days, b"{not json", "invalid JSON")
        store.insert("dead_letters", [astuple(letter)], DEAD_LETTER_COLUMNS)
        store_alert(store, at)


def stored_ages(store: Store) -> dict[str, list[int]]:
    """How many days old (rounded down) each table's rows are, as a read finds them."""
    return {
        table: sorted(
            row["days"]
            for row in store.rows(
                f"SELECT DISTINCT intDiv(dateDiff('second', {column}, now()), 86400) AS days "
                f"FROM {table}"
            )
        )
        for table, column in RETAINED.items()
    }


async def test_a_lower_retention_deletes_what_is_stored_already(store: Store) -> None:
    """Rows stored under 90 and 400 days, older than a new 30 and 50, are deleted: each
    part kept the expiry it was written with, even through OPTIMIZE FINAL, so a cut from
    90 to 30 days deleted nothing stored for 60 more days."""
    apply_retention(store, raw_days=90, rollup_days=400)
    store_days_ago(store, [1, 40, 60])
    everything = {table: [1, 40, 60] for table in RETAINED}
    assert stored_ages(store) == everything
    assert apply_retention(store, raw_days=30, rollup_days=50) == list(everything)
    kept = {table: [1] for table in RAW_TABLES} | {
        table: [1, 40] for table in ROLLUP_TABLES | ALERT_TABLES
    }
    await wait_for(lambda: stored_ages(store) == kept)  # rewritten in the background
    assert apply_retention(store, raw_days=30, rollup_days=50) == []  # nothing left to do


async def test_a_ttl_set_without_rewriting_the_rows_is_applied_at_the_next_start(
    store: Store,
) -> None:
    """A table whose TTL is as configured but whose parts were written under another (as
    an earlier llmtap left a lowered retention, or a start stopped after setting it) has
    them rewritten, once: a table partitioned by the month its rows expire in, whose
    parts' latest times ClickHouse keeps, as one that is not (dead_letters)."""
    apply_retention(store, raw_days=90, rollup_days=400)
    store_days_ago(store, [1, 60])
    for table, column in RAW_TABLES.items():
        store.command(
            f"ALTER TABLE {table} MODIFY TTL toDateTime({column}) + toIntervalDay(30) "
            "SETTINGS materialize_ttl_after_modify = 0"
        )
        store.command(f"OPTIMIZE TABLE {table} FINAL")
    raw = {table: stored_ages(store)[table] for table in RAW_TABLES}
    assert raw == {"calls": [1, 60], "dead_letters": [1, 60]}  # the parts kept their expiry
    assert apply_retention(store, raw_days=30, rollup_days=400) == ["calls", "dead_letters"]
    await wait_for(lambda: all(stored_ages(store)[table] == [1] for table in RAW_TABLES))
    assert apply_retention(store, raw_days=30, rollup_days=400) == []


async def test_old_dead_letters_alerts_and_deliveries_are_deleted_at_the_next_start(
    store: Store,
) -> None:
    """Stored before these tables had a TTL, the dead letters, alerts and delivery steps
    older than their retention are deleted once it is applied; those younger stay, and
    so does a budget alert of a period not over yet, stored longer ago than the
    retention (a store starting within its period would raise it again, were it gone),
    while the step of its delivery recorded then goes."""
    now = datetime.now(UTC)
    old, fresh = now - timedelta(days=120), now - timedelta(days=1)
    for offset, at in enumerate((old, fresh)):
        letter = DeadLetter(at, "llmtap.responses", 0, offset, b"{not json", "invalid JSON")
        store.insert("dead_letters", [astuple(letter)], DEAD_LETTER_COLUMNS)
    old_spike, fresh_spike = store_alert(store, old), store_alert(store, fresh)
    budget = store_alert(
        store, old, alert_type="budget", window_start=old, window_end=now + timedelta(days=10)
    )

    def stored() -> dict[str, list[object]]:
        ids = {"dead_letters": "offset", "alerts": "event_id", "webhook_deliveries": "alert_id"}
        return {
            table: sorted(r["id"] for r in store.rows(f"SELECT {column} AS id FROM {table}"))
            for table, column in ids.items()
        }

    assert stored() == {
        "dead_letters": [0, 1],
        "alerts": sorted([old_spike, fresh_spike, budget]),
        "webhook_deliveries": sorted([old_spike, fresh_spike, budget]),
    }
    changed = apply_retention(store, raw_days=90, rollup_days=100)
    assert {"dead_letters", "alerts", "webhook_deliveries"} <= set(changed)
    assert current_ttl_days(store, "dead_letters") == 90
    assert current_ttl_days(store, "alerts") == current_ttl_days(store, "webhook_deliveries") == 100
    kept = {
        "dead_letters": [1],
        "alerts": sorted([fresh_spike, budget]),
        "webhook_deliveries": [fresh_spike],
    }
    await wait_for(lambda: stored() == kept)  # rewritten in the background
    store.command("OPTIMIZE TABLE alerts FINAL")  # a merge keeps them as well
    assert stored() == kept
    assert apply_retention(store, raw_days=90, rollup_days=100) == []  # nothing left to do


async def test_the_writer_waits_out_a_store_outage_and_loses_nothing(
    broker: Broker, store: Store
) -> None:
    """The calls table goes away (DETACH) while events arrive; nothing is dropped."""
    store.command("DETACH TABLE calls")
    now = datetime.now(UTC)
    events = [
        call(now, user="outage", model="gpt-4o", cost="0.001", latency_ms=5) for _ in range(30)
    ]
    writer = ClickHouseWriter(
        Settings(kafka_bootstrap=broker.bootstrap, sink_batch_seconds=0.2), store
    )
    task = asyncio.create_task(writer.run())
    try:
        await produce(broker.bootstrap, [e.model_dump_json().encode() for e in events])
        await wait_for(lambda: writer.write_failures >= 2)  # it is failing, and retrying
        store.command("ATTACH TABLE calls")
        mine = "SELECT count() FROM calls WHERE user = 'outage'"
        await wait_for(lambda: int(store.command(mine)) == 30)
        await wait_for(lambda: writer.rows_written >= 30)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    outage = "SELECT sum(requests) FROM analytics_by_user_daily WHERE user = 'outage'"
    assert int(store.command(outage)) == 30


def sql_endpoint(dsn: str) -> object:
    """The SQL endpoint's session (its own client), asked a query."""
    return SqlRunner(dsn, SqlLimits()).answer("SELECT 1", 1, json_row)


@pytest.mark.parametrize("client", [Store, sql_endpoint], ids=["store", "sql-endpoint"])
async def test_an_https_dsn_speaks_tls_on_any_port_never_the_password_in_clear(
    client: Callable[[str], object],
) -> None:
    """clickhouse-connect takes TLS from the port (8443, 443), not from the DSN's scheme:
    every client llmtap makes passes the scheme on. What reaches the port must be a TLS
    ClientHello."""
    first: list[bytes] = []

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first.append(await reader.read(4096))
        writer.close()

    server = await asyncio.start_server(listen, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises((OperationalError, SqlError)):  # no ClickHouse there
            await asyncio.to_thread(client, f"https://llmtap:s3cret@127.0.0.1:{port}/llmtap")
    finally:
        server.close()
        await server.wait_closed()
    assert first and all(sent.startswith(b"\x16\x03") for sent in first)  # TLS handshakes
    assert not any(b"s3cret" in sent or b"Authorization" in sent for sent in first)


def test_a_clickhouse_dsn_of_another_scheme_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValidationError, match="clickhouse_dsn"):
        Settings(clickhouse_dsn="clickhouse://llmtap@ch:9000/llmtap")


@pytest.mark.parametrize("setting", ["clickhouse_dsn", "sql_dsn"])
@pytest.mark.parametrize("query", ["secure=true", "Secure=1", "ca_cert=/ca.pem&secure=false"])
def test_secure_in_a_dsn_is_refused_naming_the_setting_and_the_scheme_that_is_tls(
    setting: str, query: str
) -> None:
    """``?secure=true`` asks clickhouse-driver and clickhouse-go for TLS; clickhouse-connect
    does not read it (nor does it for its own DSNs): its client refused the option when
    the store started, a TypeError naming no setting, after the broker was waited for, and
    the store was restarted for ever. The scheme says whether TLS is used."""
    dsn = f"http://llmtap:s3cret@ch:8123/llmtap?{query}"
    given = {"clickhouse_dsn": "https://llmtap:s3cret@ch:8443/llmtap", setting: dsn}
    with pytest.raises(ValidationError) as refused:
        Settings.model_validate(given)
    said = str(refused.value)
    assert said.startswith(f"1 validation error for Settings\n{setting}\n"), said
    assert "?secure=" in said and "https://" in said
    assert "s3cret" not in said
    with pytest.raises(TypeError, match=r"(?i)secure"):  # what the store met at its start
        connect(dsn, {})


async def test_an_https_dsn_trusts_a_private_ca_named_in_it(tmp_path: Path) -> None:
    """``?ca_cert=`` in the DSN: a ClickHouse server whose certificate a private CA
    signed. The handshake completes and the client's first request arrives over TLS."""
    ca = trustme.CA()
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    requests: list[bytes] = []

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.read(4096))  # decrypted: the handshake completed
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(listen, "127.0.0.1", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    dsn = f"https://llmtap:s3cret@127.0.0.1:{port}/llmtap?ca_cert={cafile}"
    try:
        with pytest.raises(OperationalError):  # no ClickHouse answers, but TLS did
            await asyncio.to_thread(Store, dsn)
    finally:
        server.close()
        await server.wait_closed()
    assert requests and requests[0].split(b" ", 1)[0] in (b"GET", b"POST")


def schema_before(version: int, store: Store) -> None:
    """Apply to ``store`` every migration before ``version`` (and none recorded as
    applied), as a store made by an earlier release is."""
    for migration in available():
        if migration.version < version:
            for statement in migration.statements:
                store.command(statement)


def test_calls_stored_before_web_searches_were_priced_read_a_fee_as_their_costs_do(
    tmp_path: Path,
) -> None:
    """0011 on a store holding calls: a priced call's search fee reads 0 (its costs
    still add up to its total), an unpriced call's null like its other costs."""
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        schema_before(11, store)
        store.command(
            "INSERT INTO calls (event_id, request_id, ts_start, ts_end, tenant, model, "
            "cost_input, cost_output, cost_total, unpriced) VALUES "
            "(generateUUIDv4(), generateUUIDv4(), now64(3), now64(3), 'acme', 'gpt-4o', "
            "0.25, 0.5, 0.75, false), "
            "(generateUUIDv4(), generateUUIDv4(), now64(3), now64(3), 'acme', 'mystery', "
            "NULL, NULL, NULL, true)"
        )
        assert 11 in migrate(store)
        rows = store.rows(
            "SELECT model, web_search_requests AS searches, cost_web_search AS fee, "
            "cost_input + cost_output + cost_web_search = cost_total AS adds_up "
            "FROM calls ORDER BY model"
        )
        assert rows == [
            {"model": "gpt-4o", "searches": 0, "fee": Decimal(0), "adds_up": True},
            {"model": "mystery", "searches": 0, "fee": None, "adds_up": None},
        ]
    finally:
        store.close()


# A budget alert with its period, a spike resolved with why, and one with neither.
WHY_ALERTS = [
    make_alert("budget", alert_type="budget", baseline=Decimal(10), period="week"),
    make_alert("resolved", state="resolved", observed=Decimal(0), resolution="unjudged"),
    make_alert("firing"),
]


def test_an_alert_s_period_and_resolution_are_stored(store: Store) -> None:
    """Alert.period and Alert.resolution reach `alerts` (0018): a budget alert's period,
    why a spike resolved; '' where the alert has none."""
    store_batch(store, WHY_ALERTS, [], [])
    rows = store.rows("SELECT rule, period, resolution FROM alerts ORDER BY rule")
    assert rows == [
        {"rule": "budget", "period": "week", "resolution": ""},
        {"rule": "firing", "period": "", "resolution": ""},
        {"rule": "resolved", "period": "", "resolution": "unjudged"},
    ]


def test_alerts_stored_before_0018_read_their_period_and_resolution_from_the_payload(
    tmp_path: Path,
) -> None:
    """0018 on a store holding alerts: those whose published JSON (`payload`) carried a
    period or a resolution read them; the others ''."""
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        schema_before(18, store)
        before = [c for c in ALERT_COLUMNS if c not in ("period", "resolution")]
        rows = [dict(zip(ALERT_COLUMNS, alert_row(a), strict=True)) for a in WHY_ALERTS]
        store.insert("alerts", [tuple(r[c] for c in before) for r in rows], before)
        assert 18 in migrate(store)
        got = store.rows("SELECT rule, period, resolution FROM alerts ORDER BY rule")
        assert got == [
            {"rule": "budget", "period": "week", "resolution": ""},
            {"rule": "firing", "period": "", "resolution": ""},
            {"rule": "resolved", "period": "", "resolution": "unjudged"},
        ]
    finally:
        store.close()


def test_calls_say_the_terms_their_cost_was_computed_on(store: Store) -> None:
    """speed, service_tier and inference_geo (0014), as the call's usage said, through
    the writer's own path (the wire's decode, the Native body); the standard terms for a
    call that says none."""
    at = datetime(2026, 3, 1, 12, tzinfo=UTC)

    def billed(user: str, **terms: str) -> bytes:
        response = sample.response(
            at,
            usage=Usage(input_tokens=100, output_tokens=10, **terms),
            attribution=Attribution(tenant="acme", user=user),
        )
        return sample.costed(response, sample.cost("0.01")).model_dump_json().encode()

    raw = [
        billed("a-plain"),
        billed("b-fast-us", speed="fast", inference_geo="us"),
        billed("c-flex", service_tier="flex"),
        billed("d-priority", service_tier="priority"),
    ]
    records = runs_of(("llmtap.costed", 0, offset, value) for offset, value in enumerate(raw))
    batch = decode_batch(records, calls_types(store))
    assert batch.calls_body is not None and not batch.dead_letters  # the writer's path
    assert write_batch(store, batch) == 4
    rows = store.rows("SELECT user, speed, service_tier, inference_geo FROM calls ORDER BY user")
    assert [tuple(row.values()) for row in rows] == [
        ("a-plain", "standard", "standard", "global"),
        ("b-fast-us", "fast", "standard", "us"),
        ("c-flex", "standard", "flex", "global"),
        ("d-priority", "standard", "priority", "global"),
    ]


def test_calls_stored_before_their_terms_were_kept_read_the_standard_ones(
    tmp_path: Path,
) -> None:
    """0014 on a store holding calls: they were priced at the standard rates, and say so."""
    store = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    try:
        schema_before(14, store)
        store.command(
            "INSERT INTO calls (event_id, request_id, ts_start, ts_end, tenant, model) VALUES "
            "(generateUUIDv4(), generateUUIDv4(), now64(3), now64(3), 'acme', 'gpt-4o')"
        )
        assert 14 in migrate(store)
        rows = store.rows("SELECT speed, service_tier, inference_geo FROM calls")
        assert rows == [
            {"speed": "standard", "service_tier": "standard", "inference_geo": "global"}
        ]
    finally:
        store.close()


def test_migrate_on_a_data_dir_another_process_holds_says_so(tmp_path: Path) -> None:
    """chDB opens a data directory in one process at a time: `llmtap migrate` beside a
    running `llmtap up` ended in a traceback of clickhouse-connect's ProgrammingError
    (Error initializing EmbeddedServer ... BAD_ARGUMENTS). Now one line saying why."""
    env = {**os.environ, "LLMTAP_DATA_DIR": str(tmp_path)}
    hold = (
        "import sys; from llmtap.config import Settings; from sql.store import Store; "
        "s = Store(Settings().store_dsn); s.command('SELECT 1'); print('held', flush=True); "
        "sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        migrating = subprocess.run(
            [sys.executable, "-m", "llmtap", "migrate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.communicate(timeout=60)  # its stdin closed: it exits
    assert migrating.returncode == 2, migrating.stderr
    assert "is in use by another process (a running llmtap up?)" in migrating.stderr
    assert "Traceback" not in migrating.stderr


def migrated_by_a_newer_llmtap(data_dir: Path) -> int:
    """Make the embedded store of ``data_dir`` one a newer llmtap migrated: every
    migration applied, and one more this llmtap does not know (its version returned)."""
    store = Store(Settings(data_dir=data_dir).store_dsn)
    try:
        migrate(store)
        ahead = max(m.version for m in available()) + 1
        store.insert(
            "schema_migrations",
            [(ahead, "from_a_newer_llmtap", utcnow())],
            ("version", "name", "applied_at"),
        )
    finally:
        store.close()
    return ahead


async def test_a_store_a_newer_llmtap_migrated_is_refused_not_written(
    tmp_path: Path, broker: Broker
) -> None:
    """A downgrade: an llmtap opening a store with migrations it does not know went on
    writing (the newer columns left at their defaults) or failed in a traceback on a
    table a newer migration dropped. Now `llmtap migrate`, and the store process with
    it, refuse it in one line naming both versions."""
    env = {**os.environ, "LLMTAP_DATA_DIR": str(tmp_path)}
    ahead = migrated_by_a_newer_llmtap(tmp_path)
    store = Store(Settings(data_dir=tmp_path).store_dsn)
    try:
        with pytest.raises(SchemaAhead, match=f"up to {ahead:04d}, this llmtap's only"):
            migrate(store)
    finally:
        store.close()
    for command in ("migrate", "store"):
        refused = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "llmtap", command),
            env={**env, "LLMTAP_KAFKA_BOOTSTRAP": broker.bootstrap},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(refused.communicate(), 120)
        said = err.decode()
        assert refused.returncode == 2, (command, said)
        assert "a newer llmtap wrote it" in said, command
        assert "Traceback" not in said, command


def test_a_retention_of_a_lifetime_keeps_the_rows_it_says_it_keeps(
    store: Store, tmp_path: Path
) -> None:
    """A retention long enough to keep everything (a century: `raw_retention_days:
    36500`) must not expire anything stored today. A TTL is a DateTime, which ends in
    2106: a row's time plus that many days wrapped around to 1990, so every row of every
    table was already expired and the rewrite to the new TTL deleted them all. Such a
    retention is refused, by the settings and by apply_retention, and nothing is lost."""
    apply_retention(store, raw_days=90, rollup_days=400)
    store_days_ago(store, [1])
    everything = stored_ages(store)
    assert everything == {table: [1] for table in RETAINED}
    with pytest.raises(ValueError, match="10000"):
        apply_retention(store, raw_days=36500, rollup_days=36500)
    # Nothing of it applied: no rewrite started, the TTLs as they were.
    assert (current_ttl_days(store, "calls"), current_ttl_days(store, "alerts")) == (90, 400)
    store.command("OPTIMIZE TABLE calls FINAL")
    assert stored_ages(store) == everything
    with pytest.raises(ValidationError, match="raw_retention_days"):
        Settings(data_dir=tmp_path, raw_retention_days=36500)
    with pytest.raises(ValidationError, match="rollup_retention_days"):
        Settings(data_dir=tmp_path, rollup_retention_days=36500)


# A store one migration short of 0007 holding calls, then killed while 0007 materialized
# the remade projection (a Ctrl-C under `llmtap up` during an upgrade's migrations: the
# mutation is kept on disk, unfinished). Merges are stopped so it is still unfinished
# when the process dies; run in a process of its own, as `llmtap migrate` is.
KILLED_IN_0007 = """
import os, sys
from sql import migrate as m
from sql.store import Store, connect

store = Store(f"chdb:///{sys.argv[1]}")
every = m.available()
m.available = lambda: [x for x in every if x.version < 7]
m.migrate(store)  # as the release before 0007 left it
store.command(
    "INSERT INTO calls (event_id, request_id, ts_start, ts_end, tenant, provider, model, "
    "user, status, input_tokens, output_tokens, latency_ms, cost_total, properties) "
    "SELECT generateUUIDv4(), generateUUIDv4(), "
    "toDateTime64('2026-10-01 00:00:00', 3) + number, "
    "toDateTime64('2026-10-01 00:00:00', 3) + number, "
    "'acme', 'openai', ['m1', 'm2'][number % 2 + 1], toString(number % 100), 'ok', 10, 5, 1, "
    "toDecimal64(0.001, 9), map('app', 'chat') FROM numbers(2000000)"
)
[m7] = [x for x in every if x.version == 7]
[drop, add, materialize] = [
    s for s in m7.statements if s.startswith("ALTER TABLE calls") and "PROJECTION" in s
]
store.command(drop)
store.command(add)
store.command("SYSTEM STOP MERGES calls")
store.command(materialize)  # mutations_sync = 0: returns with the mutation under way
os._exit(0)  # killed: 0007 not recorded, its mutation unfinished
"""


def test_a_migration_killed_while_it_remade_the_projection_is_applied_at_the_next_start(
    tmp_path: Path,
) -> None:
    """0007 drops and remakes `calls`' projection. Killed while it materialized it, the
    next start resumes that mutation in the background, and 0007 applied again could not
    drop the projection ("affected by mutation ... which is not finished yet"): the
    start failed, and on chDB (whose mutations run only while a process holds the
    store) so did the next ones, each giving the mutation a moment before it exited."""
    data = tmp_path / "clickhouse"
    subprocess.run([sys.executable, "-c", KILLED_IN_0007, str(data)], check=True, timeout=120)
    store = Store(f"chdb:///{data}")
    try:
        newest = max(m.version for m in available())
        assert migrate(store) == list(range(7, newest + 1))
        counts = store.rows(
            "SELECT (SELECT count() FROM calls) AS calls, "
            "(SELECT sum(requests) FROM analytics_by_property_daily) AS by_property, "
            "(SELECT sum(requests) FROM analytics_by_provider_hourly) AS by_provider, "
            "(SELECT count() FROM system.parts WHERE database = currentDatabase() "
            "AND table = 'calls' AND active) AS parts, "
            "(SELECT count() FROM system.projection_parts WHERE database = currentDatabase() "
            "AND table = 'calls' AND name = 'by_time' AND active) AS projected"
        )
        assert counts == [
            {
                "calls": 2_000_000,
                "by_property": 2_000_000,
                "by_provider": 2_000_000,
                "parts": counts[0]["parts"],
                "projected": counts[0]["parts"],
            }
        ]
    finally:
        store.close()
