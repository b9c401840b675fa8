"""Everything a call passes before it is forwarded: its key, its body, its model and
route, the key's rate limits and the budgets' hard caps.

Each may refuse the call: answered in its provider's error shape without contacting
it, and recorded (a response event; the request event first once it passed the key's
rate limits). A bug anywhere here is answered and recorded the same way, as
``refused`` (500 ``internal_error``), and gives back what the call took.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import orjson
from aiohttp import web
from multidict import CIMultiDict

from ingress.forward.call import Call, upstream_headers
from ingress.forward.capture import parse_json, parse_json_body, too_many_values
from ingress.forward.endpoint import Endpoint, provider_url, upstream_credential
from ingress.forward.outcome import Announcement, cut_by, record_outcome
from ingress.guards.auth import Refusal, authenticated, check_model
from ingress.guards.bounds import choices, max_tokens, prompts, reach, searches_by_preview
from ingress.guards.fields import (
    model_too_long,
    model_wrong_type,
    not_an_object,
    recorded_model,
    stream_malformed,
    user_too_long,
)
from ingress.guards.ratelimit import Ticket, estimate
from ingress.guards.refusals import Unpriced
from ingress.keys import BUDGETS, KEYS, LIMITER, PUBLISHER, SETTINGS
from ingress.routing import NoRoute, Route, asks_stream_usage, endpoint_geo, resolve
from llmtap import logs, topics
from llmtap.events import Status, Usage, utcnow

log = logging.getLogger(__name__)
_unpriced_told = logs.Once()  # models refused under a hard cap for want of a price

# How long a hard-capped call waits, at an ingress's start, for the budgets' spend to be
# read before it is refused (503, retry-after); read in well under a second normally.
BUDGET_STATES_WAIT_S = 5.0
# Refusals of a body, the same on every route that reads one (unmetered.py too).
UNCOMPRESSED = "llmtap takes request bodies uncompressed: send them without Content-Encoding"
INVALID_JSON = "We could not parse the JSON body of your request."
# How long a client's SDK is expected to wait for a 429's retry-after (OpenAI's waits up
# to a minute, two in its 3.x releases, and past that retries after its own short backoff;
# Anthropic's waits whatever it says); a refusal that lifts later is not worth retrying.
SDK_RETRY_WAIT_S = 60
# A budget refusal for what calls in flight hold (not its spend): worth a retry soon.
HELD_RETRY_S = 1


@dataclass
class Admitted:
    """A call cleared to go, and what forwarding it needs."""

    route: Route
    model: str  # as the client named it
    body: bytes  # what goes to the provider
    url: str
    headers: CIMultiDict[str]
    strip_usage_chunk: bool  # llmtap asked the stream for a usage chunk the client did not
    searches_by_preview: bool  # its web searches are web_search_preview's (bounds.py)
    announced: Announcement  # the request event, made once the request has left
    ticket: Ticket | None  # the key's rate limits' hold on the call, if it has any


class Admission:
    """One call's way through the guards, and its refusal if it ends there."""

    def __init__(self, request: web.Request, endpoint: Endpoint, call: Call) -> None:
        self.request = request
        self.endpoint = endpoint
        self.call = call
        self.announce: Announcement | None = None  # the request event, once there is one
        self.ticket: Ticket | None = None  # the key's rate limits, once admitted by them
        self.answered = False  # by refuse()

    def refuse(
        self,
        status: int,
        message: str,
        error_class: str,
        param: str | None = None,
        code: str | None = None,
        openai_type: str | None = None,
    ) -> web.Response:
        """Answer without contacting the provider, and still record the call."""
        self.answered = True
        if self.announce is not None:  # before the response event, as for every call
            self.announce()
        app = self.request.app
        if self.ticket is not None:  # the provider was not contacted: nothing was spent
            app[LIMITER].release(self.ticket, time.monotonic())
        response = self.endpoint.api.error(
            status, message, param=param, code=code, openai_type=openai_type
        )
        response.headers["x-request-id"] = str(self.call.request_id)
        outcome: Status = "refused"
        if error_class == "budget_exceeded":
            outcome = "budget_exceeded"
        elif status in (400, 404, 408, 413, 415):
            outcome = "bad_request"
        elif error_class == "rate_limited":
            outcome = "rate_limited"
        record_outcome(app, self.call, outcome, status, Usage(), "", error_class)
        return response

    async def admit(self) -> Admitted | web.StreamResponse:
        """The call cleared to go, or the answer that ends it here."""
        try:
            return await self._checked()
        except Exception:
            if self.answered:  # the refusal itself failed: answering again would record it twice
                raise
            # A bug here (not a refusal) would escape as aiohttp's bare 500, with no
            # response event and the key's reservation kept: the call was not sent, so it
            # is answered and recorded as refused, and gives back what it took. The try
            # costs nothing until something in it raises.
            log.exception("the call failed before it was forwarded to %s", self.call.provider)
            return self.refuse(
                500,
                "llmtap failed before forwarding the call; it was not sent to the provider",
                "internal_error",
                code="internal_error",
            )

    async def _checked(self) -> Admitted | web.StreamResponse:
        request, endpoint, call, refuse = self.request, self.endpoint, self.call, self.refuse
        api = endpoint.api
        settings = request.app[SETTINGS]
        keys = request.app[KEYS]
        try:
            # An unknown key may be one made a moment ago: the file read again first.
            identity = await authenticated(request.headers, settings, keys)
        except Refusal as refusal:
            if refusal.attribution is not None:  # a valid key's false claim: its tenant's call
                call.attribution = refusal.attribution
                call.model_requested = await _model_named(request)
            return refuse(
                refusal.status, refusal.message, refusal.error_class, refusal.param, refusal.code
            )
        call.attribution = identity.attribution
        try:
            body = await read_body(request)
        except BodyRefused as bad:
            return refuse(bad.status, bad.message, bad.error_class, code=bad.code)
        except (ConnectionResetError, asyncio.CancelledError) as gone:
            # The client went away before its request was read whole (the handler is
            # cancelled where the server is set to): nothing was sent, nothing to
            # answer; recorded as a call it broke off.
            cut = cut_by(request)
            record_outcome(request.app, call, cut, 499, Usage(), "", cut)
            if isinstance(gone, asyncio.CancelledError):
                raise
            return web.Response(status=499)
        payload = parse_json_body(body)
        if payload is None:
            return refuse(400, why_not_an_object(body), "invalid_json")
        model = payload.get("model")
        if (wrong := model_wrong_type(model)) is not None:
            return refuse(400, wrong.message, wrong.error_class, wrong.param, wrong.code)
        if not isinstance(model, str) or not model:
            return refuse(400, "you must provide a model parameter", "missing_model", "model")
        call.model_requested = recorded_model(model)
        malformed = (
            model_too_long(model)
            or stream_malformed(payload)
            or (endpoint.checked_fields(payload) if endpoint.checked_fields else None)
            or user_too_long(payload)
        )
        if malformed is not None:
            return refuse(
                400, malformed.message, malformed.error_class, malformed.param, malformed.code
            )
        call.stream = payload.get("stream") is True
        try:
            check_model(identity, model, payload)
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
        except NoRoute as exc:  # NoModel: "openai/", an empty model
            return refuse(400, str(exc), exc.error_class, "model")
        call.provider = route.provider
        most_tokens = max_tokens(payload)
        answers, batched = choices(payload), prompts(payload, endpoint.batched)
        # Once routed (a call with no route spends nothing), before anything costly.
        if key is not None and (key.rpm or key.tpm):
            reckoned = estimate(len(body), most_tokens, answers * batched)
            admitted = request.app[LIMITER].admit(
                key.id, key.rpm, key.tpm, reckoned, time.monotonic()
            )
            if not isinstance(admitted, Ticket):
                retry_after = math.ceil(admitted.seconds)
                larger = ""
                if key.tpm and reckoned.tokens > key.tpm:  # why it waits that long
                    larger = (
                        f"; this call's estimate, {reckoned.tokens} tokens, is more than the "
                        f"key's tokens/min ({key.tpm}): it goes only once its token bucket is "
                        "full (a lower max_tokens lets it go sooner)"
                    )
                limited = refuse(
                    429,
                    f"rate limit of key {key.id} reached (requests/min: {key.rpm or 'unlimited'}, "
                    f"tokens/min: {key.tpm or 'unlimited'}); retry in {retry_after}s{larger}",
                    "rate_limited",
                    code="rate_limit_exceeded",
                    openai_type=admitted.limit,
                )
                limited.headers["retry-after"] = str(retry_after)
                if retry_after > SDK_RETRY_WAIT_S:  # a key deep in debt: as a budget's
                    limited.headers["x-should-retry"] = "false"
                return limited
            self.ticket = admitted
        self.announce = announced = Announcement(
            request.app[PUBLISHER], call, len(body), most_tokens
        )
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
            and asks_stream_usage(route.config)
            and endpoint.prepare(payload)
        )
        if rewritten or strip_usage_chunk:
            body = orjson.dumps(payload)

        try:
            credential = upstream_credential(api, route.provider, route.config, identity)
        except Refusal as refusal:
            unkeyed = refuse(
                refusal.status, refusal.message, refusal.error_class, code=refusal.code
            )
            unkeyed.headers["x-should-retry"] = "false"  # llmtap's config: no retry mends it
            return unkeyed
        headers = upstream_headers(request.headers, credential=credential)
        url = provider_url(
            route.config.base_url, endpoint.upstream_path, request.rel_url.raw_query_string
        )

        book = request.app[BUDGETS]
        if not book.read and book.caps(call.attribution):
            # Just started: the budgets' spend (and what the other ingress processes
            # hold) is still being read; or a budget new to the configuration has no
            # state holding its period's spend yet (the store publishes it as it starts).
            # Judged now, a budget would look unspent.
            try:
                async with asyncio.timeout(BUDGET_STATES_WAIT_S):
                    await book.readied(call.attribution)
            except asyncio.CancelledError:
                # Cut while it waited (its client gone, where the server cancels handlers
                # so; the proxy stopping in its first seconds): never sent. Recorded, and
                # the key's rate limits given back, as a call cut while its body was read.
                if self.ticket is not None:
                    request.app[LIMITER].release(self.ticket, time.monotonic())
                    self.ticket = None
                if self.announce is not None:  # before the response event, as refuse()
                    self.announce()
                cut = cut_by(request)
                record_outcome(request.app, call, cut, 499, Usage(), "", cut)
                raise
            except TimeoutError:
                unstated = book.unstated(call.attribution)
                message = (
                    "this llmtap ingress has not read its budgets' spend yet (the broker "
                    "is unreachable or slow), so a call against a hard-capped budget "
                    "cannot be judged; retry shortly"
                )
                if book.states_read.is_set() and book.others_read.is_set() and unstated:
                    b = unstated[0]
                    message = (
                        f"budget {b.name!r} ({b.scope} {b.value!r}) has no spend published "
                        "for its period yet: the store publishes it, read from ClickHouse, "
                        "as it starts (a budget new to the configuration has none before; "
                        "is the store running?), so a call against its hard cap cannot be "
                        "judged; retry shortly"
                    )
                unknown = refuse(503, message, "budget_unknown", code="budget_state_unavailable")
                unknown.headers["retry-after"] = "1"
                return unknown
        exhausted = book.admit(
            call.request_id,
            call.attribution,
            model,
            len(body),
            most_tokens,
            utcnow(),
            provider=route.provider,
            choices=answers,
            reach=lambda: reach(
                payload,
                endpoint.added_tokens,
                route.config.default_service_tier,
                endpoint_geo(route.config) if route.config.kind == "openai" else None,
            ),
            prompts=batched,
            unpriced=route.config.unpriced,
        )
        if isinstance(exhausted, Unpriced):  # a 400: no wait makes the model priced
            if _unpriced_told.first((model, route.provider)):
                log.warning(
                    "calls of model %r (provider %s) are refused under hard cap %r: it has "
                    "no price; add it to the pricing_file",
                    model,
                    route.provider,
                    exhausted.budget.name,
                )
            return refuse(
                400, exhausted.message(), "model_not_priced", "model", code="model_not_priced"
            )
        if exhausted is not None:
            if exhausted.never_fits:  # a 429 would have it retried at the reset, in vain
                return refuse(400, exhausted.message(), "budget_exceeded", code="budget_exceeded")
            if (alert := book.capped(exhausted, utcnow())) is not None:
                # No threshold may say it: a cap refuses before the spend reaches 100%.
                publisher = request.app[PUBLISHER]
                publisher.publish(
                    publisher.names.alerts,
                    topics.alert_key(alert),
                    alert.model_dump_json().encode(),
                )
            # Spent: OpenAI's own answer to an organization past its spend limit, a 429
            # typed insufficient_quota, which clients take as lasting. Held back by calls
            # in flight, it clears within seconds: a request rate's type, as retried.
            # (Anthropic's is a rate_limit_error, as every 429.)
            refused = refuse(
                429,
                exhausted.message(),
                "budget_exceeded",
                code="budget_exceeded",
                openai_type="requests" if exhausted.held_back else "insufficient_quota",
            )
            if exhausted.held_back:  # calls in flight hold it: they settle in seconds
                refused.headers["retry-after"] = str(HELD_RETRY_S)
                return refused
            resets_in = (exhausted.state.period_end - utcnow()).total_seconds()
            refused.headers["retry-after"] = str(max(1, math.ceil(resets_in)))
            if resets_in > SDK_RETRY_WAIT_S:
                # The SDKs retry a 429 (twice by default): Anthropic's waits whatever
                # retry-after says, days at a month's start; OpenAI's retries after its
                # own short backoff past its limit, in vain. Both obey this header.
                refused.headers["x-should-retry"] = "false"
            return refused
        return Admitted(
            route,
            model,
            body,
            url,
            headers,
            strip_usage_chunk,
            searches_by_preview(payload),
            announced,
            self.ticket,
        )


