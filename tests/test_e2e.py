"""End to end: `llmtap up` as a subprocess, the official openai SDK, a fake provider.

Each test uses its own model so the rows it waits for are its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import ClientResponse
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from sql.store import Store
from tests.conftest import ADMIN_KEY, PROVIDER_KEY, FakeUpstream, Running, pid_alive, run_llmtap
from tests.fake_provider import ANTHROPIC_SNAPSHOT, SNAPSHOT, FakeProvider
from tests.faults.harness import until
from tests.prometheus import sample

POLL_TIMEOUT_S = 45.0
LAST_CALLS = 40  # made just before SIGTERM; batched on the wire

# Per-million rates from stream/pricing.yaml, written out here on purpose.
RATES = {
    "gpt-4o-mini": (Decimal("0.15"), Decimal("0.075"), Decimal("0.60")),
    "gpt-4o": (Decimal("2.50"), Decimal("1.25"), Decimal("10.00")),
    "gpt-4.1-mini": (Decimal("0.40"), Decimal("0.10"), Decimal("1.60")),
    "gpt-4o-2024-05-13": (Decimal("5.00"), Decimal("5.00"), Decimal("15.00")),  # no cache rate
}


async def cost_row(running: Running, served: str, requests: int) -> dict[str, Any]:
    """The costs endpoint's row of model ``served``, once it counts ``requests`` calls."""
    await model_row(running.api_url, served, lambda r: r["requests"] >= requests)
    url = f"{running.api_url}/analytics/costs?range=24h&group_by=model"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as session:
        async with session.get(url) as response:
            assert response.status == 200
            rows: list[dict[str, Any]] = (await response.json())["data"]
    [row] = [r for r in rows if r["key"] == served]
    return row


def stored_calls(data_dir: Path, model: str) -> int:
    """The calls of ``model`` in the embedded store of ``data_dir``, once `up` is gone
    (the store is ours to open then)."""
    store = Store(f"chdb:///{data_dir / 'clickhouse'}")
    try:
        rows = store.rows("SELECT count() AS n FROM calls WHERE model = {m:String}", {"m": model})
    finally:
        store.close()
    return int(rows[0]["n"])


def expected_cost(model: str, prompt: int, cached: int, completion: int) -> Decimal:
    rate_in, rate_cached, rate_out = RATES[model]
    per = Decimal(1_000_000)
    return ((prompt - cached) * rate_in + cached * rate_cached + completion * rate_out) / per


async def model_row(
    api_url: str, model: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll the analytics endpoint until ``model``'s row satisfies ``done``."""
    url = f"{api_url}/analytics/models?range=24h"
    deadline = asyncio.get_running_loop().time() + POLL_TIMEOUT_S
    last: dict[str, Any] | None = None
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as session:
        while asyncio.get_running_loop().time() < deadline:
            async with session.get(url) as response:
                assert response.status == 200
                rows: list[dict[str, Any]] = (await response.json())["data"]
            last = next((r for r in rows if r["model"] == model), None)
            if last is not None and done(last):
                return last
            await asyncio.sleep(0.2)
    pytest.fail(f"{model} never showed as expected in {POLL_TIMEOUT_S}s; last row: {last}")


async def test_non_streaming_call_is_metered(
    llmtap_up: Running, openai_sdk: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    fake = upstream.provider
    completion = await openai_sdk.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hello"}],
        extra_headers={"x-llmtap-team": "search", "x-llmtap-property-ticket": "T-1"},
    )
    assert completion.choices[0].message.content == "".join(fake.words)
    assert completion.model == "gpt-4o-mini" + SNAPSHOT

    seen = fake.received[-1]
    assert seen.headers["Authorization"] == f"Bearer {PROVIDER_KEY}"  # provider key injected
    assert not any(h.lower().startswith("x-llmtap-") for h in seen.headers)  # stripped

    row = await model_row(llmtap_up.api_url, "gpt-4o-mini" + SNAPSHOT, lambda r: r["requests"] >= 1)
    assert row["requests"] == 1
    assert row["errors"] == 0
    assert row["input_tokens"] == fake.prompt_tokens
    assert row["output_tokens"] == fake.completion_tokens
    assert row["cached_input_tokens"] == fake.cached_tokens
    want = expected_cost(
        "gpt-4o-mini", fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens
    )
    assert Decimal(row["cost"]) == want


async def test_the_store_serves_its_writer_s_metrics(
    llmtap_up: Running, openai_sdk: AsyncOpenAI
) -> None:
    metrics_url = llmtap_up.api_url.removesuffix("/api/v1") + "/metrics"

    async def scrape() -> str:
        async with aiohttp.ClientSession() as session, session.get(metrics_url) as response:
            assert response.status == 200  # no key: as the proxy's /metrics
            return await response.text()

    before = sample(await scrape(), "llmtap_store_rows_written_total")
    asked_at = time.time()
    await openai_sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "counted by the store"}]
    )
    seen: dict[str, float] = {}

    async def written() -> bool:
        text = await scrape()
        seen["rows"] = sample(text, "llmtap_store_rows_written_total")
        seen["last"] = sample(text, "llmtap_store_last_write_timestamp_seconds")
        return seen["rows"] > before and seen["last"] >= asked_at

    await until(written, "the store's metrics show the call written", POLL_TIMEOUT_S)
    text = await scrape()
    assert sample(text, "llmtap_store_write_failures_total") == 0
    assert sample(text, "llmtap_store_batches_written_total") >= 1


