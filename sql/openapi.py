"""The OpenAPI 3.1 document of the API, served at GET /api/v1/openapi.json.

Built from the constants the API checks requests with (sql/params.py, sql/sqlguard.py),
so a range, an enum or a limit cannot say one thing here and do another there.
tests/test_openapi.py runs schemathesis against the served document.
"""

from __future__ import annotations

from typing import Any, get_args

from llmtap.events import PROPERTY_NAME, Alert, BudgetPeriod, BudgetScope, BudgetState
from sql import params, sqlapi, sqlguard

Schema = dict[str, Any]
BUDGET_STATUS = BudgetState.model_fields["status"].annotation
# Why a spike alert resolved (Alert.resolution: one of these, or None).
RESOLUTIONS = get_args(get_args(Alert.model_fields["resolution"].annotation)[0])


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


INT: Schema = {"type": "integer", "minimum": 0}
NUMBER: Schema = {"type": "number"}
STRING: Schema = {"type": "string"}
TIME: Schema = {"type": "string", "format": "date-time"}
MONEY: Schema = {
    "type": "string",
    "pattern": r"^-?[0-9]+\.[0-9]{9}$",
    "description": "USD, exact: a decimal string with 9 places, never a float",
}
# Unknown when every call summed was unpriced (never $0).
COST = _nullable(MONEY)
DECIMAL: Schema = {
    "type": "string",
    "pattern": r"^-?[0-9]+\.[0-9]{9}$",
    "description": "exact: a decimal string with 9 places (USD for cost and spend)",
}
# A float that is null when there is nothing to average (no calls, no streamed calls).
MAYBE_NUMBER = _nullable(NUMBER)


def _object(properties: dict[str, Schema], description: str = "") -> Schema:
    schema: Schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    if description:
        schema["description"] = description
    return schema


TOKENS = {"input_tokens": INT, "output_tokens": INT, "total_tokens": INT}

