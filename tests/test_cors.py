"""A web page calling the proxy (CORS): preflights answered by llmtap for the origins
`cors_origins` names, never forwarded nor recorded; its answers readable by the page;
the provider's own CORS headers never passed on."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy
from pydantic import ValidationError

from ingress.guards.keys import create_key
from llmtap.config import CONFIG_ENV, Settings
from tests.conftest import ingress_at
from tests.prometheus import sample

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


async def test_a_preflight_to_a_path_llmtap_does_not_serve_is_no_call(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's preflight to a path llmtap has no route of, or none a page may call: a
    404 or 405 as before, but no call recorded (nothing was asked of a provider, nor
    could be: a preflight carries no key), as a preflight to an API route is none."""
    calls: list[str] = []
    settings = ingress_settings.model_copy(update={"cors_origins": (PAGE,)})
    async with ingress_at(provider(calls), settings, monkeypatch) as server:
        async with aiohttp.ClientSession() as session:
            for path, status in (("/v1/nope", 404), ("/nope", 404), ("/metrics", 405)):
                async with session.options(server.make_url(path), headers=PREFLIGHT) as r:
                    assert r.status == status, path
                    assert "x-request-id" not in r.headers, path  # no call's id
            async with session.get(server.make_url("/metrics")) as r:
                assert sample(await r.text(), "llmtap_requests_total", endpoint="unknown") == 0
            async with session.get(server.make_url("/v1/nope"), headers={"Origin": PAGE}) as r:
                assert r.status == 404  # a call to it is one
            async with session.get(server.make_url("/metrics")) as r:
                assert sample(await r.text(), "llmtap_requests_total", endpoint="unknown") == 1
    assert calls == []


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("POST", "/v1/messages/batches", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/models", 401),
        ("POST", "/v1/messages/count_tokens", 401),
        ("POST", "/v1/responses", 401),
    ],
)
async def test_a_page_reads_llmtap_s_own_errors_on_the_api_routes(
    ingress_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    path: str,
    status: int,
) -> None:
    """An unknown API path, a method it does not take, a call without a key: llmtap's
    own error, in the provider's shape, which a page of an allowed origin may read (with
    its x-request-id), and one of another origin may not."""
    calls: list[str] = []
    settings = ingress_settings.model_copy(update={"cors_origins": (PAGE,)})
    async with ingress_at(provider(calls), settings, monkeypatch) as server:
        async with aiohttp.ClientSession() as session:
            url = server.make_url(path)
            async with session.request(method, url, json={}, headers={"Origin": PAGE}) as r:
                assert r.status == status
                assert "error" in await r.json()
                assert r.headers.getall("Access-Control-Allow-Origin") == [PAGE]
                exposed = r.headers["Access-Control-Expose-Headers"].lower().split(",")
                assert "x-request-id" in exposed
                assert "origin" in _vary(r.headers)
            other = {"Origin": "https://evil.example"}
            async with session.request(method, url, json={}, headers=other) as r:
                assert r.status == status
                assert "Access-Control-Allow-Origin" not in r.headers
                assert "origin" in _vary(r.headers)
            async with session.get(server.make_url("/nope"), headers={"Origin": PAGE}) as r:
                assert r.status == 404  # not an API route: no page's to read
                assert "Access-Control-Allow-Origin" not in r.headers
    assert calls == []


@pytest.mark.parametrize("file_says", [None, ["https://app.example.com"]])
def test_an_empty_cors_origins_variable_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_says: list[str] | None
) -> None:
    """``LLMTAP_CORS_ORIGINS=`` (compose's ``${VAR:-}``) stopped llmtap at start (not
    JSON): it is no setting, as an empty file setting is (the file's, else none)."""
    if file_says is not None:
        config = tmp_path / "llmtap.yaml"
        config.write_text(yaml.safe_dump({"cors_origins": file_says}))
        monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("LLMTAP_CORS_ORIGINS", "")
    assert Settings().cors_origins == tuple(file_says or ())
    monkeypatch.setenv("LLMTAP_CORS_ORIGINS", '["http://localhost:3000", "*"]')
    assert Settings().cors_origins == ("http://localhost:3000", "*")
    monkeypatch.setenv("LLMTAP_CORS_ORIGINS", "http://localhost:3000")  # not JSON
    with pytest.raises(ValidationError, match="cors_origins"):
        Settings()
