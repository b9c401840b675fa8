"""Usage capture from OpenAI and Anthropic bodies and SSE streams: pure, no network."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ingress.forward.capture import (
    HOLD_BYTES,
    TAIL_READ_BYTES,
    AnthropicJsonCapture,
    AnthropicStreamCapture,
    FirstEvent,
    OpenAIJsonCapture,
    OpenAIStreamCapture,
    chat_output,
)
from ingress.forward.usage import anthropic_usage, by_preview, openai_usage
from llmtap.events import Usage
from tests.fake_provider import AZURE_FIRST_CHUNK

SERVED = "gpt-4o-mini-2024-07-18"

USAGE = {
    "prompt_tokens": 1200,
    "completion_tokens": 300,
    "total_tokens": 1500,
    "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 128,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
EXPECTED = Usage(
    input_tokens=1200, output_tokens=300, cached_input_tokens=1024, reasoning_tokens=128
)


# -- JSON bodies --------------------------------------------------------------------------


def _completion(**extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": SERVED,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi"},
                "finish_reason": "stop",
            }
        ],
    }
    body.update(extra)
    return orjson.dumps(body)


def test_json_usage_is_normalised_with_cached_and_reasoning_tokens() -> None:
    capture = OpenAIJsonCapture(_completion(usage=USAGE))
    assert capture.usage == EXPECTED
    assert capture.usage.usage_missing is False
    assert capture.model == SERVED


def test_json_usage_without_details() -> None:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    capture = OpenAIJsonCapture(_completion(usage=usage))
    assert capture.usage == Usage(input_tokens=7, output_tokens=3)


def test_json_responses_api_usage_is_normalised() -> None:
    usage = {
        "input_tokens": 50,
        "input_tokens_details": {"cached_tokens": 20},
        "output_tokens": 40,
        "output_tokens_details": {"reasoning_tokens": 30},
        "total_tokens": 90,
    }
    body = orjson.dumps({"object": "response", "model": "o3-mini", "usage": usage})
    capture = OpenAIJsonCapture(body)
    assert capture.usage == Usage(
        input_tokens=50, output_tokens=40, cached_input_tokens=20, reasoning_tokens=30
    )
    assert capture.model == "o3-mini"


@pytest.mark.parametrize(
    ("usage", "output"),
    [
        # xAI's (Grok): reasoning counted apart from completion_tokens, in total_tokens
        (
            {
                "prompt_tokens": 10120,
                "completion_tokens": 1499,
                "total_tokens": 14428,
                "prompt_tokens_details": {"cached_tokens": 128},
                "completion_tokens_details": {"reasoning_tokens": 2809},
            },
            1499 + 2809,
        ),
        # a thinking answer with no visible text (no total_tokens said)
        (
            {
                "prompt_tokens": 21,
                "completion_tokens": 0,
                "completion_tokens_details": {"reasoning_tokens": 60},
            },
            60,
        ),
    ],
)
def test_reasoning_reported_apart_from_the_completion_is_output(
    usage: dict[str, Any], output: int
) -> None:
    """OpenAI-compatible providers that count reasoning tokens outside
    ``completion_tokens`` (xAI: "counted separately from completion_tokens, but counted
    in the total_tokens") bill them as output all the same: they are output tokens,
    never cut down to the completion's count."""
    capture = OpenAIJsonCapture(_completion(usage=usage))
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert (capture.usage.output_tokens, capture.usage.reasoning_tokens) == (output, reasoning)
    stream = OpenAIStreamCapture(strip_usage_chunk=True)
    chunk = {"model": "grok-4", "choices": [], "usage": usage}
    stream.feed(b"data: " + orjson.dumps(chunk) + b"\n\n")
    assert stream.final_usage == capture.usage


def test_json_body_without_usage_is_usage_missing() -> None:
    capture = OpenAIJsonCapture(_completion())
    assert capture.usage.usage_missing is True
    assert capture.model == SERVED


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None},
        {"prompt_tokens_details": {"cached_tokens": 0}},
    ],
)
def test_a_usage_without_any_count_is_usage_missing(usage: dict[str, Any]) -> None:
    """A usage object that counts nothing (empty, its counts null) says no usage: it is
    unknown, not zero tokens, and a stream's text is counted as when none came."""
    assert openai_usage(usage) is None
    assert OpenAIJsonCapture(_completion(usage=usage)).usage.usage_missing is True
    stream = OpenAIStreamCapture(strip_usage_chunk=False)
    stream.feed(b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n')
    stream.feed(b"data: " + orjson.dumps({"model": "m", "choices": [], "usage": usage}) + b"\n\n")
    assert stream.final_usage.usage_missing is True
    assert stream.output_uncounted is True


# An Anthropic stream's text: "Hi".
ANTHROPIC_HI = {"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": "Hi"}}  # fmt: skip


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"input_tokens": None, "output_tokens": None},
        {"input_tokens": None, "cache_creation": {}, "service_tier": "standard"},
    ],
)
def test_an_anthropic_usage_without_any_count_is_usage_missing(usage: dict[str, Any]) -> None:
    """As OpenAI's: an Anthropic usage that counts nothing is unknown, not zero tokens
    (it was billed $0), in a body or a stream (whose output is then counted)."""
    assert anthropic_usage(usage) is None
    assert AnthropicJsonCapture(_message(usage)).usage.usage_missing is True
    stream = AnthropicStreamCapture()
    start = {"type": "message_start", "message": {"model": ANTHROPIC_MODEL, "usage": usage}}
    for event in (start, ANTHROPIC_HI, {"type": "message_delta", "usage": usage}):
        stream.feed(b"data: " + orjson.dumps(event) + b"\n\n")
    assert stream.final_usage.usage_missing is True
    assert stream.output_uncounted is True


def test_an_anthropic_advisor_call_without_counts_is_kept_at_zero() -> None:
    """An advisor iteration that counts nothing does not make the call's usage missing
    (its own counts are told): the advisor's call is kept, its tokens zero."""
    usage = anthropic_usage(
        {"input_tokens": 5, "output_tokens": 2, "iterations": [{"type": "advisor_message",
                                                                "model": "claude-opus-4-1"}]}
    )  # fmt: skip
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens) == (5, 2)
    assert [(a.model, a.input_tokens, a.output_tokens) for a in usage.advisor] == [
        ("claude-opus-4-1", 0, 0)
    ]


@pytest.mark.parametrize(
    "delta",
    [
        {},
        {"input_tokens": None, "cache_read_input_tokens": None},
        {"output_tokens": None},
        {"input_tokens": None, "output_tokens": None, "server_tool_use": None},
    ],
)
def test_an_anthropic_delta_that_counts_nothing_keeps_message_start_s_counts(
    delta: dict[str, Any],
) -> None:
    """A message_delta whose usage counts nothing (empty, or its counts null, as
    Anthropic's optional input counts are) wipes none of message_start's counts, nor
    ends the output's count: the output streamed is counted as when no delta came."""
    stream = AnthropicStreamCapture()
    start = {"type": "message_start", "message": {"model": ANTHROPIC_MODEL,
             "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}}  # fmt: skip
    for event in (start, ANTHROPIC_HI, {"type": "message_delta", "usage": delta}):
        stream.feed(b"data: " + orjson.dumps(event) + b"\n\n")
    assert stream.final_usage == ANTHROPIC_EXPECTED.model_copy(update={"output_tokens": 1})
    assert stream.output_uncounted is True
    final = {"type": "message_delta", "usage": {**delta, "output_tokens": 800}}
    stream.feed(b"data: " + orjson.dumps(final) + b"\n\n")
    assert stream.final_usage == ANTHROPIC_EXPECTED
    assert stream.output_uncounted is False


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"<html>502 Bad Gateway</html>", b"[1, 2]", b'"usage"', b"\xff\xfe"],
)
def test_non_json_body_is_usage_missing(body: bytes) -> None:
    capture = OpenAIJsonCapture(body)
    assert capture.usage.usage_missing is True
    assert capture.model == ""