ROWS: dict[str, Schema] = {
    "models": _object(
        {
            "model": STRING,
            "provider": STRING,
            "requests": INT,
            "errors": INT,
            **TOKENS,
            "cached_input_tokens": INT,
            "reasoning_tokens": INT,
            "cost": COST,
            "unpriced_requests": INT,
            "usage_missing_requests": INT,
            # null: no call in the range (a row for the rolling windows only)
            "avg_latency_ms": MAYBE_NUMBER,
            "p95_latency_ms": MAYBE_NUMBER,
            "p99_latency_ms": MAYBE_NUMBER,
            "error_rate": MAYBE_NUMBER,
            "success_rate": MAYBE_NUMBER,
            **{
                f"{metric}_{window}": schema
                for window in ("24h", "7d", "30d")
                for metric, schema in (
                    ("requests", _nullable(INT)),
                    ("tokens", _nullable(INT)),
                    ("cost", COST),
                )
            },
        },
        "per model and provider seen in the range or a rolling window (none in the range:"
        " requests 0, latencies and rates null); the rolling *_24h/_7d/_30d whatever the range"
        " (null: a window longer than the store keeps, raw_retention_days or"
        " rollup_retention_days)",
    ),
    "timeseries": _object(
        {
            "bucket": TIME,
            "requests": INT,
            "errors": INT,
            **TOKENS,
            "cost": COST,
            "p95_latency_ms": NUMBER,
        },
        "one UTC hour or day; empty buckets are zeros",
    ),
    "providers": _object(
        {
            "provider": STRING,
            "models": INT,
            "requests": INT,
            "errors": INT,
            **TOKENS,
            "cost": COST,
            "unpriced_requests": INT,
            "avg_latency_ms": NUMBER,
            "success_rate": NUMBER,
            "error_rate": NUMBER,
        }
    ),
    "costs": _object(
        {
            "key": {
                "type": "string",
                "description": "the group; a UTC date for day; for key, the virtual key's id "
                "(a pass-through call's: the SHA-256 prefix of the provider key it brought)",
            },
            "tenant": {
                "type": ["string", "null"],
                "description": "grouped by tenant, team, user, feature, key or property: the "
                "tenant the group is of (they exist within their tenant: two tenants' team "
                "`search` are two rows); by model, provider or day: the tenant filtered on "
                "(a virtual key's own), null for every tenant",
            },
            "requests": INT,
            "unpriced_requests": INT,
            **TOKENS,
            "cost_input": COST,
            "cost_cached_input": COST,
            "cost_cache_write": COST,
            "cost_output": COST,
            "cost_reasoning": COST,
            "cost_web_search": {
                **COST,
                "description": "fees for the web searches providers ran for these calls",
            },
            "cost": COST,
        }
    ),
    "performance": _object(
        {
            "requests": INT,
            "avg_latency_ms": MAYBE_NUMBER,
            "p50_latency_ms": MAYBE_NUMBER,
            "p95_latency_ms": MAYBE_NUMBER,
            "p99_latency_ms": MAYBE_NUMBER,
            "avg_ttft_ms": MAYBE_NUMBER,
            "p50_ttft_ms": MAYBE_NUMBER,
            "p95_ttft_ms": MAYBE_NUMBER,
            "output_tokens_per_second": MAYBE_NUMBER,
            "requests_per_minute": NUMBER,
        }
    ),
    "users": _object(
        {
            "user": STRING,
            "tenant": {
                "type": "string",
                "description": "the user's tenant (two tenants' `alice` are two users)",
            },
            "requests": INT,
            "errors": INT,
            **TOKENS,
            "cost": COST,
            "unpriced_requests": INT,
            "avg_latency_ms": NUMBER,
            "success_rate": NUMBER,
            "error_rate": NUMBER,
            "unique_models": INT,
            "providers": {"type": "array", "items": STRING},
            "first_request": TIME,
            "last_request": TIME,
            "days_active": INT,
            "avg_requests_per_day": NUMBER,
            "cost_per_request": COST,
            "cost_per_1k_tokens": COST,
            "max_tokens_per_request": INT,
            "budget_rejections": INT,
        }
    ),
    "alerts": _object(
        {
            "event_id": {"type": "string", "format": "uuid", "description": "the alert id"},
            "first_seen": TIME,
            "alert_type": {"type": "string", "enum": list(params.ALERT_TYPES)},
            "state": {"type": "string", "enum": list(params.ALERT_STATES)},
            "severity": {"type": "string", "enum": list(params.SEVERITIES)},
            "rule": STRING,
            "dimension": STRING,
            "value": STRING,
            "tenant": {
                "type": "string",
                "description": "the tenant the alert is about; empty: every tenant's "
                "(a model or provider spike, a budget on every tenant, an alert from "
                "before alerts had tenants)",
            },
            "metric": STRING,
            "observed": DECIMAL,
            "baseline": _nullable(DECIMAL),
            "threshold": _nullable(DECIMAL),
            "window_start": TIME,
            "window_end": TIME,
            "message": STRING,
            "period": {
                "type": "string",
                "enum": ["", *get_args(BudgetPeriod)],
                "description": "a budget alert's budget period as configured; empty: a "
                "spike alert, or a budget alert stored before alerts carried it",
            },
            "resolution": {
                "type": "string",
                "enum": ["", *RESOLUTIONS],
                "description": "why a spike alert resolved: normal (a window back within "
                "its level), quiet (no calls), unjudged (no window with a value for as long "
                "as the rule looks back; observed is 0, not measured, for these two); "
                "empty: a firing or budget alert, or one stored before alerts carried it",
            },
        },
        "one spike or budget alert; baseline: the learned baseline (spike) or the "
        "budget's limit; threshold: the percentage of the limit crossed (budget), or the "
        "level the window had to pass to fire (spike)",
    ),
}
# A budget's money is as configured and as the stream counted it: exact, any precision.
BUDGET_MONEY: Schema = {
    "type": "string",
    "pattern": r"^-?[0-9]+(?:\.[0-9]+)?$",
    "description": "USD, exact: a decimal string, never a float",
}
UNKNOWN = "; null while the budget's state is unknown (none seen yet on the budgets topic)"
ROWS["budgets"] = _object(
    {
        "budget": STRING,
        "scope": {"type": "string", "enum": list(get_args(BudgetScope))},
        "value": {"type": "string", "description": "which tenant, team, key id, user or feature"},
        "tenant": {
            "type": ["string", "null"],
            "description": "the tenant it belongs to; null: it counts every tenant's calls",
        },
        "period": {"type": "string", "enum": list(get_args(BudgetPeriod))},
        "limit_usd": BUDGET_MONEY,
        "spent_usd": {**_nullable(BUDGET_MONEY), "description": "spent this period" + UNKNOWN},
        "remaining_usd": {
            **_nullable(BUDGET_MONEY),
            "description": "limit minus spent, negative when overspent" + UNKNOWN,
        },
        "used_percent": {
            "anyOf": [{"type": "string", "pattern": r"^-?[0-9]+\.[0-9]$"}, {"type": "null"}],
            "description": "spent as a percentage of the limit, one decimal place" + UNKNOWN,
        },
        "reserved_usd": {
            **_nullable(BUDGET_MONEY),
            "description": "held against a hard cap by the ingress processes (worst cases of "
            "calls in flight, costs not counted in spent yet; 0 without a hard cap); null "
            "when no ingress has been heard from in its last three announcement intervals",
        },
        "period_start": {**_nullable(TIME), "description": "the current period's start" + UNKNOWN},
        "period_end": {**_nullable(TIME), "description": "the current period's end" + UNKNOWN},
        "status": {"type": "string", "enum": [*get_args(BUDGET_STATUS), "unknown"]},
        "hard_cap": {"type": "boolean"},
        "thresholds_crossed": {
            "anyOf": [{"type": "array", "items": INT}, {"type": "null"}],
            "description": "alert thresholds (percent of the limit) crossed this period" + UNKNOWN,
        },
        "updated_at": {**_nullable(TIME), "description": "when the stream last counted" + UNKNOWN},
    },
    "one configured budget and its current state",
)
USAGE_TOTALS = _object(
    {
        "requests": INT,
        "errors": INT,
        **TOKENS,
        "cached_input_tokens": INT,
        "reasoning_tokens": INT,
        "cost": COST,
        "unpriced_requests": INT,
        "usage_missing_requests": INT,
    }
)
ROWS["usage"] = _object({"model": STRING, "provider": STRING, **USAGE_TOTALS["properties"]})

