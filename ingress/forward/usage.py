"""Pure capture of usage from what a provider sent: a JSON body or an SSE stream.

Nothing here does I/O; the handlers feed bytes in and forward what comes out.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmtap.events import Usage


def openai_usage(usage: Any) -> Usage | None:
    """Normalise an OpenAI ``usage`` object (chat completions / completions / embeddings)."""
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = (
        _int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0
    )
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        cached_input_tokens=min(cached, prompt),
        reasoning_tokens=min(reasoning, completion),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def parse_json_body(body: bytes) -> dict[str, Any] | None:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


class OpenAIJsonCapture:
    """Usage and served model from a complete (non-streaming) OpenAI response body."""

    def __init__(self, body: bytes) -> None:
        parsed = parse_json_body(body) or {}
        self.usage: Usage = openai_usage(parsed.get("usage")) or Usage.missing()
        model = parsed.get("model")
        self.model: str = model if isinstance(model, str) else ""


class OpenAIStreamCapture:
    """Reads an OpenAI SSE stream as it passes through, one event at a time.

    ``feed`` takes raw bytes from the provider and returns the bytes to forward now:
    whole SSE events, byte for byte as received. A partial event waits for its end.
    With ``strip_usage_chunk`` (the proxy asked for usage the client did not ask
    for), the usage-only chunk (``"choices": []`` with ``usage``) is captured and not
    forwarded, so the client sees exactly what it would have seen without the proxy.
    """

    def __init__(self, *, strip_usage_chunk: bool) -> None:
        self._strip = strip_usage_chunk
        self._pending = b""
        self.usage: Usage | None = None
        self.model = ""
        self.events = 0  # data events seen, [DONE] excluded

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        out: list[bytes] = []
        while True:
            end, sep_len = _event_end(self._pending)
            if end < 0:
                break
            event = self._pending[: end + sep_len]
            self._pending = self._pending[end + sep_len :]
            if self._inspect(event[:end]):
                out.append(event)
        return b"".join(out)

    def finish(self) -> bytes:
        """The stream ended: whatever is left (an unterminated last event) goes out."""
        tail, self._pending = self._pending, b""
        if tail and not self._inspect(tail):
            return b""
        return tail

    @property
    def final_usage(self) -> Usage:
        return self.usage or Usage.missing()

    def _inspect(self, event: bytes) -> bool:
        """Record what the event tells; return whether to forward it."""
        data = _sse_data(event)
        if data is None or data == b"[DONE]":
            return True
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True  # not ours to judge: forward as is
        if not isinstance(chunk, dict):
            return True
        self.events += 1
        model = chunk.get("model")
        if isinstance(model, str) and model:
            self.model = model
        usage = openai_usage(chunk.get("usage"))
        if usage is None:
            return True
        self.usage = usage
        usage_only = chunk.get("choices") == []
        return not (self._strip and usage_only)


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Index and length of the first blank-line separator in ``buffer``, or (-1, 0)."""
    candidates = [
        (idx, len(sep)) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r") if (idx := buffer.find(sep)) >= 0
    ]
    return min(candidates) if candidates else (-1, 0)


def _sse_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of one SSE event, or None if it has none."""
    lines = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None
