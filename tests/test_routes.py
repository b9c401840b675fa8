"""Every provider route through `llmtap up`, driven by the official SDKs.

Anthropic's Messages API, OpenAI's embeddings and Responses API, /v1/models, and an
OpenAI-compatible provider chosen by config. Each test uses its own model.
"""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import pytest
from anthropic import AsyncAnthropic
from anthropic import AuthenticationError as AnthropicAuthenticationError
from openai import AsyncOpenAI, AuthenticationError, BadRequestError

from tests.conftest import ANTHROPIC_KEY, GROQ_KEY, PROVIDER_KEY, FakeUpstream, Running
from tests.fake_provider import ANTHROPIC_SNAPSHOT, SNAPSHOT, FakeProvider
from tests.test_e2e import model_row

MILLION = Decimal(1_000_000)


def anthropic_cost(
    fake: FakeProvider, rate_in: str, rate_read: str, rate_write: str, rate_out: str
) -> Decimal:
    return (
        fake.prompt_tokens * Decimal(rate_in)
        + fake.cached_tokens * Decimal(rate_read)
        + fake.cache_write_tokens * Decimal(rate_write)
        + fake.completion_tokens * Decimal(rate_out)
    ) / MILLION


async def test_anthropic_messages_non_streaming(
    llmtap_up: Running, anthropic_sdk: AsyncAnthropic, upstream: FakeUpstream
) -> None:
    fake = upstream.provider
    message = await anthropic_sdk.messages.create(
        model="claude-3-5-sonnet",
        max_tokens=100,
        messages=[{"role": "user", "content": "hello"}],
    )
    assert message.content[0].text == "".join(fake.words)  # type: ignore[union-attr]

    seen = fake.received[-1]
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY  # the client's key never reaches it
    assert seen.headers["anthropic-version"]  # passed through

    row = await model_row(
        llmtap_up.api_url, "claude-3-5-sonnet" + ANTHROPIC_SNAPSHOT, lambda r: r["requests"] >= 1
    )
    # Normalised: input includes cache reads and writes, which Anthropic reports apart.
    assert row["input_tokens"] == fake.prompt_tokens + fake.cached_tokens + fake.cache_write_tokens
    assert row["cached_input_tokens"] == fake.cached_tokens
    assert row["output_tokens"] == fake.completion_tokens
    assert row["provider"] == "anthropic"
    assert Decimal(row["cost"]) == anthropic_cost(fake, "3.00", "0.30", "3.75", "15.00")


async def test_anthropic_messages_streaming_events_arrive_unchanged(
    llmtap_up: Running, anthropic_sdk: AsyncAnthropic, upstream: FakeUpstream
) -> None:
    fake = upstream.provider
    stream = await anthropic_sdk.messages.create(
        model="claude-3-5-haiku",
        max_tokens=100,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
    )
    received = [event.to_dict() async for event in stream]
    assert received == [data for _name, data in fake.sent_events[-1]]

    row = await model_row(
        llmtap_up.api_url, "claude-3-5-haiku" + ANTHROPIC_SNAPSHOT, lambda r: r["requests"] >= 1
    )
    # Output tokens from the final message_delta (cumulative), not message_start's 1.
    assert row["output_tokens"] == fake.completion_tokens
    assert Decimal(row["cost"]) == anthropic_cost(fake, "0.80", "0.08", "1.00", "4.00")


async def test_anthropic_route_errors_are_anthropic_shaped(llmtap_up: Running) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{llmtap_up.proxy_root}/v1/messages",
            json={"max_tokens": 5},
            headers={"x-api-key": llmtap_up.api_key},
        ) as response,
    ):
        assert response.status == 400
        body = await response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "model" in body["error"]["message"]


async def test_embeddings(
    llmtap_up: Running, openai_sdk: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    fake = upstream.provider
    result = await openai_sdk.embeddings.create(model="text-embedding-3-small", input="hello")
    assert result.data[0].embedding == [0.25, -0.5]
    row = await model_row(llmtap_up.api_url, "text-embedding-3-small", lambda r: r["requests"] >= 1)
    assert (row["input_tokens"], row["output_tokens"]) == (fake.prompt_tokens, 0)
    assert Decimal(row["cost"]) == fake.prompt_tokens * Decimal("0.02") / MILLION


@pytest.mark.parametrize(
    ("model", "stream", "rates"),
    [
        ("gpt-4.1", False, ("2.00", "0.50", "8.00")),
        ("o3-mini", True, ("1.10", "0.55", "4.40")),
    ],
)
async def test_responses_api(
    llmtap_up: Running,
    openai_sdk: AsyncOpenAI,
    upstream: FakeUpstream,
    model: str,
    stream: bool,
    rates: tuple[str, str, str],
) -> None:
    fake = upstream.provider
    if stream:
        events = await openai_sdk.responses.create(model=model, input="hello", stream=True)
        kinds = [event.type async for event in events]
        assert kinds == [name for name, _data in fake.sent_events[-1]]
    else:
        response = await openai_sdk.responses.create(model=model, input="hello")
        assert response.output_text == "".join(fake.words)
    row = await model_row(llmtap_up.api_url, model + SNAPSHOT, lambda r: r["requests"] >= 1)
    assert row["reasoning_tokens"] == fake.reasoning_tokens
    rate_in, rate_cached, rate_out = (Decimal(r) for r in rates)
    uncached = fake.prompt_tokens - fake.cached_tokens
    want = (
        uncached * rate_in + fake.cached_tokens * rate_cached + fake.completion_tokens * rate_out
    ) / MILLION
    assert Decimal(row["cost"]) == want


async def test_models_list_is_passed_through(
    openai_sdk: AsyncOpenAI, upstream: FakeUpstream
) -> None:
    page = await openai_sdk.models.list()
    assert [m.id for m in page.data] == ["gpt-4o"]
    assert upstream.provider.received[-1].headers["Authorization"] == f"Bearer {PROVIDER_KEY}"


async def test_anthropic_s_models_list_comes_from_anthropic(
    anthropic_sdk: AsyncAnthropic, upstream: FakeUpstream
) -> None:
    """Both APIs list models at /v1/models: asked by Anthropic's SDK (anthropic-version),
    the list is Anthropic's, with llmtap's Anthropic key; it was OpenAI's."""
    page = await anthropic_sdk.models.list()
    assert [m.id for m in page.data] == ["claude-3-5-haiku" + ANTHROPIC_SNAPSHOT]
    seen = upstream.provider.received[-1]
    assert (seen.path, seen.headers["x-api-key"]) == ("/v1/models", ANTHROPIC_KEY)
    assert "Authorization" not in seen.headers


async def test_models_list_wants_a_key_as_every_route(
    llmtap_up: Running, upstream: FakeUpstream
) -> None:
    """No key, or an unknown one: 401 in OpenAI's shape, and the provider never asked
    (with llmtap's key, it would answer anyone)."""
    asked = len(upstream.provider.received)
    for api_key in ("not-a-key", "ltk_unknown"):
        async with AsyncOpenAI(
            base_url=llmtap_up.proxy_url, api_key=api_key, max_retries=0
        ) as stranger:
            with pytest.raises(AuthenticationError) as refused:
                await stranger.models.list()
        assert refused.value.code == "invalid_api_key"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{llmtap_up.proxy_url}/models") as response,
    ):
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    assert len(upstream.provider.received) == asked