RANGE: Schema = {"type": "string", "enum": list(params.RANGES)}
# What an answer over a range or window says it covers (params.Filters.shown).
SHOWN: dict[str, Schema] = {
    "range": {**_nullable(RANGE), "description": "the range; null for a window (start, end)"},
    "start": {**TIME, "description": "the first moment counted"},
    "end": {**TIME, "description": "the end, exclusive: now, unless `end` was asked"},
}
LIMIT: Schema = {"type": "integer", "minimum": params.LIMIT_MIN, "maximum": params.LIMIT_MAX}
OFFSET: Schema = {"type": "integer", "minimum": 0, "maximum": params.OFFSET_MAX}
# A ranked answer's page (params.Page): where it starts, and where the next one does.
PAGE: dict[str, Schema] = {
    "limit": LIMIT,
    "offset": OFFSET,
    "next_offset": {
        **_nullable(OFFSET),
        "description": "the offset of the next page; null on the last (or past the largest offset)",
    },
}


TRUNCATED: Schema = {
    "type": "boolean",
    "description": f"more models than the answer holds ({params.MODEL_ROWS} rows, the "
    "costliest); usage's totals count them all",
}


def _answer(endpoint: str) -> Schema:
    """The 200 body of an analytics endpoint."""
    rows: Schema = {"type": "array", "items": {"$ref": f"#/components/schemas/{endpoint}_row"}}
    if endpoint == "budgets":  # the current state: no range
        return _object({"data": rows})
    extra: dict[str, Schema] = {
        "models": {"truncated": TRUNCATED, "data": rows},
        "timeseries": {
            "granularity": {"type": "string", "enum": list(params.GRANULARITIES)},
            "data": rows,
        },
        "providers": {"data": rows},
        "costs": {"group_by": STRING, **PAGE, "data": rows},
        "usage": {
            "totals": {"$ref": "#/components/schemas/usage_totals"},
            "truncated": TRUNCATED,
            "data": rows,
        },
        "performance": {"data": {"$ref": f"#/components/schemas/{endpoint}_row"}},
        "users": {**PAGE, "data": rows},
        "alerts": {**PAGE, "data": rows},
    }[endpoint]
    return _object({**SHOWN, **extra})


FILTER_TEXT = "exact match; absent or empty: all"
WINDOW_TEXT = (
    "an explicit window instead of a range, ISO-8601 with an offset or Z (a time without "
    "one is a 400)"
)
GROUP_BY_PATTERN = (
    "^(?:" + "|".join(params.GROUP_BY) + "|" + params.PROPERTY_PREFIX + PROPERTY_NAME.pattern + ")$"
)

