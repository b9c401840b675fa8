"""How many API requests one caller may have in flight at once.

The store serves every tenant from one process, its reads a few at a time
(``sql.store.READERS``): without a bound, one key sending a hundred requests at once
would queue everyone else's behind them. A caller past ``api_requests_per_key`` gets a
429 at once (``Retry-After: 1``), before anything is queued.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from aiohttp import web

from sql.auth import Caller


class TooMany(Exception):
    """The caller has as many requests in flight as it may."""


class Admission:
    def __init__(self, per_caller: int) -> None:
        self.per_caller = per_caller
        self._in_flight: Counter[str] = Counter()
        self.refused = 0  # requests refused so far (llmtap_api_requests_refused_total)

    @staticmethod
    def who(caller: Caller) -> str:
        """A virtual key's id, or "admin" (the admin keys together: one operator's)."""
        return "admin" if caller.key is None else caller.key.id

    def in_flight(self, who: str) -> int:
        return self._in_flight[who]

    @property
    def total_in_flight(self) -> int:
        return sum(self._in_flight.values())

    @contextlib.contextmanager
    def admit(self, caller: Caller) -> Iterator[None]:
        """Hold a place for one request of ``caller``; raises :class:`TooMany`."""
        who = self.who(caller)
        if self._in_flight[who] >= self.per_caller:
            self.refused += 1
            raise TooMany(
                f"this key has {self.per_caller} requests in flight, the most it may: "
                "wait for one to finish"
            )
        self._in_flight[who] += 1
        try:
            yield
        finally:
            self._in_flight[who] -= 1
            if not self._in_flight[who]:
                del self._in_flight[who]


ADMISSION = web.AppKey("admission", Admission)
