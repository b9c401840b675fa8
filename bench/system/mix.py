"""The request mix (models, prompts, streaming, upstream errors, keys over tenants) and
pricing what was sent with the catalog."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from fake_upstream import usage_for

from llmtap.events import Usage
from stream.catalog import Catalog
from stream.pricing import cost_of

MODELS = (("gpt-4o-mini", 45), ("gpt-4.1-nano", 20), ("gpt-4o", 15), ("gpt-4.1-mini", 20))
PROMPT_CHARS = ((60, 50), (400, 35), (3000, 15))  # (characters, weight)
MAX_TOKENS = (None, None, None, None, 16, 64, 128, 256)
FEATURES = ("chat", "search", "summarize")
WORDS = (
    "the quarterly report shows revenue growth across all regions while costs in "
    "logistics rose faster than planned please summarise the main drivers and list "
    "three actions for the next quarter with owners and dates"
).split()


@dataclass(frozen=True)
class KeySpec:
    tenant: str
    team: str
    user: str
    weight: int


KEYS = (
    KeySpec("acme", "search", "", 35),
    KeySpec("acme", "chat", "", 25),
    KeySpec("globex", "", "", 25),
    KeySpec("initech", "", "dev-1", 15),
)
CAPPED = KeySpec("capped", "batch", "", 0)


@dataclass(frozen=True)
class Entry:
    """One request of the mix, with what the report needs to know about it."""

    key: int  # index into KEYS (or -1: the capped tenant)
    body: dict[str, Any]
    headers: dict[str, str]
    model: str
    stream: bool
    upstream_error: int | None  # the status the fake is asked to answer, if any


def prompt(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:chars]


def make_mix(size: int, stream_share: float, error_share: float, seed: int) -> list[Entry]:
    rng = random.Random(seed)
    entries = []
    for _ in range(size):
        key = rng.choices(range(len(KEYS)), weights=[k.weight for k in KEYS])[0]
        model = rng.choices([m for m, _ in MODELS], weights=[w for _, w in MODELS])[0]
        chars = rng.choices([c for c, _ in PROMPT_CHARS], weights=[w for _, w in PROMPT_CHARS])[0]
        content = prompt(rng, chars)
        error = None
        if rng.random() < error_share:
            error = 500 if rng.random() < 0.6 else 429
            content += f" fake-status:{error}"
        messages: list[dict[str, str]] = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": "You are a concise assistant."})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": model, "messages": messages}
        max_tokens = rng.choice(MAX_TOKENS)
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        stream = rng.random() < stream_share
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        headers = {"x-llmtap-feature": rng.choice(FEATURES)} if rng.random() < 0.5 else {}
        entries.append(Entry(key, body, headers, model, stream, error))
    return entries


def budget_mix(size: int, seed: int) -> list[Entry]:
    """The capped tenant's calls: one model, no errors, ``max_tokens`` set (so the
    worst case reserved at admission is close to the real cost)."""
    rng = random.Random(seed)
    entries = []
    for _ in range(size):
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": prompt(rng, 400)}],
            "max_tokens": 32,
        }
        entries.append(Entry(-1, body, {}, "gpt-4o-mini", False, None))
    return entries


def write_mix(path: Path, entries: list[Entry], keys: list[str], capped_key: str) -> None:
    requests = [
        {"body": e.body, "key": capped_key if e.key < 0 else keys[e.key], "headers": e.headers}
        for e in entries
    ]
    path.write_text(json.dumps({"requests": requests}))


# --- pricing what was sent ---------------------------------------------------------------


def usage_of(tokens: list[int]) -> Usage:
    prompt_tokens, completion, cached, reasoning = tokens
    return Usage(
        input_tokens=prompt_tokens,
        output_tokens=completion,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
    )


def price(catalog: Catalog, model: str, usage: Usage) -> Decimal:
    entry = catalog.lookup(model, "openai")
    rates = entry[1].at(datetime.now(UTC)) if entry is not None else None
    if rates is None:
        raise SystemExit(f"no price for {model}: the mix must use priced models")
    return cost_of(usage, rates).total


def fake_usage(body: dict[str, Any]) -> Iterator[int]:
    usage = usage_for(body)
    yield usage["prompt_tokens"]
    yield usage["completion_tokens"]
    yield usage["prompt_tokens_details"]["cached_tokens"]
    yield usage["completion_tokens_details"]["reasoning_tokens"]
