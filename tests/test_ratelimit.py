"""Rate limits per key: the bucket arithmetic, and 429s with retry-after at the ingress."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from ingress.guards.bounds import choices, max_tokens
from ingress.guards.keys import create_key
from ingress.guards.ratelimit import (
    Estimate,
    RateLimiter,
    Ticket,
    TokenBucket,
    Wait,
    estimate,
    spent,
)
from llmtap.config import Settings
from llmtap.events import Usage
from tests.conftest import (
    INGRESS_PROVIDER_KEY,
    Broker,
    FakeUpstream,
    ingress_before,
    serve_ingress,
)
from tests.fake_provider import FakeProvider
from tests.test_ingress_ops import response_event


def test_a_bucket_refills_at_its_capacity_per_minute() -> None:
    bucket = TokenBucket(60)  # one a second
    bucket.take(60, now=100.0)
    assert bucket.wait_for(1, now=100.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=101.0) == 0.0
    assert bucket.wait_for(30, now=110.0) == pytest.approx(20.0)  # 10 there, 20 to go
    assert bucket.wait_for(1, now=10_000.0) == 0.0
    assert bucket.level == 60  # never above capacity


NOTHING = Estimate(0, 0)


def waited(result: Ticket | Wait) -> tuple[Any, str]:
    """A refusal's seconds to wait and the limit that holds the call."""
    assert isinstance(result, Wait), result
    return result.seconds, result.limit


def refused(
    limiter: RateLimiter, rpm: int | None, tpm: int | None, estimate: Estimate, now: float
) -> tuple[Any, str]:
    return waited(limiter.admit("k", rpm, tpm, estimate, now))


def admitted(limiter: RateLimiter, rpm: int | None, tpm: int | None, tokens: int) -> Ticket:
    ticket = limiter.admit("k", rpm, tpm, Estimate(tokens, 0), now=0.0)
    assert isinstance(ticket, Ticket)
    return ticket


def test_requests_per_minute() -> None:
    limiter = RateLimiter()
    assert all(isinstance(limiter.admit("k", 3, None, NOTHING, now=0.0), Ticket) for _ in range(3))
    assert refused(limiter, 3, None, NOTHING, now=0.0) == (pytest.approx(20.0), "requests")
    assert isinstance(limiter.admit("other", 3, None, NOTHING, now=0.0), Ticket)  # per key


def test_tokens_are_settled_when_a_call_ends() -> None:
    limiter = RateLimiter()
    ticket = admitted(limiter, None, 600, 100)
    limiter.settle(ticket, Usage(input_tokens=800, output_tokens=100), now=0.0)
    # 900 in all, more than the whole minute: in debt by 300.
    assert refused(limiter, None, 600, NOTHING, now=0.0) == (pytest.approx(30.0), "tokens")
    assert isinstance(limiter.admit("k", None, 600, NOTHING, now=30.0), Ticket)


def test_calls_in_flight_at_once_are_admitted_only_as_far_as_the_bucket_covers() -> None:
    limiter = RateLimiter()
    tickets = [limiter.admit("k", None, 1000, Estimate(50, 200), now=0.0) for _ in range(5)]
    assert [isinstance(t, Ticket) for t in tickets] == [True] * 4 + [False]
    # 250 at 1000/min (15 s) were they to spend all they reserved; held back by them
    # alone, it is told to retry in a second, as they settle.
    assert waited(tickets[4]) == (pytest.approx(1.0), "tokens")
    # One ends having spent less than reserved: the rest is given back.
    first = tickets[0]
    assert isinstance(first, Ticket)
    limiter.settle(first, Usage(input_tokens=40, output_tokens=10), now=0.0)
    assert isinstance(limiter.admit("k", None, 1000, Estimate(50, 150), now=0.0), Ticket)
    assert refused(limiter, None, 1000, Estimate(1, 0), now=0.0) == (pytest.approx(0.06), "tokens")


def test_a_call_larger_than_the_limit_goes_once_the_bucket_is_full() -> None:
    limiter = RateLimiter()
    big = limiter.admit("k", None, 1000, Estimate(5000, 0), now=0.0)
    assert isinstance(big, Ticket)  # not forever refused
    # Its whole estimate is held while it runs (the bucket 4000 below empty), not spent:
    # the next is told to retry in a second, not in five minutes.
    again = refused(limiter, None, 1000, Estimate(5000, 0), now=0.0)
    assert again == (pytest.approx(1.0), "tokens")
    limiter.settle(big, Usage(input_tokens=1000), now=0.0)
    assert isinstance(limiter.admit("k", None, 1000, Estimate(5000, 0), now=60.0), Ticket)