# -- SSE streams --------------------------------------------------------------------------


def _chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": SERVED,
        "system_fingerprint": "fp_1",
        "choices": choices,
        "usage": usage,
    }


@pytest.mark.parametrize(
    ("chunk", "unasked"),
    [
        (b'{"id":"c","choices":[],"usage":null}', b'{"id":"c","choices":[]}'),
        (b'{"usage":null,"id":"c"}', b'{"id":"c"}'),  # first in its object
        (b'{"id":"c", "usage": null }', b'{"id":"c" }'),  # spaced JSON (vLLM, others)
        (b'{"id":"c","usage":null,"x":1}', b'{"id":"c","x":1}'),
        # What a model wrote is never touched: its quotes are escaped.
        (b'{"t":"\\"usage\\":null,","usage":null}', b'{"t":"\\"usage\\":null,"}'),
        (
            b'{"id":"c","choices":[{"index":0}],"usage":{"prompt_tokens":1}}',
            b'{"id":"c","choices":[{"index":0}],"usage":{"prompt_tokens":1}}',
        ),
    ],
)
def test_the_usage_null_asking_adds_to_each_chunk_is_taken_out(
    chunk: bytes, unasked: bytes
) -> None:
    capture = OpenAIStreamCapture(strip_usage_chunk=True)
    assert capture.feed(b"data: " + chunk + b"\n\n") == b"data: " + unasked + b"\n\n"


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _event(payload: dict[str, Any] | str, sep: bytes) -> bytes:
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + sep


def _stream(sep: bytes) -> tuple[bytes, bytes]:
    """A realistic chat stream with a usage-only chunk; returns (stream, usage event)."""
    before = [
        _event(_chunk([_delta({"role": "assistant", "content": ""})]), sep),
        _event(_chunk([_delta({"content": "Héllo"})]), sep),  # multi-byte UTF-8
        _event(_chunk([_delta({"content": ", wörld 🌍"})]), sep),
        _event(_chunk([_delta({}, finish="stop")]), sep),
    ]
    usage_event = _event(_chunk([], USAGE), sep)
    done = _event("[DONE]", sep)
    return b"".join([*before, usage_event, done]), usage_event


def _whole(data: bytes) -> Iterator[list[bytes]]:
    yield [data]


def _two_pieces(data: bytes) -> Iterator[list[bytes]]:
    for i in range(len(data) + 1):
        yield [data[:i], data[i:]]


def _byte_by_byte(data: bytes) -> Iterator[list[bytes]]:
    yield [data[i : i + 1] for i in range(len(data))]


def _random_pieces(data: bytes) -> Iterator[list[bytes]]:
    rng = random.Random(1234)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 12)))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


SPLITS = [_whole, _two_pieces, _byte_by_byte, _random_pieces]
SEPARATORS = [
    pytest.param(b"\n\n", id="LF"),
    pytest.param(b"\r\n\r\n", id="CRLF"),
    pytest.param(b"\r\r", id="CR"),
    # SSE lets a stream mix its line ends: a line's end, then an empty line's
    pytest.param(b"\n\r\n", id="LF+CRLF"),
    pytest.param(b"\r\n\n", id="CRLF+LF"),
    pytest.param(b"\n\r", id="LF+CR"),
]


def _run(capture: OpenAIStreamCapture, pieces: list[bytes], sep: bytes) -> bytes:
    out = []
    for piece in pieces:
        forwarded = capture.feed(piece)
        # only whole events go out, never a partial one
        assert forwarded == b"" or forwarded.endswith(sep)
        out.append(forwarded)
    out.append(capture.finish())
    return b"".join(out)


@pytest.mark.parametrize("sep", SEPARATORS)
@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("strip", [False, True], ids=["keep", "strip"])
def test_stream_is_forwarded_byte_for_byte_and_usage_captured(
    sep: bytes, split: Any, strip: bool
) -> None:
    stream, usage_event = _stream(sep)
    # Stripped, the client gets what it would have without asking for usage: no usage
    # chunk, and no "usage":null in the others (OpenAI adds both when asked).
    unasked = stream.replace(usage_event, b"").replace(b',"usage":null', b"")
    expected = unasked if strip else stream
    assert b'"usage"' not in unasked and len(unasked) < len(stream) - len(usage_event)
    for pieces in split(stream):
        capture = OpenAIStreamCapture(strip_usage_chunk=strip)
        assert _run(capture, pieces, sep) == expected, [len(p) for p in pieces]
        assert capture.final_usage == EXPECTED
        assert capture.model == SERVED


@pytest.mark.parametrize("sep", SEPARATORS)
@pytest.mark.parametrize("split", SPLITS, ids=lambda f: f.__name__.strip("_"))
def test_reads_held_and_read_after_capture_what_reads_fed_as_they_come(
    sep: bytes, split: Any
) -> None:
    """A verbatim stream's reads go out first and are held (StreamCapture.hold), read
    at the end: the same usage, model and text as feeding each read at once."""
    stream, _ = _stream(sep)
    for pieces in split(stream):
        fed, held = (OpenAIStreamCapture(strip_usage_chunk=False) for _ in range(2))
        assert fed.verbatim and held.verbatim
        for piece in pieces:
            fed.feed(piece)
            held.hold(piece)
        assert held.model == ""  # nothing read yet
        fed.finish()
        held.finish()
        assert (held.final_usage, held.model, held.streamed_text()) == (
            fed.final_usage,
            fed.model,
            fed.streamed_text(),
        )
    assert not OpenAIStreamCapture(strip_usage_chunk=True).verbatim


