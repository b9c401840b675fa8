"""The body fields llmtap reads or rewrites (ingress/guards/fields.py): a malformed one is
refused in its provider's shape, naming it, before the provider is asked, and recorded;
through the ingress itself, driven by the official SDKs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from openai.types.chat import ChatCompletionMessageParam

from ingress.guards.fields import MAX_MODEL_CHARS, MAX_USER_CHARS
from llmtap.config import Settings
from llmtap.events import ResponseEvent
from llmtap.names import Names
from tests.conftest import Broker, FakeUpstream
from tests.test_ingress_ops import make_key

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def secret(ingress: str, ingress_settings: Settings) -> str:
    return await make_key(ingress, ingress_settings.key_file)


@pytest.fixture
async def openai_client(ingress: str, secret: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{ingress}/v1", api_key=secret, max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def anthropic_client(ingress: str, secret: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=ingress, api_key=secret, max_retries=0) as client:
        yield client


async def response_events(bootstrap: str, request_ids: set[str]) -> dict[str, ResponseEvent]:
    """The response events of these calls, read from the start of llmtap.responses."""
    found: dict[str, ResponseEvent] = {}
    consumer = AIOKafkaConsumer(
        Names().responses, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        async with asyncio.timeout(30):
            while len(found) < len(request_ids):
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        # Other tests' records share the topic: some not events at all.
                        said = None
                        with contextlib.suppress(orjson.JSONDecodeError):
                            said = orjson.loads(record.value or b"null")
                        if isinstance(said, dict) and said.get("request_id") in request_ids:
                            event = ResponseEvent.model_validate_json(record.value)
                            found[str(event.request_id)] = event
    finally:
        await consumer.stop()
    return found


async def refused_chat(
    client: openai.AsyncOpenAI, model: str = "gpt-4o", **body: Any
) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model=model, messages=MESSAGES, extra_body=body, timeout=10
        )
    return refused.value


@pytest.mark.parametrize("stream", ["true", 1, 0, "false", {}, []])
async def test_a_stream_that_is_not_a_boolean_is_refused_and_recorded(
    openai_client: openai.AsyncOpenAI, upstream: FakeUpstream, broker: Broker, stream: Any
) -> None:
    """A lenient provider streams a "stream": "true" (the fake one does): llmtap read it
    as no stream, did not ask for the usage chunk and recorded the call unmetered."""
    before = len(upstream.provider.received)
    error = await refused_chat(openai_client, stream=stream)
    assert (error.param, error.code, error.type) == (
        "stream",
        "invalid_type",
        "invalid_request_error",
    )
    assert "'stream'" in error.message and "expected a boolean" in error.message
    assert len(upstream.provider.received) == before  # never sent
    request_id = error.response.headers["x-request-id"]
    event = (await response_events(broker.bootstrap, {request_id}))[request_id]
    assert (event.status, event.http_status, event.error_class) == (
        "bad_request",
        400,
        "invalid_stream",
    )
    assert event.model_requested == "gpt-4o"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ("yes", "stream_options"),
        (["include_usage"], "stream_options"),
        (True, "stream_options"),
        ({"include_usage": "true"}, "stream_options.include_usage"),
        ({"include_usage": 1}, "stream_options.include_usage"),
    ],
)
async def test_malformed_stream_options_are_refused_not_replaced(
    openai_client: openai.AsyncOpenAI,
    upstream: FakeUpstream,
    broker: Broker,
    options: Any,
    param: str,
) -> None:
    """llmtap replaced them with {"include_usage": true}: a call that fails sent direct
    succeeded through it. Now refused, on both routes whose streams it asks for usage."""
    before = len(upstream.provider.received)
    ids = set()
    chat = await refused_chat(openai_client, stream=True, stream_options=options)
    with pytest.raises(openai.BadRequestError) as completion:
        await openai_client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="hi",
            extra_body={"stream": True, "stream_options": options},
            timeout=10,
        )
    for error in (chat, completion.value):
        assert (error.param, error.code) == (param, "invalid_type")
        assert f"'{param}'" in error.message
        ids.add(error.response.headers["x-request-id"])
    assert len(upstream.provider.received) == before
    events = await response_events(broker.bootstrap, ids)
    assert {(e.status, e.http_status, e.error_class) for e in events.values()} == {
        ("bad_request", 400, "invalid_stream_options")
    }


async def test_null_stream_and_stream_options_are_absent_ones(
    openai_client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    fake = upstream.provider
    answer = await openai_client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_body={"stream": None}, timeout=10
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == fake.prompt_tokens
    stream = await openai_client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_body={"stream_options": {"include_usage": None}},
        timeout=10,
    )
    chunks = [chunk async for chunk in stream]
    assert chunks and all(chunk.usage is None for chunk in chunks)  # llmtap's, stripped
    assert fake.received[-1].body["stream_options"] == {"include_usage": True}


async def test_the_responses_and_messages_routes_refuse_a_stream_that_is_not_a_boolean(
    openai_client: openai.AsyncOpenAI,
    anthropic_client: anthropic.AsyncAnthropic,
    upstream: FakeUpstream,
    broker: Broker,
) -> None:
    before = len(upstream.provider.received)
    with pytest.raises(openai.BadRequestError) as responses:
        await openai_client.responses.create(
            model="gpt-4.1", input="hi", extra_body={"stream": "true"}, timeout=10
        )
    assert (responses.value.param, responses.value.code) == ("stream", "invalid_type")
    with pytest.raises(anthropic.BadRequestError) as messages:
        await anthropic_client.messages.create(
            model="claude-3-5-haiku",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"stream": 1},
            timeout=10,
        )
    body = messages.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "'stream'" in body["error"]["message"]
    assert len(upstream.provider.received) == before
    ids = {
        responses.value.response.headers["x-request-id"],
        messages.value.response.headers["x-request-id"],
    }
    events = await response_events(broker.bootstrap, ids)
    assert {(e.endpoint, e.status, e.error_class) for e in events.values()} == {
        ("responses", "bad_request", "invalid_stream"),
        ("messages", "bad_request", "invalid_stream"),
    }


async def test_a_background_response_is_refused_and_recorded(
    openai_client: openai.AsyncOpenAI, upstream: FakeUpstream, broker: Broker
) -> None:
    """A background response answers queued, with no usage, and is read later from the
    stored response llmtap does not pass: never metered, nor held against a cap or a
    rate limit. Refused before the provider is asked; background false goes."""
    before = len(upstream.provider.received)
    with pytest.raises(openai.BadRequestError) as refused:
        await openai_client.responses.create(
            model="o3", input="write a long novel", background=True, timeout=10
        )
    assert (refused.value.param, refused.value.code) == ("background", "unsupported_parameter")
    assert "background responses are not supported" in refused.value.message
    assert len(upstream.provider.received) == before
    answered = await openai_client.responses.create(
        model="gpt-4.1", input="hi", background=False, timeout=10
    )
    assert answered.id
    assert len(upstream.provider.received) == before + 1
    request_id = refused.value.response.headers["x-request-id"]
    (event,) = (await response_events(broker.bootstrap, {request_id})).values()
    assert (event.endpoint, event.status, event.error_class) == (
        "responses",
        "bad_request",
        "background_unsupported",
    )


async def healthz(ingress: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(f"{ingress}/healthz") as response:
        health: dict[str, Any] = await response.json()
        return health


async def test_a_model_or_user_too_long_for_an_event_is_refused_and_recorded(
    ingress: str,
    secret: str,
    openai_client: openai.AsyncOpenAI,
    anthropic_client: anthropic.AsyncAnthropic,
    upstream: FakeUpstream,
    broker: Broker,
) -> None:
    """Each was copied whole into the call's events (the body may hold 32 MiB): an event
    over the broker's 1 MiB was dropped, the call (forwarded) never recorded."""
    before = len(upstream.provider.received)
    huge_model = "gpt-4o-" + "m" * 2_000_000
    model = await refused_chat(openai_client, model=huge_model)
    assert (model.param, model.code) == ("model", "string_above_max_length")
    assert f"maximum length {MAX_MODEL_CHARS}, but got a string with length 2000007" in (
        model.message
    )
    with pytest.raises(openai.BadRequestError) as user:
        await openai_client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, user="u" * 2_000_000, timeout=10
        )
    assert (user.value.param, user.value.code) == ("user", "string_above_max_length")
    assert f"maximum length {MAX_USER_CHARS}," in user.value.message
    with pytest.raises(anthropic.BadRequestError) as messages:
        await anthropic_client.messages.create(
            model="claude-" + "m" * 2_000_000,
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            timeout=10,
        )
    body = messages.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert "'model'" in body["error"]["message"]
    # A valid key's false claim is refused before the body is judged; still recorded.
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{ingress}/v1/chat/completions",
            json={"model": huge_model, "messages": MESSAGES},
            headers={"Authorization": f"Bearer {secret}", "x-llmtap-tenant": "globex"},
        ) as claimed,
    ):
        assert claimed.status == 403
        claim_id = claimed.headers["x-request-id"]
    assert len(upstream.provider.received) == before  # none was sent

    ids = {
        model.response.headers["x-request-id"]: ("model_too_long", huge_model[:MAX_MODEL_CHARS]),
        user.value.response.headers["x-request-id"]: ("user_too_long", "gpt-4o"),
        messages.value.response.headers["x-request-id"]: (
            "model_too_long",
            ("claude-" + "m" * 2_000_000)[:MAX_MODEL_CHARS],
        ),
    }
    events = await response_events(broker.bootstrap, {*ids, claim_id})
    for request_id, (error_class, recorded) in ids.items():
        event = events[request_id]
        assert (event.status, event.http_status, event.error_class) == (
            "bad_request",
            400,
            error_class,
        )
        assert event.model_requested == recorded
        assert event.attribution.user == ""
    assert events[claim_id].model_requested == huge_model[:MAX_MODEL_CHARS]
    assert events[claim_id].attribution.tenant == "acme"
    assert (await healthz(ingress))["events_dropped"] == 0