def test_a_ceiling_past_any_model_s_does_not_break_the_key() -> None:
    """max_tokens 1e308 (n 2): its estimate took the bucket past what a float holds, the
    call's settlement raised (its event lost) and every later call of the key was a 500."""
    limiter = RateLimiter()
    body = {"max_tokens": 1e308, "n": 2}
    huge = estimate(100, max_tokens(body), choices(body))
    call = limiter.admit("k", None, 100_000, huge, now=0.0)
    assert isinstance(call, Ticket)
    limiter.settle(call, Usage(input_tokens=10, output_tokens=5), now=0.0)
    assert isinstance(limiter.admit("k", None, 100_000, Estimate(100, 0), now=1.0), Ticket)


def test_a_settlement_or_a_release_counts_once() -> None:
    limiter = RateLimiter()
    first, _ = admitted(limiter, 3, 100, 40), admitted(limiter, 3, 100, 40)
    limiter.release(first, now=0.0)
    limiter.release(first, now=0.0)
    limiter.settle(first, Usage(input_tokens=100), now=0.0)
    # 60 tokens and 2 requests left, as if the first had never come.
    held = limiter.admit("k", 3, 100, Estimate(61, 0), now=0.0)
    assert waited(held) == (pytest.approx(0.6), "tokens")
    went = [isinstance(limiter.admit("k", 3, 100, NOTHING, now=0.0), Ticket) for _ in range(3)]
    assert went == [True, True, False]


def test_a_call_refused_after_admission_gives_back_its_request_and_tokens() -> None:
    limiter = RateLimiter()
    limiter.release(admitted(limiter, 1, 100, 100), now=0.0)
    assert isinstance(limiter.admit("k", 1, 100, Estimate(100, 0), now=0.0), Ticket)


def test_the_estimate_is_the_body_by_its_bytes_and_the_output_it_may_ask() -> None:
    assert estimate(4003, 100, answers=2) == Estimate(1000, 200)
    assert estimate(400, None) == Estimate(100, 0)


def test_a_call_whose_prompt_went_uncounted_keeps_its_estimate() -> None:
    reckoned = Estimate(1000, 200)
    assert spent(reckoned, Usage(input_tokens=12, output_tokens=5)) == 17  # counted: refunded
    assert spent(reckoned, Usage.missing()) == 1200
    # A stream cut short: its output counted by llmtap, its prompt not at all.
    cut = Usage(output_tokens=50, output_tokens_counted=True, usage_missing=True)
    assert spent(reckoned, cut) == 1200
    assert spent(Estimate(1000, 0), cut) == 1050
    # The input known (Anthropic's comes first), the count stands.
    counted = Usage(input_tokens=900, output_tokens=50, output_tokens_counted=True)
    assert spent(reckoned, counted) == 950


def test_changed_limits_keep_what_the_bucket_held() -> None:
    limiter = RateLimiter()
    assert all(isinstance(limiter.admit("k", 5, None, NOTHING, now=0.0), Ticket) for _ in range(5))
    # Lowered: no fresh bucket, still empty, refilled at the new rate.
    assert refused(limiter, 3, None, NOTHING, now=0.0) == (pytest.approx(20.0), "requests")
    # Raised: refilled faster, from what it held.
    assert refused(limiter, 60, None, NOTHING, now=0.0) == (pytest.approx(1.0), "requests")
    assert isinstance(limiter.admit("k", 60, None, NOTHING, now=1.0), Ticket)


def test_a_changed_token_limit_keeps_the_debt() -> None:
    limiter = RateLimiter()
    limiter.settle(admitted(limiter, 10, 600, 0), Usage(input_tokens=1200), now=0.0)
    # 600 in debt: the lower limit refills it at 5 a second, the request bucket untouched.
    assert refused(limiter, 10, 300, NOTHING, now=0.0) == (pytest.approx(120.0), "tokens")
    assert refused(limiter, 10, 6000, NOTHING, now=0.0) == (pytest.approx(6.0), "tokens")


def test_a_token_limit_removed_and_put_back_keeps_the_debt() -> None:
    """A limit taken off a key (its entry edited to unlimited) and put back: the bucket
    was dropped, and the one made again was full, its debt forgiven."""
    limiter = RateLimiter()
    limiter.settle(admitted(limiter, 10, 600, 0), Usage(input_tokens=1200), now=0.0)
    assert isinstance(limiter.admit("k", 10, None, NOTHING, now=0.0), Ticket)  # unlimited
    # 600 in debt, 10 s refilled at 10 a second: 500 left, 50 s to go.
    assert refused(limiter, 10, 600, NOTHING, now=10.0) == (pytest.approx(50.0), "tokens")
    emptied = [limiter.admit("r", 2, None, NOTHING, now=0.0) for _ in range(2)]
    assert all(isinstance(t, Ticket) for t in emptied)
    assert isinstance(limiter.admit("r", None, None, NOTHING, now=0.0), Ticket)
    assert waited(limiter.admit("r", 2, None, NOTHING, now=0.0)) == (
        pytest.approx(30.0),
        "requests",
    )


