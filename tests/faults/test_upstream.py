"""A provider that fails: 500s, 429s with retry-after, an answer past the proxy's read
timeout, an Anthropic 529, streams that stall, break off mid-event or carry a chunk
that is not JSON.

The client (the official SDKs, no retries) must get the provider's own status and
error (or the proxy's 504 when the provider never answered), each call must be in
ClickHouse once with what happened to it, and every llmtap process must still be
there to serve the next call. The calls are made once, by the module's fixture; each
test checks one of those promises.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx2  # the openai SDK's HTTP client
import openai
import pytest
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from tests.faults.conftest import faulty_upstream
from tests.faults.harness import Cluster
from tests.faults.load import Load, compare
from tests.faults.upstream import RETRY_AFTER

pytestmark = pytest.mark.faults

FEATURE = "upstream-faults"
READ_TIMEOUT_S = 1.5  # the proxy's upstream_read_timeout_s; the fake stalls for 4 s
HEADERS = {"x-llmtap-feature": FEATURE}
MESSAGES: Any = [{"role": "user", "content": "hi"}]
# What each failing call must be recorded as: status, http_status, error_class.
RECORDED = {
    "fault-500": ("upstream_error", 500, "server_error"),  # the provider's error type
    "fault-429": ("upstream_error", 429, "requests"),
    "fault-slow": ("upstream_unreachable", 504, "SocketTimeoutError"),
    "fault-529": ("upstream_error", 529, "overloaded_error"),
    "fault-stall": ("upstream_error", 200, "SocketTimeoutError"),
    "fault-cut": ("upstream_error", 200, "ClientPayloadError"),
    "fault-badjson": ("ok", 200, ""),  # complete, with its usage: the proxy does not judge
}


@dataclass
class Outcome:
    errors: dict[str, Exception] = field(default_factory=dict)  # model -> what the SDK raised
    streams: dict[str, tuple[list[Any], BaseException | None]] = field(default_factory=dict)
    request_ids: dict[str, str] = field(default_factory=dict)  # model -> x-request-id
    ordinary: list[Any] = field(default_factory=list)  # load.Sent of the calls after
    ordinary_failures: list[str] = field(default_factory=list)
    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)
    ready_after: bool = False
    served: list[str] = field(default_factory=list)


async def read_stream(sdk: AsyncOpenAI, model: str, outcome: Outcome) -> None:
    """Read a streamed call to the end: the chunks the SDK yielded, and what it raised
    while reading (None if the stream simply ended)."""
    raw = await sdk.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, stream=True, extra_headers=HEADERS
    )
    outcome.request_ids[model] = raw.headers["x-request-id"]
    chunks: list[Any] = []
    raised: BaseException | None = None
    try:
        async for chunk in raw.parse():
            chunks.append(chunk)
    except Exception as exc:
        raised = exc
    outcome.streams[model] = (chunks, raised)


async def make_calls(cluster: Cluster, outcome: Outcome) -> None:
    sdk = AsyncOpenAI(base_url=cluster.proxy_url, api_key=cluster.api_key, max_retries=0)
    claude = AsyncAnthropic(base_url=cluster.proxy_root, api_key=cluster.api_key, max_retries=0)
    try:
        for model in ("fault-500", "fault-429", "fault-slow"):
            try:
                await sdk.chat.completions.create(
                    model=model, messages=MESSAGES, extra_headers=HEADERS
                )
            except openai.APIStatusError as exc:
                outcome.errors[model] = exc
                outcome.request_ids[model] = exc.response.headers["x-request-id"]
        try:
            await claude.messages.create(
                model="fault-529", max_tokens=5, messages=MESSAGES, extra_headers=HEADERS
            )
        except anthropic.APIStatusError as exc:
            outcome.errors["fault-529"] = exc
            outcome.request_ids["fault-529"] = exc.response.headers["x-request-id"]
        for model in ("fault-stall", "fault-cut", "fault-badjson"):
            await read_stream(sdk, model, outcome)
    finally:
        await sdk.close()
        await claude.close()


@pytest.fixture(scope="module")
async def outcome(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Outcome]:
    found = Outcome()
    async with faulty_upstream() as upstream:
        cluster = Cluster(
            tmp_path_factory.mktemp("upstream-faults"),
            upstream.root_url,
            {"LLMTAP_UPSTREAM_READ_TIMEOUT_S": str(READ_TIMEOUT_S)},
        )
        try:
            await cluster.start_all()
            await make_calls(cluster, found)
            found.dead = cluster.dead()
            found.ready_after = await cluster.http_ok(f"{cluster.proxy_root}/readyz")
            load = Load(cluster.proxy_url, cluster.proxy_root, cluster.api_key, FEATURE)
            await load.run(3)  # one ordinary call of each kind, after all that
            await load.close()
            found.ordinary, found.ordinary_failures = load.sent, load.failures
            await cluster.quiet()
            found.stored = await cluster.calls_by_request(FEATURE)
            found.dead += cluster.dead()
            found.served = upstream.provider.faults_served
            yield found
        except BaseException:
            print(cluster.tails(25))
            raise
        finally:
            await cluster.close()


def test_error_statuses_reach_the_client_as_the_provider_sent_them(outcome: Outcome) -> None:
    server_error = outcome.errors["fault-500"]
    assert isinstance(server_error, openai.InternalServerError)
    assert server_error.status_code == 500
    assert "The server had an error" in server_error.message

    limited = outcome.errors["fault-429"]
    assert isinstance(limited, openai.RateLimitError)
    assert limited.code == "rate_limit_exceeded"
    assert limited.response.headers["retry-after"] == RETRY_AFTER

    overloaded = outcome.errors["fault-529"]
    assert isinstance(overloaded, anthropic.APIStatusError)
    assert overloaded.status_code == 529
    assert isinstance(overloaded.body, dict)
    assert overloaded.body["error"]["type"] == "overloaded_error"


def test_a_provider_that_never_answers_is_a_504(outcome: Outcome) -> None:
    timed_out = outcome.errors["fault-slow"]
    assert isinstance(timed_out, openai.InternalServerError)
    assert timed_out.status_code == 504
    assert timed_out.code == "upstream_timeout"


def test_each_call_is_recorded_once_with_what_happened(outcome: Outcome) -> None:
    by_model = {
        model: (row["status"], row["http_status"], row["error_class"])
        for model, request_id in outcome.request_ids.items()
        if (row := outcome.stored.get(request_id)) is not None
    }
    expected = dict(RECORDED)
    # The SDK gives up at the chunk that is not JSON and hangs up: whether the proxy had
    # forwarded the rest by then is a race, and either way it records what happened.
    hung_up = ("client_disconnected", 200, "client_disconnected")
    if by_model.get("fault-badjson") == hung_up:
        expected["fault-badjson"] = hung_up
    assert by_model == expected
    assert all(outcome.stored[rid]["rows"] == 1 for rid in outcome.request_ids.values())
    badjson = outcome.stored[outcome.request_ids["fault-badjson"]]
    if by_model["fault-badjson"] != hung_up:
        assert (badjson["input_tokens"], badjson["output_tokens"]) == (12, 5)
    assert sorted(outcome.served) == sorted(RECORDED)  # each reached the provider once


def test_a_chunk_that_is_not_json_reaches_the_client_as_sent(outcome: Outcome) -> None:
    chunks, raised = outcome.streams["fault-badjson"]
    assert [c.choices[0].delta.content for c in chunks] == ["", "Hello"]
    assert isinstance(raised, json.JSONDecodeError | openai.APIError), raised


def test_streams_the_provider_broke_off_reach_the_client_as_far_as_they_went(
    outcome: Outcome,
) -> None:
    for model in ("fault-stall", "fault-cut"):
        chunks, _ = outcome.streams[model]
        assert [c.choices[0].delta.content for c in chunks] == ["", "Hello"], model


def test_streams_the_provider_broke_off_end_in_an_error_at_the_client(outcome: Outcome) -> None:
    for model in ("fault-stall", "fault-cut"):
        _, raised = outcome.streams[model]
        assert isinstance(raised, httpx2.TransportError | openai.APIError), (model, raised)


def test_nothing_crashed_and_ordinary_calls_still_work(outcome: Outcome) -> None:
    assert outcome.dead == []
    assert outcome.ready_after
    assert outcome.ordinary_failures == []
    ordinary = {s.request_id for s in outcome.ordinary}
    stored = {k: v for k, v in outcome.stored.items() if k in ordinary}
    assert compare(outcome.ordinary, stored) == []
    assert len(outcome.stored) == len(RECORDED) + len(ordinary)  # nothing else was stored
