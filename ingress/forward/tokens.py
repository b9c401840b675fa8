"""Counting the tokens of streamed text, for a stream that broke off (or whose client
went away) before the provider said how many tokens it generated.

The tokenizer is OpenAI's tiktoken with the ``o200k_base`` encoding, the one of
OpenAI's current models (GPT-4o, 4.1, 5, the o-series): for those, the count of a text
is the provider's. Other providers' tokenizers differ (Anthropic's is not public), so
for them it is an estimate; the event says the count is llmtap's either way
(``Usage.output_tokens_counted``).

tiktoken downloads its encodings on first use, and a gateway may have no way out but
to its providers: the encoding ships with llmtap (``encodings/o200k_base.tiktoken.gz``,
OpenAI's file, MIT-licensed) and is given to tiktoken as the cache entry it looks for
(``TIKTOKEN_CACHE_DIR``), where tiktoken checks it against the SHA-256 it expects. It
is loaded on the first count (~0.2 s, ~80 MB), in a thread: a process whose streams
all end normally never loads it.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken

log = logging.getLogger(__name__)

ENCODING = "o200k_base"
# The address tiktoken would fetch it from: its cache entry is named by the address's SHA-1.
_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
_lock = threading.Lock()


def _cache_dir() -> Path:
    """The directory tiktoken reads its cache from (set here when it is not set)."""
    configured = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    if configured:
        return Path(configured)
    path = Path(tempfile.gettempdir()) / "llmtap-tiktoken"
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)
    return path


@cache
def encoding() -> tiktoken.Encoding:
    """The encoding, loaded once (blocking: call it from a thread)."""
    with _lock:
        entry = _cache_dir() / hashlib.sha1(_URL.encode()).hexdigest()
        if not entry.exists():
            entry.parent.mkdir(parents=True, exist_ok=True)
            packed = resources.files("ingress.forward") / "encodings" / f"{ENCODING}.tiktoken.gz"
            partial = entry.with_suffix(f".{os.getpid()}.part")
            partial.write_bytes(gzip.decompress(packed.read_bytes()))
            partial.replace(entry)  # tiktoken verifies its SHA-256 when it reads it
        return tiktoken.get_encoding(ENCODING)


def count(text: str) -> int:
    """The tokens of ``text`` (blocking: call it from a thread)."""
    return len(encoding().encode_ordinary(text)) if text else 0


class Counting:
    """Counts off the event loop (parsing what a stream kept, then tokenizing, in a
    thread) and hands the count on; holds the tasks so none is lost at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def then(self, text: Callable[[], str], done: Callable[[int], None]) -> None:
        """Count the tokens of ``text()`` and call ``done`` with them (0 if counting
        failed) on the event loop."""
        task = asyncio.get_running_loop().create_task(self._count(text, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _count(self, text: Callable[[], str], done: Callable[[int], None]) -> None:
        try:
            tokens = await asyncio.to_thread(lambda: count(text()))
        except Exception:
            log.exception("counting a stream's output tokens failed")
            tokens = 0
        done(tokens)

    async def drain(self) -> None:
        """Wait for the counts under way."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
