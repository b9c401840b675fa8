"""Structured logs: JSON lines carrying the request id."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson

from llmtap import logs
from tests.fake_provider import free_port


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


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeating_kafka_line_passes_once_per_interval_then_says_how_many_were_held() -> None:
    now = [100.0]
    throttle = logs.Throttle(("aiokafka",), interval=10.0, clock=lambda: now[0])
    unable = "Unable connect to node with id %s: %s"
    passed = [throttle.filter(record("aiokafka", unable, 1, f"try {i}")) for i in range(50)]
    assert passed == [True] + [False] * 49
    # Another kind (message, logger or level) is not held back by the first.
    assert throttle.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
    assert throttle.filter(record("aiokafka.consumer.fetcher", unable, 1, "x"))
    assert throttle.filter(record("aiokafka", unable, 1, "x", level=logging.WARNING))
    # Nor is any other logger, however often it repeats.
    assert all(throttle.filter(record("stream.agents.costs", "not delivered")) for _ in range(5))

    now[0] += 9.9
    assert not throttle.filter(record("aiokafka", unable, 1, "still"))
    now[0] += 0.1
    next_one = record("aiokafka", unable, 1, "after")
    assert throttle.filter(next_one)
    line = orjson.loads(logs.JsonFormatter("store").format(next_one))
    assert line["suppressed"] == 50  # 49, then the one at 9.9 s
    now[0] += 10.0
    quiet_since = record("aiokafka", unable, 1, "again")
    assert throttle.filter(quiet_since)
    assert "suppressed" not in orjson.loads(logs.JsonFormatter("store").format(quiet_since))


def test_once_says_yes_once_a_thing_and_remembers_a_bounded_number() -> None:
    once = logs.Once(most=3)
    assert [once.first(t) for t in ("a", "b", "a", "c", "b")] == [True, True, False, True, False]
    assert once.first("d")  # a fourth: the three are forgotten, so memory stays bounded
    assert not once.first("d")
    assert once.first("a")  # forgotten, so told again


def test_a_process_that_fails_says_so_in_a_json_line_not_a_bare_traceback(
    tmp_path: Path,
) -> None:
    """`llmtap ingress` (as compose runs it, alone) whose port another program holds:
    it exits, status 1. What it wrote on its way out was Python's own traceback, ~25
    lines that are not JSON (a log pipeline reading JSON lines drops or mangles them)
    and not redacted. Now one JSON line, at CRITICAL, with the traceback in it."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {
            **os.environ,
            "LLMTAP_DATA_DIR": str(tmp_path),
            "LLMTAP_PROXY_PORT": str(port),
            "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # nothing there
        }
        ran = subprocess.run(
            [sys.executable, "-m", "llmtap", "ingress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert ran.returncode == 1, ran.stderr
    lines = [orjson.loads(line) for line in ran.stderr.splitlines()]  # every one JSON
    (failed,) = [line for line in lines if line["level"] == "CRITICAL"]
    assert "address already in use" in failed["message"]
    assert "Traceback" in failed["exception"]
