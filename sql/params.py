"""The analytics API's query parameters: each one checked, every error naming it.

A request's query string becomes a :class:`Filters` (what every analytics query is
scoped to) plus the few parameters one endpoint takes (granularity, group_by, limit).
The caller's key adds a :class:`Scope` (its tenant, and its team and user when it is
bound to them) that no query parameter can widen. Nothing here builds SQL: the values
go to ClickHouse as bound parameters. sql/openapi.py documents the same constants.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from multidict import MultiMapping

from llmtap.events import PROPERTY_NAME, PROPERTY_NAME_RULE, Alert
from llmtap.events import utcnow as utcnow  # re-exported: tests and bench pin the clock here

RANGES = {
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
    "90d": timedelta(days=90),
}
DEFAULT_RANGE = "30d"

GRANULARITIES = ("hour", "day")
HOURLY_UP_TO = RANGES["24h"]  # the longest span charted by hour when no granularity is asked


def default_granularity(span: timedelta) -> str:
    """The buckets a span is charted in when none are asked: hours up to a day, else days."""
    return "hour" if span <= HOURLY_UP_TO else "day"


DEFAULT_GRANULARITY = {name: default_granularity(span) for name, span in RANGES.items()}

GROUP_BY = ("model", "provider", "day", "tenant", "team", "user", "feature", "key")
PROPERTY_PREFIX = "property:"
# PROPERTY_NAME (llmtap.events): the ingress takes the property names this can group by.

LIMIT_MIN, LIMIT_MAX, DEFAULT_LIMIT = 1, 1000, 100
OFFSET_MAX = 1_000_000  # the rows a ranked answer may skip (costs, users, alerts)
# The most rows of models and usage (one per model and provider): model names are what
# callers send, and a key allowed any model could send a million names. Past it, the
# answer says ``truncated`` (its rows are the costliest; usage's totals still count all).
MODEL_ROWS = 1000

# The alerts endpoint's choices (llmtap.events.Alert).
ALERT_TYPES: tuple[str, ...] = get_args(Alert.model_fields["alert_type"].annotation)
ALERT_STATES: tuple[str, ...] = get_args(Alert.model_fields["state"].annotation)
SEVERITIES: tuple[str, ...] = get_args(Alert.model_fields["severity"].annotation)

# A time's fraction of a second with digits past the microsecond that are not all 0
# (RFC 3339 takes any number; Go's RFC3339Nano writes nine): a datetime keeps six.
_PAST_MICROSECONDS = re.compile(r"^[^.,]*[.,][0-9]{6}[0-9]*[1-9]")

# An explicit window, instead of a range: calls that ended at or after `start` and
# before `end` (ISO-8601 with an offset or Z; `end` absent: now).
WINDOW = ("start", "end")
# Every endpoint over calls takes these; an endpoint may take a few more (see Query).
# `tenant` narrows an admin key's answer to one tenant; a virtual key's is its own.
COMMON = ("range", *WINDOW, "tenant", "provider", "team", "feature", "env")
# What the dashboard's page takes: ranges only (its links are ranges).
RANGED = tuple(name for name in COMMON if name not in WINDOW)
# The few more, per endpoint (sql/analytics.py's routes, and the OpenAPI document).
EXTRA: dict[str, tuple[str, ...]] = {
    "models": (),
    "timeseries": ("granularity",),
    "providers": (),
    "costs": ("group_by", "limit", "offset"),
    "usage": ("model_id", "user_id"),
    "performance": ("model_id",),
    "users": ("limit", "offset"),
    "alerts": ("alert_type", "state", "severity", "rule", "limit", "offset"),
    "budgets": (),
}
# Alerts are not calls: of the common parameters they take the range (or window) and the tenant
# only. Budgets are their current state: no range; the tenant alone.
COMMON_OF: dict[str, tuple[str, ...]] = {
    "alerts": ("range", *WINDOW, "tenant"),
    "budgets": ("tenant",),
}


def parameters(endpoint: str) -> tuple[str, ...]:
    """Every query parameter ``endpoint`` takes, in the order they are documented."""
    return (*COMMON_OF.get(endpoint, COMMON), *EXTRA[endpoint])


# The optional equality filters, named as sql/queries/_filters.sql names them, each a
# query parameter of the same name (a key's scope sets those it is bound to).
FILTERS = ("tenant", "provider", "team", "feature", "env", "model_id", "user_id")


class BadParameter(Exception):
    """A 400: a parameter that is unknown, repeated or invalid."""

    status = 400
    code: str | None = None  # set by the SQL endpoint's errors (SqlError, below)

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class SqlError(BadParameter):
    """A query that is refused or failed: 400, naming the ``query`` field, with a code
    (POST /api/v1/sql: sql/sqlguard.py, sql/sqlnames.py, sql/sqlrun.py)."""

    def __init__(self, code: str, message: str, status: int = 400, param: str = "query") -> None:
        super().__init__(param, message)
        self.code = code
        self.status = status


class OutOfScope(BadParameter):
    """A 403: a filter that asks for rows outside the caller's key's scope."""

    status = 403


@dataclass(frozen=True)
class Scope:
    """What a caller may see, set by the server from its key; None: not restricted.

    An admin key has the empty scope (every tenant). A virtual key is confined to its
    tenant, and to its team and user when it is bound to them.
    """

    tenant: str | None = None
    team: str | None = None
    user: str | None = None


# Each bound scope field, and the filter (and query parameter) it sets.
SCOPED = {"tenant": "tenant", "team": "team", "user": "user_id"}


@dataclass(frozen=True)
class Filters:
    """What one analytics query is scoped to: calls that ended since ``since`` (and
    before ``end``, when one is asked), and each filter that is not None (an empty query
    value means "not filtered")."""

    range: str | None  # None: an explicit window (start, and maybe end)
    since: datetime
    until: datetime  # "now" for this request; the end of a range
    tenant: str | None = None
    provider: str | None = None
    team: str | None = None
    feature: str | None = None
    env: str | None = None
    model_id: str | None = None
    user_id: str | None = None
    end: datetime | None = None  # an explicit end (exclusive); None: up to now, as a range

    @property
    def span(self) -> timedelta:
        """How long the range or window is."""
        return (self.end or self.until) - self.since

    @property
    def elapsed(self) -> timedelta:
        """How much of the range or window has passed (a window may end after now)."""
        return min(self.end or self.until, self.until) - self.since

    def shown(self) -> dict[str, Any]:
        """What an answer says it covers: the range (null for a window), its start and
        its end (now, unless one was asked)."""
        return {"range": self.range, "start": self.since, "end": self.end or self.until}

    def active(self) -> frozenset[str]:
        """The names of the filters that apply: the structure the SQL is rendered with."""
        return frozenset(name for name in FILTERS if getattr(self, name) is not None)

    def parameters(self) -> dict[str, Any]:
        """The bound values for the shared WHERE clause."""
        values = {name: getattr(self, name) for name in self.active()}
        bound = {"end": self.end} if self.end is not None else {}
        return {"since": self.since, "until": self.until, **bound, **values}


@dataclass(frozen=True)
class Page:
    """Which rows of a ranked answer (costs, users, alerts) a request asks for: ``limit``
    of them after the first ``offset``. The query is asked for one row more, so the
    answer can say where the next page starts (``next_offset``; null on the last, and
    past OFFSET_MAX, which no request may ask for: the SQL endpoint reads further)."""

    limit: int = DEFAULT_LIMIT
    offset: int = 0

    def values(self) -> dict[str, int]:
        """The values the query binds: ``limit`` (one more than asked) and ``offset``."""
        return {"limit": self.limit + 1, "offset": self.offset}

    def cut(self, rows: list[Any]) -> tuple[list[Any], dict[str, int | None]]:
        """The page's rows, and what the answer says of it: its limit and offset, and the
        offset of the next page when there are rows past this one (else None)."""
        following = self.offset + self.limit
        more = len(rows) > self.limit and following <= OFFSET_MAX  # else none can be asked
        shown = {
            "limit": self.limit,
            "offset": self.offset,
            "next_offset": following if more else None,
        }
        return rows[: self.limit], shown


@dataclass(frozen=True)
class Kept:
    """How many days the store keeps (llmtap.config, sql/retention.py's TTLs): the raw
    calls (``raw_retention_days``) and the rollups, windows and alerts
    (``rollup_retention_days``).

    An answer over calls reads both: whole buckets from the rollups, a range's first
    partial hour or day (and some filter combinations, all of it) from `calls`. So a
    range that reaches back further than either keeps is refused, never answered short.
    A range of exactly the days kept is answered: its calls expire from now on (a call's
    TTL is its end, to the second, plus the days), and a TTL merge deletes them only
    after that, so what it may miss is the calls of its first second, and only should a
    merge of their partition run in that very second.
    """

    raw_days: int = 90
    rollup_days: int = 400

    def setting(self, *, raw: bool = True) -> tuple[str, int]:
        """The setting that bounds an answer (over calls: the smaller of the two; over
        alerts, ``raw=False``: the rollups'), and its days."""
        if raw and self.raw_days <= self.rollup_days:
            return "raw_retention_days", self.raw_days
        return "rollup_retention_days", self.rollup_days

    def covers(self, span: timedelta, *, raw: bool = True) -> bool:
        return span <= timedelta(days=self.setting(raw=raw)[1])

    def default_range(self, *, raw: bool = True) -> str:
        """The range an answer covers when none is asked: DEFAULT_RANGE, or the longest
        range shorter than it the store keeps (a ``raw_retention_days`` under 30: every
        request without a range, and the dashboard's first page, were a 400)."""
        fits = [
            name
            for name, span in RANGES.items()
            if span <= RANGES[DEFAULT_RANGE] and self.covers(span, raw=raw)
        ]
        return fits[-1] if fits else DEFAULT_RANGE

    def check(self, filters: Filters, *, raw: bool = True) -> None:
        """A 400 if ``filters`` reach back past what the store keeps: naming ``range``,
        or ``start`` for a window (one longer than the days kept, or starting before
        them: its end, when later than now, counts from its start)."""
        reach = max(filters.until, filters.end or filters.until) - filters.since
        if self.covers(reach, raw=raw):
            return
        name, days = self.setting(raw=raw)
        what = "calls" if name == "raw_retention_days" else "rollups and alerts"
        kept = f"the store keeps {what} {days} days ({name}: {days})"
        if filters.range is None:
            upto = "'end'" if filters.end is not None and filters.end > filters.until else "now"
            raise BadParameter(
                "start",
                f"'start' {filters.since.isoformat()} is {reach / timedelta(days=1):g} days "
                f"before {upto}, but {kept}: an answer would leave out what is deleted; "
                f"start at most {days} days before {upto}",
            )
        shorter = [r for r, span in RANGES.items() if self.covers(span, raw=raw)]
        raise BadParameter(
            "range",
            f"range {filters.range!r} reaches back {RANGES[filters.range].days} days, but "
            f"{kept}: an answer would leave out what is deleted; use "
            f"{', '.join(shorter) or 'a shorter range'}",
        )


class Query:
    """One request's query string, checked against the parameters its endpoint takes."""

    def __init__(
        self, query: MultiMapping[str], *extra: str, common: tuple[str, ...] = COMMON
    ) -> None:
        self.allowed = (*common, *extra)
        for name in query:  # a repeated key comes once per value
            if name not in self.allowed:
                takes = ", ".join(self.allowed) or "no parameters"
                raise BadParameter(name, f"unknown parameter {name!r}: this endpoint takes {takes}")
            if len(query.getall(name)) > 1:
                raise BadParameter(name, f"parameter {name!r} is given more than once")
        self._query = query

    def _choice(self, name: str, choices: Collection[str], default: str) -> str:
        value = self._query.get(name, default)
        if value not in choices:
            raise BadParameter(
                name, f"invalid {name!r} {value!r}: expected one of {', '.join(choices)}"
            )
        return value

    def filters(self, scope: Scope | None = None, default_range: str = DEFAULT_RANGE) -> Filters:
        """The filters asked for, narrowed to ``scope``; ``default_range`` when no range
        is asked (:meth:`Kept.default_range`).

        A bound field of the scope is a filter whatever the query says; asking for
        another value of it is a 403 (an :class:`OutOfScope`), never an empty answer.
        """
        # Milliseconds, as ClickHouse keeps times: a bound is then the same in Python
        # and in every query.
        now = utcnow()
        until = now.replace(microsecond=now.microsecond // 1000 * 1000)
        range_, since, end = self._window(until, default_range)
        optional = {name: self._query.get(name) or None for name in FILTERS if name in self.allowed}
        for field, name in SCOPED.items():
            bound = getattr(scope, field) if scope is not None else None
            if bound is None:
                continue
            asked = optional.get(name)
            if asked is not None and asked != bound:
                raise OutOfScope(
                    name, f"this key is bound to {field} {bound!r}: {name!r} cannot be {asked!r}"
                )
            optional[name] = bound
        return Filters(range=range_, since=since, until=until, end=end, **optional)

    def _window(
        self, now: datetime, default_range: str
    ) -> tuple[str | None, datetime, datetime | None]:
        """The range and its start; or, asked ``start`` (and ``end``), None, the start
        and the end (None: not asked, up to now)."""
        start, end = self._time("start"), self._time("end")
        if start is None:
            if end is not None:
                raise BadParameter("end", "'end' needs a 'start': the window's first moment")
            range_ = self._choice("range", RANGES, default_range)
            return range_, now - RANGES[range_], None
        if self._query.get("range"):
            raise BadParameter(
                "range",
                "give either 'range' or 'start' (and 'end'), not both: 'range' is a window "
                "that ends now",
            )
        if end is not None and start >= end:
            raise BadParameter(
                "end",
                f"'start' {start.isoformat()} must be before 'end' {end.isoformat()} "
                "('end' is exclusive)",
            )
        if start >= now:
            raise BadParameter(
                "start",
                f"'start' {start.isoformat()} must be before now ({now.isoformat()}): no "
                "call has ended since",
            )
        return None, start, end

    def _time(self, name: str) -> datetime | None:
        """An ISO-8601 time with an offset (or Z), in UTC and rounded up to the
        millisecond (times are kept to the millisecond: the same calls are at or after
        it); None when absent."""
        value = self._query.get(name)
        if value is None:
            return None
        try:
            # RFC 3339 (OpenAPI's date-time) takes a lower-case z too; Python, only Z.
            parsed = datetime.fromisoformat(value[:-1] + "Z" if value.endswith("z") else value)
            if parsed.tzinfo is None:
                at = None
            else:
                at = parsed.astimezone(UTC)
                if _PAST_MICROSECONDS.search(value):  # a datetime drops them: later still
                    at += timedelta(microseconds=1)
                at += timedelta(microseconds=-at.microsecond % 1000)
        except (ValueError, OverflowError):
            raise BadParameter(
                name,
                f"invalid {name!r} {value!r}: expected an ISO-8601 time with an offset or Z, "
                "as in 2026-11-01T00:00:00Z (in a URL, write + as %2B)",
            ) from None
        if at is None:
            raise BadParameter(
                name,
                f"invalid {name!r} {value!r}: give its offset, as in 2026-11-01T00:00:00Z or "
                "2026-11-01T00:00:00-05:00 (a time without one is ambiguous)",
            )
        return at

    def optional_choice(self, name: str, choices: Collection[str]) -> str | None:
        """One of ``choices``, or None when the parameter is absent or empty (all)."""
        value = self._query.get(name) or None
        if value is not None and value not in choices:
            raise BadParameter(
                name, f"invalid {name!r} {value!r}: expected one of {', '.join(choices)}"
            )
        return value

    def text(self, name: str) -> str | None:
        """A free-text exact-match filter; None when absent or empty (all)."""
        return self._query.get(name) or None

    def granularity(self, span: timedelta) -> str:
        """The buckets asked for; by default as :func:`default_granularity` picks."""
        return self._choice("granularity", GRANULARITIES, default_granularity(span))

    def group_by(self) -> tuple[str, str | None]:
        """The grouping, and the property name when it is ``property:<name>``: in lower
        case, as the ingress records it (header names are case-insensitive)."""
        value = self._query.get("group_by", "model")
        if value.startswith(PROPERTY_PREFIX):
            prop = value.removeprefix(PROPERTY_PREFIX)
            if not PROPERTY_NAME.fullmatch(prop):
                raise BadParameter(
                    "group_by",
                    f"invalid 'group_by' property name {prop!r}: {PROPERTY_NAME_RULE}",
                )
            return "property", prop.lower()
        if value not in GROUP_BY:
            expected = ", ".join((*GROUP_BY, f"{PROPERTY_PREFIX}<name>"))
            raise BadParameter(
                "group_by", f"invalid 'group_by' {value!r}: expected one of {expected}"
            )
        return value, None

    def page(self) -> Page:
        """``limit`` (1..1000, default 100) and ``offset`` (0..1,000,000, default 0)."""
        return Page(
            self._integer("limit", LIMIT_MIN, LIMIT_MAX, DEFAULT_LIMIT),
            self._integer("offset", 0, OFFSET_MAX, 0),
        )

    def _integer(self, name: str, low: int, high: int, default: int) -> int:
        value = self._query.get(name, str(default))
        if not re.fullmatch(r"[0-9]{1,7}", value) or not low <= int(value) <= high:
            raise BadParameter(
                name, f"invalid {name!r} {value!r}: expected an integer {low}..{high}"
            )
        return int(value)