@pytest.mark.parametrize(
    ("model", "upstream_model"),
    [
        # Models with no price in the catalog (Groq's real Llama models have one).
        ("groq/house-model-8b", "house-model-8b"),  # <provider>/<model>
        ("llama-house-70b", "llama-house-70b"),  # model_routes: "llama-*"
    ],
)
async def test_openai_compatible_provider_chosen_by_config(
    llmtap_up: Running,
    openai_sdk: AsyncOpenAI,
    upstream: FakeUpstream,
    model: str,
    upstream_model: str,
) -> None:
    await openai_sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}]
    )
    seen = upstream.provider.received[-1]
    assert seen.body["model"] == upstream_model
    assert seen.headers["Authorization"] == f"Bearer {GROQ_KEY}"
    row = await model_row(
        llmtap_up.api_url, upstream_model + SNAPSHOT, lambda r: r["requests"] >= 1
    )
    assert row["provider"] == "groq"
    # No price in the catalog: counted as unpriced, never as $0.
    assert row["unpriced_requests"] == 1
    assert row["cost"] is None


async def test_a_model_served_by_another_api_is_refused_clearly(openai_sdk: AsyncOpenAI) -> None:
    with pytest.raises(BadRequestError) as raised:
        await openai_sdk.chat.completions.create(
            model="anthropic/claude-3-5-sonnet", messages=[{"role": "user", "content": "hi"}]
        )
    assert "speaks the anthropic API" in raised.value.message


async def test_free_counts_and_moderations_pass_through_with_the_provider_key(
    openai_sdk: AsyncOpenAI, anthropic_sdk: AsyncAnthropic, upstream: FakeUpstream
) -> None:
    """What an SDK asks besides calls, all free: a prompt's tokens (Anthropic's
    count_tokens, the Responses API's input_tokens) and a moderation. Each reaches the
    provider serving its model, with llmtap's key for it and the model's upstream name."""
    fake = upstream.provider
    counted = await anthropic_sdk.messages.count_tokens(
        model="claude-3-5-haiku", messages=[{"role": "user", "content": "hello"}]
    )
    assert counted.input_tokens == fake.prompt_tokens
    seen = fake.received[-1]
    assert (seen.path, seen.headers["x-api-key"]) == ("/v1/messages/count_tokens", ANTHROPIC_KEY)
    assert seen.body["messages"] == [{"role": "user", "content": "hello"}]

    tokens = await openai_sdk.responses.input_tokens.count(model="groq/house-model-8b", input="hi")
    assert tokens.input_tokens == fake.prompt_tokens
    seen = fake.received[-1]
    assert seen.path == "/v1/responses/input_tokens"
    assert seen.headers["Authorization"] == f"Bearer {GROQ_KEY}"  # the model's provider
    assert seen.body == {"model": "house-model-8b", "input": "hi"}

    moderation = await openai_sdk.moderations.create(input="hi")
    assert moderation.results[0].flagged is False
    seen = fake.received[-1]
    assert (seen.path, seen.headers["Authorization"]) == (
        "/v1/moderations",
        f"Bearer {PROVIDER_KEY}",
    )


async def test_free_counts_want_a_key_and_a_model_the_key_may_use(
    llmtap_up: Running, upstream: FakeUpstream
) -> None:
    """As every route: no key is a 401 in the API's shape, a body that is not JSON a
    400, and the provider is never asked."""
    asked = len(upstream.provider.received)
    async with AsyncAnthropic(
        base_url=llmtap_up.proxy_root, api_key="ltk_unknown", max_retries=0
    ) as stranger:
        with pytest.raises(AnthropicAuthenticationError):
            await stranger.messages.count_tokens(
                model="claude-3-5-haiku", messages=[{"role": "user", "content": "hello"}]
            )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{llmtap_up.proxy_url}/responses/input_tokens",
            data=b"{not json",
            headers={"Authorization": f"Bearer {llmtap_up.api_key}"},
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"
        assert response.headers["x-request-id"]
    assert len(upstream.provider.received) == asked