async def test_a_model_and_a_user_at_their_bounds_are_forwarded_and_recorded(
    openai_client: openai.AsyncOpenAI, upstream: FakeUpstream, broker: Broker
) -> None:
    model, user = "gpt-4o-" + "m" * (MAX_MODEL_CHARS - 7), "u" * MAX_USER_CHARS
    raw = await openai_client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, user=user, timeout=10
    )
    assert raw.status_code == 200
    assert (upstream.provider.received[-1].body["model"], len(model)) == (model, MAX_MODEL_CHARS)
    request_id = raw.headers["x-request-id"]
    event = (await response_events(broker.bootstrap, {request_id}))[request_id]
    assert (event.status, event.model_requested, event.attribution.user) == ("ok", model, user)


async def test_a_provider_prefix_with_no_model_after_it_is_an_empty_model(
    openai_client: openai.AsyncOpenAI,
    anthropic_client: anthropic.AsyncAnthropic,
    upstream: FakeUpstream,
    broker: Broker,
) -> None:
    """A model of "openai/" passed the empty-model check: sent to OpenAI as model ""."""
    before = len(upstream.provider.received)
    chat = await refused_chat(openai_client, model="openai/")
    assert chat.param == "model" and "model parameter" in chat.message
    with pytest.raises(anthropic.BadRequestError) as messages:
        await anthropic_client.messages.create(
            model="anthropic/",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            timeout=10,
        )
    body = messages.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "model parameter" in body["error"]["message"]
    # The free routes, unrecorded, refuse it the same way.
    with pytest.raises(anthropic.BadRequestError) as counted:
        await anthropic_client.messages.count_tokens(
            model="anthropic/", messages=[{"role": "user", "content": "hi"}], timeout=10
        )
    assert "model parameter" in str(counted.value)
    assert len(upstream.provider.received) == before  # none was sent
    ids = {
        chat.response.headers["x-request-id"],
        messages.value.response.headers["x-request-id"],
    }
    events = await response_events(broker.bootstrap, ids)
    assert {(e.endpoint, e.model_requested, e.error_class) for e in events.values()} == {
        ("chat.completions", "openai/", "missing_model"),
        ("messages", "anthropic/", "missing_model"),
    }
    assert {(e.status, e.http_status) for e in events.values()} == {("bad_request", 400)}


