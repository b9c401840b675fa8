"""A web page calling the proxy (CORS): preflights answered by llmtap for the origins
`cors_origins` names, never forwarded nor recorded; its answers readable by the page;
the provider's own CORS headers never passed on."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import ValidationError

from ingress.guards.keys import create_key
from llmtap.config import Settings
from tests.conftest import ingress_at

PAGE = "https://app.example.com"
PROVIDER_CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "x-a"}
CHUNK = b'data: {"id":"c","object":"chat.completion.chunk","choices":[]}\n\ndata: [DONE]\n\n'
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def provider(calls: list[str]) -> web.Application:
    """A provider that answers chat completions with its own CORS headers, and notes
    each request's method."""

    async def chat(request: web.Request) -> web.StreamResponse:
        calls.append(request.method)
        body = await request.json()
        if body.get("stream"):
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", **PROVIDER_CORS}
            )
            await response.prepare(request)
            await response.write(CHUNK)
            await response.write_eof()
            return response
        answer = {"id": "c", "object": "chat.completion", "model": "gpt-4o", "choices": []}
        return web.json_response(answer, headers=PROVIDER_CORS)

    app = web.Application()
    app.router.add_route("*", "/v1/chat/completions", chat)
    return app


@pytest.mark.parametrize("origins", [(PAGE,), ("*",)])
async def test_a_page_of_an_allowed_origin_calls_the_proxy(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch, origins: tuple[str, ...]
) -> None:
    calls: list[str] = []
    settings = ingress_settings.model_copy(update={"cors_origins": origins})
    secret, _ = create_key(settings.key_file, tenant="acme")
    async with ingress_at(provider(calls), settings, monkeypatch) as server:
        url = server.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as session:
            async with session.options(url, headers=PREFLIGHT) as preflight:
                assert preflight.status == 200, await preflight.text()
                allowed = preflight.headers
                assert allowed["Access-Control-Allow-Origin"] == PAGE
                assert "POST" in allowed["Access-Control-Allow-Methods"]
                asked = {h.strip() for h in allowed["Access-Control-Allow-Headers"].split(",")}
                assert {"authorization", "content-type", "x-stainless-os"} <= {
                    h.lower() for h in asked
                }
                assert int(allowed["Access-Control-Max-Age"]) > 0
            assert calls == []  # the preflight is llmtap's to answer, not the provider's
            headers = {"Origin": PAGE, "Authorization": f"Bearer {secret}"}
            for stream in (False, True):
                body: dict[str, object] = {"model": "gpt-4o", "messages": [], "stream": stream}
                async with session.post(url, json=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
                    assert response.headers.getall("Access-Control-Allow-Origin") == [PAGE]
                    exposed = response.headers["Access-Control-Expose-Headers"].lower()
                    assert "x-request-id" in exposed.split(",")
                    assert "x-a" not in exposed.split(",")  # the provider's list, not passed on
            assert calls == ["POST", "POST"]


async def test_a_page_of_another_origin_is_refused_at_its_preflight(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    settings = ingress_settings.model_copy(update={"cors_origins": (PAGE,)})
    async with ingress_at(provider(calls), settings, monkeypatch) as server:
        url = server.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as session:
            other = {**PREFLIGHT, "Origin": "https://evil.example"}
            async with session.options(url, headers=other) as preflight:
                assert preflight.status == 403
                assert "Access-Control-Allow-Origin" not in preflight.headers
            async with session.options(server.make_url("/metrics"), headers=PREFLIGHT) as r:
                assert r.status == 405  # only the API routes take a page's calls
    assert calls == []


async def test_without_origins_no_cors_header_reaches_a_page(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    secret, _ = create_key(ingress_settings.key_file, tenant="acme")
    async with ingress_at(provider(calls), ingress_settings, monkeypatch) as server:
        url = server.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as session:
            async with session.options(url, headers=PREFLIGHT) as preflight:
                assert preflight.status == 405
            headers = {"Origin": PAGE, "Authorization": f"Bearer {secret}"}
            body = {"model": "gpt-4o", "messages": []}
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status == 200
                # the provider's "*" would have let any page read llmtap's answers
                assert not [h for h in response.headers if h.lower().startswith("access-")]
    assert calls == ["POST"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com/",
        "app.example.com",
        "https://a.example/x",
        "ftp://a",
        "http://a.example:0",
        "http://a.example:99999",
    ],
)
def test_an_origin_that_is_none_is_refused_naming_the_setting(origin: str) -> None:
    with pytest.raises(ValidationError, match="cors_origins"):
        Settings(cors_origins=(origin,))


async def test_an_answer_a_page_may_read_says_it_varies_by_origin(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Access-Control-Allow-Origin is the page's own origin (or none), so an HTTP cache
    (the browser's, a CDN's) must not give one page's answer to another origin's page."""
    calls: list[str] = []
    settings = ingress_settings.model_copy(update={"cors_origins": (PAGE,)})
    secret, _ = create_key(settings.key_file, tenant="acme")
    async with ingress_at(provider(calls), settings, monkeypatch) as server:
        url = server.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as session:
            async with session.options(url, headers=PREFLIGHT) as preflight:
                assert preflight.status == 200
                assert "origin" in _vary(preflight.headers)
            for origin in ({"Origin": PAGE}, {"Origin": "https://evil.example"}, {}):
                headers = {**origin, "Authorization": f"Bearer {secret}"}
                for stream in (False, True):
                    body: dict[str, object] = {"model": "gpt-4o", "messages": [], "stream": stream}
                    async with session.post(url, json=body, headers=headers) as response:
                        assert response.status == 200
                        await response.read()
                        assert "origin" in _vary(response.headers), (origin, stream)
            async with session.post(url, json={}, headers={"Origin": PAGE}) as refused:
                assert refused.status == 401  # llmtap's own answer, readable by the page
                assert refused.headers["Access-Control-Allow-Origin"] == PAGE
                assert "origin" in _vary(refused.headers)


def _vary(headers: CIMultiDictProxy[str]) -> set[str]:
    return {
        name.strip().lower() for value in headers.getall("Vary", ()) for name in value.split(",")
    }


@pytest.mark.parametrize(
    ("origin", "written"),
    [
        ("https://App.Example.com", "https://app.example.com"),
        ("https://app.example.com:443", "https://app.example.com"),
        ("http://localhost:80", "http://localhost"),
        ("http://[::1]:80", "http://[::1]"),
    ],
)
def test_an_origin_no_browser_sends_is_refused_naming_how_it_sends_it(
    origin: str, written: str
) -> None:
    """A browser sends its host in lower case and no port of the scheme's own: written
    otherwise, an origin would match no page's, every preflight a 403."""
    with pytest.raises(ValidationError, match="cors_origins") as refused:
        Settings(cors_origins=(origin,))
    assert repr(written) in str(refused.value)
    assert Settings(cors_origins=(written, "http://a.example:8080")).cors_origins == (
        written,
        "http://a.example:8080",
    )
