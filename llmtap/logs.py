"""Structured logs: one JSON object per line, with the request id when there is one.

Nothing a caller sent (prompts, completions, keys) is ever passed to a logger; the
request id ties a log line to the call's events and to the client's `x-request-id`.
What others log is redacted of keys as it is written (:func:`redact`): aiohttp's own
ERROR for a request it refuses quotes the header line it could not parse, which may be
the credential itself (a key with a stray byte at its end), or the body's bytes (a
prompt's): those it quotes are left out.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from types import TracebackType

import orjson
from aiohttp.http_exceptions import HttpProcessingError

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class AtMostEvery:
    """Says yes at most once every ``seconds`` (the first time at once): for a log line
    about something that may happen many times a second."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._next = 0.0  # time.monotonic() from which the next yes is due

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.seconds
        return True


class Once:
    """Says yes the first time it is asked about a thing, for a log line worth reading
    once per thing (a model with no price). What it remembers is bounded: past
    ``most`` things it forgets them all, so a stream of ever new things (made-up model
    names) costs a line each and never grows the process."""

    def __init__(self, most: int = 1000) -> None:
        self.most = most
        self._seen: set[Hashable] = set()

    def first(self, thing: Hashable) -> bool:
        if thing in self._seen:
            return False
        if len(self._seen) >= self.most:
            self._seen.clear()
        self._seen.add(thing)
        return True


# What a log line may quote of a request aiohttp refused: its parser's errors show a
# header line, or only its value, as the repr of its bytes. A value ends at a quote, a
# backslash or a blank; a blank may be its repr ("\t"); what comes before may be a
# repr's "\n" (so no word boundaries). Kept: a header's name, a credential's scheme, a
# key's prefix.
_VALUE = r"[^\s'\"\\]+"
_BLANK = r"(?:\s|\\t)"
REDACTED = "[redacted]"
_SECRETS = (
    # A credential header's value (one after a scheme: the next one's).
    (
        re.compile(
            rf"(?i)((?:proxy-)?authorization|(?:x-)?api-key){_BLANK}*:{_BLANK}*"
            rf"(?!(?:bearer|basic){_BLANK}){_VALUE}"
        ),
        rf"\1: {REDACTED}",
    ),
    # A credential after its scheme, wherever it is quoted.
    (re.compile(rf"(?i)(bearer|basic){_BLANK}+{_VALUE}"), rf"\1 {REDACTED}"),
    # llmtap's own keys (ltk_ virtual, lta_ admin) and providers' (OpenAI's and
    # Anthropic's begin sk-: a passthrough client's own), anywhere.
    (re.compile(r"(lt[ka]_|sk-)[A-Za-z0-9_-]{16,}"), rf"\1{REDACTED}"),
)


def redact(text: str) -> str:
    """``text`` without the credentials it quotes."""
    for secret, kept in _SECRETS:
        text = secret.sub(kept, text)
    return text


class JsonFormatter(logging.Formatter):
    def __init__(self, process_name: str) -> None:
        super().__init__()
        self._process = process_name

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self._process,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        held_back = getattr(record, "suppressed", 0)
        if held_back:
            entry["suppressed"] = held_back
        if record.exc_info:
            entry["exception"] = redact(_format_exception(self, record.exc_info))
        return orjson.dumps(entry).decode()


def _format_exception(formatter: logging.Formatter, exc_info: _ExcInfo) -> str:
    """A traceback; of a request aiohttp could not parse, only its kind and status: its
    message quotes the request's bytes (a header line, a key; a body's, a prompt), on
    its first line too (a header value too long; with aiohttp's pure-Python parser, a
    chunk-size line, which is the body's)."""
    exc = exc_info[1]
    if isinstance(exc, HttpProcessingError):
        kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return f"{kind}: {exc.code} (its message, which quotes the request, is not logged)"
    return formatter.formatException(exc_info)


# Loggers whose lines repeat for as long as a broker is down: aiokafka logs each
# reconnect, metadata and fetch attempt (~100 ERROR lines a second from a store or a
# worker), which buries everything else and bills a log pipeline by the line.
REPEATING = ("aiokafka",)
REPEAT_S = 10.0
_MAX_KINDS = 1_000


class Throttle(logging.Filter):
    """Lets one line of each kind (logger, level, message template) of the loggers under
    ``prefixes`` through per ``interval`` seconds; the next one through carries in
    ``suppressed`` how many were held back. Other loggers' lines all pass."""

    def __init__(
        self,
        prefixes: tuple[str, ...] = REPEATING,
        interval: float = REPEAT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._prefixes = prefixes
        self._interval = interval
        self._clock = clock
        self._seen: dict[tuple[str, int, str], tuple[float, int]] = {}  # -> passed at, held

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self._prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._interval:
            self._seen[key] = (seen[0], seen[1] + 1)
            return False
        if len(self._seen) >= _MAX_KINDS:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self._interval}
        self._seen[key] = (now, 0)
        if seen is not None and seen[1]:
            record.suppressed = seen[1]
        return True


class ClientFaults(logging.Filter):
    """aiohttp logs a request it could not parse (a control character in a header, a
    bad chunk size, too many headers...) as an ERROR, traceback and all: the client's
    fault, answered with a 400, which anyone who can reach the port can send. Such a
    line is a WARNING, and one of them is written per ``interval`` seconds (the next
    one through carries how many were held back)."""

    def __init__(self, interval: float = REPEAT_S, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self._throttle = Throttle(("aiohttp.server",), interval, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name != "aiohttp.server" or not isinstance(exc, HttpProcessingError):
            return True
        if not 400 <= (exc.code or 0) < 500 or record.levelno <= logging.WARNING:
            return True  # a server's error; or one aiohttp logs lower itself (DEBUG)
        if not logging.getLogger(record.name).isEnabledFor(logging.WARNING):
            return False  # past the logger's level check as an ERROR, not as a WARNING
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return self._throttle.filter(record)


def setup(process_name: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process_name))
    handler.addFilter(ClientFaults())
    handler.addFilter(Throttle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
