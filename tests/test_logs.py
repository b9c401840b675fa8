"""Structured logs: JSON lines carrying the request id."""

from __future__ import annotations

import logging

import orjson

from llmtap import logs


def test_a_log_line_is_json_with_the_request_id() -> None:
    formatter = logs.JsonFormatter("ingress")
    record = logging.LogRecord(
        "ingress.x", logging.WARNING, __file__, 1, "provider %s down", ("openai",), None
    )
    token = logs.request_id.set("3f0c6b7e-0000-4000-8000-000000000001")
    try:
        line = orjson.loads(formatter.format(record))
    finally:
        logs.request_id.reset(token)
    assert line["message"] == "provider openai down"
    assert line["level"] == "WARNING"
    assert line["process"] == "ingress"
    assert line["request_id"] == "3f0c6b7e-0000-4000-8000-000000000001"
    assert line["ts"].endswith("+00:00")

    assert "request_id" not in orjson.loads(formatter.format(record))
