"""The one forwarding path every metered route shares.

Read and check the body, resolve the provider, forward (publishing the request event
while the provider works), stream the answer back byte for byte while capturing usage,
publish the response event, whatever happened. A route differs only by its :class:`Endpoint`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from ingress.errors import ErrorShape
from ingress.forward.call import Call, downstream_headers, upstream_headers
from ingress.forward.usage import Capture, StreamCapture, parse_json_body
from ingress.guards.auth import Identity, Refusal, authenticate, check_model
from ingress.guards.bounds import choices, max_tokens, prompts, reach
from ingress.guards.ratelimit import Ticket, estimate
from ingress.keys import (
    BUDGETS,
    COUNTING,
    GRACE_OVER,
    KEYS,
    LIMITER,
    METRICS,
    PUBLISHER,
    SETTINGS,
    UPSTREAM,
)
from ingress.publisher import EventPublisher
from ingress.routing import NoRoute, resolve
from ingress.spool import Delivered
from llmtap import logs, topics, wire
from llmtap.config import ApiKind, ProviderConfig
from llmtap.events import Status, Usage, utcnow

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Settle = Callable[[datetime], Delivered | None]  # a call's end time -> who hears of its event


@dataclass(frozen=True)
class Api:
    """How one API family is spoken: its errors, its usage, its credential header."""

    kind: ApiKind
    error: ErrorShape
    json_capture: Callable[[bytes], Capture]
    stream_capture: Callable[[bool], StreamCapture]  # argument: strip the usage chunk
    credential_header: str  # where the provider key goes
    credential_prefix: str  # "Bearer " or ""


@dataclass(frozen=True)
class Endpoint:
    name: str  # recorded as the event's endpoint, e.g. "chat.completions"
    api: Api
    upstream_path: str  # appended to the provider's base_url
    # Adjust the payload before forwarding; return True when the proxy added a usage
    # chunk to the stream that the client must not see.
    prepare: Callable[[dict[str, Any]], bool] | None = None
    # The body field whose list items the provider answers apart, each a prompt of its
    # own (ingress/guards/bounds.py: prompts).
    batched: str | None = None


def record_outcome(
    app: web.Application,
    call: Call,
    status: Status,
    http_status: int,
    usage: Usage,
    model_served: str = "",
    error_class: str = "",
    settle: Settle | None = None,
) -> None:
    """Publish a call's response event and count it, however the call ended. ``settle``
    is called with the event's end time first, and may return who to tell where the
    event went (a cost held against a hard cap until a budget state counts it)."""
    event = call.response_event(
        status=status,
        http_status=http_status,
        usage=usage,
        model_served=model_served,
        error_class=error_class,
    )
    delivered = None
    if settle is not None:
        try:
            delivered = settle(event.ts_end)
        except Exception:  # a bug in budget code must not cost the call its event
            log.exception("settling the call's budgets failed")
    key = topics.partition_key(call.request_id)
    publisher = app[PUBLISHER]
    publisher.publish(publisher.names.responses, key, wire.encode(event), delivered)
    app[METRICS].observe(event)


@dataclass
class Announcement:
    """A call's request event, published once: when its request has left for the
    provider, or before its response event if the call ends first."""

    publisher: EventPublisher
    call: Call
    request_bytes: int
    max_tokens: int | None
    done: bool = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        event = self.call.request_event(
            request_bytes=self.request_bytes, max_tokens=self.max_tokens
        )
        self.publisher.publish(
            self.publisher.names.requests,
            topics.partition_key(self.call.request_id),
            wire.encode(event),
        )


def upstream_credential(
    api: Api, name: str, provider: ProviderConfig, identity: Identity
) -> tuple[str, str] | None:
    """What the provider gets as its credential: llmtap's key for it, or None (forward
    the caller's own, in passthrough). A virtual key must never reach a provider: with
    one and no provider key, a Refusal."""
    key = os.environ.get(provider.api_key_env, "") if provider.api_key_env else ""
    if key:
        return api.credential_header, api.credential_prefix + key
    if identity.key is not None:
        raise Refusal(
            500,
            f"llmtap holds no API key for provider {name!r} "
            f"(set the {provider.api_key_env or 'api_key_env'} environment variable)",
            "no_provider_key",
        )
    return None


def metered(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward(request, endpoint)

    return handle


async def forward(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    publisher = request.app[PUBLISHER]
    api = endpoint.api
    call = Call(provider=api.kind, endpoint=endpoint.name)
    request_id = str(call.request_id)
    logs.request_id.set(request_id)

    def record(
        status: Status,
        http_status: int,
        usage: Usage,
        model: str,
        error: str,
        settle: Settle | None = None,
    ) -> None:
        record_outcome(request.app, call, status, http_status, usage, model, error, settle)

    announce: Announcement | None = None  # the request event, once there is one
    ticket: Ticket | None = None  # the key's rate limits, once admitted by them

    answered = False  # by refuse()

    def refuse(
        status: int,
        message: str,
        error_class: str,
        param: str | None = None,
        code: str | None = None,
    ) -> web.Response:
        """Answer without contacting the provider, and still record the call."""
        nonlocal answered
        answered = True
        if announce is not None:  # before the response event, as for every call
            announce()
        if ticket is not None:  # the provider was not contacted: nothing was spent
            request.app[LIMITER].release(ticket, time.monotonic())
        response = api.error(status, message, param=param, code=code)
        response.headers["x-request-id"] = request_id
        outcome: Status = "refused"
        if status in (400, 404, 413, 415):
            outcome = "bad_request"
        elif error_class == "rate_limited":
            outcome = "rate_limited"
        elif error_class == "budget_exceeded":
            outcome = "budget_exceeded"
        record(outcome, status, Usage(), "", error_class)
        return response

    try:
        try:
            identity = authenticate(request.headers, settings, request.app[KEYS])
        except Refusal as refusal:
            if refusal.attribution is not None:  # a valid key's false claim: its tenant's call
                call.attribution = refusal.attribution
                call.model_requested = await _model_named(request)
            return refuse(refusal.status, refusal.message, refusal.error_class, code=refusal.code)
        call.attribution = identity.attribution
        if compressed(request):
            # The SDKs send bodies as they are; a compressed one would be inflated here, a
            # chunk at a time, before its size could be judged (a 1 MB gzip bomb: 330 MB).
            return refuse(
                415,
                "llmtap takes request bodies uncompressed: send them without Content-Encoding",
                "unsupported_encoding",
                code="unsupported_encoding",
            )
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            return refuse(413, exc.text or "request body too large", "body_too_large")
        except (ConnectionResetError, asyncio.CancelledError) as gone:
            # The client went away before its request was read whole (the handler is
            # cancelled where the server is set to): nothing was sent, nothing to
            # answer; recorded as a call it broke off.
            cut = _cut_by(request)
            record(cut, 499, Usage(), "", cut)
            if isinstance(gone, asyncio.CancelledError):
                raise
            return web.Response(status=499)
        payload = parse_json_body(body)
        if payload is None:
            return refuse(400, "We could not parse the JSON body of your request.", "invalid_json")
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            return refuse(400, "you must provide a model parameter", "missing_model", "model")
        call.model_requested = model
        call.stream = payload.get("stream") is True
        try:
            check_model(identity, model)
        except Refusal as refusal:
            return refuse(
                refusal.status, refusal.message, refusal.error_class, "model", refusal.code
            )
        key = identity.key
        user_field = payload.get("user")
        if isinstance(user_field, str) and not call.attribution.user:
            call.attribution = call.attribution.model_copy(update={"user": user_field})
        try:
            route = resolve(model, api.kind, settings)
        except NoRoute as exc:
            return refuse(400, str(exc), "no_route", "model")
        call.provider = route.provider
        most_tokens = max_tokens(payload)
        answers, batched = choices(payload), prompts(payload, endpoint.batched)
        # Once routed (a call with no route spends nothing), before anything costly.
        if key is not None and (key.rpm or key.tpm):
            admitted = request.app[LIMITER].admit(
                key.id,
                key.rpm,
                key.tpm,
                estimate(len(body), most_tokens, answers * batched),
                time.monotonic(),
            )
            if not isinstance(admitted, Ticket):
                retry_after = math.ceil(admitted)
                limited = refuse(
                    429,
                    f"rate limit of key {key.id} reached (requests/min: {key.rpm or 'unlimited'}, "
                    f"tokens/min: {key.tpm or 'unlimited'}); retry in {retry_after}s",
                    "rate_limited",
                    code="rate_limit_exceeded",
                )
                limited.headers["retry-after"] = str(retry_after)
                return limited
            ticket = admitted
        announce = announced = Announcement(publisher, call, len(body), most_tokens)
        # Made once the request is on its way, while the provider works: nothing below
        # waits before the post, whose body aiohttp sends from a task of its own before
        # Python 3.12, hence two hops. A refusal before then publishes it first, itself.
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.call_soon, announced)

        rewritten = route.upstream_model != model
        if rewritten:
            payload["model"] = route.upstream_model
        strip_usage_chunk = bool(
            call.stream
            and endpoint.prepare
            and route.config.stream_usage
            and endpoint.prepare(payload)
        )
        if rewritten or strip_usage_chunk:
            body = orjson.dumps(payload)

        try:
            credential = upstream_credential(api, route.provider, route.config, identity)
        except Refusal as refusal:
            return refuse(refusal.status, refusal.message, refusal.error_class)
        headers = upstream_headers(request.headers, credential=credential)
        url = route.config.base_url + endpoint.upstream_path
        if request.query_string:
            url += "?" + request.query_string

        budgets = request.app[BUDGETS]
        exhausted = budgets.admit(
            call.request_id,
            call.attribution,
            model,
            len(body),
            most_tokens,
            utcnow(),
            provider=route.provider,
            choices=answers,
            reach=lambda: reach(payload),
            prompts=batched,
        )
        if exhausted is not None:
            refused = refuse(429, exhausted.message(), "budget_exceeded", code="budget_exceeded")
            resets_in = (exhausted.state.period_end - utcnow()).total_seconds()
            refused.headers["retry-after"] = str(max(1, math.ceil(resets_in)))
            return refused
    except Exception:
        if answered:  # the refusal itself failed: answering again would record it twice
            raise
        # A bug here (not a refusal) would escape as aiohttp's bare 500, with no
        # response event and the key's reservation kept: the call was not sent, so it
        # is answered and recorded as refused, and gives back what it took. The try
        # costs nothing until something in it raises.
        log.exception("the call failed before it was forwarded to %s", call.provider)
        return refuse(
            500,
            "llmtap failed before forwarding the call; it was not sent to the provider",
            "internal_error",
            code="internal_error",
        )

    status: Status = "ok"
    http_status = 0
    error_class = ""
    usage = Usage.missing()
    model_served = ""
    response: web.StreamResponse | None = None
    answer_headers: CIMultiDict[str] | None = None
    capture: StreamCapture | None = None
    try:
        call.mark_sent()
        async with request.app[UPSTREAM].post(url, data=body, headers=headers) as upstream:
            call.mark_first_byte()
            http_status = upstream.status
            if upstream.status >= 400:
                status, error_class = "upstream_error", f"http_{upstream.status}"
            answer_headers = downstream_headers(upstream.headers, request_id)
            if upstream.content_type == "text/event-stream":
                response = web.StreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=answer_headers
                )
                capture = api.stream_capture(strip_usage_chunk)
                await response.prepare(request)
                if capture.verbatim:
                    # The client gets each read as it comes; the events are read once
                    # the whole answer is out (a read the client missed was generated
                    # all the same, so it is held before it is written).
                    async for data in upstream.content.iter_any():
                        capture.hold(data)
                        await response.write(data)
                    call.mark_upstream_done()
                    try:
                        await response.write_eof()
                    finally:  # the whole stream came: its last event too, ended or not
                        capture.finish()
                else:
                    async for data in upstream.content.iter_any():
                        out = capture.feed(data)
                        if out:
                            await response.write(out)
                    call.mark_upstream_done()
                    tail = capture.finish()
                    if tail:
                        await response.write(tail)
                    await response.write_eof()
                if capture.error and status == "ok":  # it failed after the 200 went out
                    status, error_class = "upstream_error", capture.error
                return response
            else:
                data = await upstream.read()
                call.mark_upstream_done()
                # The whole answer is here: one write sends the head and the body, with
                # a Content-Length; its usage is read once the client has it.
                response = web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=answer_headers,
                    body=data,
                )
                try:
                    await response.prepare(request)
                    await response.write_eof()
                finally:  # an answer the client missed was still generated
                    if upstream.status < 400:
                        captured = api.json_capture(data)
                        usage, model_served = captured.usage, captured.model
                    else:
                        error_class = _provider_error_type(data) or error_class
                        usage = Usage()
                return response
    except ConnectionResetError:
        # The client went away mid-answer, or the proxy, stopping, closed the connection
        # once its grace ran out. What was streamed so far is still metered.
        status = error_class = _cut_by(request)
        return response if response is not None else web.Response(status=499)
    except asyncio.CancelledError:
        status = error_class = _cut_by(request)
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        error_class = type(exc).__name__
        if response is not None and response.prepared:
            # The provider broke off mid-answer; the client already has the headers and
            # part of the body. Ending the body cleanly would pass the cut-off answer off
            # as complete: drop the connection instead, so the client sees it broken
            # (no final chunk), as it would have without the proxy.
            status = "upstream_error"
            if request.transport is not None:
                request.transport.abort()
            return response
        if answer_headers is not None and http_status >= 400:
            # The provider answered an error, whose body broke off: an error is not
            # billed, and the caller gets its status (a 429 stays one, with when to retry).
            status, error_class, usage = "upstream_error", f"http_{http_status}", Usage()
            log.warning("provider %s answered %d, its body cut off", route.provider, http_status)
            error = api.error(
                http_status,
                f"the provider {route.provider!r} answered {http_status}; its error body "
                f"was cut off ({type(exc).__name__})",
                code="upstream_error_cut_off",
            )
            # With the provider's headers (when to retry, whether to, its rate limits;
            # x-request-id is llmtap's among them), but the type of the body it sent:
            # downstream_headers already left out its length and encoding.
            error.headers.extend(
                (name, value)
                for name, value in answer_headers.items()
                if name.lower() != "content-type"
            )
            return error
        status = "upstream_unreachable"
        # Never connected: nothing was sent, nothing spent. Else (no answer in time, the
        # connection dropped) the provider may be working on it, and bill it: unknown.
        unsent = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
        usage = Usage() if unsent else Usage.missing()
        timed_out = isinstance(exc, TimeoutError)
        http_status = 504 if timed_out else 502
        log.warning("provider %s unreachable: %s", route.provider, error_class)
        error = api.error(
            http_status,
            f"llmtap could not reach the provider {route.provider!r} ({error_class})",
            code="upstream_timeout" if timed_out else "upstream_unreachable",
        )
        error.headers["x-request-id"] = request_id
        return error
    finally:

        def finish(usage: Usage) -> None:
            def settle(ended: datetime) -> Delivered | None:
                held = budgets.settle(
                    call.request_id, model_served or model, usage, ended, provider=route.provider
                )
                # A cost held against a hard cap learns where its event went: a budget
                # state that has counted past there has counted it.
                return held.delivered if held is not None else None

            if ticket is not None:  # first: its response event says it is settled
                request.app[LIMITER].settle(ticket, usage, time.monotonic())
            announced()  # if the call ended before its turn came
            record(status, http_status, usage, model_served, error_class, settle)

        if capture is None:
            finish(usage)
        else:  # a stream, finished or not: usage as far as it was seen
            capture.catch_up()
            model_served = capture.model
            if capture.output_uncounted:  # broken off before the provider counted it
                seen = capture
                request.app[COUNTING].then(
                    seen.streamed_text, lambda tokens: finish(seen.counted_usage(tokens))
                )
            else:
                finish(capture.final_usage)


def compressed(request: web.Request) -> bool:
    """Whether the request's body comes with a Content-Encoding."""
    return request.headers.get("Content-Encoding", "identity").lower() != "identity"


async def _model_named(request: web.Request) -> str:
    """The model a refused call's body names, for its record; "" if it names none, or
    its body cannot be read (too large, cut off, compressed: it would be inflated first):
    the refusal is recorded either way."""
    if compressed(request):
        return ""
    try:
        payload = parse_json_body(await request.read())
    except Exception:
        return ""
    model = payload.get("model") if payload is not None else None
    return model if isinstance(model, str) else ""


def _cut_by(request: web.Request) -> Status:
    """Who ended a call mid-answer: the proxy, stopping, or the client."""
    return "proxy_stopped" if request.app[GRACE_OVER].is_set() else "client_disconnected"


def _provider_error_type(body: bytes) -> str:
    error = (parse_json_body(body) or {}).get("error")
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        if isinstance(kind, str):
            return kind
    return ""
