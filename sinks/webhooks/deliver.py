"""One alert to one endpoint: signed POSTs, retried with backoff, every attempt recorded.

2xx: delivered. A timeout, a connection error, 408, 425, 429 or 5xx: retried after
``backoff_s * 2**(n-1)`` (capped at BACKOFF_CAP_S, jittered to between half and all of
it), or after the receiver's ``retry-after`` when it sends a longer one (capped at
RETRY_AFTER_CAP_S), and never sooner than MIN_RETRY_S; the attempt that reaches
``max_attempts`` is dead-lettered. 410 Gone is ``gone``: the receiver asks for nothing
more (Standard Webhooks), and the worker disables the endpoint (gone.py). Any other
answer (3xx included: redirects are never followed, 4xx) is dead-lettered at once: the
same request would get the same answer. An answer is decided by its status, once its
head came: a failed one's body is read for the record only, for at most
ERROR_BODY_WAIT_S (a 4xx whose body stalls is still the receiver's refusal, not a
timeout). A target the SSRF guard refuses is recorded as
``refused`` and never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp
import yarl

from llmtap.config_sections import BACKOFF_CAP_S, MIN_RETRY_S, WebhookEndpoint, backoff_wait_s
from llmtap.events import utcnow
from sinks.webhooks import guard, sign
from sinks.webhooks.records import Attempt, Outcome
from sinks.webhooks.render import Body

RETRY_AFTER_CAP_S = 3600.0
ERROR_BODY_BYTES = 300  # how much of a failed answer's body is kept in the record
ERROR_BODY_WAIT_S = 1.0  # how long that body is waited for once the status came
USER_AGENT = "llmtap-webhooks/1"
_RETRYABLE_STATUS = frozenset({408, 425, 429})
GONE = 410  # the receiver asks to be sent nothing more

Record = Callable[[Attempt], Awaitable[None]]


@dataclass(frozen=True)
class Response:
    """What one attempt got: a status, or an error before any status."""

    status: int | None
    error: str = ""
    retry_after: float | None = None
    retryable: bool = True

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@contextlib.asynccontextmanager
async def client_session(*, allow_private: bool) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose every resolved address passes the SSRF guard; no env proxies."""
    resolver = guard.GuardedResolver(allow_private=allow_private)
    try:
        connector = aiohttp.TCPConnector(resolver=resolver)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            yield session
    finally:
        await resolver.close()  # the connector closes only a resolver it made


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``retry-after`` in seconds (delta-seconds or an HTTP date, in any of the three
    forms RFC 9110 has receivers read; always GMT); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²": str.isdigit takes it
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # the asctime form, or "-0000": an HTTP date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_delay(
    attempt: int,
    backoff_s: float,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float:
    """How long to wait after failed attempt number ``attempt`` (1-based): the backoff,
    or the receiver's ``retry_after`` if longer (a load balancer's 503 with
    ``retry-after: 1`` must not use up every attempt in seconds)."""
    backoff = backoff_wait_s(attempt, backoff_s)
    delay = backoff / 2 + rand() * backoff / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return max(delay, MIN_RETRY_S)


def _status_error(status: int, reason: str | None, location: str | None, body: bytes | None) -> str:
    error = f"HTTP {status} {reason or ''}".rstrip()
    if location is not None:
        error += f" (redirect to {location} not followed)"
    if body is None:
        return f"{error}: (body not received)"
    text = body.decode(errors="replace").strip()
    return f"{error}: {text}" if text else error


async def _error_body(resp: aiohttp.ClientResponse) -> bytes | None:
    """The start of a failed answer's body, for the record; None if it did not come in
    ERROR_BODY_WAIT_S (or the attempt's timeout, if sooner) or broke off: the status
    decides the attempt either way."""
    try:
        async with asyncio.timeout(ERROR_BODY_WAIT_S):
            return await resp.content.read(ERROR_BODY_BYTES)
    except (TimeoutError, aiohttp.ClientError):
        return None