PARAMETERS: dict[str, Schema] = {
    "range": {
        "schema": {**RANGE, "default": params.DEFAULT_RANGE},
        "description": (
            "calls that ended within the last 24 hours, 7, 30 or 90 days; absent: 30d, or "
            "the longest range the store keeps if that is shorter (the answer's range)"
        ),
    },
    "start": {
        "schema": TIME,
        "description": WINDOW_TEXT + ": calls that ended at or after it (not with "
        "`range`; before now)",
    },
    "end": {
        "schema": TIME,
        "description": WINDOW_TEXT + ", exclusive: calls that ended before it; absent: "
        "now (only with `start`, and after it)",
    },
    "tenant": {
        "schema": STRING,
        "description": FILTER_TEXT + " (a virtual key: its own tenant only, else 403)",
    },
    "provider": {"schema": STRING, "description": FILTER_TEXT},
    "team": {
        "schema": STRING,
        "description": FILTER_TEXT + " (a key bound to a team: that team only, else 403)",
    },
    "feature": {"schema": STRING, "description": FILTER_TEXT},
    "env": {"schema": STRING, "description": FILTER_TEXT},
    "model_id": {"schema": STRING, "description": "the model, " + FILTER_TEXT},
    "user_id": {
        "schema": STRING,
        "description": FILTER_TEXT + " (a key bound to a user: that user only, else 403)",
    },
    "granularity": {
        "schema": {"type": "string", "enum": list(params.GRANULARITIES)},
        "description": "bucket size; default: "
        + ", ".join(f"{k}: {v}" for k, v in params.DEFAULT_GRANULARITY.items())
        + f"; a window: hour up to {params.HOURLY_UP_TO.total_seconds() / 3600:g} hours, "
        "else day",
    },
    "group_by": {
        "schema": {"type": "string", "pattern": GROUP_BY_PATTERN, "default": "model"},
        "description": "one of "
        + ", ".join(params.GROUP_BY)
        + ", or property:<name> (any case: names are recorded in lower case); "
        "a tenant, team, user, feature, key or property value is one tenant's",
    },
    "limit": {
        "schema": {**LIMIT, "default": params.DEFAULT_LIMIT},
        "description": "how many users, costliest first",
    },
    "offset": {
        "schema": {**OFFSET, "default": 0},
        "description": "how many of the ranked rows to skip: the answer's `next_offset` "
        "reads the next page",
    },
    "alert_type": {
        "schema": {"type": "string", "enum": ["", *params.ALERT_TYPES]},
        "description": "spike or budget; absent or empty: both",
    },
    "state": {
        "schema": {"type": "string", "enum": ["", *params.ALERT_STATES]},
        "description": "firing or resolved; absent or empty: both",
    },
    "severity": {
        "schema": {"type": "string", "enum": ["", *params.SEVERITIES]},
        "description": "absent or empty: all",
    },
    "rule": {"schema": STRING, "description": "the spike rule's or budget's name, " + FILTER_TEXT},
}
# A parameter that means something else on one endpoint.
PARAMETER_OF: dict[tuple[str, str], Schema] = {
    ("alerts", "range"): {
        "schema": {**RANGE, "default": params.DEFAULT_RANGE},
        "description": "alerts first seen within the last 24 hours, 7, 30 or 90 days",
    },
    ("alerts", "start"): {
        "schema": TIME,
        "description": WINDOW_TEXT + ": alerts first seen at or after it (not with `range`)",
    },
    ("alerts", "end"): {
        "schema": TIME,
        "description": WINDOW_TEXT + ", exclusive: alerts first seen before it; absent: now",
    },
    ("alerts", "tenant"): {
        "schema": STRING,
        "description": "the alerts a key of this tenant sees: its tenant's spikes and its "
        "budgets' alerts; absent or empty: every alert the key sees (a virtual key: its "
        "own tenant only, else 403)",
    },
    ("budgets", "tenant"): {
        "schema": STRING,
        "description": "the budgets a key of this tenant (bound to no team or user) sees; "
        "absent or empty: every budget the key sees (a virtual key: its own tenant only, "
        "else 403)",
    },
    ("alerts", "limit"): {
        "schema": {**LIMIT, "default": params.DEFAULT_LIMIT},
        "description": "how many alerts, newest first",
    },
    ("costs", "limit"): {
        "schema": {**LIMIT, "default": params.DEFAULT_LIMIT},
        "description": "how many groups: the costliest (days among them oldest first)",
    },
}

