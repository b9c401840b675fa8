"""How long a failed delivery is retried (sinks/webhooks/deliver.py): the default
schedule outlasts a receiver's deploy, and a receiver's retry-after lengthens a wait,
never shortens it (an HTTP receiver here; no broker, no store)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from llmtap.config_sections import WebhookEndpoint
from sinks.webhooks import deliver
from sinks.webhooks.records import Attempt
from sinks.webhooks.render import Body
from tests.test_webhooks import SECRET

HOUR = 3600.0
SECOND = 1.0  # the shortest wait between two attempts


def schedule(hook: WebhookEndpoint, jitter: float) -> float:
    """The waits between a delivery's attempts, all of them failed: its span."""
    waits = (
        deliver.retry_delay(n, hook.backoff_s, rand=lambda: jitter)
        for n in range(1, hook.max_attempts)
    )
    return sum(waits)


def test_the_default_schedule_outlasts_a_deploy() -> None:
    """With 8 attempts a delivery was dead-lettered after 1 to 2 minutes: a receiver
    down for a 10-minute deploy lost the alerts raised meanwhile (a spike's firing
    lost, its resolve delivered). Standard Webhooks advises retrying over hours, and a
    15 to 30 s timeout; an alert still matters in an hour, less so in a day."""
    hook = WebhookEndpoint(name="a", url="https://example.com/", secret=SECRET)
    assert schedule(hook, jitter=0.0) >= HOUR  # every wait as short as jitter makes it
    assert schedule(hook, jitter=1.0) <= 3 * HOUR  # a receiver's later alerts wait behind
    assert 15 <= hook.timeout_s <= 30


def test_a_retry_after_lengthens_the_backoff_and_never_shortens_it() -> None:
    """It replaced the backoff: a load balancer's 503 with `retry-after: 1` used every
    attempt up in seconds, and `retry-after: 0` (or a date past) retried at once."""
    late = deliver.retry_delay(9, 1.0, rand=lambda: 1.0)
    assert late == 256.0
    assert deliver.retry_delay(9, 1.0, retry_after=1, rand=lambda: 1.0) == late
    assert deliver.retry_delay(3, 1.0, retry_after=0, rand=lambda: 1.0) == 4.0
    assert deliver.retry_delay(1, 1.0, retry_after=120) == 120  # longer: the receiver's
    long = deliver.retry_delay(1, 1.0, retry_after=10**9)
    assert long == deliver.RETRY_AFTER_CAP_S  # capped as before


def test_no_wait_is_under_a_second() -> None:
    """`backoff_s: 0` (allowed) or `retry-after: 0` made a tight loop of requests."""
    assert deliver.retry_delay(1, 0.0) == SECOND
    assert deliver.retry_delay(5, 0.0, retry_after=0) == SECOND
    assert deliver.retry_delay(1, 1.0, rand=lambda: 0.0) == SECOND  # half of 1 s: floored


async def deliveries(
    handle: Callable[[web.Request], Awaitable[web.Response]], count: int = 1, **hook: Any
) -> tuple[list[str], list[Attempt]]:
    """``count`` deliveries to a receiver answering with ``handle``, one after another as
    an endpoint's worker sends them: their outcomes, and the attempts recorded."""
    app = web.Application()
    app.router.add_post("/hook", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    recorded: list[Attempt] = []

    async def record(attempt: Attempt) -> None:
        recorded.append(attempt)

    endpoint = WebhookEndpoint(
        name="hook", url=str(server.make_url("/hook")), secret=SECRET, **hook
    )
    outcomes: list[str] = []
    try:
        async with deliver.client_session(allow_private=True) as session:
            for _ in range(count):
                outcomes.append(
                    await deliver.deliver(
                        session,
                        endpoint,
                        uuid.uuid4(),
                        Body(b"{}", "application/json"),
                        allow_private=True,
                        record=record,
                    )
                )
    finally:
        await server.close()
    return outcomes, recorded


async def test_a_delivery_answered_retry_after_0_is_not_retried_at_once() -> None:
    """deliver() on a real receiver: 503 with `retry-after: 0`, then 200."""
    answered: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        status = 200 if answered else 503
        answered.append(status)
        return web.Response(status=status, headers={"retry-after": "0"})

    outcomes, recorded = await deliveries(handle, backoff_s=0)
    assert outcomes == ["delivered"] and answered == [503, 200]
    first, second = recorded
    assert first.retry_at is not None
    assert (first.retry_at - first.ts).total_seconds() >= SECOND
    assert (second.ts - first.ts).total_seconds() >= SECOND


async def test_a_delivery_given_up_on_a_retry_after_holds_the_next_one_that_long() -> None:
    """Its last attempt answered 429 with `retry-after: 2`: dead-lettered, and the
    endpoint's next delivery is not sent into the wait the receiver asked for (with
    `max_attempts: 1` every failure is a last attempt)."""
    arrived: list[float] = []

    async def handle(request: web.Request) -> web.Response:
        arrived.append(time.monotonic())
        status = 429 if len(arrived) == 1 else 200
        return web.Response(status=status, headers={"retry-after": "2"})

    outcomes, _ = await deliveries(handle, count=2, max_attempts=1)
    assert outcomes == ["dead_lettered", "delivered"]
    assert arrived[1] - arrived[0] >= 2 * SECOND