async def send(
    session: aiohttp.ClientSession,
    endpoint: WebhookEndpoint,
    msg_id: str,
    body: Body,
    *,
    allow_private: bool,
) -> Response:
    """One signed POST. Raises guard.Refused if the target is refused (nothing sent)."""
    guard.check_url(endpoint.url, allow_private=allow_private)
    headers = {
        "content-type": body.content_type,
        "user-agent": USER_AGENT,
        **sign.headers(endpoint.secrets(), msg_id, body.data),
    }
    try:
        async with session.post(
            endpoint.url,
            data=body.data,
            headers=headers,
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=endpoint.timeout_s),
        ) as resp:
            if 200 <= resp.status < 300:
                return Response(resp.status)
            text = await _error_body(resp)
            retryable = resp.status in _RETRYABLE_STATUS or resp.status >= 500
            error = _status_error(resp.status, resp.reason, resp.headers.get("location"), text)
            retry_after = parse_retry_after(resp.headers.get("retry-after"))
            return Response(resp.status, error, retry_after, retryable)
    except TimeoutError:
        return Response(None, f"timeout after {endpoint.timeout_s:g}s")
    except aiohttp.InvalidURL:  # its text is the URL: a secret, never said
        return Response(None, "invalid URL", retryable=False)
    except aiohttp.ClientResponseError as exc:  # its text ends in the URL
        return Response(None, f"{type(exc).__name__}: {exc.status}, {exc.message}")
    except aiohttp.ClientError as exc:
        return Response(None, _unquoted(f"{type(exc).__name__}: {exc}", endpoint.url))
    except guard.Refused:
        raise  # an address the resolver gave (GuardedResolver)
    except Exception as exc:  # anything else the answer made fail: an attempt all the same
        return Response(None, _unquoted(f"{type(exc).__name__}: {exc}", endpoint.url))


def _unquoted(error: str, url: str) -> str:
    """``error`` without the endpoint's URL (a Slack incoming webhook's path is its
    secret), as settings are shown: kept in webhook_deliveries, printed by `llmtap
    alerts test`."""
    for quoted in {url, str(yarl.URL(url))}:
        error = error.replace(quoted, "[webhook url]")
    return error


async def _until(when: datetime) -> None:
    await asyncio.sleep(max(0.0, (when - utcnow()).total_seconds()))


def _outcome(response: Response, last: bool) -> Outcome:
    if response.ok:
        return "delivered"
    if response.status == GONE:
        return "gone"
    return "retrying" if response.retryable and not last else "dead_lettered"


async def deliver(
    session: aiohttp.ClientSession,
    endpoint: WebhookEndpoint,
    alert_id: uuid.UUID,
    body: Body,
    *,
    allow_private: bool,
    record: Record,
    attempts_made: int = 0,
    not_before: datetime | None = None,
) -> Outcome:
    """Deliver until a final outcome; ``record`` stores each attempt before the next,
    a failed one with when the next is due (its ``retry_at``). A delivery resumed
    (``attempts_made``) waits for the retry its last attempt was due at, ``not_before``.

    The alert id is the ``webhook-id`` of every attempt: the receiver's idempotency key.
    """
    name, msg_id = endpoint.name, str(alert_id)
    if not_before is not None and attempts_made < endpoint.max_attempts:
        # Recorded by another process, perhaps: its clock ahead of this one's (a VM
        # restored from a snapshot) holds the endpoint's queue no longer than the
        # longest wait llmtap records.
        longest = timedelta(seconds=max(RETRY_AFTER_CAP_S, BACKOFF_CAP_S))
        await _until(min(not_before, utcnow() + longest))
    for n in range(attempts_made + 1, endpoint.max_attempts + 1):
        try:
            response = await send(session, endpoint, msg_id, body, allow_private=allow_private)
        except guard.Refused as exc:
            await record(Attempt(alert_id, name, n, utcnow(), None, f"refused: {exc}", "refused"))
            return "refused"
        outcome = _outcome(response, last=n == endpoint.max_attempts)
        now = utcnow()
        if outcome != "retrying":
            await record(Attempt(alert_id, name, n, now, response.status, response.error, outcome))
            if outcome == "dead_lettered" and response.retry_after is not None:
                # Given up on an answer that asked for a wait (a 429 or 503): the
                # endpoint's next delivery waits for it too, not sent at once into it.
                await _until(now + timedelta(seconds=min(response.retry_after, RETRY_AFTER_CAP_S)))
            return outcome
        delay = retry_delay(n, endpoint.backoff_s, response.retry_after)
        retry_at = now + timedelta(seconds=delay)
        status, error = response.status, response.error
        await record(Attempt(alert_id, name, n, now, status, error, outcome, retry_at=retry_at))
        await _until(retry_at)
    # Resumed with no attempt left (max_attempts was lowered since the last one).
    error = f"no attempt left ({attempts_made} made, max_attempts {endpoint.max_attempts})"
    await record(Attempt(alert_id, name, attempts_made, utcnow(), None, error, "dead_lettered"))
    return "dead_lettered"