def test_a_long_held_stream_is_read_as_it_goes() -> None:
    """Held reads are read once HOLD_BYTES wait, so a long stream is not all in memory."""
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    event = _event(_chunk([_delta({"content": "x" * 1000})]), b"\n\n")
    for _ in range(HOLD_BYTES // len(event) + 1):
        capture.hold(event)
    assert capture.model == SERVED  # read before the end
    assert capture._held_bytes <= HOLD_BYTES


# Lines of LF-only SSE events: content and usage-only chunks, [DONE], JSON that is not
# an object, broken JSON, comments, other fields, and blank lines (runs of them).
_LINES = st.sampled_from(
    [
        b"data: " + orjson.dumps(_chunk([_delta({"content": "a"})])),
        b"data: " + orjson.dumps(_chunk([], {"prompt_tokens": 3, "completion_tokens": 1})),
        b"data: [DONE]",
        b"data: [1, 2]",
        b"data:{",
        b": keep-alive",
        b"event: ping",
        b"",
    ]
)
_EVENTS = st.lists(st.lists(_LINES, min_size=1, max_size=3), max_size=8)


@given(_EVENTS, st.lists(st.integers(min_value=0, max_value=2_000), max_size=6), st.booleans())
def test_the_lf_fast_path_splits_and_judges_events_as_the_general_path(
    events: list[list[bytes]], cuts: list[int], strip: bool
) -> None:
    stream = b"".join(b"\n".join(lines) + b"\n\n" for lines in events)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    fast = OpenAIStreamCapture(strip_usage_chunk=strip)
    general = OpenAIStreamCapture(strip_usage_chunk=strip)
    for piece in pieces:
        assert fast.feed(piece) == general._feed_any(general._pending + piece)
    assert fast.finish() == general.finish()
    assert (fast.final_usage, fast.model, fast.streamed_text()) == (
        general.final_usage,
        general.model,
        general.streamed_text(),
    )


_LINE_ENDS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(
    st.lists(st.tuples(_LINES, _LINE_ENDS), max_size=24),
    st.lists(st.integers(min_value=0, max_value=2_000), max_size=6),
    st.booleans(),
)
def test_reads_held_and_read_as_one_buffer_are_read_as_they_came(
    lines: list[tuple[bytes, bytes]], cuts: list[int], strip: bool
) -> None:
    """catch_up reads a stream's held reads as one buffer: the same events, judged the
    same, as feeding the reads one by one, whatever their line ends (CR, LF and CRLF
    mixed, a CRLF cut between two reads)."""
    stream = b"".join(line + end for line, end in lines)
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    by_read = OpenAIStreamCapture(strip_usage_chunk=strip)
    for piece in pieces:
        by_read.feed(piece)
    by_read.finish()
    held = OpenAIStreamCapture(strip_usage_chunk=strip)
    held._held = list(pieces)  # as hold() keeps them (forwarded already), read at the end
    held.finish()
    assert (held.final_usage, held.model, held.streamed_text(), held.error) == (
        by_read.final_usage,
        by_read.model,
        by_read.streamed_text(),
        by_read.error,
    )


@pytest.mark.parametrize("sep", SEPARATORS)
def test_an_event_whose_data_spans_lines_is_read_as_their_join(sep: bytes) -> None:
    line_end = sep[: len(sep) // 2]
    event = line_end.join(
        [
            b'data: {"id": "c", "model": "m", "choices": [],',
            b'data: "usage": {"prompt_tokens": 3, "completion_tokens": 1}}',
        ]
    )
    capture = OpenAIStreamCapture(strip_usage_chunk=True)
    # the usage-only chunk, held back (a stream's last CR may start a CRLF: it is read
    # at the end)
    assert capture.feed(event + sep) + capture.finish() == b""
    assert (capture.final_usage.input_tokens, capture.final_usage.output_tokens) == (3, 1)


def test_crlf_events_are_split_one_by_one() -> None:
    stream, _ = _stream(b"\r\n\r\n")
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    first = _event(_chunk([_delta({"role": "assistant", "content": ""})]), b"\r\n\r\n")
    # a whole first event and half of the second: only the first goes out
    assert capture.feed(stream[: len(first) + 10]) == first
    assert capture.feed(stream[len(first) + 10 :]) == stream[len(first) :]
    assert capture.finish() == b""
    assert capture.final_usage == EXPECTED


@pytest.mark.parametrize("strip", [False, True])
def test_stream_without_usage_chunk_is_usage_missing(strip: bool) -> None:
    sep = b"\n\n"
    # "usage": null on every chunk, as with stream_options.include_usage before the end
    stream = b"".join(
        [
            _event(_chunk([_delta({"role": "assistant", "content": ""})]), sep),
            _event(_chunk([_delta({"content": "Hi"})]), sep),
            _event(_chunk([_delta({}, finish="stop")]), sep),
            _event("[DONE]", sep),
        ]
    )
    capture = OpenAIStreamCapture(strip_usage_chunk=strip)
    unasked = stream.replace(b',"usage":null', b"") if strip else stream
    assert capture.feed(stream) + capture.finish() == unasked
    assert capture.usage is None
    assert capture.final_usage.usage_missing is True
    assert capture.model == SERVED


def test_empty_stream_is_usage_missing() -> None:
    capture = OpenAIStreamCapture(strip_usage_chunk=True)
    assert capture.feed(b"") == b""
    assert capture.finish() == b""
    assert capture.final_usage.usage_missing is True


def test_last_event_without_trailing_blank_line_is_returned_by_finish() -> None:
    stream, _ = _stream(b"\n\n")
    unterminated = b"data: [DONE]"
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    truncated = stream.removesuffix(b"\n\n")
    assert truncated.endswith(unterminated)
    forwarded = capture.feed(truncated)
    assert forwarded == truncated.removesuffix(unterminated)
    assert capture.finish() == unterminated
    assert capture.finish() == b""  # nothing left twice
    assert capture.final_usage == EXPECTED


@pytest.mark.parametrize("strip", [False, True])
def test_unterminated_last_event_carrying_usage(strip: bool) -> None:
    content = _event(_chunk([_delta({"content": "Hi"})]), b"\n\n")
    last = _event(_chunk([], USAGE), b"\n")  # a single newline: not an event end
    capture = OpenAIStreamCapture(strip_usage_chunk=strip)
    unasked = content.replace(b',"usage":null', b"")
    assert capture.feed(content + last) == (unasked if strip else content)
    assert capture.finish() == (b"" if strip else last)
    assert capture.final_usage == EXPECTED


@pytest.mark.parametrize("strip", [False, True])
def test_usage_on_a_chunk_with_choices_is_forwarded_and_captured(strip: bool) -> None:
    sep = b"\n\n"
    stream = b"".join(
        [
            _event(_chunk([_delta({"role": "assistant", "content": "Hi"})]), sep),
            _event(_chunk([_delta({}, finish="stop")], USAGE), sep),  # usage on the last
            _event("[DONE]", sep),
        ]
    )
    capture = OpenAIStreamCapture(strip_usage_chunk=strip)
    # Usage on a chunk with choices goes out (it is not a chunk of its own to hold back).
    unasked = stream.replace(b',"usage":null', b"") if strip else stream
    assert capture.feed(stream) + capture.finish() == unasked
    assert capture.final_usage == EXPECTED


def test_responses_api_stream_usage_is_captured_and_forwarded() -> None:
    sep = b"\n\n"
    created = {"type": "response.created", "response": {"model": "o3-mini", "usage": None}}
    completed = {
        "type": "response.completed",
        "response": {
            "model": "o3-mini-2025-01-31",
            "usage": {
                "input_tokens": 10,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 50,
                "output_tokens_details": {"reasoning_tokens": 40},
            },
        },
    }
    stream = b"".join(
        [
            b"event: response.created\n" + _event(created, sep),
            b"event: response.output_text.delta\n"
            + _event({"type": "response.output_text.delta", "delta": "Hi"}, sep),
            b"event: response.completed\n" + _event(completed, sep),
        ]
    )
    # The proxy asks the Responses API for nothing: its stream goes out as it came.
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    assert capture.feed(stream) + capture.finish() == stream
    assert capture.final_usage == Usage(input_tokens=10, output_tokens=50, reasoning_tokens=40)
    assert capture.model == "o3-mini-2025-01-31"


def test_non_json_and_comment_events_are_forwarded() -> None:
    sep = b"\n\n"
    stream = b": keep-alive" + sep + b"data: {not json" + sep + _event("[DONE]", sep)
    capture = OpenAIStreamCapture(strip_usage_chunk=True)
    assert capture.feed(stream) + capture.finish() == stream
    assert capture.final_usage.usage_missing is True


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"])
def test_a_byte_order_mark_opening_a_stream_hides_none_of_its_first_event(sep: bytes) -> None:
    """The SSE spec strips a leading UTF-8 BOM: the first event is read (Anthropic's
    message_start holds the input's counts and the model), and forwarded as it came."""
    events = [
        {"type": "message_start", "message": {"model": ANTHROPIC_MODEL,
         "usage": {**ANTHROPIC_USAGE, "output_tokens": 1}}},
        {"type": "message_delta", "usage": {"output_tokens": 800}},
    ]  # fmt: skip
    stream = b"\xef\xbb\xbf" + b"".join(_event(event, sep) for event in events)
    capture = AnthropicStreamCapture()
    assert capture.feed(stream[:2]) + capture.feed(stream[2:]) + capture.finish() == stream
    assert capture.final_usage == ANTHROPIC_EXPECTED
    assert capture.model == ANTHROPIC_MODEL


@pytest.mark.parametrize("done", [b"data:[DONE]", b"data: [DONE] ", b"data: [DONE]\t"])
def test_done_without_its_space_or_with_trailing_whitespace_ends_the_stream(done: bytes) -> None:
    """The space after "data:" is optional (the SSE spec strips one); some servers send
    [DONE] with whitespace after it, which the openai SDK takes as the end too."""
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    capture.feed(_event(_chunk([_delta({"content": "Hi"})]), b"\n\n"))
    assert not capture.ended
    capture.feed(done + b"\n\n")
    assert capture.ended


@pytest.mark.parametrize("usage", [USAGE, {}, {"prompt_tokens": None, "completion_tokens": None}])
@pytest.mark.parametrize("choices", [{"choices": []}, {"choices": None}, {}])
def test_a_usage_chunk_with_choices_null_or_absent_is_held_back(
    choices: dict[str, Any], usage: dict[str, Any]
) -> None:
    """Some OpenAI-compatible servers send the usage chunk llmtap asked for with
    "choices" null or absent, not []: it is llmtap's all the same, not the client's; so
    is one whose usage counts nothing (usage_missing: it went out once such a usage was
    no longer read as zero tokens). An error chunk carrying usage still goes out."""
    sep = b"\n\n"
    content = _event(_chunk([_delta({"content": "Hi"})]), sep)
    usage_only = _event({"id": "c", "model": SERVED, **choices, "usage": usage}, sep)
    capture = OpenAIStreamCapture(strip_usage_chunk=True)
    assert capture.feed(content + usage_only) + capture.finish() == content.replace(
        b',"usage":null', b""
    )
    if usage is USAGE:
        assert capture.final_usage == EXPECTED
    else:  # unknown, and the output counted from the text
        assert capture.final_usage.usage_missing and capture.output_uncounted
    failed = _event({"error": {"type": "server_error"}, **choices, "usage": USAGE}, sep)
    capture = OpenAIStreamCapture(strip_usage_chunk=True)
    assert capture.feed(failed) + capture.finish() == failed
    unasked = OpenAIStreamCapture(strip_usage_chunk=False)
    assert unasked.feed(usage_only) + unasked.finish() == usage_only


# -- Anthropic: cache writes by lifetime ---------------------------------------------------

ANTHROPIC_MODEL = "claude-sonnet-4-5-20250929"
# Anthropic's input_tokens excludes cache reads and writes; cache_creation splits the
# writes by lifetime (5 minutes, 1 hour).
ANTHROPIC_USAGE = {
    "input_tokens": 1000,
    "cache_creation_input_tokens": 5000,
    "cache_read_input_tokens": 20000,
    "cache_creation": {"ephemeral_5m_input_tokens": 3000, "ephemeral_1h_input_tokens": 2000},
    "output_tokens": 800,
    "service_tier": "standard",
}
ANTHROPIC_EXPECTED = Usage(
    input_tokens=26000,  # 1000 + 20000 read + 5000 written
    output_tokens=800,
    cached_input_tokens=20000,
    cache_creation_input_tokens=5000,
    cache_creation_1h_input_tokens=2000,
)


def _message(usage: dict[str, Any] | None) -> bytes:
    return orjson.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": "end_turn",
            "usage": usage,
        }
    )