SUMMARIES = {
    "models": "Per model and provider: requests, errors, tokens, cost, latency, rolling windows",
    "timeseries": "Requests, tokens, cost and p95 latency per UTC hour or day",
    "providers": "Per provider: models, requests, tokens, cost, latency, success rate",
    "costs": "Cost per model, provider, day, tenant, team, user, feature or custom property",
    "usage": "Usage totals, and per model and provider",
    "performance": "Latency, time to first token and throughput over the range",
    "users": "Per user of a tenant, costliest first",
    "alerts": "Alert history (spike and budget), newest first",
    "budgets": "Every budget's current state: spend, limit, remaining, period end, status",
}


def _error(description: str, *, authenticate: bool = False) -> Schema:
    response: Schema = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if authenticate:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}}
    return response


def _too_many() -> Schema:
    response = _error("the key has `api_requests_per_key` requests in flight already")
    response["headers"] = {"Retry-After": {"schema": {"type": "string"}, "required": True}}
    return response


ERRORS: dict[str, Schema] = {
    "400": _error(
        "a bad or unknown parameter, named in `param`; a `range` (or a window's `start`) "
        "reaching back further than the store keeps (raw_retention_days, "
        "rollup_retention_days); `range` with `start`; a `start` not before `end`"
    ),
    "401": _error("no key, or an unknown or revoked one", authenticate=True),
    "429": _too_many(),
    "503": _error(
        "the store could not answer: a read past its time limit (code `timeout`) or "
        "its memory limit (code `too_large`), or a store that failed (code "
        "`store_unavailable`)"
    ),
}


def _analytics(endpoint: str) -> Schema:
    responses: Schema = {
        "200": {
            "description": "the answer, scoped to the caller's key",
            "content": {"application/json": {"schema": _answer(endpoint)}},
        },
        **ERRORS,
        "403": _error("a filter outside the key's tenant, team or user"),
    }
    if endpoint == "budgets":  # the current state: no range to reach back too far
        responses["400"] = _error("a bad or unknown parameter, named in `param`")
    return {
        "get": {
            "operationId": f"analytics_{endpoint}",
            "summary": SUMMARIES[endpoint],
            "tags": ["analytics"],
            "parameters": [
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    **PARAMETER_OF.get((endpoint, name), PARAMETERS[name]),
                }
                for name in params.parameters(endpoint)
            ],
            "responses": responses,
        }
    }


def _sql(limits: sqlguard.SqlLimits) -> Schema:
    count_header = {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True}
    headers = {
        "X-Rows-Returned": count_header,
        "X-Truncated": {"schema": {"type": "string", "enum": ["true", "false"]}, "required": True},
        "X-Elapsed-Ms": {"schema": {"type": "string"}, "required": True},
        "X-Truncated-By": {
            "schema": {"type": "string", "enum": ["max_rows", "max_answer_bytes"]},
            "description": "which limit cut the answer short (only when one did)",
        },
    }
    return {
        "post": {
            "operationId": "sql",
            "summary": "Run one read-only query (admin keys only)",
            "description": (
                "Statements: " + sqlguard.ALLOWED + ". Refused with a 400 before they run: "
                "writes and DDL, more than one statement, FORMAT and INTO OUTFILE, system "
                "and information_schema tables, table functions other than "
                + ", ".join(sorted(sqlguard.TABLE_FUNCTIONS))
                + ", and functions that read files, the network or dictionaries. "
                "It runs in a ClickHouse session with readonly=1, "
                f"max_execution_time={limits.timeout_s:g} s and at most "
                f"{limits.max_rows} result rows. An answer stops short, saying so, at "
                f"max_rows rows or {limits.max_answer_bytes} bytes of rows as encoded."
            ),
            "tags": ["sql"],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/SqlRequest"}}
                },
            },
            "responses": {
                "200": {
                    "description": "the rows: JSON, or CSV with a header row",
                    "headers": headers,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/SqlResult"}},
                        "text/csv": {"schema": {"type": "string"}},
                    },
                },
                "400": _error(
                    "a bad body; a refused query; a ClickHouse error (its message); "
                    "a query past its time limit (code `timeout`)"
                ),
                "401": ERRORS["401"],
                "403": _error("a virtual key: SQL is for admin keys only"),
                "413": _error("a body larger than 1 MiB"),
                "429": ERRORS["429"],
                "503": _error("ClickHouse is unavailable"),
            },
        }
    }


