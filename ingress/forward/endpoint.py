"""What a metered route is: the API family it speaks (:class:`Api`) and where it goes
(:class:`Endpoint`). ``openai.py`` and ``anthropic.py`` declare theirs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ingress.errors import ErrorShape
from ingress.forward.usage import Capture, StreamCapture
from llmtap.config import ApiKind


@dataclass(frozen=True)
class Api:
    """How one API family is spoken: its errors, its usage, its credential header."""

    kind: ApiKind
    error: ErrorShape
    json_capture: Callable[[bytes], Capture]
    stream_capture: Callable[[bool], StreamCapture]  # argument: strip the usage chunk
    credential_header: str  # where the provider key goes
    credential_prefix: str  # "Bearer " or ""


@dataclass(frozen=True)
class Endpoint:
    name: str  # recorded as the event's endpoint, e.g. "chat.completions"
    api: Api
    upstream_path: str  # appended to the provider's base_url
    # Adjust the payload before forwarding; return True when the proxy added a usage
    # chunk to the stream that the client must not see.
    prepare: Callable[[dict[str, Any]], bool] | None = None
    # The body field whose list items the provider answers apart, each a prompt of its
    # own (ingress/guards/bounds.py: prompts).
    batched: str | None = None