def test_anthropic_json_usage_keeps_the_one_hour_cache_writes() -> None:
    capture = AnthropicJsonCapture(_message(ANTHROPIC_USAGE))
    assert capture.usage == ANTHROPIC_EXPECTED
    assert capture.model == ANTHROPIC_MODEL


def test_anthropic_usage_without_the_split_has_no_one_hour_writes() -> None:
    usage = {k: v for k, v in ANTHROPIC_USAGE.items() if k != "cache_creation"}
    assert anthropic_usage(usage) == ANTHROPIC_EXPECTED.model_copy(
        update={"cache_creation_1h_input_tokens": 0}
    )


def test_anthropic_usage_with_only_the_split_counts_its_sum_as_writes() -> None:
    usage = {k: v for k, v in ANTHROPIC_USAGE.items() if k != "cache_creation_input_tokens"}
    assert anthropic_usage(usage) == ANTHROPIC_EXPECTED


@pytest.mark.parametrize(
    ("split", "one_hour"),
    [
        ({"ephemeral_5m_input_tokens": 5000, "ephemeral_1h_input_tokens": 0}, 0),
        ({"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 5000}, 5000),
        ({"ephemeral_1h_input_tokens": 9999}, 5000),  # never more than the writes
        ({"ephemeral_1h_input_tokens": "2000"}, 0),
        (None, 0),
        ([1, 2], 0),
    ],
)
def test_anthropic_one_hour_writes_are_a_subset_of_the_writes(split: Any, one_hour: int) -> None:
    usage = {**ANTHROPIC_USAGE, "cache_creation": split}
    captured = anthropic_usage(usage)
    assert captured is not None
    assert captured.cache_creation_input_tokens == 5000
    assert captured.cache_creation_1h_input_tokens == one_hour


def _anthropic_stream(final_usage: dict[str, Any], **started: Any) -> bytes:
    start_usage = {**ANTHROPIC_USAGE, "output_tokens": 1, **started}
    events: list[tuple[str, dict[str, Any]]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_1",
                    "type": "message",
                    "role": "assistant",
                    "model": ANTHROPIC_MODEL,
                    "content": [],
                    "usage": start_usage,
                },
            },
        ),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"text": "Hi"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": final_usage},
        ),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(
        b"event: " + name.encode() + b"\n" + _event(data, b"\n\n") for name, data in events
    )