@pytest.mark.parametrize("model", [5, ["gpt-4o"], {"id": "gpt-4o"}, True])
async def test_a_model_that_is_not_a_string_is_refused_naming_its_type(
    openai_client: openai.AsyncOpenAI,
    anthropic_client: anthropic.AsyncAnthropic,
    upstream: FakeUpstream,
    broker: Broker,
    model: Any,
) -> None:
    """A model named, of another type than a string: the 400 said "you must provide a
    model parameter" to a caller that had, as for none (the free routes said its type)."""
    before = len(upstream.provider.received)
    chat = await refused_chat(openai_client, model=model)
    assert (chat.param, chat.code) == ("model", "invalid_type")
    assert "'model'" in chat.message and "expected a string" in chat.message
    with pytest.raises(anthropic.BadRequestError) as messages:
        await anthropic_client.messages.create(
            model="claude-3-5-haiku",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"model": model},  # the SDK hashes the model it is given
            timeout=10,
        )
    body = messages.value.body
    assert isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"
    assert "expected a string" in body["error"]["message"]
    assert len(upstream.provider.received) == before  # none was sent
    ids = {
        chat.response.headers["x-request-id"],
        messages.value.response.headers["x-request-id"],
    }
    events = await response_events(broker.bootstrap, ids)
    assert {(e.endpoint, e.status, e.http_status, e.error_class) for e in events.values()} == {
        ("chat.completions", "bad_request", 400, "invalid_model"),
        ("messages", "bad_request", 400, "invalid_model"),
    }


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"[]", "an array"), (b'"hi"', "a string"), (b"null", "null"), (b"3", "an integer")],
)
async def test_a_body_that_is_json_but_not_an_object_is_refused_saying_so(
    ingress: str, secret: str, upstream: FakeUpstream, broker: Broker, body: bytes, kind: str
) -> None:
    """Valid JSON, not an object: the 400 said "We could not parse the JSON body", a
    caller looking for a syntax error in a body that has none."""
    before = len(upstream.provider.received)
    answers = {}
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/chat/completions", "/v1/messages"):
            async with session.post(
                f"{ingress}{path}",
                data=body,
                headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            ) as response:
                answers[path] = (response.status, await response.json(), response.headers)
    chat, messages = answers["/v1/chat/completions"], answers["/v1/messages"]
    assert (chat[0], messages[0]) == (400, 400)
    assert chat[1]["error"]["type"] == "invalid_request_error"
    assert messages[1]["type"] == "error"
    assert messages[1]["error"]["type"] == "invalid_request_error"
    for said in (chat[1]["error"]["message"], messages[1]["error"]["message"]):
        assert f"expected a JSON object, but got {kind}" in said, said
    assert len(upstream.provider.received) == before  # none was sent
    ids = {chat[2]["x-request-id"], messages[2]["x-request-id"]}
    events = await response_events(broker.bootstrap, ids)
    assert {(e.endpoint, e.status, e.http_status, e.error_class) for e in events.values()} == {
        ("chat.completions", "bad_request", 400, "invalid_json"),
        ("messages", "bad_request", 400, "invalid_json"),
    }