def test_a_changed_limit_keeps_what_the_old_one_refilled_before_the_change() -> None:
    limiter = RateLimiter()
    emptied = [limiter.admit("k", 60, None, NOTHING, now=0.0) for _ in range(60)]
    assert all(isinstance(t, Ticket) for t in emptied)
    # 30 s at one a second refilled 30 under the old limit; the new one holds 6 at most
    admitted_now = [limiter.admit("k", 6, None, NOTHING, now=30.0) for _ in range(7)]
    assert [isinstance(a, Ticket) for a in admitted_now] == [True] * 6 + [False]


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: dict[str, Any]


async def call(ingress: str, key: str, model: str = "gpt-4o") -> Answer:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{ingress}/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        ) as response,
    ):
        return Answer(response.status, CIMultiDict(response.headers), await response.json())


async def statuses_of_new_key(ingress: str, secret: str, calls: int) -> list[int]:
    """Statuses of ``calls`` calls, counted from the first the ingress did not 401."""
    async with asyncio.timeout(10):  # the key file is re-read within a second
        while (first := await call(ingress, secret)).status == 401:
            await asyncio.sleep(0.05)
    rest = [await call(ingress, secret) for _ in range(calls - 1)]
    return [first.status, *(r.status for r in rest)]


async def test_a_key_over_its_request_rate_gets_429_with_retry_after(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", rpm=2)
    assert await statuses_of_new_key(ingress, secret, 3) == [200, 200, 429]
    response = await call(ingress, secret)
    assert response.status == 429
    assert int(response.headers["retry-after"]) == 30  # 2/min: one every 30 s
    assert "x-should-retry" not in response.headers  # the SDKs wait and retry
    assert "rate limit of key" in response.body["error"]["message"]
    assert response.body["error"]["code"] == "rate_limit_exceeded"
    assert response.body["error"]["type"] == "requests"  # OpenAI's type: the limit hit


async def test_a_key_over_its_token_rate_is_held_back_after_the_call_that_spent_it(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=1000)
    upstream.provider.prompt_tokens = 1000  # far past the call's estimate
    try:
        # The first is admitted on its estimate; its real count puts the key in debt.
        assert await statuses_of_new_key(ingress, secret, 2) == [200, 429]
        held = await call(ingress, secret)
        assert (held.status, held.body["error"]["type"]) == (429, "tokens")
    finally:
        upstream.provider.prompt_tokens = FakeProvider.prompt_tokens


async def test_a_key_held_back_for_minutes_is_told_not_to_retry(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """A call of 10,000 tokens on a 1,000 tokens/min key leaves it ~9 minutes in debt:
    the 429 said so in retry-after alone, and Anthropic's SDK sleeps whatever that
    says (twice). Past a minute it also says x-should-retry: false, as a budget's does."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=1000)
    upstream.provider.prompt_tokens = 10_000
    try:
        assert await statuses_of_new_key(ingress, secret, 2) == [200, 429]
        held = await call(ingress, secret)
        assert held.status == 429
        assert int(held.headers["retry-after"]) > 8 * 60
        assert held.headers["x-should-retry"] == "false"
    finally:
        upstream.provider.prompt_tokens = FakeProvider.prompt_tokens


async def key_known(ingress: str, secret: str) -> None:
    """Once the ingress has loaded the key: asked with a body that is not JSON, refused
    before its limits are looked at."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(10):
        while True:
            async with session.post(
                f"{ingress}/v1/chat/completions",
                data=b"{",
                headers={"Authorization": f"Bearer {secret}"},
            ) as response:
                if response.status != 401:
                    return
            await asyncio.sleep(0.05)


async def test_calls_at_once_are_admitted_only_as_far_as_the_tokens_per_minute_cover(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    messages = [{"role": "user", "content": "hi"}]
    body = orjson.dumps(
        {"model": "gpt-4o", "messages": messages, "max_tokens": 200, "stream": True}
    )
    each = estimate(len(body), 200).tokens
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=3 * each + each // 2)
    await key_known(ingress, secret)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    provider = upstream.provider
    provider.second_half = asyncio.Event()  # the admitted are held at the provider
    before = len(provider.received)
    try:
        async with aiohttp.ClientSession() as session:

            async def one() -> int:
                async with session.post(
                    f"{ingress}/v1/chat/completions", data=body, headers=headers
                ) as response:
                    await response.read()
                    return response.status

            calls = [asyncio.create_task(one()) for _ in range(10)]
            async with asyncio.timeout(10):  # each held at the provider, or answered
                while len(provider.received) - before + sum(c.done() for c in calls) < 10:
                    await asyncio.sleep(0.02)
            assert len(provider.received) - before == 3
            provider.second_half.set()
            statuses = await asyncio.gather(*calls)
    finally:
        provider.second_half.set()
        provider.second_half = None
    assert sorted(statuses) == [200] * 3 + [429] * 7


async def test_a_stream_the_client_hangs_up_on_keeps_its_prompt_counted(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream, broker: Broker
) -> None:
    """The provider's usage comes last and never arrives: the prompt, all billed, is
    counted as estimated."""
    prompt = "word " * 800
    body = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], "stream": True}
    )
    each = estimate(len(body), None).tokens
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=each * 3 // 2)
    await key_known(ingress, secret)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    upstream.provider.chunk_delay_s = 0.2
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{ingress}/v1/chat/completions", data=body, headers=headers) as cut,
        ):
            async for line in cut.content:
                if b'"Hello"' in line:
                    break
            cut.close()  # hang up
        event = await response_event(broker.bootstrap, cut.headers["x-request-id"])
        assert (event.status, event.usage.usage_missing) == ("client_disconnected", True)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{ingress}/v1/chat/completions", data=body, headers=headers) as after,
        ):
            assert after.status == 429
    finally:
        upstream.provider.chunk_delay_s = 0.0