@pytest.mark.parametrize(
    "final_usage",
    [
        pytest.param({"output_tokens": 800}, id="delta-with-output-only"),
        pytest.param(ANTHROPIC_USAGE, id="delta-with-cumulative-usage"),
    ],
)
def test_anthropic_stream_keeps_the_one_hour_cache_writes(final_usage: dict[str, Any]) -> None:
    stream = _anthropic_stream(final_usage)
    for pieces in _random_pieces(stream):
        capture = AnthropicStreamCapture()
        forwarded = b"".join(capture.feed(piece) for piece in pieces) + capture.finish()
        assert forwarded == stream
        assert capture.final_usage == ANTHROPIC_EXPECTED
        assert capture.model == ANTHROPIC_MODEL


def test_deepseek_cache_hits_are_cached_input() -> None:
    usage = openai_usage(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 20,
            "prompt_cache_hit_tokens": 640,
            "prompt_cache_miss_tokens": 360,
        }
    )
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens) == (1000, 640)


@pytest.mark.parametrize(
    ("capture", "event", "error"),
    [
        (  # Anthropic, overloaded mid-answer
            AnthropicStreamCapture,
            b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error"}}',
            "overloaded_error",
        ),
        (  # an OpenAI-compatible provider's chunk holding only an error
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            b'data: {"error":{"message":"boom","type":"server_error","code":null}}',
            "server_error",
        ),
        (  # the Responses API
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            b'event: response.failed\ndata: {"type":"response.failed","response":'
            b'{"status":"failed","error":{"code":"server_error","message":"x"}}}',
            "server_error",
        ),
        (
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            b'event: error\ndata: {"type":"error","code":"rate_limit_exceeded","message":"x"}',
            "rate_limit_exceeded",
        ),
        (  # a model that writes "error" has not failed
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"error"}}]}',
            "",
        ),
    ],
)
def test_a_stream_s_error_event_is_the_provider_s_error(
    capture: Any, event: bytes, error: str
) -> None:
    reading = capture()
    reading.feed(b'data: {"model":"m","type":"ping"}\n\n')  # the model known: the hot path
    assert reading.feed(event + b"\n\n") == event + b"\n\n"  # forwarded as it came
    assert reading.error == error


# Web searches a provider ran, each billed on top of the tokens.


def test_anthropic_searches_are_counted_from_server_tool_use() -> None:
    usage = {**ANTHROPIC_USAGE, "server_tool_use": {"web_search_requests": 3}}
    assert AnthropicJsonCapture(_message(usage)).usage == ANTHROPIC_EXPECTED.model_copy(
        update={"web_search_requests": 3}
    )
    for odd in ({"web_search_requests": "3"}, {"web_fetch_requests": 2}, None, [3]):
        captured = anthropic_usage({**ANTHROPIC_USAGE, "server_tool_use": odd})
        assert captured is not None and captured.web_search_requests == 0


def test_anthropic_stream_counts_the_searches_its_last_delta_reports() -> None:
    # As Anthropic streams a call that searched: message_start has no server_tool_use,
    # the final message_delta's cumulative usage has it.
    final = {**ANTHROPIC_USAGE, "server_tool_use": {"web_search_requests": 2}}
    stream = _anthropic_stream(final)
    for pieces in _random_pieces(stream):
        capture = AnthropicStreamCapture()
        forwarded = b"".join(capture.feed(piece) for piece in pieces) + capture.finish()
        assert forwarded == stream
        assert capture.final_usage == ANTHROPIC_EXPECTED.model_copy(
            update={"web_search_requests": 2}
        )


# The speed that served the call: Anthropic's fast mode is billed at a premium.


def test_anthropic_usage_says_which_speed_served_the_call() -> None:
    fast = {**ANTHROPIC_USAGE, "speed": "fast"}
    assert AnthropicJsonCapture(_message(fast)).usage == ANTHROPIC_EXPECTED.model_copy(
        update={"speed": "fast"}
    )
    # Asked for fast mode and served at standard speed (Opus 4.6), said or not.
    for odd in ("standard", None, "FAST", "turbo", 1):
        captured = anthropic_usage({**ANTHROPIC_USAGE, "speed": odd})
        assert captured is not None and captured.speed == "standard"


def test_anthropic_stream_keeps_the_speed_its_message_start_reports() -> None:
    # Anthropic's message_start carries the message's usage, speed included; the
    # message_delta's usage after it does not repeat it.
    stream = _anthropic_stream({"output_tokens": 800}, speed="fast")
    for pieces in _random_pieces(stream):
        capture = AnthropicStreamCapture()
        forwarded = b"".join(capture.feed(piece) for piece in pieces) + capture.finish()
        assert forwarded == stream
        assert capture.final_usage == ANTHROPIC_EXPECTED.model_copy(update={"speed": "fast"})


# Where the call's inference ran: Anthropic bills US-only inference at a premium.


def test_anthropic_usage_says_where_the_call_s_inference_ran() -> None:
    us = {**ANTHROPIC_USAGE, "inference_geo": "us"}
    assert AnthropicJsonCapture(_message(us)).usage == ANTHROPIC_EXPECTED.model_copy(
        update={"inference_geo": "us"}
    )
    # A geography the catalog may not know is kept as told, so it is not priced as global.
    for told, kept in (("eu", "eu"), ("US", "us"), (" us ", "us"), ("ap-south", "ap-south")):
        captured = anthropic_usage({**ANTHROPIC_USAGE, "inference_geo": told})
        assert captured is not None and captured.inference_geo == kept
    # None told, or none that can be: billed as global is.
    for odd in ("global", "not_available", None, "", "US West", "a" * 40, 1, ["us"]):
        captured = anthropic_usage({**ANTHROPIC_USAGE, "inference_geo": odd})
        assert captured is not None and captured.inference_geo == "global"
    assert ANTHROPIC_EXPECTED.inference_geo == "global"


def test_anthropic_stream_keeps_the_geo_its_message_start_reports() -> None:
    # message_start's usage says where the inference ran; message_delta's does not
    # repeat it (the SDK's MessageDeltaUsage has no inference_geo).
    stream = _anthropic_stream({"output_tokens": 800}, inference_geo="us")
    for pieces in _random_pieces(stream):
        capture = AnthropicStreamCapture()
        forwarded = b"".join(capture.feed(piece) for piece in pieces) + capture.finish()
        assert forwarded == stream
        usage = capture.final_usage
        assert usage is not None and usage.inference_geo == "us"
        assert usage == ANTHROPIC_EXPECTED.model_copy(update={"inference_geo": "us"})


RESPONSES_USAGE = {"input_tokens": 9000, "output_tokens": 300}
SEARCH_ITEMS = [
    {"type": "web_search_call", "id": "ws_1", "status": "completed",
     "action": {"type": "search", "query": "llm gateways"}},
    {"type": "web_search_call", "id": "ws_2", "status": "completed",
     "action": {"type": "open_page", "url": "https://example.com"}},  # not a search
    {"type": "web_search_call", "id": "ws_3", "status": "completed"},  # no action: a search
    {"type": "web_search_call", "id": "ws_4", "status": "completed",
     "action": {"type": "find_in_page", "pattern": "x"}},  # not a search
    {"type": "message", "id": "msg_1", "role": "assistant",
     "content": [{"type": "output_text", "text": "web_search_call"}]},
]  # fmt: skip


