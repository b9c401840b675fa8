"""ClickHouse DSNs: what llmtap takes as ``clickhouse_dsn`` (the store) and ``sql_dsn``
(the SQL endpoint's own user), checked as the settings are read, so a DSN
clickhouse-connect would refuse, or read otherwise than it looks, fails at start naming
the setting, not as the store first connects."""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qsl, urlsplit


def port_ok(parts: SplitResult) -> bool:
    """Whether a URL's port, if it names one, is 1 to 65535."""
    try:
        return parts.port != 0
    except ValueError:  # a port that is no number, or out of range
        return False


def chdb_location(dsn: str) -> str:
    """A chDB DSN's data directory as clickhouse-connect reads it (or an in-memory
    one's name: none, ``memory``, ``:memory:``): ``chdb:///abs/path``,
    ``chdb://relative``, ``chdb:relative``."""
    parts = urlsplit(dsn)
    return parts.netloc.rpartition("@")[2] if parts.netloc else parts.path


# What clickhouse-connect's get_client reads of a DSN's query, each name as written (no
# case folded). A server's: every option is an argument of its HTTP client, not a
# ClickHouse setting, so any other name (?sslmode=require, ?max_threads=4) failed the
# store's start, a TypeError naming no setting, after the broker was waited for; these
# are its arguments a string can give (not those the DSN itself gives: host, port,
# username, password, database; nor settings, headers, pool_mgr, token_provider), and
# user, user_name and compression, read for username and compress. chDB's client's
# arguments, and ch_<name>: a ClickHouse setting (whether ClickHouse has one so named,
# only its engine says); any other name clickhouse-connect ignores, but for a warning.
# tests/test_config.py holds both to the library's clients.
HTTP_DSN_OPTIONS = frozenset(
    {
        "access_token",
        "autogenerate_query_id",
        "autogenerate_session_id",
        "ca_cert",
        "client_cert",
        "client_cert_key",
        "client_name",
        "compress",
        "compression",
        "connect_timeout",
        "dedicated_pool",
        "form_encode_query_params",
        "http_proxy",
        "https_proxy",
        "native_codec",
        "proxy_path",
        "query_limit",
        "query_retries",
        "rename_response_column",
        "send_receive_timeout",
        "server_host_name",
        "session_id",
        "show_clickhouse_errors",
        "tls_mode",
        "tz_mode",
        "tz_source",
        "user",
        "user_name",
        "verify",
    }
)
CHDB_DSN_OPTIONS = frozenset(
    {
        "database",
        "path",
        "query_limit",
        "rename_response_column",
        "show_clickhouse_errors",
        "tz_mode",
        "tz_source",
    }
)


# Options the client takes that would change what llmtap's own queries do.
CHANGES_LLMTAPS_QUERIES = {
    "query_limit": (
        "it puts a LIMIT on every query of llmtap's that has none (the analytics "
        "endpoints', the SQL endpoint's, the migrations' checks), cutting their answers "
        "short without saying so"
    ),
    "session_id": (
        "it runs every query of llmtap's in one ClickHouse session, which takes one "
        "query at a time: those that overlap fail (SESSION_IS_LOCKED)"
    ),
    # A chDB DSN's ch_<setting>: ClickHouse's own way to the same end as query_limit.
    "ch_limit": (
        "it sets ClickHouse's setting limit, which cuts every answer of llmtap's to that "
        "many rows, a LIMIT said or not, without saying so"
    ),
    "ch_offset": (
        "it sets ClickHouse's setting offset, which leaves out that many rows of every "
        "answer of llmtap's, without saying so"
    ),
}


