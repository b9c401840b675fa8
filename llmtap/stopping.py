"""A stop (SIGTERM, SIGINT) asked while a process prepares to run: the worker and the
store waiting for the broker and its topics, the worker reading back the windows judged
before, all before their servers (Faust's worker, aiohttp's ``web.run_app``) have
signal handlers of their own.

Left to its default, SIGTERM ended such a process at once (status -15), or, when it is
a container's first process (compose runs ``llmtap worker`` as PID 1), not at all: the
kernel drops a signal PID 1 has no handler for, and ``docker stop`` waited out its
grace period, then killed it.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A stop was asked before the work was done (the signal's name): the process ends,
    status 0, having started nothing."""


async def unless_stopped(work: Awaitable[T]) -> T:
    """``work``'s result, or :class:`Stopped` (the work cancelled) if SIGTERM or SIGINT
    comes first, or while it ends. The signals' handlers are put back as they were."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    asked: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        asked.append(sig)
        task.cancel()

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        result = await task
    except asyncio.CancelledError:
        if not asked:
            raise  # cancelled from outside: not ours to turn into a stop
        raise Stopped(asked[0].name) from None
    else:
        if asked:  # came as the work ended: a stop all the same
            raise Stopped(asked[0].name)
        return result
    finally:
        for sig, handler in before.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
