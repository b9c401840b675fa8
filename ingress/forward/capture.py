"""Pure capture of usage from what a provider sent: a JSON body or an SSE stream.

Nothing here does I/O; the handlers feed bytes in and forward what comes out.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from ingress.forward.usage import (
    ImpossibleCount,
    anthropic_usage,
    is_count,
    is_search,
    openai_usage,
    served_tier,
    with_searches,
    with_tier,
)
from llmtap.events import STANDARD_TIER, ServiceTier, Usage


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark


def too_many_values(body: bytes, most: int) -> str | None:
    """Why a body is not parsed: more than ``most`` JSON values, by its commas (counted
    in C, ~2 ms a MB; a body of ``most`` bytes or fewer cannot hold that many). Parsing
    runs on the event loop: 8M empty objects in 32 MB took 0.64 s of it, every tenant's
    calls waiting, and 1 GB. No model's context holds that much (a comma in a string
    counts too: 2M of them are ~20 MB of dense text)."""
    if len(body) <= most or body.count(b",") < most:
        return None
    return (
        f"the request body holds {most:,} commas or more (max_body_values: between its JSON "
        "values, and in its text), more than any model's context takes: it is not parsed "
        "nor forwarded"
    )


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body`` (raises orjson.JSONDecodeError). A leading UTF-8 byte
    order mark is passed over, as RFC 8259 lets a parser do and Python's own does (orjson
    refuses it): whether the body is acceptable is then for the provider to say, as it
    would without llmtap."""
    return orjson.loads(body.removeprefix(_BOM))