def known_options(parts: SplitResult, known: frozenset[str], prefix: str) -> None:
    """Raise ValueError naming the first option of a DSN's query that is not in ``known``
    and does not start with ``prefix`` (if any), or that llmtap refuses
    (:data:`CHANGES_LLMTAPS_QUERIES`)."""
    for name, _ in parse_qsl(parts.query):
        if name in CHANGES_LLMTAPS_QUERIES:
            raise ValueError(f"?{name}= is refused: {CHANGES_LLMTAPS_QUERIES[name]}")
        if name not in known and not (prefix and name.startswith(prefix)):
            extra = f", or {prefix}<setting> for a ClickHouse setting" if prefix else ""
            raise ValueError(
                f"?{name}= is not an option of llmtap's ClickHouse client (clickhouse-connect) "
                f"for a {parts.scheme}:// DSN: its options are "
                f"{', '.join(sorted(known - CHANGES_LLMTAPS_QUERIES.keys()))}"
                f"{extra}"
            )


def server_dsn(dsn: str) -> str:
    """A ClickHouse server's DSN with a host and, if any, a port 1 to 65535 (without a
    host, clickhouse-connect went to localhost:8123, whatever was there), whose scheme
    alone says whether it is TLS: ``?secure=`` (clickhouse-driver's and clickhouse-go's
    way) is not clickhouse-connect's, which refused the option as the store started, a
    TypeError naming no setting, after the broker was waited for."""
    parts = urlsplit(dsn)
    if not parts.hostname or not port_ok(parts):
        raise ValueError(
            "must name the server's host and, if any, a port 1 to 65535 "
            "(http://user:pass@host:8123/database)"
        )
    if any(name.lower() == "secure" for name, _ in parse_qsl(parts.query)):
        raise ValueError(
            "?secure= is not an option of llmtap's ClickHouse client: the scheme says "
            "whether TLS is used (https://user:pass@host:8443/database for TLS, http:// "
            "without it)"
        )
    known_options(parts, HTTP_DSN_OPTIONS, "")
    # clickhouse-connect reads user= or user_name= as the user only when the DSN names
    # none (the first of them), and compression= only without compress=: otherwise it
    # passes them to its client, which does not take them (the same TypeError).
    names = {name for name, _ in parse_qsl(parts.query)}
    users: list[str] = [name for name in ("user", "user_name") if name in names]
    twice = users if parts.username is not None else users[1:]
    if "compression" in names and "compress" in names:
        twice.append("compression")
    if twice:
        raise ValueError(
            f"?{twice[0]}= says again what the DSN says already (its user, or ?compress=): "
            "give it once"
        )
    return dsn


def dsn_database(dsn: str) -> str:
    """The database a ClickHouse server DSN names (its path; ``default`` without one)."""
    return urlsplit(dsn).path.strip("/") or "default"


def store_dsn(dsn: str) -> str:
    """``clickhouse_dsn``: empty (the embedded store under data_dir), a chDB data
    directory, or a ClickHouse server's HTTP interface."""
    if not dsn:
        return dsn
    parts = urlsplit(dsn)
    if parts.scheme not in ("http", "https", "chdb"):
        raise ValueError("must be http://, https:// (ClickHouse's HTTP interface) or chdb://")
    if parts.scheme == "chdb":
        # None, "memory" or ":memory:" is chDB's in-memory store, every call in it
        # lost when the store process stops.
        if chdb_location(dsn) in ("", "memory", ":memory:"):
            raise ValueError(
                "chdb:// names no data directory (chDB would keep the store in memory, "
                "every call lost when it stops): give chdb:///absolute/path, or leave "
                "clickhouse_dsn empty for <data_dir>/clickhouse"
            )
        known_options(parts, CHDB_DSN_OPTIONS, "ch_")
        return dsn
    return server_dsn(dsn)


def sql_dsn(dsn: str) -> str:
    """``sql_dsn``: empty (the store's DSN), or a ClickHouse server user's."""
    if dsn and urlsplit(dsn).scheme not in ("http", "https"):
        raise ValueError(
            "must be http:// or https:// (a ClickHouse server's user; chDB has no users)"
        )
    return server_dsn(dsn) if dsn else dsn
