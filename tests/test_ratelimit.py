"""Rate limits per key: the bucket arithmetic, and 429s with retry-after at the ingress."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from ingress.guards.keys import create_key
from ingress.guards.ratelimit import RateLimiter, TokenBucket
from llmtap.config import Settings
from tests.conftest import FakeUpstream


def test_a_bucket_refills_at_its_capacity_per_minute() -> None:
    bucket = TokenBucket(60)  # one a second
    bucket.take(60, now=100.0)
    assert bucket.wait_for(1, now=100.0) == pytest.approx(1.0)
    assert bucket.wait_for(1, now=101.0) == 0.0
    assert bucket.wait_for(30, now=110.0) == pytest.approx(20.0)  # 10 there, 20 to go
    assert bucket.wait_for(1, now=10_000.0) == 0.0
    assert bucket.level == 60  # never above capacity


def test_requests_per_minute() -> None:
    limiter = RateLimiter()
    assert [limiter.admit("k", 3, None, now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("k", 3, None, now=0.0) == pytest.approx(20.0)  # 3/min: one per 20 s
    assert limiter.admit("other", 3, None, now=0.0) == 0.0  # per key


def test_tokens_are_settled_when_a_call_ends() -> None:
    limiter = RateLimiter()
    assert limiter.admit("k", None, 600, now=0.0) == 0.0
    limiter.settle("k", 900, now=0.0)  # more than the whole minute: in debt by 300
    assert limiter.admit("k", None, 600, now=0.0) == pytest.approx(30.0)  # 10 tokens/s
    assert limiter.admit("k", None, 600, now=30.0) == 0.0


def test_changed_limits_take_effect() -> None:
    limiter = RateLimiter()
    assert limiter.admit("k", 1, None, now=0.0) == 0.0
    assert limiter.admit("k", 1, None, now=0.0) > 0
    assert limiter.admit("k", 100, None, now=0.0) == 0.0


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: dict[str, Any]


async def call(ingress: str, key: str) -> Answer:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{ingress}/v1/chat/completions",
            json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
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
    assert "rate limit of key" in response.body["error"]["message"]
    assert response.body["error"]["code"] == "rate_limit_exceeded"


async def test_a_key_over_its_token_rate_is_held_back_after_the_call_that_spent_it(
    ingress: str, ingress_settings: Settings, upstream: FakeUpstream
) -> None:
    per_call = upstream.provider.prompt_tokens + upstream.provider.completion_tokens
    secret, _ = create_key(ingress_settings.key_file, tenant="acme", tpm=per_call + 1)
    # The first two calls are admitted (the bucket is not in debt before either); the
    # second's tokens put it in debt, so the third waits.
    assert await statuses_of_new_key(ingress, secret, 3) == [200, 200, 429]