def test_responses_api_searches_are_its_search_items() -> None:
    body = orjson.dumps(
        {"object": "response", "model": "gpt-5", "output": SEARCH_ITEMS, "usage": RESPONSES_USAGE}
    )
    assert OpenAIJsonCapture(body).usage == Usage(
        input_tokens=9000, output_tokens=300, web_search_requests=2
    )
    body = orjson.dumps({"object": "response", "model": "gpt-5", "usage": RESPONSES_USAGE})
    assert OpenAIJsonCapture(body).usage.web_search_requests == 0


def test_responses_api_stream_counts_the_searches_of_its_completed_response() -> None:
    completed = {
        "type": "response.completed",
        "response": {"model": "gpt-5", "output": SEARCH_ITEMS, "usage": RESPONSES_USAGE},
    }
    stream = b"event: response.completed\n" + _event(completed, b"\n\n")
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    assert capture.feed(stream) + capture.finish() == stream
    assert capture.final_usage == Usage(input_tokens=9000, output_tokens=300, web_search_requests=2)


def test_responses_api_stream_whose_final_output_is_empty_counts_the_searches_streamed() -> None:
    # Some upstreams stream the items and leave the completed response's output empty.
    created: dict[str, Any] = {
        "type": "response.created",
        "response": {"model": "gpt-5", "usage": None},
    }
    items: list[dict[str, Any]] = [
        {"type": "response.output_item.done", "output_index": i, "item": item}
        for i, item in enumerate(SEARCH_ITEMS)
    ]
    completed: dict[str, Any] = {
        "type": "response.completed",
        "response": {"model": "gpt-5", "output": [], "usage": RESPONSES_USAGE},
    }
    stream = b"".join(_event(e, b"\n\n") for e in [created, *items, completed])
    for pieces in _random_pieces(stream):
        capture = OpenAIStreamCapture(strip_usage_chunk=False)
        forwarded = b"".join(capture.feed(piece) for piece in pieces) + capture.finish()
        assert forwarded == stream
        assert capture.final_usage.web_search_requests == 2


def test_responses_api_stream_cut_short_keeps_the_searches_it_ran() -> None:
    """A stream that ends before its response completed (the client or the provider went
    away): its usage is unknown, but the searches streamed were run, and billed."""
    items = [
        {"type": "response.output_item.done", "output_index": i, "item": item}
        for i, item in enumerate(SEARCH_ITEMS)
    ]
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    for item in items:
        capture.hold(_event(item, b"\n\n"))
    capture.finish()
    assert capture.final_usage == Usage(usage_missing=True, web_search_requests=2)
    assert OpenAIStreamCapture(strip_usage_chunk=False).final_usage == Usage.missing()


def _search_result(index: int, content: Any) -> dict[str, Any]:
    block = {"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_{index}"}
    return {"type": "content_block_start", "index": index, "content_block": {**block,
            "content": content}}  # fmt: skip


def test_anthropic_stream_cut_before_its_last_delta_counts_the_search_results_streamed() -> None:
    found = [{"type": "web_search_result", "url": "https://example.com", "title": "x"}]
    failed = {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}
    whole = _anthropic_stream({**ANTHROPIC_USAGE, "server_tool_use": {"web_search_requests": 2}})
    start, rest = whole.split(b"\n\n", 1)
    results = b"".join(
        b"event: content_block_start\n" + _event(_search_result(i, content), b"\n\n")
        for i, content in enumerate([found, failed, found], start=5)
    )
    # Cut short after the results: two searches ran (the error is not billed).
    capture = AnthropicStreamCapture()
    capture.feed(start + b"\n\n" + results)
    assert capture.final_usage.web_search_requests == 2
    # The same when message_start said 0 searches, before any ran.
    said_none = start.replace(
        b'"usage":{', b'"usage":{"server_tool_use":{"web_search_requests":0},'
    )
    assert said_none != start
    capture = AnthropicStreamCapture()
    capture.feed(said_none + b"\n\n" + results)
    assert capture.final_usage.web_search_requests == 2
    # Whole: the last delta's count wins, whatever was streamed.
    capture = AnthropicStreamCapture()
    head, tail = rest.rsplit(b"event: message_delta", 1)
    capture.feed(start + b"\n\n" + results + results + head + b"event: message_delta" + tail)
    assert capture.final_usage.web_search_requests == 2


def test_searches_by_the_preview_tool_are_all_the_call_s_searches() -> None:
    searched = Usage(input_tokens=10, web_search_requests=3)
    assert by_preview(searched) == Usage(
        input_tokens=10, web_search_requests=3, web_search_preview_requests=3
    )
    assert by_preview(Usage(input_tokens=10)) == Usage(input_tokens=10)
    assert by_preview(Usage.missing()) == Usage.missing()


# -- The service tier that served an OpenAI call: flex, priority and ultrafast have rates
# of their own; a tier llmtap does not know is kept as named (unpriced, never standard).


@pytest.mark.parametrize(
    ("said", "tier"),
    [("flex", "flex"), ("priority", "priority"), ("fast", "priority"), ("default", "standard"),
     ("scale", "standard"), ("ultrafast", "ultrafast"), ("turbo-x", "turbo-x"),
     ("auto", "standard"), (None, "standard"), ("PRIORITY", "priority"), (1, "unknown"),
     ("not a tier!", "unknown")],
)  # fmt: skip
def test_an_openai_answer_says_which_tier_served_the_call(said: Any, tier: str) -> None:
    """Chat completions and the Responses API put it at the top of the answer."""
    chat = OpenAIJsonCapture(_completion(usage=USAGE, service_tier=said))
    assert chat.usage == EXPECTED.model_copy(update={"service_tier": tier})
    response = orjson.dumps(
        {"object": "response", "model": "gpt-5", "usage": RESPONSES_USAGE, "service_tier": said}
    )
    assert OpenAIJsonCapture(response).usage.service_tier == tier
    # Told nothing (an older answer, another OpenAI-compatible API): standard.
    assert OpenAIJsonCapture(_completion(usage=USAGE)).usage.service_tier == "standard"


def _tiered(chunk: dict[str, Any], tier: str) -> dict[str, Any]:
    return {**chunk, "service_tier": tier}


@pytest.mark.parametrize("strip", [False, True], ids=["keep", "strip"])
def test_a_chat_stream_s_chunks_say_the_tier_that_served_it(strip: bool) -> None:
    """Every chunk names it, the usage chunk too, which llmtap takes out when the client
    did not ask for usage: the tier is read from it, stripped or not, as from the first."""
    sep = b"\n\n"
    before = [
        _event(_tiered(_chunk([_delta({"role": "assistant", "content": ""})]), "priority"), sep),
        _event(_tiered(_chunk([_delta({"content": "Hi"})]), "priority"), sep),
        _event(_tiered(_chunk([_delta({}, finish="stop")]), "priority"), sep),
    ]
    usage_event = _event(_tiered(_chunk([], USAGE), "priority"), sep)
    stream = b"".join([*before, usage_event, _event("[DONE]", sep)])
    unasked = stream.replace(usage_event, b"").replace(b',"usage":null', b"")
    for pieces in _random_pieces(stream):
        capture = OpenAIStreamCapture(strip_usage_chunk=strip)
        forwarded = b"".join(capture.feed(piece) for piece in pieces) + capture.finish()
        assert forwarded == (unasked if strip else stream)
        assert capture.final_usage == EXPECTED.model_copy(update={"service_tier": "priority"})
    # Cut short before its usage: the count of its text is still the tier's.
    capture = OpenAIStreamCapture(strip_usage_chunk=strip)
    capture.feed(b"".join(before))
    capture.finish()
    assert capture.counted_usage(2).service_tier == "priority"