async def test_streamed_chunks_reach_the_client_unchanged(
    llmtap_up: Running, openai_sdk: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    fake = upstream.provider
    stream = await openai_sdk.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    received = [chunk.to_dict() async for chunk in stream]

    sent = fake.sent_chunks[-1]
    # The proxy asked for usage the client did not ask for...
    assert fake.received[-1].body["stream_options"] == {"include_usage": True}
    assert sent[-1]["choices"] == [] and "usage" in sent[-1]
    # ...and the client sees exactly what it would have seen without the proxy: not the
    # usage chunk, and no "usage": null in the others.
    assert all(c["usage"] is None for c in sent[:-1])
    assert received == [{k: v for k, v in c.items() if k != "usage"} for c in sent[:-1]]

    row = await model_row(llmtap_up.api_url, "gpt-4o" + SNAPSHOT, lambda r: r["requests"] >= 1)
    assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (
        1,
        fake.prompt_tokens,
        fake.completion_tokens,
    )
    want = expected_cost("gpt-4o", fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens)
    assert Decimal(row["cost"]) == want


@asynccontextmanager
async def chat_answer(running: Running, body: dict[str, Any]) -> AsyncIterator[ClientResponse]:
    """A chat completions call through ``running``'s proxy with its key, answered 200."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{running.proxy_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {running.api_key}"},
        ) as response,
    ):
        assert response.status == 200
        yield response


def asking_usage(model: str) -> dict[str, Any]:
    """A streamed chat body whose client asks for usage itself: passed on unchanged."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def last_stream(provider: FakeProvider) -> bytes:
    """The bytes of the last chat stream the fake provider wrote."""
    sent = provider.sent_chunks[-1]
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in sent) + b"data: [DONE]\n\n"


async def test_streamed_bytes_are_forwarded_as_sent_when_client_asks_for_usage(
    llmtap_up: Running, upstream: FakeUpstream
) -> None:
    body = asking_usage("gpt-4.1-mini")
    upstream.provider.chunk_delay_s = 0.05
    try:
        async with chat_answer(llmtap_up, body) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["x-request-id"]
            arrivals = []
            raw = b""
            async for piece in response.content.iter_any():
                arrivals.append(asyncio.get_running_loop().time())
                raw += piece
    finally:
        upstream.provider.chunk_delay_s = 0.0
    expected = last_stream(upstream.provider)
    assert raw == expected
    # Not buffered: the pieces arrived spread over the fake's 50 ms pauses.
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 0.1
    await model_row(
        llmtap_up.api_url,
        "gpt-4.1-mini" + SNAPSHOT,
        lambda r: r["input_tokens"] == upstream.provider.prompt_tokens and r["cost"] is not None,
    )


