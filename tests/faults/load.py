"""The load driver: calls through the proxy with the official SDKs, each one recorded
with the request id the proxy gave it (``x-request-id``) and the usage the provider
reported to the client, so a test can compare exactly what was sent with what
ClickHouse holds.

Calls rotate through three kinds: OpenAI chat non-streaming, OpenAI chat streaming
(with ``include_usage``, so the client sees the usage chunk too) and Anthropic
messages. Each carries ``x-llmtap-feature: <scenario>``, which is how a scenario
finds its own rows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

OPENAI_MODEL = "gpt-4o-mini"
ANTHROPIC_MODEL = "claude-3-5-haiku"
KINDS = ("openai", "openai-stream", "anthropic")
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Sent:
    """One call that succeeded, as the client saw it."""

    request_id: str
    kind: str
    input_tokens: int  # llmtap's count: cache reads and writes included (events.Usage)
    output_tokens: int
    started: float  # time.monotonic() just before the request was sent
    ended: float


@dataclass
class Load:
    proxy_url: str  # for the OpenAI SDK (ends in /v1)
    proxy_root: str  # for the Anthropic SDK
    api_key: str
    feature: str
    sent: list[Sent] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _count: int = 0

    def __post_init__(self) -> None:
        self.openai = AsyncOpenAI(
            base_url=self.proxy_url, api_key=self.api_key, max_retries=0, timeout=CALL_TIMEOUT_S
        )
        self.anthropic = AsyncAnthropic(
            base_url=self.proxy_root, api_key=self.api_key, max_retries=0, timeout=CALL_TIMEOUT_S
        )
        self.headers = {"x-llmtap-feature": self.feature}

    async def close(self) -> None:
        await self.openai.close()
        await self.anthropic.close()

    async def one(self) -> None:
        kind = KINDS[self._count % len(KINDS)]
        self._count += 1
        started = time.monotonic()
        try:
            request_id, tokens_in, tokens_out = await getattr(self, "_" + kind.replace("-", "_"))()
        except Exception as exc:
            self.failures.append(f"{kind} call started at {started:.3f}: {exc!r}")
            return
        self.sent.append(Sent(request_id, kind, tokens_in, tokens_out, started, time.monotonic()))

    async def _openai(self) -> tuple[str, int, int]:
        raw = await self.openai.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=self.headers,
        )
        usage = raw.parse().usage
        assert usage is not None
        return raw.headers["x-request-id"], usage.prompt_tokens, usage.completion_tokens

    async def _openai_stream(self) -> tuple[str, int, int]:
        raw = await self.openai.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=self.headers,
        )
        usage = None
        async for chunk in raw.parse():
            usage = chunk.usage or usage
        assert usage is not None, "the stream carried no usage chunk"
        return raw.headers["x-request-id"], usage.prompt_tokens, usage.completion_tokens

    async def _anthropic(self) -> tuple[str, int, int]:
        raw = await self.anthropic.messages.with_raw_response.create(
            model=ANTHROPIC_MODEL,
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers=self.headers,
        )
        usage = (await raw.parse()).usage
        tokens_in = (
            usage.input_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )
        return raw.headers["x-request-id"], tokens_in, usage.output_tokens

    async def run(self, count: int, concurrency: int = 8) -> None:
        """``count`` calls, ``concurrency`` at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def gated() -> None:
            async with gate:
                await self.one()

        await asyncio.gather(*(gated() for _ in range(count)))

    async def run_until(
        self, stop: asyncio.Event, lanes: int = 4, max_calls: int = 2_000, pause_s: float = 0.0
    ) -> None:
        """Calls on ``lanes`` lanes, each after the last, until ``stop`` is set (or
        ``max_calls`` were made: the load is bounded whatever happens)."""
        first = self._count

        async def lane() -> None:
            while not stop.is_set() and self._count - first < max_calls:
                await self.one()
                if pause_s:
                    await asyncio.sleep(pause_s)

        await asyncio.gather(*(lane() for _ in range(lanes)))


def compare(sent: list[Sent], stored: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Every way ClickHouse differs from what the clients saw: missing calls, calls
    stored more than once, rows no client made, tokens that differ. Empty: identical."""
    problems: list[str] = []
    by_id = {s.request_id: s for s in sent}
    if len(by_id) != len(sent):
        problems.append(f"{len(sent) - len(by_id)} request ids were given to two calls")
    missing = [s for s in sent if s.request_id not in stored]
    if missing:
        problems.append(
            f"{len(missing)} of {len(sent)} calls missing, e.g. "
            + ", ".join(f"{s.kind} {s.request_id}" for s in missing[:5])
        )
    twice = {rid: row["rows"] for rid, row in stored.items() if row["rows"] != 1}
    if twice:
        problems.append(
            f"{len(twice)} calls stored more than once: {dict(list(twice.items())[:5])}"
        )
    unknown = sorted(set(stored) - set(by_id))
    if unknown:
        problems.append(f"{len(unknown)} stored calls no client made: {unknown[:5]}")
    wrong = [
        (
            s.request_id,
            (s.input_tokens, s.output_tokens),
            (row["input_tokens"], row["output_tokens"]),
        )
        for s in sent
        if (row := stored.get(s.request_id)) is not None
        and row["rows"] == 1
        and (row["input_tokens"], row["output_tokens"]) != (s.input_tokens, s.output_tokens)
    ]
    if wrong:
        problems.append(f"{len(wrong)} calls with other tokens than the client saw: {wrong[:5]}")
    sent_in = sum(s.input_tokens for s in sent)
    stored_in = sum(int(row["input_tokens"]) for row in stored.values())
    if not problems and sent_in != stored_in:
        problems.append(f"input tokens: sent {sent_in}, stored {stored_in}")
    return problems