def test_a_responses_stream_s_completed_response_says_the_tier_that_served_it() -> None:
    """response.created echoes the tier asked ("auto"); response.completed's is the
    served one."""
    created: dict[str, Any] = {
        "type": "response.created",
        "response": {"model": "gpt-5", "usage": None, "service_tier": "auto"},
    }
    completed: dict[str, Any] = {
        "type": "response.completed",
        "response": {"model": "gpt-5", "usage": RESPONSES_USAGE, "service_tier": "flex"},
    }
    stream = b"".join(_event(e, b"\n\n") for e in [created, completed])
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    assert capture.feed(stream) + capture.finish() == stream
    assert capture.final_usage == Usage(input_tokens=9000, output_tokens=300, service_tier="flex")
    # A priority request served at the default tier (no priority capacity left) is billed so.
    asked = {**created, "response": {**created["response"], "service_tier": "priority"}}
    served = {**completed, "response": {**completed["response"], "service_tier": "default"}}
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    capture.feed(b"".join(_event(e, b"\n\n") for e in [asked, served]))
    capture.finish()
    assert capture.final_usage.service_tier == "standard"


@pytest.mark.parametrize(
    ("usage", "api"),
    [
        (
            {
                "prompt_tokens": 18_014,
                "completion_tokens": 12,
                "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 18_011},
            },
            "chat",
        ),
        (
            {
                "input_tokens": 18_014,
                "output_tokens": 12,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 18_011},
            },
            "responses",
        ),
    ],
)
def test_openai_cache_writes_are_cache_creation_tokens(usage: dict[str, Any], api: str) -> None:
    """GPT-5.6 on: writes are part of the prompt count, as llmtap's input_tokens holds
    them, and billed apart (at cache_write)."""
    normalised = openai_usage(usage)
    assert normalised is not None, api
    assert (normalised.input_tokens, normalised.cache_creation_input_tokens) == (18_014, 18_011)
    assert normalised.cached_input_tokens == 0


def test_openai_cache_writes_never_exceed_the_prompt_left_after_reads() -> None:
    normalised = openai_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 1,
            "prompt_tokens_details": {"cached_tokens": 70, "cache_write_tokens": 50},
        }
    )
    assert normalised is not None
    assert (normalised.cached_input_tokens, normalised.cache_creation_input_tokens) == (70, 30)


@pytest.mark.parametrize("details", ["prompt_tokens_details", "input_tokens_details"])
def test_openai_12_hour_cache_writes_are_the_longer_lived_writes(details: str) -> None:
    """OpenAI splits the writes by retention (cache_write_tokens_details: ttl_30m_tokens,
    ttl_12h_tokens); the 12-hour ones, priced higher, are kept as the longer-lived writes
    (they were priced at the 30-minute rate). When only the split is given, the writes
    are its sum; never more than the prompt left after the reads."""
    prompt, out = (
        ("prompt_tokens", "completion_tokens")
        if details.startswith("prompt")
        else ("input_tokens", "output_tokens")
    )
    by_ttl = {"ttl_30m_tokens": 3_000, "ttl_12h_tokens": 5_000}
    for written in ({"cache_write_tokens": 8_000}, {}):
        normalised = openai_usage(
            {prompt: 20_000, out: 10,
             details: {"cached_tokens": 1_000, **written, "cache_write_tokens_details": by_ttl}}
        )  # fmt: skip
        assert normalised is not None
        assert (
            normalised.cache_creation_input_tokens,
            normalised.cache_creation_1h_input_tokens,
        ) == (8_000, 5_000), written
    capped = openai_usage(
        {prompt: 4_000, out: 10,
         details: {"cached_tokens": 1_000, "cache_write_tokens_details": by_ttl}}
    )  # fmt: skip
    assert capped is not None
    assert (capped.cache_creation_input_tokens, capped.cache_creation_1h_input_tokens) == (
        3_000,
        3_000,
    )


# -- Gemini's OpenAI-compatible endpoint: thoughts counted in total_tokens only --------


@pytest.mark.parametrize(
    ("usage", "output", "reasoning"),
    [
        # live answers of gemini-2.5-flash through /v1beta/openai (content "The Social
        # Network": 3 tokens; the other 650 are thoughts, in total_tokens only)
        ({"completion_tokens": 3, "prompt_tokens": 18, "total_tokens": 671}, 653, 650),
        ({"completion_tokens": 24, "prompt_tokens": 11, "total_tokens": 561}, 550, 526),
        # a thinking answer cut by max_tokens before any visible text
        ({"completion_tokens": 0, "prompt_tokens": 21, "total_tokens": 81}, 60, 60),
        # no thinking: nothing added
        ({"completion_tokens": 13, "prompt_tokens": 8, "total_tokens": 21}, 13, 0),
        # cache reads are within prompt_tokens, not a gap
        (
            {
                "completion_tokens": 19,
                "prompt_tokens": 4634,
                "prompt_tokens_details": {"cached_tokens": 4088},
                "total_tokens": 4653,
            },
            19,
            0,
        ),
    ],
)
def test_thoughts_counted_in_total_tokens_only_are_output(
    usage: dict[str, Any], output: int, reasoning: int
) -> None:
    """Gemini's OpenAI-compatible endpoint reports the visible answer as
    ``completion_tokens`` and its thinking tokens only in ``total_tokens`` (no
    ``reasoning_tokens``); Google bills thinking as output, so they are output."""
    capture = OpenAIJsonCapture(_completion(usage=usage, model="gemini-2.5-flash"))
    assert (capture.usage.output_tokens, capture.usage.reasoning_tokens) == (output, reasoning)
    assert capture.usage.input_tokens == usage["prompt_tokens"]
    stream = OpenAIStreamCapture(strip_usage_chunk=True)
    chunk = {
        "model": "gemini-2.5-flash",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}],
        "usage": usage,
    }
    stream.feed(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
    assert stream.final_usage == capture.usage


def test_an_embeddings_usage_with_a_total_alone_adds_no_output() -> None:
    """The thinking gap is read only from an answer that counts its completion."""
    usage = openai_usage({"prompt_tokens": 8, "total_tokens": 8})
    assert usage == Usage(input_tokens=8)
    usage = openai_usage({"total_tokens": 10})
    assert usage is not None and usage.output_tokens == 0


def test_an_embeddings_usage_counting_only_its_total_is_all_input() -> None:
    """Voyage's embeddings, and some OpenAI-compatible servers', count only
    ``total_tokens``: an embedding has no output, so all of it is input (it read 0)."""
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
        "model": "voyage-3.5",
        "usage": {"total_tokens": 12},
    }
    assert OpenAIJsonCapture(orjson.dumps(body)).usage == Usage(input_tokens=12)
    # Counting its prompt, or counting any output, a usage's total is no input of its own.
    assert openai_usage({"prompt_tokens": 8, "total_tokens": 12}) == Usage(input_tokens=8)
    counted = openai_usage({"completion_tokens": 3, "total_tokens": 12})
    assert counted is not None and counted.input_tokens == 0


