"""A provider that takes its key in another header than its API's: Azure OpenAI's
deployments API (``/openai/deployments/<name>/...?api-version=...``) takes an API key
only as ``api-key``; sent as ``Authorization: Bearer``, it is read as an Entra ID token
and refused (401 "Access token is missing, invalid, audience is incorrect")."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI

from ingress.guards.keys import create_key
from llmtap.config import Settings
from llmtap.config_sections import ProviderConfig
from tests.conftest import INGRESS_PROVIDER_KEY, Broker, serve_ingress
from tests.test_ingress_ops import response_event

AZURE_KEY = "azure-key-for-tests"
USAGE = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


def azure() -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        if request.query.get("api-version") != "2024-10-21":
            return web.json_response({"error": {"code": "404"}}, status=404)
        if request.headers.get("api-key") != AZURE_KEY or "Authorization" in request.headers:
            message = "Unauthorized. Access token is missing, invalid, audience is incorrect"
            return web.json_response({"statusCode": 401, "message": message}, status=401)
        return web.json_response(
            {"id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-2024-08-06",
             "choices": [], "usage": USAGE}
        )  # fmt: skip

    app = web.Application()
    app.router.add_post("/openai/deployments/gpt-4o/chat/completions", chat)
    return app


async def test_a_provider_s_key_goes_in_the_header_it_names(
    ingress_settings: Settings, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Set api_key_header: api-key, llmtap's key for it goes there, bare (no Bearer),
    and the caller's call is served: it was a 401 from the provider, every call."""
    monkeypatch.setenv("LLMTAP_TEST_AZURE_KEY", AZURE_KEY)
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    upstream = TestServer(azure(), host="127.0.0.1")
    await upstream.start_server()
    deployment = f"http://127.0.0.1:{upstream.port}/openai/deployments/gpt-4o"
    config = ProviderConfig(
        base_url=f"{deployment}?api-version=2024-10-21",
        api_key_env="LLMTAP_TEST_AZURE_KEY",
        api_key_header="api-key",
    )
    settings = ingress_settings.model_copy(
        update={"providers": {"azure": config}, "model_routes": {"gpt-4o": "azure"}}
    )
    secret, _ = create_key(settings.key_file, tenant="acme")
    try:
        server = await serve_ingress(settings)
        try:
            async with AsyncOpenAI(
                base_url=str(server.make_url("/v1")), api_key=secret, max_retries=0
            ) as sdk:
                raw = await sdk.chat.completions.with_raw_response.create(
                    model="gpt-4o",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_headers={"api-key": secret},  # as Azure's SDK sends its key
                )
        finally:
            await server.close()
    finally:
        await upstream.close()
    assert raw.http_response.status_code == 200
    event = await response_event(broker.bootstrap, raw.headers["x-request-id"])
    assert (event.provider, event.status, event.usage.input_tokens) == ("azure", "ok", 9)


@pytest.mark.parametrize("header", ["", "api key", "x-llmtap-key", "api-key\n"])
def test_a_key_header_that_is_no_header_name_is_refused(header: str) -> None:
    with pytest.raises(ValueError, match="api_key_header"):
        ProviderConfig(base_url="https://x.example/v1", api_key_header=header)