def parse_json_body(body: bytes) -> dict[str, Any] | None:
    """A JSON object, or None (:func:`parse_json`)."""
    try:
        parsed = parse_json(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _read(normalise: Callable[..., Usage | None], *usage: Any) -> tuple[Usage | None, str]:
    """What ``normalise(*usage)`` makes of a provider's usage, and "": or, if it holds a
    count no call can have, a missing usage and that count (``field=value``)."""
    try:
        return normalise(*usage), ""
    except ImpossibleCount as exc:
        return Usage.missing(), str(exc)


class Capture:
    """What a complete (non-streaming) response body tells: usage and served model, and
    the count no call can have that made its usage missing (``field=value``), if any."""

    usage: Usage
    model: str
    impossible: str


# An answer larger than this is read from its end (:func:`top_level_tail`) when it can be.
TAIL_READ_BYTES = 1024 * 1024
# The top-level members of an OpenAI answer its usage is read from.
_READ_MEMBERS = ("usage", "model", "service_tier", "output")


def top_level_tail(body: bytes, members: tuple[str, ...]) -> dict[str, Any] | None:
    """The members of a JSON object from the first of ``members`` it holds to its end,
    parsed without what comes before (an embeddings answer's vectors: 2,048 of 3,072
    floats are up to 130 MB, whose parse held the event loop, every tenant's calls, up
    to 1.3 s after each such call; the SDKs' base64 is 4x smaller and cheap to parse,
    but not every client asks for it). Each member is found by its last ``"name"``.
    None when none is there, or when one found is not a member of the object itself:
    nested in another value, or a ``"name"`` that is no key (a value, the end of a
    string after an escaped quote), its tail is no JSON object, or lacks it. Then parse
    the body whole."""
    found = {name: body.rfind(f'"{name}"'.encode()) for name in members}
    found = {name: at for name, at in found.items() if at >= 0}
    if not found:
        return None
    try:
        tail = orjson.loads(b"{" + body[min(found.values()) :])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(tail, dict) or any(name not in tail for name in found):
        return None
    return tail


class OpenAIJsonCapture(Capture):
    """Chat completions, completions, embeddings and responses bodies (the tier that
    served the call is the body's ``service_tier``). A large one is read from its end
    when its members read are last (:func:`top_level_tail`)."""

    def __init__(self, body: bytes) -> None:
        tail = top_level_tail(body, _READ_MEMBERS) if len(body) > TAIL_READ_BYTES else None
        parsed = tail or parse_json_body(body) or {}
        usage, self.impossible = _read(openai_usage, parsed.get("usage"))
        self.usage = (
            Usage.missing()
            if usage is None
            else with_tier(with_searches(usage, parsed), served_tier(parsed.get("service_tier")))
        )
        model = parsed.get("model")
        self.model = model if isinstance(model, str) else ""


class AnthropicJsonCapture(Capture):
    """A Messages API body."""

    def __init__(self, body: bytes) -> None:
        parsed = parse_json_body(body) or {}
        model = parsed.get("model")
        self.model = model if isinstance(model, str) else ""
        usage, self.impossible = _read(anthropic_usage, parsed.get("usage"), self.model)
        self.usage = usage or Usage.missing()


# What a stream keeps of its events' data, for counting its output tokens should it end
# before the provider counts them: this much at most (~15,000 tokens of chat chunks);
# past it, the count is scaled by the bytes seen.
KEEP_STREAMED_BYTES = 2 * 1024 * 1024
HOLD_BYTES = 256 * 1024  # forwarded, not read yet (StreamCapture.hold)


class StreamCapture:
    """Reads an SSE stream as it passes through, one event at a time.

    ``feed`` takes raw bytes from the provider and returns the bytes to forward now:
    whole SSE events, byte for byte as received. A partial event waits for its end.
    Subclasses read each event's JSON in ``_chunk`` and may hold one back; one that
    never does is :attr:`verbatim`, and the proxy then forwards each read as it comes,
    gives it here with :meth:`hold`, and has it all read once the answer is out
    (:meth:`catch_up`, which :meth:`finish` does first).

    Until the provider's final count of output tokens arrives, the events' data is kept
    as it came (not parsed: that is the hot path), so that a stream that breaks off, or
    whose client goes away, can still have its output counted (:meth:`counted_usage`).
    """

    def __init__(self) -> None:
        self._pending = b""
        self.usage: Usage | None = None
        self.impossible = ""  # as Capture's, of the usage last seen
        self.model = ""
        self.output_final = False  # the provider's own count of output tokens arrived
        self.error = ""  # the provider's error type, when an event of the stream is one
        # Its last event came (OpenAI's [DONE], the Responses API's response.completed,
        # response.incomplete or response.failed, Anthropic's message_stop): the answer is whole,
        # however the connection then ends.
        self.ended = False
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._seen_bytes = 0
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._first = True  # the stream's first event is still to be read

    def hold(self, data: bytes) -> None:
        """Bytes already forwarded as they came (:attr:`verbatim`), to read later: at
        the end, or once ``HOLD_BYTES`` wait (a long stream is read as it goes)."""
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD_BYTES:
            self.catch_up()

    def catch_up(self) -> None:
        """Read what :meth:`hold` kept; the state then covers every byte given here."""
        held, self._held, self._held_bytes = self._held, [], 0
        if held:  # one buffer: its events are found in one pass, not read by read
            self.feed(b"".join(held))  # (a single read is joined as itself, not copied)

    def feed(self, data: bytes) -> bytes:
        buffer = self._pending + data if self._pending else data
        if b"\r" in buffer:
            return self._feed_any(buffer)
        # Lines end with LF alone (every provider's streams): events end at "\n\n".
        out: list[bytes] = []
        start = 0
        dropped = False
        while (end := buffer.find(b"\n\n", start)) >= 0:
            if self._inspect(buffer[start:end]):
                out.append(buffer[start : end + 2])
            else:
                dropped = True
            start = end + 2
        self._pending = buffer[start:]
        return self._out(b"".join(out) if dropped else buffer[:start])

    def _feed_any(self, buffer: bytes) -> bytes:
        """:meth:`feed` for a buffer with CR in it: lines may end with CRLF, LF or CR,
        mixed, and an event ends at its first empty line. One pass: the buffer may be a
        whole stream's held reads (:meth:`catch_up`), never copied event by event."""
        out: list[bytes] = []
        start = 0
        while (found := _EVENT_END.search(buffer, start)) is not None:
            end, stop = found.span()
            if stop == len(buffer) and buffer.endswith(b"\r"):
                break  # at the end, a CR may be the first half of a CRLF still to come
            if self._inspect(buffer[start:end]):
                out.append(buffer[start:stop])
            start = stop
        self._pending = buffer[start:]
        return self._out(b"".join(out))

    def finish(self) -> bytes:
        """The stream ended: whatever is left (an unterminated last event) goes out."""
        self.catch_up()
        tail, self._pending = self._pending, b""
        if tail and not self._inspect(tail):
            return b""
        return self._out(tail)

    def _out(self, events: bytes) -> bytes:
        """The whole events to forward, as the client should get them (as received)."""
        return events

    @property
    def verbatim(self) -> bool:
        """Every byte fed goes out unchanged: the proxy may forward what it reads before
        feeding it here, instead of waiting for each event's end."""
        return True

    @property
    def final_usage(self) -> Usage:
        return self.usage or Usage.missing()

    @property
    def output_uncounted(self) -> bool:
        """Text was streamed and the provider did not count its tokens."""
        return bool(self._kept) and not self.output_final

    def streamed_text(self) -> str:
        """The text the kept events carried (content, reasoning, tool arguments)."""
        parts: list[str] = []
        for data in self._kept:
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            if isinstance(chunk, dict):
                parts.extend(self._texts(chunk))
        return "".join(parts)

    def counted_usage(self, tokens: int) -> Usage:
        """The usage seen, with ``tokens`` (the count of :meth:`streamed_text`, scaled
        up if not all was kept) as its output when that is more than the provider said,
        flagged as llmtap's count either way: the provider's own never came (what it
        said of its output before, Anthropic's ``message_start``, is a placeholder),
        and a stream cut short may have been billed for what it did not stream
        (thinking, redacted or not shown). Usage not seen at all stays missing."""
        if self._kept_bytes and self._seen_bytes > self._kept_bytes:
            tokens = round(tokens * self._seen_bytes / self._kept_bytes)
        seen = self.final_usage
        if seen.usage_missing and tokens <= seen.output_tokens:
            return seen
        output = max(tokens, seen.output_tokens)
        return seen.model_copy(update={"output_tokens": output, "output_tokens_counted": True})

    def _inspect(self, event: bytes) -> bool:
        """Record what the event tells; return whether to forward it."""
        if self._first:  # a UTF-8 BOM opening the stream is no part of it (the SSE spec)
            self._first = False
            event = event.removeprefix(_BOM)
        data = _sse_data(event)
        if data is None:
            return True
        # OpenAI's chat and completions streams end with it; some servers write
        # whitespace after it, which the openai SDK takes as the end too.
        if data.rstrip() == b"[DONE]":
            self.ended = True
            return True
        if not self.output_final:
            self._seen_bytes += len(data)
            if self._kept_bytes + len(data) <= KEEP_STREAMED_BYTES:
                self._kept.append(data)
                self._kept_bytes += len(data)
        if self.model and not self._may_tell(data):
            return True  # nothing new to learn: content chunks are not parsed (hot path)
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True  # not ours to judge: forward as is
        if not isinstance(chunk, dict):
            return True
        if not self.error:
            self.error = stream_error(chunk)
        return self._chunk(chunk)

    def _may_tell(self, data: bytes) -> bool:
        return _may_tell(data)

    def _chunk(self, chunk: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _texts(self, chunk: dict[str, Any]) -> list[str]:
        """The generated text one event carries."""
        raise NotImplementedError

    def _model(self, source: Any) -> None:
        model = source.get("model") if isinstance(source, dict) else None
        if isinstance(model, str) and model:
            self.model = model


class OpenAIStreamCapture(StreamCapture):
    """OpenAI chat/completions chunks, and Responses API events.

    With ``strip_usage_chunk`` (the proxy asked for usage the client did not ask
    for), the usage-only chunk (``"choices": []`` with ``usage``) is captured and not
    forwarded, and the ``"usage": null`` that asking puts in every other chunk is taken
    out of them, so the client sees exactly what it would have seen without the proxy.

    The tier that served the call is the last ``service_tier`` an event told: every chat
    chunk carries it (the usage chunk too, stripped or not), a Responses API stream's
    response objects (``response.completed``'s is the served one; ``response.created``'s
    may echo the request's).
    """

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        super().__init__()
        self._strip = strip_usage_chunk
        self._searches = 0  # search items streamed (response.output_item.done)
        self._tier: ServiceTier = STANDARD_TIER

    def _out(self, events: bytes) -> bytes:
        return _without_usage_null(events) if self._strip else events

    @property
    def verbatim(self) -> bool:
        return not self._strip

    @property
    def final_usage(self) -> Usage:
        if self.usage is None and self._searches:  # cut short: the searches it ran
            usage = Usage(usage_missing=True, web_search_requests=self._searches)
        else:
            usage = super().final_usage
        return with_tier(usage, self._tier)

    def _chunk(self, chunk: dict[str, Any]) -> bool:
        # Responses API events carry the response object: {"type": ..., "response": {...}}
        kind = chunk.get("type")
        if kind == "response.output_item.done" and is_search(chunk.get("item")):
            self._searches += 1
        elif kind in _RESPONSE_ENDS:  # the Responses API's last event (it sends no [DONE])
            self.ended = True
        response = chunk.get("response")
        source = response if isinstance(response, dict) else chunk
        self._model(source)
        if "service_tier" in source:
            self._tier = served_tier(source["service_tier"])
        told = source.get("usage")
        usage, impossible = _read(openai_usage, told)
        if usage is None:
            # Groq's streams say their usage unasked in the last chunk's x_groq.usage.
            groq = source.get("x_groq")
            found = groq.get("usage") if isinstance(groq, dict) else None
            usage, impossible = _read(openai_usage, found)
        if usage is None:  # a usage that counts nothing is missing, its chunk llmtap's
            return not (isinstance(told, dict) and self._usage_chunk(chunk))
        self.usage = with_searches(usage, source, self._searches)
        self.impossible = impossible
        self.output_final = True
        self._kept.clear()
        return not self._usage_chunk(chunk)

    def _usage_chunk(self, chunk: dict[str, Any]) -> bool:
        """Whether a chunk that says a usage is the usage chunk llmtap asked for and the
        client did not, taken out: "choices" [] (OpenAI's), or null or absent (some
        servers'), and no error (an error goes to the client, usage or not)."""
        return self._strip and chunk.get("choices") in ([], None) and not stream_error(chunk)

    def _texts(self, chunk: dict[str, Any]) -> list[str]:
        delta = chunk.get("delta")
        if isinstance(delta, str):  # Responses API: response.output_text.delta and others
            return [delta] if str(chunk.get("type", "")).endswith(".delta") else []
        texts: list[str] = []
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict):
                continue
            texts.append(_str(choice.get("text")))  # completions
            message = choice.get("delta")  # chat completions
            if not isinstance(message, dict):
                continue
            for key in ("content", "refusal"):
                texts.append(_str(message.get(key)))
            # Thinking: DeepSeek's reasoning_content; Groq's, OpenRouter's, Ollama's and
            # vLLM's reasoning (some send both, the same text): one of them.
            texts.append(_str(message.get("reasoning_content")) or _str(message.get("reasoning")))
            calls = message.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    texts.append(_str(function.get("name")))
                    texts.append(_str(function.get("arguments")))
        return [text for text in texts if text]


# The events a Responses API stream ends with, its usage in them (a failed one's,
# response.failed, with its error). A tuple: a chunk's "type" may be any JSON, unhashable.
_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")

# An event's type: the first "type" of its data, which OpenAI's Responses events open with.
_EVENT_TYPE = re.compile(rb'"type"\s*:\s*"([^"]*)"')


class FirstEvent:
    """Finds the read of an event stream that holds its first event of what the model
    generated: a ``data:`` line (not a comment, nor only the head), of a type not in
    ``preamble`` (the events an API sends before generating anything), whose JSON
    carries ``output`` when that is given (a chat chunk's text: not Azure's first, its
    prompt filter's results). An event's type is its ``event:`` line's, else its data's
    first "type" (OpenAI's opens its data; a server dumping the SDK's own event models
    writes it last, after the response's). A line a read cuts is judged with the reads
    that go on with it: cut inside its type, a response.created was not yet known to be
    one; cut inside its JSON, its output not yet read."""

    HEAD = 256  # the start of a cut line kept: an event's "type" opens its data
    # A cut line kept whole to read its output; one longer is taken as output (the
    # chunks before any are small: a role, Azure's prompt filter results).
    LINE = 64 * 1024

    def __init__(
        self,
        preamble: frozenset[bytes],
        output: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        self._preamble = preamble
        self._output = output
        self._keep = self.HEAD if output is None else self.LINE
        self._head = b""  # the start of the line the last read cut
        self._event: bytes | None = None  # the event: line of the event being read

    def generated(self, data: bytes) -> bool:
        if not self._preamble and self._output is None:
            return b"data:" in data
        lines = data.split(b"\n")
        lines[0] = self._head + lines[0]
        cut = lines.pop()  # not ended in this read ("" if it ended with a line)
        self._head = cut[: self._keep]
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                self._event = None  # the event ended
            elif line.startswith(b"event:"):
                self._event = line[6:].strip()
            elif self._generates(line, True):
                return True
        if self._output is not None and len(cut) > self._keep:  # that long: output
            return self._generates(self._head[: self.HEAD], False, long=True)
        return self._generates(self._head, False)

    def _generates(self, line: bytes, whole: bool, long: bool = False) -> bool:
        """Whether ``line`` (its start if not ``whole``; of a line too ``long`` to keep
        whole: taken as output unless its type is a preamble's) generates."""
        if not line.startswith(b"data:"):
            return False
        if self._event is not None:
            if self._event in self._preamble:
                return False
        elif self._preamble:
            found = _EVENT_TYPE.search(line)
            if found is None:
                if not whole:
                    return False  # a cut line's type may be in the reads to come
            elif found[1] in self._preamble:
                return False
        if self._output is None or long:
            return True
        if not whole:
            return False  # its output is in the reads to come
        data = line[5:].strip()
        if data == b"[DONE]":
            return False
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True  # not ours to judge: as it comes
        return not isinstance(event, dict) or self._output(event)


# A chat delta's members that carry what the model generated: DeepSeek's, Groq's,
# OpenRouter's, vLLM's reasoning too, an audio model's audio, and the function call of
# the API's older functions parameter.
_OUTPUT_MEMBERS = (
    "content",
    "refusal",
    "reasoning_content",
    "reasoning",
    "tool_calls",
    "function_call",
    "audio",
)


def chat_output(chunk: dict[str, Any]) -> bool:
    """Whether a chat or completions chunk carries what the model generated: a choice's
    text, or its delta's content, refusal, reasoning, tool or function call, or audio.
    Not Azure OpenAI's first chunk (no choices: its prompt filter's results, as the call
    is taken), nor a first chunk's role alone (its content empty). A chunk that is no
    chat chunk (no ``choices``: an error) is taken as it comes."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return True
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("text") or (
            isinstance(delta, dict) and any(delta.get(name) for name in _OUTPUT_MEMBERS)
        ):
            return True
    return False


# The Responses API's events that carry what the model generated beside its deltas (a
# type ending ".delta": text, refusal, reasoning and its summary, a tool call's
# arguments or input, code, audio), and the ends, taken as they come (a server that
# streams no delta sends its output whole in response.completed; an error, as chat's).
_RESPONSES_OUTPUT = (
    "response.image_generation_call.partial_image",
    *_RESPONSE_ENDS,
    "error",
)


def responses_output(event: dict[str, Any]) -> bool:
    """Whether a Responses API event carries what the model generated: a delta, an
    image's partial, or its end. Not the events that open an output item, its content
    part or its reasoning summary's part (``response.output_item.added``,
    ``response.content_part.added``, ...: as the model starts, before any of it), nor a
    hosted tool's progress. An event with no type string is taken as it comes."""
    kind = event.get("type")
    if not isinstance(kind, str):
        return True
    return kind.endswith(".delta") or kind in _RESPONSES_OUTPUT


def _may_tell(data: bytes) -> bool:
    """Whether an event's data may carry usage, an error or a web search ("usage":null
    tells nothing; a quote in a JSON string is escaped, so the text streamed cannot look
    like any of these keys or types, only like the value "error")."""
    if b'"error"' in data or b'"web_search_call"' in data or b'"web_search_tool_result"' in data:
        return True
    usages = data.count(b'"usage"')
    return usages > 1 or (usages == 1 and b'"usage":null' not in data)


def stream_error(event: dict[str, Any]) -> str:
    """The provider's error type if a stream's event says the answer failed (HTTP 200 was
    sent before it did): Anthropic's ``error`` event, an OpenAI chunk holding only an
    ``error``, the Responses API's ``error`` and ``response.failed``; else ""."""
    kind = event.get("type")
    error = event.get("error")
    if kind == "response.failed":
        response = event.get("response")
        error = response.get("error") if isinstance(response, dict) else None
    elif kind != "error" and not isinstance(error, dict):
        return ""
    found = error.get("type") or error.get("code") if isinstance(error, dict) else None
    found = found or event.get("code")  # the Responses API's error event
    return found if isinstance(found, str) and found else str(kind or "error")


# A chunk's "usage": null member, with the comma that joins it to the one before (or,
# first in its object, to the one after). A quote inside a JSON string is escaped, so
# this is never text a model wrote.
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')


def _without_usage_null(events: bytes) -> bytes:
    return _USAGE_NULL.sub(b"", events) if b'"usage"' in events else events


class AnthropicStreamCapture(StreamCapture):
    """Messages API events: usage from ``message_start``, updated by ``message_delta``.

    ``message_delta`` usage is cumulative: its counts replace those seen before.
    """

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, Any] = {}
        self._searches = 0  # web search results streamed (their content_block_start)
        self._searches_told = False  # a message_delta carried the provider's count

    def _chunk(self, chunk: dict[str, Any]) -> bool:
        kind = chunk.get("type")
        if kind == "message_start":
            message = chunk.get("message")
            self._model(message)
            usage = message.get("usage") if isinstance(message, dict) else None
        elif kind == "message_delta":
            usage = chunk.get("usage")
        elif kind == "content_block_start":
            if _searched(chunk.get("content_block")):
                self._searches += 1
                self._count()
            return True
        else:
            self.ended = self.ended or kind == "message_stop"
            return True
        if isinstance(usage, dict):
            self._raw.update({k: v for k, v in usage.items() if v is not None})
            if kind == "message_delta" and isinstance(usage.get("server_tool_use"), dict):
                self._searches_told = True
            self._count()
            if kind == "message_delta" and is_count(usage.get("output_tokens")):
                self.output_final = True
                self._kept.clear()
        return True

    def _may_tell(self, data: bytes) -> bool:
        # message_stop, the stream's last event, carries nothing else: parsed to be sure
        # the name is its type (a quote in a string is escaped, but a search result's
        # title is a value of its own).
        return _may_tell(data) or b'"message_stop"' in data

    def _count(self) -> None:
        """The usage so far. Searches are counted by a message_delta's usage; until one
        does (a stream cut short), the search results streamed count too (message_start
        may say 0 before any search ran)."""
        usage, self.impossible = (
            _read(anthropic_usage, self._raw, self.model) if self._raw else (None, "")
        )
        if usage is not None and not self._searches_told:
            searches = max(usage.web_search_requests, self._searches)
            if searches != usage.web_search_requests:
                usage = usage.model_copy(update={"web_search_requests": searches})
        self.usage = usage

    def _texts(self, chunk: dict[str, Any]) -> list[str]:
        delta = chunk.get("delta") if chunk.get("type") == "content_block_delta" else None
        if not isinstance(delta, dict):
            return []
        texts = (_str(delta.get(key)) for key in ("text", "partial_json", "thinking"))
        return [text for text in texts if text]


def _searched(block: Any) -> bool:
    """A web search's result block (a list of results; an error is not billed)."""
    return (
        isinstance(block, dict)
        and block.get("type") == "web_search_tool_result"
        and isinstance(block.get("content"), list)
    )


# A line's end (CRLF, LF, or a CR not starting a CRLF) followed by an empty line's.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")


def _sse_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one SSE event, or None if it has none."""
    if event.startswith(b"data: ") and b"\n" not in event and b"\r" not in event:
        return event[6:]  # the usual event: one data line
    lines = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None