LARGE = "x" * (2 * 1024 * 1024)  # text enough to make a body be read from its end


@pytest.mark.parametrize(
    ("body", "tier", "searches"),
    [
        # Its members after the vectors: read from there.
        ({"object": "list", "data": [{"embedding": LARGE}], "model": "m", "usage": USAGE}, "", 0),
        # A Responses body: its output (searches) and model before a tool naming a model.
        (
            {
                "model": "m",
                "output": [{"type": "web_search_call"}, {"type": "message", "text": LARGE}],
                "tools": [{"type": "image_generation", "model": "gpt-image-1"}],
                "service_tier": "flex",
                "usage": USAGE,
            },
            "flex",
            1,
        ),
        # The last "output" is an item's (an MCP call's), the object's own before it.
        (
            {
                "output": [{"type": "web_search_call"}, {"type": "mcp_call", "output": LARGE}],
                "model": "m",
                "usage": USAGE,
            },
            "",
            1,
        ),
        # The model after its usage; a tier before the vectors.
        (
            {"service_tier": "priority", "data": [LARGE], "usage": USAGE, "model": "m"},
            "priority",
            0,
        ),
    ],
)
def test_a_large_body_is_read_from_its_end_as_it_would_be_whole(
    body: dict[str, Any], tier: str, searches: int
) -> None:
    """An answer over TAIL_READ_BYTES is read from the first of the members its usage
    needs (usage, model, service_tier, output) to its end, when each is the object's own
    (an embeddings answer's float vectors, parsed whole, held the event loop ~1 s): what
    it reads is what the whole body says."""
    encoded = orjson.dumps(body)
    assert len(encoded) > TAIL_READ_BYTES
    read = OpenAIJsonCapture(encoded)
    expected = EXPECTED.model_copy(update={"web_search_requests": searches})
    if tier:
        expected = expected.model_copy(update={"service_tier": tier})
    assert (read.usage, read.model) == (expected, "m")


def test_groq_s_usage_in_x_groq_is_captured_from_a_stream_that_did_not_ask() -> None:
    """Groq streams its usage unasked, in the last chunk's ``x_groq.usage`` (a provider
    set ``stream_usage: false``, or a stream sent as the client sent it): it is the
    call's usage, not a stream to count from its text."""
    first = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "llama-3.3-70b-versatile",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}}],
        "x_groq": {"id": "req_1"},
    }
    last = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "llama-3.3-70b-versatile",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "x_groq": {
            "id": "req_1",
            "usage": {
                "queue_time": 0.09,
                "prompt_tokens": 38,
                "prompt_time": 0.003,
                "completion_tokens": 4,
                "completion_time": 0.027,
                "total_tokens": 42,
                "total_time": 0.03,
            },
        },
    }
    stream = (
        b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in (first, last))
        + b"data: [DONE]\n\n"
    )
    capture = OpenAIStreamCapture(strip_usage_chunk=False)
    assert capture.feed(stream) + capture.finish() == stream
    assert capture.final_usage == Usage(input_tokens=38, output_tokens=4)
    assert capture.output_uncounted is False


# A stream's last event: the answer is whole, however the connection then ends.


@pytest.mark.parametrize(
    ("capture", "events", "last"),
    [
        (
            lambda: OpenAIStreamCapture(strip_usage_chunk=True),
            [b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"[DONE]"}}]}'],
            b"data: [DONE]",
        ),
        (
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            [
                b'event: response.created\ndata: {"type":"response.created","response":'
                b'{"model":"gpt-5","metadata":{"k":"response.completed"},"usage":null}}'
            ],
            b'event: response.completed\ndata: {"type":"response.completed","response":'
            b'{"model":"gpt-5","usage":{"input_tokens":9,"output_tokens":3}}}',
        ),
        (
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            [],
            b'data: {"type":"response.incomplete","response":{"model":"gpt-5","status":'
            b'"incomplete","usage":{"input_tokens":9,"output_tokens":3}}}',
        ),
        (
            lambda: OpenAIStreamCapture(strip_usage_chunk=False),
            [],
            b'data: {"type":"response.failed","response":{"model":"gpt-5","status":"failed",'
            b'"error":{"code":"server_error"},"usage":{"input_tokens":9,"output_tokens":3}}}',
        ),
        (
            AnthropicStreamCapture,
            [
                b'data: {"type":"message_start","message":{"model":"claude-x","usage":'
                b'{"input_tokens":9,"output_tokens":1}}}',
                b'data: {"type":"content_block_delta","index":0,"delta":'
                b'{"type":"text_delta","text":"\\"message_stop\\""}}',
                b'data: {"type":"content_block_start","index":1,"content_block":{"type":'
                b'"web_search_tool_result","content":[{"title":"message_stop"}]}}',
                b'data: {"type":"message_delta","usage":{"output_tokens":3}}',
            ],
            b'event: message_stop\ndata: {"type":"message_stop"}',
        ),
    ],
)
def test_a_stream_has_ended_at_its_last_event_only(
    capture: Any, events: list[bytes], last: bytes
) -> None:
    """Its last event (OpenAI's [DONE], the Responses API's response.completed,
    response.incomplete or response.failed, Anthropic's message_stop) ends it; its name
    in text before it (written by the model, a search result's title, a response's
    metadata) does not."""
    reading = capture()
    for event in events:
        reading.feed(event + b"\n\n")
        assert not reading.ended
    reading.feed(last + b"\n\n")
    assert reading.ended


ROLE = {  # every OpenAI-compatible stream's first chunk of a choice: its role, no text
    "id": "chatcmpl-1",
    "model": "gpt-4o",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
}


@pytest.mark.parametrize(
    "output",
    [
        {"content": "Hi"},
        {"refusal": "No"},
        {"reasoning_content": "Hm"},
        {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]},
        {"function_call": {"name": "f", "arguments": ""}},
    ],
)
def test_a_chat_stream_s_first_token_is_its_first_chunk_with_output(
    output: dict[str, Any],
) -> None:
    """Azure's prompt filter results and the role chunk come before any token; the
    first chunk with text (or a tool call) is the first token, however reads cut it."""
    first = b"".join(
        b"data: " + orjson.dumps(chunk) + b"\n\n"
        for chunk in (AZURE_FIRST_CHUNK, ROLE, {**ROLE, "choices": [{"index": 0, "delta": output}]})
    )
    stream = first + b"data: [DONE]\n\n"
    ends = len(first) - 2  # where the line of the first output ends
    for cut in range(1, len(stream)):
        event = FirstEvent(frozenset(), chat_output)
        found = [event.generated(stream[:cut]), event.generated(stream[cut:])]
        assert found == ([True, False] if cut > ends else [False, True]), cut
    for chunks in (AZURE_FIRST_CHUNK, ROLE), ():  # no output: no first token
        event = FirstEvent(frozenset(), chat_output)
        told = [b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks]
        assert not any(event.generated(data) for data in [*told, b"data: [DONE]\n\n"])
