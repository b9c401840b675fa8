"""The one forwarding path every metered route shares.

Admit the call (``admission.py``: key, body, route, guards), forward it (publishing
the request event while the provider works), stream the answer back byte for byte
while capturing usage, publish the response event, whatever happened. A route differs
only by its :class:`~ingress.forward.endpoint.Endpoint`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ingress.forward import resend
from ingress.forward.admission import Admission
from ingress.forward.call import Call, downstream_headers
from ingress.forward.capture import Capture, FirstEvent, StreamCapture, parse_json_body
from ingress.forward.endpoint import Endpoint, cut_off, redirected, unreachable
from ingress.forward.outcome import cut_by, record_outcome
from ingress.forward.usage import by_preview
from ingress.keys import BUDGETS, COUNTING, LIMITER
from ingress.routing import endpoint_geo, priced_tier
from ingress.spool import Delivered
from llmtap import logs
from llmtap.events import GLOBAL_GEO, Status, Usage

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metered(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await forward(request, endpoint)

    return handle


async def forward(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    api = endpoint.api
    call = Call(provider=api.kind, endpoint=endpoint.name)
    request_id = str(call.request_id)
    logs.request_id.set(request_id)
    admitted = await Admission(request, endpoint, call).admit()
    if isinstance(admitted, web.StreamResponse):
        return admitted
    # Not the admitted call itself: a stream cut short is finished later (its output
    # counted in a thread), and its body need not wait with it.
    route, model, ticket, announced, by_preview_tool = (
        admitted.route,
        admitted.model,
        admitted.ticket,
        admitted.announced,
        admitted.searches_by_preview,
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
        # A redirect is not followed: it would take the prompt, and llmtap's provider key
        # in any header aiohttp does not strip across origins (Anthropic's x-api-key),
        # wherever it points. It goes to the client as the provider sent it, recorded as
        # the provider's error, as a client calling the provider directly would see it.
        upstream = await resend.request(
            request.app, route.provider, "POST", admitted.url, admitted.body, admitted.headers
        )
        async with upstream:
            http_status = upstream.status
            if upstream.status >= 300:
                status, error_class = "upstream_error", f"http_{upstream.status}"
            answer_headers = downstream_headers(upstream.headers, request_id)
            if upstream.content_type == "text/event-stream":
                response = _Stream(
                    status=upstream.status, reason=upstream.reason, headers=answer_headers
                )
                capture = api.stream_capture(admitted.strip_usage_chunk)
                await response.prepare(request)
                await _relay(
                    upstream.content,
                    response,
                    capture,
                    FirstEvent(endpoint.preamble, endpoint.output),
                    call,
                )
                if capture.error:  # it failed after the 200 went out, or is an error
                    # answered as a stream: the provider's type, as an error's JSON gives it
                    status, error_class = "upstream_error", capture.error
                return response
            else:
                data = await whole_body(upstream)
                call.mark_upstream_done()
                # The whole answer is here: one write sends the head and the body, with
                # a Content-Length; its usage is read once the client has it.
                response = redirected(
                    api, route.provider, upstream.status, answer_headers
                ) or web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=answer_headers,
                    body=data,
                )
                try:
                    await response.prepare(request)
                    await response.write_eof()
                finally:  # an answer the client missed was still generated
                    if upstream.status < 300:
                        captured = api.json_capture(data)
                        usage, model_served = captured.usage, captured.model
                        _warn_impossible(route.provider, captured)
                    else:
                        error_class = _provider_error_type(data) or error_class
                        usage = Usage()
                return response
    except ConnectionResetError:
        # The client went away mid-answer, or the proxy, stopping, closed the connection
        # once its grace ran out. What was streamed so far is still metered.
        status, error_class = _broken_off(request, status, error_class, capture)
        return response if response is not None else web.Response(status=499)
    except asyncio.CancelledError:
        status, error_class = _broken_off(request, status, error_class, capture)
        if capture is None and http_status >= 300:  # an error body cut: not billed
            usage = Usage()
        raise
    except (aiohttp.ClientError, TimeoutError) as exc:
        error_class = type(exc).__name__
        if response is not None and response.prepared:
            # The provider broke off mid-answer; the client already has the headers and
            # part of the body. Ending the body cleanly would pass the cut-off answer off
            # as complete: drop the connection instead, so the client sees it broken
            # (no final chunk), as it would have without the proxy.
            status = "upstream_error"
            if capture is not None and capture.error:  # its stream's error event came first
                error_class = capture.error
            if request.transport is not None:
                request.transport.abort()
            return response
        if answer_headers is not None and http_status >= 300:
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
        if answer_headers is not None:
            # The provider answered (its head came), then its body broke off: its error,
            # not a provider out of reach. It may bill the call: usage unknown.
            status = "upstream_error"
            log.warning(
                "provider %s answered %d, its body cut off: %s",
                route.provider,
                http_status,
                error_class,
            )
            error = cut_off(api, route.provider, http_status, exc, request_id)
            http_status = error.status  # what the client got, as for one unreachable
            return error
        status = "upstream_unreachable"
        # Never connected: nothing was sent, nothing spent. Else (no answer in time, the
        # connection dropped) the provider may be working on it, and bill it: unknown.
        unsent = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
        usage = Usage() if unsent else Usage.missing()
        log.warning("provider %s unreachable: %s", route.provider, error_class)
        error = unreachable(api, route.provider, exc, request_id)
        http_status = error.status
        return error
    finally:
        regional = endpoint_geo(route.config) if route.config.kind == "openai" else GLOBAL_GEO

        def finish(usage: Usage) -> None:
            if by_preview_tool:
                usage = by_preview(usage)
            tier = priced_tier(route.provider, route.config, usage.service_tier)
            if tier != usage.service_tier:
                # Another provider's tier (of the same name): priced at the standard rates.
                usage = usage.model_copy(update={"service_tier": tier})
            if regional != GLOBAL_GEO:
                # An OpenAI data-residency endpoint ran it: its region's price.
                usage = usage.model_copy(update={"inference_geo": regional})

            def settle(ended: datetime) -> Delivered | None:
                held = request.app[BUDGETS].settle(
                    call.request_id,
                    model_served or model,
                    usage,
                    ended,
                    provider=route.provider,
                    started=call.ts_start,
                )
                # A cost held against a hard cap learns where its event went: a budget
                # state that has counted past there has counted it.
                return held.delivered if held is not None else None

            if ticket is not None:  # first: its response event says it is settled
                try:
                    request.app[LIMITER].settle(ticket, usage, time.monotonic())
                except Exception:  # a bug here must not lose the call's event
                    log.exception("settling the rate limits of call %s failed", call.request_id)
            announced()  # if the call ended before its turn came
            record_outcome(
                request.app, call, status, http_status, usage, model_served, error_class, settle
            )

        if capture is None:
            finish(usage)
        else:  # a stream, finished or not: usage as far as it was seen
            capture.catch_up()
            model_served = capture.model
            _warn_impossible(route.provider, capture)
            if capture.usage is None and (
                http_status >= 300 or (capture.error and not capture.streamed_text())
            ):
                # An error answered as a stream, or a stream that failed before any
                # token (Anthropic's overloaded_error as its first event), with no
                # usage: not billed, as an error's JSON is not (held as unknown, a hard
                # cap kept its worst case all period).
                finish(Usage())
            elif capture.output_uncounted:  # broken off before the provider counted it
                call.mark_end()  # the count, after, is no part of the call the client saw
                seen = capture
                request.app[COUNTING].then(
                    seen.streamed_text, lambda tokens: finish(seen.counted_usage(tokens))
                )
            else:
                finish(capture.final_usage)


class _Stream(web.StreamResponse):
    """A streamed answer whose head leaves with the first bytes of its body, when they
    are already here (aiohttp sends a ``StreamResponse``'s head alone, at ``prepare()``;
    its ``Response`` buffers it so). :func:`_relay` never holds the head back waiting."""

    _send_headers_immediately = False


async def _relay(
    content: aiohttp.StreamReader,
    response: web.StreamResponse,
    capture: StreamCapture,
    first: FirstEvent,
    call: Call,
) -> None:
    """Forward a stream's reads as they come, in as few writes as that allows (each a
    syscall and a packet: ~2.6 ``sendto`` a streamed call instead of ~4.6, the request
    to the provider included, bench/NOTES.md): what has come with the provider's head
    leaves with llmtap's, and a read that ends the stream leaves with its end. Nothing
    that has come is held back: with nothing yet, or no whole event of it to pass on,
    the head goes alone, at once.

    A verbatim capture gets each read as it comes and reads its events once the whole
    answer is out (a read the client missed was generated all the same, so it is held
    before it is written); otherwise the capture passes on what the client gets of each
    read (a usage chunk llmtap asked for is cut)."""

    verbatim = capture.verbatim

    def taken(data: bytes) -> bytes:
        if call.t_first_byte is None and first.generated(data):
            call.mark_first_byte()  # its first event's, not its head's
        if verbatim:
            capture.hold(data)
            return data
        return capture.feed(data)

    data = content.read_nowait()  # what came with the provider's head
    if not data:
        await response.write(b"")  # nothing yet: the head goes now, as the provider's came
        data = await _read_on(content, capture)
    out = b""
    while data:
        out = taken(data)
        if content.at_eof():
            break  # the stream's end goes in the same write
        # b"" too: the head goes now even when this read made no whole event yet
        await response.write(out)
        out = b""
        data = await _read_on(content, capture)
    call.mark_upstream_done()
    try:
        if verbatim:
            try:
                await response.write_eof(out)
            finally:  # the whole stream came: its last event too, ended or not
                capture.finish()
        else:
            out += capture.finish()
            await response.write_eof(out)
    except ConnectionResetError:
        if out or not capture.ended:
            raise
        # Every event was written, the last too, and the client left before the body's
        # end (the openai SDK closes its connection at data: [DONE]): it had the whole
        # answer, and left none of it.
        log.debug("the client left at the stream's last event, before its end")


async def _read_on(content: aiohttp.StreamReader, capture: StreamCapture) -> bytes:
    """The stream's next read; b"" at its end. A provider that breaks the connection off
    (reset, closed without the body's end, silent) once its last event came (the
    capture's :attr:`~StreamCapture.ended`) sent the whole answer: that is its end, the
    client's stream ended as a clean one is. Before it, the break is raised."""
    try:
        return await content.readany()
    except (aiohttp.ClientError, TimeoutError) as exc:
        capture.catch_up()
        if not capture.ended:
            raise
        log.debug("the provider broke its stream off after its last event: %r", exc)
        return b""


async def whole_body(upstream: aiohttp.ClientResponse) -> bytes:
    """A whole answer's body. One the provider breaks off (reset, closed before the
    body's end, silent) once a whole JSON object came was all sent: the client can read
    it, as a stream broken off after its last event. Before it, the break is raised."""
    reads: list[bytes] = []  # joined once, as StreamReader.read does: one copy
    try:
        while read := await upstream.content.readany():
            reads.append(read)
    except BaseException as exc:
        upstream.close()  # as ClientResponse.read does: the connection is not reused
        if not isinstance(exc, (aiohttp.ClientError, TimeoutError)):
            raise
        body = b"".join(reads)
        if parse_json_body(body) is None:
            raise
        log.debug("the provider broke its answer off after its whole JSON: %r", exc)
        return body
    return b"".join(reads)


def _broken_off(
    request: web.Request, status: Status, error_class: str, capture: StreamCapture | None
) -> tuple[Status, str]:
    """A call's status and error class once its client left (or the proxy, stopping,
    cut it): a provider error it had already answered stays the call's, the answer's
    status or an error event of its stream (the leaving did not cause it)."""
    if status != "ok":
        return status, error_class
    if capture is not None:
        capture.catch_up()  # the reads held, the one the client missed included
        if capture.error:
            return "upstream_error", capture.error
    cut = cut_by(request)
    return cut, cut


def _warn_impossible(provider: str, capture: Capture | StreamCapture) -> None:
    """Once per call: its usage held a count no call can have, recorded as missing."""
    if capture.impossible:
        log.warning(
            "provider %s answered a usage count no call can have (%s): usage recorded as missing",
            provider,
            capture.impossible,
        )


def _provider_error_type(body: bytes) -> str:
    error = (parse_json_body(body) or {}).get("error")
    if isinstance(error, dict):
        kind = error.get("type") or error.get("code")
        if isinstance(kind, str):
            return kind
    return ""
