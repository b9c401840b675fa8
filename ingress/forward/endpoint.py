"""What a metered route is: the API family it speaks (:class:`Api`, and the provider
credential it sends: :func:`upstream_credential`) and where it goes (:class:`Endpoint`).
``openai.py`` and ``anthropic.py`` declare theirs."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from ingress.errors import ErrorShape
from ingress.forward.call import NO_CREDENTIAL
from ingress.forward.capture import Capture, StreamCapture
from ingress.guards.auth import Identity, Refusal
from ingress.guards.fields import Malformed
from llmtap.config_sections import ApiKind, ProviderConfig


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
    # What the body must hold for llmtap to read or meter it right (a malformed value
    # prepare would replace, a mode whose usage never comes): refused when it does not,
    # whether or not prepare runs.
    checked_fields: Callable[[dict[str, Any]], Malformed | None] | None = None
    # The body field whose list items the provider answers apart, each a prompt of its
    # own (ingress/guards/bounds.py: prompts).
    batched: str | None = None
    # The input tokens the provider adds to what the body holds (Anthropic's tool-use
    # system prompt and its tools' definitions: tool_tokens.py), for a hard cap's worst
    # case; None: none.
    added_tokens: Callable[[dict[str, Any]], int] | None = None
    # The types of the events a stream of it sends before the model generates anything
    # (the Responses API's response.created, at once): not its first token.
    preamble: frozenset[bytes] = frozenset()
    # Whether an event of a stream of it carries what the model generated (a chat
    # chunk: not Azure's first, its prompt filter's results; a Responses API delta: not
    # the output item it opens first); None: any event not in
    # preamble does. Its first token is the first that does.
    output: Callable[[dict[str, Any]], bool] | None = None


def upstream_credential(
    api: Api, name: str, provider: ProviderConfig, identity: Identity
) -> tuple[str, str] | None:
    """What the provider gets as its credential: llmtap's key for it, or None (forward
    the caller's own, in passthrough, whether or not llmtap holds a key for the
    provider: each team's calls go on its own account, and a caller without a key of
    its own gets the provider's 401, not llmtap's key). A virtual key must never reach
    a provider: with one, a provider that takes no key (no ``api_key_env``: a local
    server) gets none (:data:`NO_CREDENTIAL`), and one whose key is not set, a
    Refusal."""
    if identity.key is None:  # passthrough
        return None
    # Stripped: a key read from a file (a Kubernetes secret) often ends in a newline,
    # which no header may hold (every call was a bare 500).
    key = os.environ.get(provider.api_key_env, "").strip() if provider.api_key_env else ""
    if key:
        if provider.api_key_header:  # Azure's api-key: the key as it is
            return provider.api_key_header, key
        return api.credential_header, api.credential_prefix + key
    if not provider.api_key_env:
        return NO_CREDENTIAL
    raise Refusal(
        500,
        f"llmtap holds no API key for provider {name!r} "
        f"(set the {provider.api_key_env or 'api_key_env'} environment variable)",
        "no_provider_key",
        code="no_provider_key",
    )


def provider_url(base_url: str, path: str, query: str) -> str:
    """``path`` on the provider at ``base_url``, with the base URL's own query (an
    Azure-style gateway's ``api-version``), then the client's ``query`` as it sent it,
    still encoded (decoded, a %23 would end it, a %20 would be a space in the request
    line). Appended to the whole base URL, the path went inside its query."""
    if "?" in base_url:
        base_url, _, base_query = base_url.partition("?")
        query = f"{base_query}&{query}" if query and base_query else base_query or query
    url = base_url.rstrip("/") + path
    return f"{url}?{query}" if query else url


def unreachable(api: Api, provider: str, exc: BaseException, request_id: str) -> web.Response:
    """The answer to a call the provider could not take (``exc``: a connection error,
    or no answer in time): 502, or 504 on a timeout, in the API's shape."""
    timed_out = isinstance(exc, TimeoutError)
    error = api.error(
        504 if timed_out else 502,
        f"llmtap could not reach the provider {provider!r} ({type(exc).__name__})",
        code="upstream_timeout" if timed_out else "upstream_unreachable",
    )
    error.headers["x-request-id"] = request_id
    return error


def cut_off(
    api: Api, provider: str, status: int, exc: BaseException, request_id: str
) -> web.Response:
    """The answer to a call whose provider answered ``status`` (a success: its head
    came), then broke its body off (``exc``: the connection closed or reset, or no byte
    in time): 502, or 504 on a timeout, in the API's shape. Passed on as far as it came,
    the answer would be a body no client can read."""
    timed_out = isinstance(exc, TimeoutError)
    error = api.error(
        504 if timed_out else 502,
        f"the provider {provider!r} answered {status}, then its answer was cut off "
        f"({'no more of it in time' if timed_out else type(exc).__name__})",
        code="upstream_timeout" if timed_out else "upstream_cut_off",
    )
    error.headers["x-request-id"] = request_id
    return error


def redirected(
    api: Api, provider: str, status: int, headers: CIMultiDict[str]
) -> web.Response | None:
    """The answer to a provider's redirect (a 3xx with a ``Location``), or None for any
    other answer. llmtap does not follow it (it would take the call, and llmtap's
    provider key, wherever it points), and must not pass it on as sent either: the
    official SDKs follow redirects (httpx's follow_redirects), so the call went there
    all the same, around llmtap: its prompt sent on, its answer (a target taking no key:
    a completion) never metered. The client gets the status and the provider's other
    headers, without the ``Location``, and an error in the API's shape naming it."""
    location = headers.get("location")
    if location is None or not 300 <= status < 400:
        return None
    error = api.error(
        status,
        f"the provider {provider!r} answered {status}, a redirect to {location}: llmtap "
        "neither follows a provider's redirect nor passes it on to be followed (the call "
        "would go there unmetered); check the provider's base_url",
        openai_type="api_error",
        code="upstream_redirect",
    )
    error.headers.extend(
        (name, value)
        for name, value in headers.items()
        if name.lower() not in ("content-type", "location")
    )
    return error