async def test_a_streamed_read_is_forwarded_before_its_event_ends(
    llmtap_up: Running, upstream: FakeUpstream
) -> None:
    """A client that asked for usage gets every read as the provider wrote it, half an
    event included: the proxy does not wait for an event's end to pass it on."""
    body = asking_usage("gpt-4.1-nano")
    upstream.provider.second_half = asyncio.Event()
    try:
        async with chat_answer(llmtap_up, body) as response:
            # The provider holds the rest until this half has reached the client.
            first = await asyncio.wait_for(response.content.readany(), timeout=10)
            upstream.provider.second_half.set()
            rest = await response.content.read()
    finally:
        upstream.provider.second_half.set()
        upstream.provider.second_half = None
    expected = last_stream(upstream.provider)
    assert first and b"\n\n" not in first
    assert first + rest == expected
    row = await model_row(
        llmtap_up.api_url,
        "gpt-4.1-nano" + SNAPSHOT,
        lambda r: r["requests"] >= 1,
    )
    # Its usage was still read from the events, after they went out.
    assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (
        1,
        upstream.provider.prompt_tokens,
        upstream.provider.completion_tokens,
    )


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "could not parse the JSON body"),
        (b'{"messages": []}', "model", "model"),
        (b'{"model": 42}', "model", "model"),
        (b"[1, 2]", None, "expected a JSON object, but got an array"),
    ],
)
async def test_bad_input_gets_openai_shaped_400_without_contacting_the_provider(
    llmtap_up: Running, upstream: FakeUpstream, body: bytes, param: str | None, fragment: str
) -> None:
    before = len(upstream.provider.received)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{llmtap_up.proxy_url}/chat/completions",
            data=body,
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {llmtap_up.api_key}",
            },
        ) as response,
    ):
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]
    assert len(upstream.provider.received) == before


async def test_unknown_route_is_an_openai_shaped_404(
    llmtap_up: Running, upstream: FakeUpstream
) -> None:
    """Also a route of the provider's that reaches what its account stores (files):
    every tenant's calls share that account. The provider is never asked."""
    asked = len(upstream.provider.received)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{llmtap_up.proxy_url}/no/such/route") as response:
            assert response.status == 404
            assert "Unknown route" in (await response.json())["error"]["message"]
        async with session.post(
            f"{llmtap_up.proxy_url}/files",
            data=b"x",
            headers={"Authorization": f"Bearer {llmtap_up.api_key}"},
        ) as response:
            assert response.status == 404
            message = (await response.json())["error"]["message"]
            assert "POST /v1/files" in message and "provider account stores" in message
    assert len(upstream.provider.received) == asked


async def test_upstream_unreachable_is_a_502_and_still_recorded(
    llmtap_up: Running, openai_sdk: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await upstream.stop()
    try:
        from openai import InternalServerError

        with pytest.raises(InternalServerError) as raised:
            await openai_sdk.chat.completions.create(
                model="gpt-4.1-nano-unreachable", messages=[{"role": "user", "content": "hi"}]
            )
        assert raised.value.status_code == 502
        assert "could not reach the provider" in raised.value.message
    finally:
        await upstream.start()
    row = await model_row(
        llmtap_up.api_url, "gpt-4.1-nano-unreachable", lambda r: r["requests"] >= 1
    )
    assert row["errors"] == 1
    assert Decimal(row["cost"]) == 0  # nothing reached a model


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_up_drains_in_flight_events_then_stops_every_child(
    tmp_path: Path, upstream: FakeUpstream, stop: signal.Signals
) -> None:
    """Calls made just before SIGTERM still reach ClickHouse: `up` stops the ingress
    first and lets the stream and the writer catch up before stopping them, because
    the embedded broker's topics die with it. Then no child is left running. A hangup
    (its terminal or ssh session closed) stops it the same way: before, SIGHUP ended it
    at once, every child got SIGTERM together, and the calls were lost with the broker.
    """
    async with run_llmtap(tmp_path, upstream) as running:
        async with running.openai() as sdk:
            await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model="gpt-4o-mini-last-call", messages=[{"role": "user", "content": "bye"}]
                    )
                    for _ in range(LAST_CALLS)
                )
            )
        pids = running.child_pids()
        assert set(pids) == {"broker", "store", "worker", "ingress"}
        running.process.send_signal(stop)
        assert await asyncio.wait_for(running.process.wait(), 90) == 0
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    # The ingress says it is stopping (it said nothing; a call it refused then looked
    # like a network fault).
    assert any('"stopping: no new connections' in line for line in running.output)
    secrets = (running.api_key, PROVIDER_KEY)  # no key ever reaches a log line
    assert not [line for line in running.output if any(k in line for k in secrets)]

    assert stored_calls(tmp_path, "gpt-4o-mini-last-call" + SNAPSHOT) == LAST_CALLS


