"""Routing models whose provider-side id starts with another provider's name."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import AsyncOpenAI

from ingress.routing import priced_tier, resolve
from llmtap.config import Settings
from llmtap.config_sections import ProviderConfig
from tests.conftest import INGRESS_PROVIDER_KEY, Broker, FakeUpstream
from tests.test_ingress_ops import make_key, response_event, serve_with_provider

GROQ = ProviderConfig(base_url="https://api.groq.com/openai/v1", api_key_env="GROQ_API_KEY")


@pytest.mark.parametrize("pattern", ["openai/gpt-oss-120b", "openai/gpt-oss-*", "openai/*"])
def test_a_route_naming_a_provider_s_prefix_wins_over_the_prefix(
    tmp_path: Path, pattern: str
) -> None:
    """Groq serves OpenAI's open-weight model as "openai/gpt-oss-120b" (OpenRouter names
    every model so): a route written for that name sends it to Groq, named as Groq names
    it. It went to OpenAI as "gpt-oss-120b", the route never read."""
    settings = Settings(data_dir=tmp_path, providers={"groq": GROQ}, model_routes={pattern: "groq"})
    route = resolve("openai/gpt-oss-120b", "openai", settings)
    assert (route.provider, route.upstream_model) == ("groq", "openai/gpt-oss-120b")


def test_the_provider_prefix_still_wins_over_a_route_not_written_for_it(tmp_path: Path) -> None:
    """A route that does not name the prefix (a catch-all, "gpt-*") leaves
    <provider>/<model> as it was: that provider, the model after the slash."""
    routes = {"gpt-*": "groq", "*": "groq"}
    settings = Settings(data_dir=tmp_path, providers={"groq": GROQ}, model_routes=routes)
    route = resolve("openai/gpt-4o", "openai", settings)
    assert (route.provider, route.upstream_model) == ("openai", "gpt-4o")
    route = resolve("groq/openai/gpt-oss-120b", "openai", settings)
    assert (route.provider, route.upstream_model) == ("groq", "openai/gpt-oss-120b")
    # A route of the prefix to its own provider is the prefix's rule, as it was.
    settings = Settings(data_dir=tmp_path, model_routes={"openai/*": "openai"})
    route = resolve("openai/gpt-4o", "openai", settings)
    assert (route.provider, route.upstream_model) == ("openai", "gpt-4o")


def test_openrouter_s_names_of_another_api_s_models_go_to_openrouter(tmp_path: Path) -> None:
    """OpenRouter serves Claude on the OpenAI API as "anthropic/claude-sonnet-4": routed
    there by "anthropic/*", it was refused (400: provider anthropic speaks the anthropic
    API), the route never read."""
    openrouter = ProviderConfig(base_url="https://openrouter.ai/api/v1", api_key_env="OR_KEY")
    settings = Settings(
        data_dir=tmp_path,
        providers={"openrouter": openrouter},
        model_routes={"anthropic/*": "openrouter", "openai/*": "openrouter"},
    )
    for model in ("anthropic/claude-sonnet-4", "openai/gpt-4o"):
        route = resolve(model, "openai", settings)
        assert (route.provider, route.upstream_model) == ("openrouter", model)
    route = resolve("claude-sonnet-4", "anthropic", settings)  # the Messages API's own
    assert route.provider == "anthropic"


async def test_the_sdk_s_call_reaches_the_routed_provider_named_as_it_names_it(
    ingress_settings: Settings,
    upstream: FakeUpstream,
    broker: Broker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    monkeypatch.setenv("LLMTAP_TEST_GROQ_KEY", "gsk-groq")
    groq = ProviderConfig(base_url=upstream.base_url, api_key_env="LLMTAP_TEST_GROQ_KEY")
    server, base, settings = await serve_with_provider(
        ingress_settings, "groq", groq, "openai/gpt-oss-*"
    )
    try:
        secret = await make_key(base, settings.key_file)
        async with AsyncOpenAI(base_url=f"{base}/v1", api_key=secret, max_retries=0) as sdk:
            raw = await sdk.chat.completions.with_raw_response.create(
                model="openai/gpt-oss-120b", messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await server.close()
    seen = upstream.provider.received[-1]
    assert seen.body["model"] == "openai/gpt-oss-120b"
    assert seen.headers["Authorization"] == "Bearer gsk-groq"
    event = await response_event(broker.bootstrap, raw.headers["x-request-id"])
    assert (event.provider, event.status) == ("groq", "ok")


@pytest.mark.parametrize(
    ("provider", "base_url", "service_tiers", "tier", "priced"),
    [
        # OpenAI's own API: its tiers by name, any other tier as named (no price: unpriced)
        ("openai", "https://api.openai.com/v1", None, "flex", "flex"),
        ("openai", "https://api.openai.com/v1", None, "turbo-x", "turbo-x"),
        ("openai-eu", "https://eu.api.openai.com/v1", None, "turbo-x", "turbo-x"),
        # The provider named openai on another server (a gateway, a mock): OpenAI's tiers
        # by name; a tier of its own is standard, as before unknown tiers were unpriced.
        ("openai", "https://gateway.example.com/v1", None, "ultrafast", "ultrafast"),
        ("openai", "https://gateway.example.com/v1", None, "on_demand", "standard"),
        ("openai", "https://gateway.example.com/v1", True, "on_demand", "on_demand"),
        # Another provider's tiers are its own
        ("groq", "https://api.groq.com/openai/v1", None, "flex", "standard"),
        ("groq", "https://api.groq.com/openai/v1", None, "standard", "standard"),
    ],
)
def test_the_tier_a_call_is_priced_at(
    provider: str, base_url: str, service_tiers: bool | None, tier: str, priced: str
) -> None:
    config = ProviderConfig(base_url=base_url, service_tiers=service_tiers)
    assert priced_tier(provider, config, tier) == priced
