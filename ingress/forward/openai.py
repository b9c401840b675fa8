"""OpenAI-compatible routes: forwarded unchanged, streamed chunk by chunk, metered."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ingress.errors import openai_error
from ingress.forward.call import (
    Call,
    attribution_from,
    downstream_headers,
    upstream_headers,
)
from ingress.forward.usage import OpenAIJsonCapture, OpenAIStreamCapture, parse_json_body
from ingress.keys import PUBLISHER, SETTINGS, UPSTREAM
from llmtap import topics
from llmtap.events import Status, Usage

log = logging.getLogger(__name__)

PROVIDER = "openai"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    publisher = request.app[PUBLISHER]
    call = Call(provider=PROVIDER, endpoint="chat.completions")

    def refuse(response: web.Response, error_class: str) -> web.Response:
        """Answer without contacting the provider, and still record the call."""
        response.headers["x-request-id"] = str(call.request_id)
        publisher.publish(
            topics.RESPONSES,
            topics.partition_key(call.request_id),
            call.response_event(
                status="bad_request",
                http_status=response.status,
                usage=Usage(),
                error_class=error_class,
            ),
        )
        return response

    call.attribution = attribution_from(request.headers)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        return refuse(openai_error(413, exc.text or "request body too large"), "body_too_large")
    payload = parse_json_body(body)
    if payload is None:
        return refuse(
            openai_error(400, "We could not parse the JSON body of your request."),
            "invalid_json",
        )
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        return refuse(
            openai_error(400, "you must provide a model parameter", param="model"),
            "missing_model",
        )
    call.model_requested = model
    call.stream = payload.get("stream") is True
    user_field = payload.get("user")
    if isinstance(user_field, str) and not call.attribution.user:
        call.attribution = call.attribution.model_copy(update={"user": user_field})
    publisher.publish(
        topics.REQUESTS,
        topics.partition_key(call.request_id),
        call.request_event(request_bytes=len(body), max_tokens=_max_tokens(payload)),
    )

    strip_usage_chunk = False
    if call.stream and not _asked_for_usage(payload):
        # Ask for the usage chunk the client did not ask for, and hide it from them.
        options = payload.get("stream_options")
        payload["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
        body = orjson.dumps(payload)
        strip_usage_chunk = True

    provider_key = os.environ.get(settings.openai_api_key_env, "")
    headers = upstream_headers(
        request.headers,
        authorization=f"Bearer {provider_key}" if provider_key else None,
    )
    url = settings.openai_base_url + request.path.removeprefix("/v1")
    if request.query_string:
        url += "?" + request.query_string

    status: Status = "ok"
    http_status = 0
    error_class = ""
    usage = Usage.missing()
    model_served = ""
    response: web.StreamResponse | None = None
    try:
        call.mark_sent()
        async with request.app[UPSTREAM].post(url, data=body, headers=headers) as upstream:
            call.mark_first_byte()
            http_status = upstream.status
            if upstream.status >= 400:
                status, error_class = "upstream_error", f"http_{upstream.status}"
            is_sse = upstream.content_type == "text/event-stream"
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=downstream_headers(upstream.headers, str(call.request_id)),
            )
            if call.stream and is_sse:
                capture = OpenAIStreamCapture(strip_usage_chunk=strip_usage_chunk)
                await response.prepare(request)
                async for data in upstream.content.iter_any():
                    out = capture.feed(data)
                    if out:
                        await response.write(out)
                call.mark_upstream_done()
                tail = capture.finish()
                if tail:
                    await response.write(tail)
                usage, model_served = capture.final_usage, capture.model
            else:
                data = await upstream.read()
                call.mark_upstream_done()
                if upstream.status < 400:
                    captured = OpenAIJsonCapture(data)
                    usage, model_served = captured.usage, captured.model
                else:
                    error_class = _provider_error_type(data) or error_class
                    usage = Usage()
                await response.prepare(request)
                await response.write(data)
            await response.write_eof()
            return response
    except (ConnectionResetError, asyncio.CancelledError):
        status, error_class = "client_disconnected", "client_disconnected"
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        error_class = type(exc).__name__
        if response is not None and response.prepared:
            # The provider broke off mid-answer; the client already has the headers.
            status = "upstream_error"
            return response
        status = "upstream_unreachable"
        usage = Usage()
        timed_out = isinstance(exc, TimeoutError)
        http_status = 504 if timed_out else 502
        log.warning("upstream %s unreachable: %s", settings.openai_base_url, error_class)
        error = openai_error(
            http_status,
            f"llmtap could not reach the provider ({error_class})",
            type_="api_error",
            code="upstream_timeout" if timed_out else "upstream_unreachable",
        )
        error.headers["x-request-id"] = str(call.request_id)
        return error
    finally:
        publisher.publish(
            topics.RESPONSES,
            topics.partition_key(call.request_id),
            call.response_event(
                status=status,
                http_status=http_status,
                usage=usage,
                model_served=model_served,
                error_class=error_class,
            ),
        )


def _asked_for_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _max_tokens(payload: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _provider_error_type(body: bytes) -> str:
    error = (parse_json_body(body) or {}).get("error")
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        if isinstance(kind, str):
            return kind
    return ""