async def test_up_starts_a_dead_stage_again_and_the_proxy_goes_on(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The stream worker killed under `llmtap up`: the proxy keeps answering, the
    supervisor starts a new worker, and a call made while none ran is costed by it.
    The broker killed: its topics are gone with it, so everything is started again in
    order, and calls are metered again."""
    fake = upstream.provider
    one_call = expected_cost(
        "gpt-4o-mini", fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens
    )

    async def call(running: Running) -> None:
        async with running.openai() as sdk:
            await sdk.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )

    async with run_llmtap(tmp_path, upstream) as running:
        first = running.child_pids()
        os.kill(first["worker"], signal.SIGKILL)
        await call(running)
        row = await model_row(  # its own store: the only gpt-4o-mini calls there
            running.api_url, "gpt-4o-mini" + SNAPSHOT, lambda r: r["requests"] >= 1
        )
        assert (row["requests"], Decimal(row["cost"])) == (1, one_call)
        second = running.child_pids()
        assert second["worker"] != first["worker"]
        assert {k: v for k, v in second.items() if k != "worker"} == {
            k: v for k, v in first.items() if k != "worker"
        }
        assert any("worker exited with code -9; starting it again" in x for x in running.output)

        os.kill(second["broker"], signal.SIGKILL)

        async def started_over() -> bool:
            return any("llmtap is up again" in line for line in running.output)

        await until(started_over, "every process started again", 120)
        third = running.child_pids()
        assert all(third[name] != second[name] for name in second)
        # The worker, whose output could only go to the dead broker, was not waited for.
        assert any("killing worker: its broker is gone" in line for line in running.output)
        assert not any("did not stop" in line for line in running.output)
        await call(running)
        row = await model_row(
            running.api_url, "gpt-4o-mini" + SNAPSHOT, lambda r: r["requests"] >= 2
        )
        assert (row["requests"], Decimal(row["cost"])) == (2, 2 * one_call)
        assert running.process.returncode is None
        running.process.terminate()
        assert await asyncio.wait_for(running.process.wait(), 90) == 0
    pids = [*first.values(), *second.values(), *third.values()]
    assert [pid for pid in pids if pid_alive(pid)] == []


async def test_web_searches_are_priced_per_search_through_to_the_store(
    llmtap_up: Running, anthropic_sdk: AsyncAnthropic, upstream: FakeUpstream
) -> None:
    """A streamed Messages call whose provider ran two web searches (counted in the last
    message_delta's server_tool_use): the store holds their $10-a-thousand fee in the
    call's cost, and the costs endpoint shows it apart from the tokens."""
    fake = upstream.provider
    fake.web_searches = 2
    try:
        async with anthropic_sdk.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=100,
            messages=[{"role": "user", "content": "what is new?"}],
            tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        ) as stream:
            final = await stream.get_final_message()
    finally:
        fake.web_searches = 0
    assert final.usage.server_tool_use is not None
    assert final.usage.server_tool_use.web_search_requests == 2  # reached the client as sent

    row = await cost_row(llmtap_up, "claude-haiku-4-5" + ANTHROPIC_SNAPSHOT, 1)
    assert row["cost_web_search"] == "0.020000000"
    # Haiku 4.5: $1 input, $0.10 cache reads, $1.25 cache writes, $5 output a million.
    tokens = (
        fake.prompt_tokens * Decimal("1.00")
        + fake.cached_tokens * Decimal("0.10")
        + fake.cache_write_tokens * Decimal("1.25")
        + fake.completion_tokens * Decimal("5.00")
    ) / Decimal(1_000_000)
    assert Decimal(row["cost"]) == tokens + Decimal("0.02")


PREVIEW_MODEL = "gpt-4o-2024-05-13"  # a snapshot priced apart: no other test's rows


async def test_searches_by_the_preview_tool_are_priced_at_its_fee_through_to_the_store(
    llmtap_up: Running, openai_sdk: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    """Three Responses calls on gpt-4o-2024-05-13, each with two searches: with the older
    web_search_preview tool ($25 a thousand on a non-reasoning model) streamed and not,
    and with web_search ($10). The store holds $0.12 of search fees on top of the
    tokens."""
    fake = upstream.provider
    fake.web_searches = 2
    try:
        stream = await openai_sdk.responses.create(
            model=PREVIEW_MODEL, input="news?", tools=[{"type": "web_search_preview"}], stream=True
        )
        async for _ in stream:
            pass
        for tool in ("web_search_preview", "web_search"):
            tools: Any = [{"type": tool}]
            await openai_sdk.responses.create(model=PREVIEW_MODEL, input="news?", tools=tools)
    finally:
        fake.web_searches = 0
    row = await cost_row(llmtap_up, PREVIEW_MODEL + SNAPSHOT, 3)
    assert row["requests"] == 3
    assert row["cost_web_search"] == "0.120000000"
    tokens = expected_cost(
        PREVIEW_MODEL, fake.prompt_tokens, fake.cached_tokens, fake.completion_tokens
    )
    assert Decimal(row["cost"]) == 3 * tokens + Decimal("0.12")