class BodyRefused(Exception):
    """A request body not taken (:func:`read_body`), and the answer that says why."""

    def __init__(
        self, status: int, message: str, error_class: str, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.error_class, self.code = status, message, error_class, code


async def read_body(request: web.Request) -> bytes:
    """A request's body, read as every route that reads one reads it, or
    :class:`BodyRefused`: uncompressed (the SDKs send bodies as they are; a compressed
    one would be inflated, a chunk at a time, before its size could be judged: a 1 MB
    gzip bomb took 330 MB), at most ``max_body_bytes``, whole within
    ``body_read_timeout_s``, and of at most ``max_body_values`` values (before it is
    parsed: :func:`too_many_values`). A client gone before it was read whole raises as
    aiohttp raises it (ConnectionResetError, or the handler cancelled)."""
    settings = request.app[SETTINGS]
    if compressed(request):
        raise BodyRefused(415, UNCOMPRESSED, "unsupported_encoding", code="unsupported_encoding")
    declared = request.content_length
    if declared is not None and declared > settings.max_body_bytes:
        # Said before it is sent: refused now, not once that many bytes came (a client
        # declaring more than it sends was held until the read's deadline).
        raise BodyRefused(
            413,
            f"the request body is {declared} bytes (Content-Length), more than "
            f"max_body_bytes ({settings.max_body_bytes}); it was not forwarded",
            "body_too_large",
        )
    try:
        if request.content.is_eof():
            # Here whole already (a small body comes with its head): nothing to wait
            # for, so no deadline to set (~4 us a call).
            body = await request.read()
        else:
            async with asyncio.timeout(settings.body_read_timeout_s):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        # Sent chunked (no Content-Length to judge it by): known too large as it came.
        raise BodyRefused(
            413,
            f"the request body is more than max_body_bytes ({settings.max_body_bytes}); it "
            "was not forwarded",
            "body_too_large",
        ) from None
    except TimeoutError:
        raise BodyRefused(
            408,
            f"the request body did not arrive whole within {settings.body_read_timeout_s:g}s "
            "(body_read_timeout_s); it was not forwarded",
            "body_timeout",
        ) from None
    if (dense := too_many_values(body, settings.max_body_values)) is not None:
        raise BodyRefused(413, dense, "body_too_large")
    return body


def why_not_an_object(body: bytes) -> str:
    """What the 400 says of a body that is no JSON object: that it does not parse, or
    the type it parses as (parsed once more: a refusal's cost only)."""
    try:
        value = parse_json(body)
    except orjson.JSONDecodeError:
        return INVALID_JSON
    return not_an_object(value)


def compressed(request: web.Request) -> bool:
    """Whether the request's body comes with a Content-Encoding."""
    return request.headers.get("Content-Encoding", "identity").lower() != "identity"


async def _model_named(request: web.Request) -> str:
    """The model a refused call's body names, for its record (cut to its bound, so the
    record fits the broker); "" if it names none, or its body cannot be read (too large,
    cut off, compressed: it would be inflated first): the refusal is recorded either way."""
    try:
        payload = parse_json_body(await read_body(request))
    except Exception:  # refused (read_body), or cut off
        return ""
    model = payload.get("model") if payload is not None else None
    return recorded_model(model) if isinstance(model, str) else ""