def _redeliver() -> Schema:
    """POST /api/v1/webhooks/{endpoint}/redeliver: served by the store process only
    (sinks/app.py; `llmtap alerts redeliver` asks it)."""
    return {
        "post": {
            "operationId": "webhooks_redeliver",
            "summary": "Send an endpoint's given-up webhook deliveries again (admin keys only)",
            "description": (
                "Each of the endpoint's deliveries whose latest sending ended dead_lettered, "
                "gone or refused (of the alerts named, given up at or after `since`; none named: "
                "all) is made due again: sent with the same webhook-id on a fresh retry "
                "schedule, as new rows of the next redelivery. The endpoint is enabled "
                "again if a 410 disabled it. Served by the store process only."
            ),
            "tags": ["webhooks"],
            "parameters": [
                {
                    "name": "endpoint",
                    "in": "path",
                    "required": True,
                    "schema": STRING,
                    "description": "a configured webhook endpoint's name",
                }
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "alert_ids": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "uuid"},
                                    "description": "only these alerts' deliveries",
                                },
                                "since": {
                                    **TIME,
                                    "description": "only deliveries given up at or after "
                                    "this (with an offset)",
                                },
                            },
                            "additionalProperties": False,
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "how many deliveries were made due again",
                    "content": {
                        "application/json": {
                            "schema": _object({"endpoint": STRING, "redelivered": INT})
                        }
                    },
                },
                "400": _error("a bad body, the field named in `param`"),
                "401": ERRORS["401"],
                "403": _error("a virtual key: redelivering is for admin keys only"),
                "404": _error("no webhook endpoint of that name (`param` is `endpoint`)"),
                "429": ERRORS["429"],
                "503": ERRORS["503"],
            },
        }
    }


def _components(limits: sqlguard.SqlLimits) -> Schema:
    return {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": (
                    "An admin key (admin_key_hashes: every tenant, and SQL) or a virtual "
                    "key from `llmtap keys create` (its tenant; its team and user if bound)"
                ),
            }
        },
        "schemas": {
            "Error": _object(
                {
                    "error": {
                        "type": "object",
                        "properties": {
                            "message": STRING,
                            "param": {"type": ["string", "null"]},
                            "code": STRING,
                        },
                        "required": ["message", "param"],
                        "additionalProperties": False,
                    }
                }
            ),
            **{f"{name}_row": schema for name, schema in ROWS.items()},
            "usage_totals": USAGE_TOTALS,
            "SqlRequest": {
                "type": "object",
                "properties": {
                    "query": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": limits.max_query_chars,
                        # Not blank, no NUL.
                        "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$",
                    },
                    "format": {"type": "string", "enum": list(sqlapi.FORMATS), "default": "json"},
                    "max_rows": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": limits.max_rows,
                        "default": limits.default_rows,
                    },
                },
                "required": ["query"],
                "additionalProperties": False,
            },
            "SqlResult": _object(
                {
                    "columns": {
                        "type": "array",
                        "items": _object({"name": STRING, "type": STRING}),
                    },
                    "rows": {"type": "array", "items": {"type": "array"}},
                    "rows_returned": INT,
                    "truncated": {
                        "type": "boolean",
                        "description": "the answer stopped short: see truncated_by",
                    },
                    "truncated_by": {
                        **_nullable({"type": "string", "enum": ["max_rows", "max_answer_bytes"]}),
                        "description": (
                            "max_rows: the query had more rows, the first max_rows are "
                            "here; max_answer_bytes: the rows here are all that fit in "
                            f"{limits.max_answer_bytes} bytes as encoded; null: all rows"
                        ),
                    },
                    "elapsed_ms": NUMBER,
                }
            ),
        },
    }


def document(limits: sqlguard.SqlLimits | None = None, *, webhooks: bool = False) -> Schema:
    """The document; ``webhooks``: the store process's, which also serves redelivery."""
    limits = limits or sqlguard.SqlLimits()
    paths: dict[str, Schema] = {
        f"/api/v1/analytics/{endpoint}": _analytics(endpoint) for endpoint in params.EXTRA
    }
    paths["/api/v1/sql"] = _sql(limits)
    if webhooks:
        paths["/api/v1/webhooks/{endpoint}/redeliver"] = _redeliver()
    paths["/api/v1/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document (no key needed)",
            "security": [],
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llmtap analytics API",
            "version": "1",
            "description": (
                "Analytics over calls (from the rollups; counts and sums exact, "
                "percentiles t-digest estimates) and alert history, and read-only SQL "
                "for admins. Every operation but this document needs "
                "`Authorization: Bearer <key>`."
            ),
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": _components(limits),
    }
