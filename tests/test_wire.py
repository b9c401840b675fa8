"""The msgspec mirror of the contract (llmtap/wire.py) against its pydantic models: every
event the models write decodes to the same ``calls`` row both ways, every kind of bad
message the model refuses is refused by both, the ingress's request and response
events (built as structs) are the ones the models would write, the stream's cost stage
(response read, priced and written with the structs) writes the very event the models
would, and so does its windows step (windows built as structs, without validation)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingress.forward.call import Call
from llmtap import wire
from llmtap.events import (
    _DERIVED_NS,
    MAX_DURATION_MS,
    AdvisorUsage,
    Attribution,
    Cost,
    CostedEvent,
    RequestEvent,
    ResponseEvent,
    Status,
    Usage,
    WindowEvent,
    derived_id,
    stable_id,
)
from llmtap.wire import decode_costed
from sinks.clickhouse.rows import call_row
from stream.catalog import load_catalog
from stream.pricing import price, price_wire
from stream.windows import Windower
from tests.test_clickhouse_writer import costed
from tests.test_windows import T0, call

names = st.text(max_size=12)
tokens = st.integers(min_value=0, max_value=2**40)
millis = st.floats(min_value=0, max_value=1e7, allow_nan=False, allow_infinity=False)
money = st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)

attributions = st.builds(
    Attribution,
    tenant=names,
    team=names,
    user=names,
    feature=names,
    env=names,
    key_id=names,
    properties=st.dictionaries(names, names, max_size=3),
)
usages = st.builds(
    Usage,
    input_tokens=tokens,
    output_tokens=tokens,
    cached_input_tokens=tokens,
    cache_creation_input_tokens=tokens,
    cache_creation_1h_input_tokens=tokens,
    reasoning_tokens=tokens,
    usage_missing=st.booleans(),
    output_tokens_counted=st.booleans(),
    web_search_requests=tokens,
    web_search_preview_requests=tokens,
    speed=st.sampled_from(["standard", "fast"]),
    inference_geo=st.sampled_from(["global", "us", "eu", "not_available"]),
    service_tier=st.sampled_from(["standard", "flex", "priority"]),
    advisor=st.lists(
        st.builds(
            AdvisorUsage,
            model=st.sampled_from(["claude-opus-4-6", "claude-sonnet-4-6", "no-model"]) | names,
            input_tokens=tokens,
            output_tokens=tokens,
            cached_input_tokens=tokens,
            cache_creation_input_tokens=tokens,
            cache_creation_1h_input_tokens=tokens,
        ),
        max_size=2,
    ).map(tuple),
)
responses = st.builds(
    ResponseEvent,
    request_id=st.uuids(),
    ts_start=moments,
    ts_end=moments,
    provider=names,
    endpoint=names,
    model_requested=names,
    model_served=names,
    stream=st.booleans(),
    status=st.sampled_from(get_args(Status)),
    http_status=st.integers(min_value=0, max_value=999),
    error_class=names,
    usage=usages,
    latency_ms=millis,
    ttft_ms=st.none() | millis,
    proxy_overhead_ms=millis,
    attribution=attributions,
)
costs = st.builds(
    Cost,
    input=money,
    cached_input=money,
    cache_write=money,
    output=money,
    reasoning=money,
    total=money,
    web_search=money,
)
events = st.builds(
    CostedEvent,
    event_id=st.uuids(),
    response=responses,
    cost=st.none() | costs,
    unpriced=st.booleans(),
    pricing_model=names,
)


def reads_the_same(raw: bytes) -> None:
    assert call_row(decode_costed(raw)) == call_row(CostedEvent.model_validate_json(raw))


@settings(max_examples=300, deadline=None)
@given(events)
def test_every_event_the_contract_writes_reads_the_same_both_ways(event: CostedEvent) -> None:
    reads_the_same(event.model_dump_json().encode())


@settings(max_examples=300, deadline=None)
@given(
    attribution=attributions,
    usage=usages,
    model=names,
    served=names,
    stream=st.booleans(),
    request_bytes=tokens,
    max_tokens=st.none() | tokens,
    status=st.sampled_from(get_args(Status)),
    http_status=st.integers(min_value=0, max_value=999),
    error_class=names,
    answered=st.booleans(),
)
def test_the_ingress_writes_the_events_the_contract_would(
    attribution: Attribution,
    usage: Usage,
    model: str,
    served: str,
    stream: bool,
    request_bytes: int,
    max_tokens: int | None,
    status: Status,
    http_status: int,
    error_class: str,
    answered: bool,
) -> None:
    call = Call(provider="openai", endpoint="chat.completions")
    call.model_requested, call.stream, call.attribution = model, stream, attribution
    request = call.request_event(request_bytes=request_bytes, max_tokens=max_tokens)
    assert RequestEvent.model_validate_json(wire.encode(request)) == RequestEvent(
        event_id=request.event_id,
        request_id=call.request_id,
        ts=call.ts_start,
        provider="openai",
        endpoint="chat.completions",
        model_requested=model,
        stream=stream,
        request_bytes=request_bytes,
        max_tokens=max_tokens,
        attribution=attribution,
    )
    if answered:
        call.mark_sent()
        call.mark_first_byte()
        call.mark_upstream_done()
    response = call.response_event(
        status=status,
        http_status=http_status,
        usage=usage,
        model_served=served,
        error_class=error_class,
    )
    assert (response.ttft_ms is None) is not (answered and stream)  # a stream's only
    assert ResponseEvent.model_validate_json(wire.encode(response)) == ResponseEvent(
        event_id=response.event_id,
        request_id=call.request_id,
        ts_start=call.ts_start,
        ts_end=response.ts_end,
        provider="openai",
        endpoint="chat.completions",
        model_requested=model,
        model_served=served,
        stream=stream,
        status=status,
        http_status=http_status,
        error_class=error_class,
        usage=usage,
        latency_ms=response.latency_ms,
        ttft_ms=response.ttft_ms,
        proxy_overhead_ms=response.proxy_overhead_ms,
        attribution=attribution,
    )


def test_a_call_longer_than_the_contract_holds_is_written_as_its_longest() -> None:
    """The ingress sets no limit on a call's whole length (a stream is timed out only
    between reads): one past MAX_DURATION_MS is written at it, not as an event the
    cost stage and the store refuse (its cost, and its budgets' spend, lost)."""
    call = Call(provider="openai", endpoint="chat.completions", stream=True)
    call.t_start -= 8 * 24 * 3600  # started eight days ago, by the clock it is timed on
    call.mark_sent()
    call.mark_first_byte()
    call.mark_upstream_done()
    response = call.response_event(status="ok", http_status=200, usage=Usage())
    read = ResponseEvent.model_validate_json(wire.encode(response))
    assert read.latency_ms == read.ttft_ms == read.proxy_overhead_ms == MAX_DURATION_MS
    assert wire.decode_response(wire.encode(response)) == response
    assert response.ts_end - response.ts_start >= timedelta(days=8)  # as it happened


CATALOG = load_catalog()


@settings(max_examples=300, deadline=None)
@given(
    responses,
    st.sampled_from(["gpt-4o", "claude-3-5-sonnet", "claude-opus-5", "o3-mini", "no-such-model"]),
)
def test_the_cost_stage_writes_the_event_the_contract_would(
    response: ResponseEvent, model: str
) -> None:
    response = response.model_copy(update={"model_served": model})
    raw = response.model_dump_json().encode()
    read = wire.decode_response(raw)
    written = wire.encode(price_wire(read, CATALOG))
    assert CostedEvent.model_validate_json(written) == price(response, CATALOG)
    assert decode_costed(written) == price_wire(read, CATALOG)


def test_usage_counts_left_at_their_defaults_are_not_written() -> None:
    """A reader from before a usage field refuses it; a call that does not use it must
    read to it as before (the field left out), so a rolling upgrade loses only calls
    that use it."""
    plain = wire.usage_of(Usage(input_tokens=10, web_search_requests=2))
    assert json.loads(msgspec.json.encode(plain)) == {"input_tokens": 10, "web_search_requests": 2}
    preview = wire.usage_of(
        Usage(input_tokens=10, web_search_requests=2, web_search_preview_requests=2)
    )
    assert json.loads(msgspec.json.encode(preview))["web_search_preview_requests"] == 2
    assert Usage.model_validate_json(msgspec.json.encode(plain)) == Usage(
        input_tokens=10, web_search_requests=2
    )
    # The speed is written for a call served in fast mode only.
    fast = wire.usage_of(Usage(input_tokens=10, speed="fast"))
    assert json.loads(msgspec.json.encode(fast)) == {"input_tokens": 10, "speed": "fast"}
    assert Usage.model_validate_json(msgspec.json.encode(fast)).speed == "fast"
    # The inference geography for a call not served "global" only.
    us = wire.usage_of(Usage(input_tokens=10, inference_geo="us"))
    assert json.loads(msgspec.json.encode(us)) == {"input_tokens": 10, "inference_geo": "us"}
    assert Usage.model_validate_json(msgspec.json.encode(us)).inference_geo == "us"
    anywhere = wire.usage_of(Usage(input_tokens=10, inference_geo="global"))
    assert json.loads(msgspec.json.encode(anywhere)) == {"input_tokens": 10}
    # The service tier, for a call served at flex or priority only.
    flex = wire.usage_of(Usage(input_tokens=10, service_tier="flex"))
    assert json.loads(msgspec.json.encode(flex)) == {"input_tokens": 10, "service_tier": "flex"}
    assert Usage.model_validate_json(msgspec.json.encode(flex)).service_tier == "flex"
    advised = Usage(input_tokens=10, advisor=(AdvisorUsage(model="m", output_tokens=3),))
    written = msgspec.json.encode(wire.usage_of(advised))
    assert json.loads(written) == {
        "input_tokens": 10,
        "advisor": [{"model": "m", "output_tokens": 3}],
    }
    assert Usage.model_validate_json(written) == advised


RAW = "raw json:"  # a string set so is written as the JSON it holds (a number past float)


def mutated(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """The JSON of a sample costed event, changed by ``mutate``."""
    doc = json.loads(costed().model_dump_json())
    mutate(doc)
    return re.sub(f'"{RAW}([^"]*)"', r"\1", json.dumps(doc)).encode()


def at(path: str) -> Callable[[dict[str, Any]], tuple[dict[str, Any], str]]:
    """The dict holding the last key of a dotted ``path``, and that key."""

    def find(doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
        *parents, key = path.split(".")
        for parent in parents:
            doc = doc[parent]
        return doc, key

    return find


def without(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        holder, key = at(path)(doc)
        del holder[key]

    return mutate


def setting(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        holder, key = at(path)(doc)
        holder[key] = value

    return mutate


LATER = (datetime.now(UTC) + timedelta(hours=2)).replace(tzinfo=None)

BAD = {
    "event id missing": without("event_id"),
    "response missing": without("response"),
    "cost missing": without("cost"),
    "unpriced missing": without("unpriced"),
    "request id missing": without("response.request_id"),
    "usage missing": without("response.usage"),
    "status missing": without("response.status"),
    "latency missing": without("response.latency_ms"),
    "a cost part missing": without("cost.total"),
    "unknown top field": setting("surprise", 1),
    "unknown response field": setting("response.surprise", 1),
    "unknown usage field": setting("response.usage.surprise", 1),
    "unknown attribution field": setting("response.attribution.surprise", 1),
    "unknown cost field": setting("cost.surprise", "1"),
    "negative tokens": setting("response.usage.input_tokens", -1),
    "negative reasoning tokens": setting("response.usage.reasoning_tokens", -3),
    "http status over 999": setting("response.http_status", 1000),
    "negative latency": setting("response.latency_ms", -0.5),
    "negative ttft": setting("response.ttft_ms", -1),
    # A number past float's range reads as infinity: an infinite ttft was stored as
    # NULL, and a latency near float's largest made the rollups' sums infinite.
    "infinite latency": setting("response.latency_ms", RAW + "1e400"),
    "infinite ttft": setting("response.ttft_ms", RAW + "1e400"),
    "infinite ttft as a string": setting("response.ttft_ms", "1e400"),
    "infinite overhead": setting("response.proxy_overhead_ms", RAW + "-1e400"),
    "latency near float's largest": setting("response.latency_ms", 1.7e308),
    "ttft past a week": setting("response.ttft_ms", 604_800_001),
    "overhead past a week": setting("response.proxy_overhead_ms", 1e12),
    "unknown status": setting("response.status", "exploded"),
    "unknown speed": setting("response.usage.speed", "ludicrous"),
    "geo not a name": setting("response.usage.inference_geo", "US West"),
    "empty geo": setting("response.usage.inference_geo", ""),
    "geo not a string": setting("response.usage.inference_geo", 1),
    "tier not a name": setting("response.usage.service_tier", "Priority Tier"),
    "tier not a string": setting("response.usage.service_tier", 1),
    "wrong kind": setting("kind", "response"),
    "future schema": setting("schema_version", 2),
    "naive timestamp": setting("response.ts_end", LATER.isoformat()),
    "timestamp in another zone": setting("response.ts_start", "2026-11-29T10:00:00+02:00"),
    "not a timestamp": setting("response.ts_start", "yesterday"),
    "bad uuid": setting("event_id", "not-a-uuid"),
    "response event id null": setting("response.event_id", None),
    "usage null": setting("response.usage", None),
    "money not a number": setting("cost.total", "a lot"),
    "property value not a string": setting("response.attribution.properties", {"k": 1}),
    "tokens as a fraction": setting("response.usage.output_tokens", 1.5),
    "advisor call without its model": setting("response.usage.advisor", [{"input_tokens": 1}]),
    "unknown advisor field": setting("response.usage.advisor", [{"model": "m", "surprise": 1}]),
    "negative advisor tokens": setting(
        "response.usage.advisor", [{"model": "m", "output_tokens": -1}]
    ),
    "advisor not a list": setting("response.usage.advisor", {"model": "m"}),
    "stream not a bool": setting("response.stream", "sometimes"),
    "cost a list": setting("cost", []),
}


@pytest.mark.parametrize("mutate", BAD.values(), ids=BAD.keys())
def test_a_message_the_contract_refuses_is_refused(
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    raw = mutated(mutate)
    with pytest.raises(ValidationError):
        CostedEvent.model_validate_json(raw)
    with pytest.raises(msgspec.ValidationError):
        decode_costed(raw)


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b"\xff\xfe"])
def test_what_is_not_an_object_is_refused(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        CostedEvent.model_validate_json(raw)
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        decode_costed(raw)


LAX = {
    "tokens as a string": setting("response.usage.input_tokens", "10"),
    "latency as an int": setting("response.latency_ms", 12),
    "latency of a week": setting("response.latency_ms", 604_800_000),
    "money as a number": setting("cost.total", 0.5),
    "utc as +00:00": setting("response.ts_start", "2026-11-29T10:00:00+00:00"),
    "defaults left out": without("response.attribution"),
    # an event written before web searches were counted and priced
    "no web searches": without("response.usage.web_search_requests"),
    "no web search fee": without("cost.web_search"),
    "no preview searches": without("response.usage.web_search_preview_requests"),
    # an event written before the speed that served a call was read
    "no speed": without("response.usage.speed"),
    # an event written before where a call's inference ran was read
    "no inference geo": without("response.usage.inference_geo"),
    # an event written before the service tier that served a call was read
    "no service tier": without("response.usage.service_tier"),
    "no advisor": without("response.usage.advisor"),
    "advisor tokens left out": setting("response.usage.advisor", [{"model": "claude-opus-4-6"}]),
}


@pytest.mark.parametrize("mutate", LAX.values(), ids=LAX.keys())
def test_what_the_contract_accepts_loosely_reads_the_same(
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    reads_the_same(mutated(mutate))


# Windows: built by the windows step as structs, read by the spikes stage and the writer
# as structs, and by anyone else with the contract's model.

window_calls = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=179),  # second of the call's end
        st.sampled_from(["search", "ads", "é/ü"]),
        st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
        st.none() | st.floats(min_value=0, max_value=1e5, allow_nan=False),
        st.none() | st.decimals(min_value=0, max_value=1000, places=9, allow_nan=False),
        st.sampled_from(["ok", "upstream_error", "upstream_unreachable"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(window_calls)
def test_every_window_the_stream_writes_is_the_one_the_contract_writes(
    calls: list[tuple[int, str, float, float | None, Any, Status]],
) -> None:
    windower = Windower((60, 120), timedelta(seconds=10))
    for offset, (second, team, latency, ttft, cost, status) in enumerate(calls):
        event = call(
            timedelta(seconds=second),
            team=team,
            latency_ms=latency,
            ttft_ms=ttft,
            cost=None if cost is None else str(cost),
            status=status,
            error_class="" if status == "ok" else status,
        )
        windower.add(event, T0, offset)
    closed = windower.advance(T0 + timedelta(hours=1), [0, 2])
    assert closed
    for window in closed:
        written = wire.encode(window)
        # The very bytes the contract's model writes for the event it reads them as.
        assert WindowEvent.model_validate_json(written).model_dump_json().encode() == written
        assert wire.decode_window(written) == window


def window_doc() -> dict[str, Any]:
    windower = Windower((60,), timedelta(seconds=10))
    windower.add(call(timedelta(seconds=5), ttft_ms=40.0), T0, 0)
    [team] = [w for w in windower.advance(T0 + timedelta(hours=1), [0]) if w.dimension == "team"]
    doc: dict[str, Any] = json.loads(wire.encode(team))
    return doc


BAD_WINDOWS = {
    "zero length": ("size_s", 0),
    "unknown dimension": ("dimension", "planet"),
    "naive start": ("window_start", "2026-03-02T09:00:00"),
    "start in another zone": ("window_start", "2026-03-02T11:00:00+02:00"),
    "negative requests": ("requests", -1),
    "cost not a number": ("cost", "lots"),
    "unknown field": ("surprise", 1),
    "wrong kind": ("kind", "costed"),
    "sketch accuracy of 1": ("latency_ms.relative_accuracy", 1),
    "unknown sketch field": ("ttft_ms.surprise", 1),
    "sketch count missing": ("latency_ms.count", None),
    # A sketch's min and max are durations, its sum theirs: finite, as a call's are.
    "sketch sum infinite": ("latency_ms.sum", "inf"),
    "sketch sum not a number": ("ttft_ms.sum", "nan"),
    "sketch sum negative": ("latency_ms.sum", -1.0),
    "sketch sum near float's largest": ("latency_ms.sum", 1.7e308),
    "sketch max infinite": ("latency_ms.max", "Infinity"),
    "sketch min not a number": ("ttft_ms.min", "nan"),
    "sketch max past a week": ("latency_ms.max", 604_800_001),
}


@pytest.mark.parametrize("change", BAD_WINDOWS.values(), ids=BAD_WINDOWS.keys())
def test_a_window_the_contract_refuses_is_refused(change: tuple[str, object]) -> None:
    path, value = change
    doc = window_doc()
    WindowEvent.model_validate(doc)  # the unchanged window is a good one
    if value is None:
        without(path)(doc)
    else:
        setting(path, value)(doc)
    raw = json.dumps(doc).encode()
    with pytest.raises(ValidationError):
        WindowEvent.model_validate_json(raw)
    with pytest.raises(msgspec.ValidationError):
        wire.decode_window(raw)


@settings(max_examples=300, deadline=None)
@given(st.uuids(), st.text(), st.lists(st.text(), min_size=1, max_size=4))
def test_derived_ids_are_uuid5_of_their_names(
    source: uuid.UUID, stage: str, parts: list[str]
) -> None:
    assert derived_id(source, stage) == uuid.uuid5(_DERIVED_NS, f"{stage}:{source}")
    assert stable_id(*parts) == uuid.uuid5(_DERIVED_NS, "\x1f".join(parts))