async def test_a_call_refused_before_the_provider_does_not_spend_a_request(
    ingress: str,
    ingress_settings: Settings,
    upstream: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", rpm=1)
    await key_known(ingress, secret)
    routed_nowhere = await call(ingress, secret, model="anthropic/claude-3-5-haiku")
    assert routed_nowhere.status == 400
    assert routed_nowhere.body["error"]["message"].endswith("not the openai API of this route")
    monkeypatch.delenv("LLMTAP_TEST_OPENAI_KEY")  # refused after admission
    assert (await call(ingress, secret)).status == 500
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    assert [(await call(ingress, secret)).status for _ in range(2)] == [200, 429]


@pytest.mark.parametrize(
    "broken_step",
    # before the key's rate limits (routing, the call's bounds), and after them
    ["resolve", "max_tokens", "upstream_headers"],
)
async def test_a_call_that_fails_in_llmtap_before_the_provider_is_answered_and_recorded(
    ingress: str,
    ingress_settings: Settings,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    broken_step: str,
) -> None:
    """A bug in llmtap before the provider is contacted: the caller gets a 500 in its
    provider's shape, the call its response event, and the key its request back
    (nothing was sent). Before admission it escaped as aiohttp's bare 500, unrecorded."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", rpm=1)
    await key_known(ingress, secret)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"a bug in {broken_step}")

    with monkeypatch.context() as patched, caplog.at_level(logging.ERROR):
        patched.setattr(f"ingress.forward.admission.{broken_step}", broken)
        failed = await call(ingress, secret)
    assert failed.status == 500
    assert failed.body["error"]["type"] == "api_error"
    assert failed.body["error"]["code"] == "internal_error"
    event = await response_event(broker.bootstrap, failed.headers["x-request-id"])
    assert (event.status, event.http_status, event.error_class) == (
        "refused",
        500,
        "internal_error",
    )
    assert event.attribution.tenant == "acme"
    logged = [r for r in caplog.records if r.exc_info and r.name == "ingress.forward.admission"]
    assert len(logged) == 1 and f"a bug in {broken_step}" in caplog.text
    assert secret not in caplog.text and INGRESS_PROVIDER_KEY not in caplog.text
    assert '"hi"' not in caplog.text  # nor the prompt
    assert [(await call(ingress, secret)).status for _ in range(2)] == [200, 429]


async def test_a_call_the_provider_took_but_never_answered_keeps_its_estimate(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No answer within the read timeout: the provider has the request and may bill it,
    so its usage is unknown (not none), and the key keeps what it reserved."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    server = await serve_ingress(
        ingress_settings.model_copy(update={"upstream_read_timeout_s": 0.3})
    )
    ingress = str(server.make_url("")).rstrip("/")
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi " * 500}]})
    each = estimate(len(body), None).tokens
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=each * 3 // 2)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    upstream.provider.answer_held = asyncio.Event()  # held at the provider
    try:
        await key_known(ingress, secret)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{ingress}/v1/chat/completions", data=body, headers=headers
            ) as late:
                assert late.status == 504
            event = await response_event(broker.bootstrap, late.headers["x-request-id"])
            assert (event.status, event.usage.usage_missing) == ("upstream_unreachable", True)
            upstream.provider.answer_held.set()
            async with session.post(
                f"{ingress}/v1/chat/completions", data=body, headers=headers
            ) as after:
                assert after.status == 429
    finally:
        upstream.provider.answer_held.set()
        upstream.provider.answer_held = None
        await server.close()


async def test_an_error_answer_cut_off_spends_nothing(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider's 429 whose body breaks off: an error is not billed, so nothing is
    held for it (a call sent and never answered is: the test above); and the caller
    gets the provider's 429 and when to retry (it got a 502, as if the provider could
    not be reached)."""

    async def cut_off(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(
            status=429,
            headers={"Content-Length": "200", "Retry-After": "7", "x-should-retry": "false"},
        )
        await response.prepare(request)
        await response.write(b'{"error":')
        assert request.transport is not None
        request.transport.close()
        return response

    async with ingress_before(cut_off, ingress_settings, monkeypatch) as server:
        ingress = str(server.make_url("")).rstrip("/")
        secret, _ = create_key(ingress_settings.key_file, tenant="acme")
        await key_known(ingress, secret)
        answer = await call(ingress, secret)
        event = await response_event(broker.bootstrap, answer.headers["x-request-id"])
        assert (answer.status, answer.headers.get("retry-after")) == (429, "7")
        assert answer.headers.get("x-should-retry") == "false"  # the SDKs follow it
        assert len(answer.headers.getall("x-request-id")) == 1
        assert answer.body["error"]["code"] == "upstream_error_cut_off"
        assert (event.status, event.http_status, event.error_class) == (
            "upstream_error",
            429,
            "http_429",
        )
        assert event.usage == Usage()  # an error is not billed


async def test_a_call_held_back_only_by_a_call_in_flight_is_told_to_retry_soon(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """A call whose estimate passes the limit goes on a full bucket, and takes it into
    what looks like minutes of debt until it ends; the next call was told to retry in
    minutes, and not to retry at all (x-should-retry: false), though the first settled
    at a few tokens a moment later and the second was then admitted at once."""
    body = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000}
    )
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=1000)
    await key_known(ingress, secret)
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    provider = upstream.provider
    provider.answer_held = asyncio.Event()
    before = len(provider.received)
    try:
        async with aiohttp.ClientSession() as session:

            async def one() -> Answer:
                async with session.post(
                    f"{ingress}/v1/chat/completions", data=body, headers=headers
                ) as response:
                    return Answer(
                        response.status, CIMultiDict(response.headers), await response.json()
                    )

            first = asyncio.create_task(one())
            async with asyncio.timeout(10):
                while len(provider.received) == before:
                    await asyncio.sleep(0.02)
            held = await one()
            assert held.status == 429
            provider.answer_held.set()
            assert (await first).status == 200  # it spent 17 tokens
            await asyncio.sleep(1.5)  # the bucket is full again
            again = await one()
    finally:
        provider.answer_held.set()
        provider.answer_held = None
    assert again.status == 200  # admitted: the 429 said to wait minutes, not to retry
    assert "x-should-retry" not in held.headers, held.headers
    assert int(held.headers["retry-after"]) <= 1


async def test_a_call_larger_than_the_token_rate_is_told_it_waits_for_a_full_bucket(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    """A call whose estimate is past the key's tokens/min goes only once the bucket is
    full (the README); refused, its 429 said only "rate limit reached", as for any call,
    so a client retrying it among the key's other calls never learned why it waited."""
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=1000)
    upstream.provider.prompt_tokens = 600  # the first leaves the bucket part spent
    try:
        assert await statuses_of_new_key(ingress, secret, 1) == [200]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{ingress}/v1/chat/completions",
                json={
                    "model": "gpt-4o",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5000,
                },
                headers={"Authorization": f"Bearer {secret}"},
            ) as response,
        ):
            assert response.status == 429
            message = (await response.json())["error"]["message"]
    finally:
        upstream.provider.prompt_tokens = FakeProvider.prompt_tokens
    assert "rate limit of key" in message
    assert "this call's estimate" in message and "more than the key's tokens/min (1000)" in message
    assert "only once its token bucket is full" in message
