"""A stop (SIGTERM, SIGINT) asked while a process prepares to run: the worker and the
store waiting for the broker and its topics, the worker reading back the windows judged
before, all before their servers (Faust's worker, aiohttp's ``web.run_app``) have
signal handlers of their own.

Left to its default, SIGTERM ended such a process at once (status -15), or, when it is
a container's first process (compose runs ``llmtap worker`` as PID 1), not at all: the
kernel drops a signal PID 1 has no handler for, and ``docker stop`` waited out its
grace period, then killed it. ``llmtap migrate`` (synchronous, in the main thread)
is stopped so too: :func:`stopped_at_once`.

A process `llmtap up` started is told that up is gone (killed outright: SIGKILL, the OOM
killer) by :data:`PARENT_GONE` (:func:`die_with_parent`, between fork and exec), which it
takes as one SIGTERM: :func:`stop_once_parent_gone`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# What `llmtap up` has the kernel send each llmtap process it starts once up is gone
# without stopping it (PR_SET_PDEATHSIG, llmtap/supervisor.py). Not SIGTERM: the kernel
# sends it again each time the child passes from one of up's threads that exits to
# another (1 to 4 in a row were seen, ~10 ms apart, up SIGKILLed), and a second SIGTERM
# cuts the ingress's shutdown_delay_s short. None of llmtap's processes, nor Faust's
# worker nor aiohttp, has another use for it, and up's children have no terminal to
# hang up.
PARENT_GONE = signal.SIGHUP
_PR_SET_PDEATHSIG = 1
_PR_GET_PDEATHSIG = 2
_LINUX = sys.platform.startswith("linux")

log = logging.getLogger(__name__)


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


class _Asked(BaseException):
    """A stop, raised where the main thread is: a BaseException, as KeyboardInterrupt is,
    so that no ``except Exception`` on the way (a client's, wrapping what it meets as
    its own error) takes it for a failure."""


@contextmanager
def stopped_at_once() -> Iterator[None]:
    """For synchronous work in the main thread (``llmtap migrate``'s): SIGTERM or
    SIGINT during the block ends it at once, as :class:`Stopped`: a sleep or a read of
    a socket (a server that does not answer) is cut short; a call into C (a chDB
    statement) ends first. Only the main thread can install the handlers, and it runs
    them. The signals' handlers are put back as they were."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Asked(signal.Signals(signum).name)

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        for sig in STOP_SIGNALS:
            signal.signal(sig, stop)
        yield
    except _Asked as exc:
        raise Stopped(str(exc)) from None
    finally:
        # Held while they are put back: a stop then is the restored handlers' to take.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig, handler in before.items():
                signal.signal(sig, handler)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def die_with_parent(death: signal.Signals, parent: int) -> None:
    """Runs in the child between fork and exec: ``death`` once ``parent`` (up) is gone,
    also when it went before this ran (the child, reparented, would never be told)."""
    if _LINUX:
        libc = _libc()
        libc.signal(death, 0)  # SIG_DFL: not left ignored (`nohup llmtap up` ignores SIGHUP)
        libc.prctl(_PR_SET_PDEATHSIG, death)
        if os.getppid() != parent:
            os.kill(os.getpid(), death)


def stop_once_parent_gone() -> None:
    """In a process whose parent-death signal is :data:`PARENT_GONE` (one `llmtap up`
    started, as the kernel says), take the first as one SIGTERM (what each process does
    with it: a graceful stop, the ingress's with its shutdown_delay_s) and ignore the
    kernel's repeats. A process started otherwise is left as it is."""
    if not _LINUX:
        return
    death = ctypes.c_int(0)
    if _libc().prctl(_PR_GET_PDEATHSIG, ctypes.byref(death)) != 0 or death.value != PARENT_GONE:
        return

    def gone(signum: int, frame: FrameType | None) -> None:
        signal.signal(PARENT_GONE, signal.SIG_IGN)
        log.warning("the llmtap up that started this process is gone: stopping as on SIGTERM")
        signal.raise_signal(signal.SIGTERM)

    signal.signal(PARENT_GONE, gone)
