"""`llmtap up`'s restarts: their delays, and a stop during one (the restarts end to
end: tests/test_e2e.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from aiohttp import web

from llmtap import ports, topics, wire
from llmtap.config import Settings
from llmtap.events import Alert
from llmtap.kafka import Kafka
from llmtap.names import Names
from llmtap.probes import listening
from llmtap.supervisor import (
    RESTART_MAX_S,
    RESTART_MIN_S,
    RESTART_RESET_S,
    Backoff,
    Child,
    StartupFailed,
    Supervisor,
    http_ok,
    stop_signals,
)
from llmtap.topics import TopicsRefused
from sql.store import Store
from stream.app import StreamWorker, create_app, ready_file
from tests.conftest import FakeUpstream, pid_alive, run_llmtap
from tests.fake_provider import SNAPSHOT, free_port
from tests.faults.harness import until
from tests.test_e2e import stored_calls
from tests.test_windows_e2e import sql


def test_a_stage_that_keeps_dying_waits_twice_as_long_each_time_up_to_the_most() -> None:
    backoff = Backoff()
    delays = [backoff.after(ran_s=0.5) for _ in range(9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert (RESTART_MIN_S, RESTART_MAX_S) == (1.0, 60.0)


def test_a_stage_that_ran_a_while_before_it_died_waits_the_least_again() -> None:
    backoff = Backoff()
    assert [backoff.after(ran_s=1.0) for _ in range(3)] == [1.0, 2.0, 4.0]
    assert backoff.after(ran_s=RESTART_RESET_S) == RESTART_MIN_S
    assert backoff.after(ran_s=RESTART_RESET_S - 1) == 2.0


async def test_a_stop_that_comes_while_a_stage_restarts_still_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new process is recorded even when the stop cancels its start, so stop_all
    stops it rather than leaving it running."""
    monkeypatch.setattr(Backoff, "after", lambda self, ran_s: 0.0)
    supervisor = Supervisor(Settings(data_dir=tmp_path))
    marker = tmp_path / "ran-once"
    # Exits at once the first time; the second time it runs until stopped.
    script = (
        "import os, sys, time; p = sys.argv[1]; os.path.exists(p) and time.sleep(60); open(p, 'w')"
    )
    first = await supervisor.spawn("stage", [sys.executable, "-c", script, str(marker)])
    start = supervisor._start

    async def stop_asked_meanwhile(name: str, argv: list[str], log_file: Path | None) -> Child:
        supervisor.stopping.set()
        await asyncio.sleep(0)  # the supervisor sees the stop and cancels the restart
        return await start(name, argv, log_file)

    monkeypatch.setattr(supervisor, "_start", stop_asked_meanwhile)
    assert await supervisor._keep_all()  # a stop
    second = supervisor.children[0]
    assert second is not first
    assert second.running
    await supervisor.stop_all()
    assert not second.running


async def test_a_broker_that_refuses_llmtap_s_topics_fails_the_start_saying_why(
    tmp_path: Path,
) -> None:
    async def refused() -> bool:
        raise TopicsRefused("the broker refused to create llmtap.requests: PolicyViolationError")

    supervisor = Supervisor(Settings(data_dir=tmp_path))
    with pytest.raises(StartupFailed, match=r"broker: .*llmtap\.requests: PolicyViolationError"):
        await supervisor.wait_ready("broker", refused)


async def test_a_broker_listens_when_any_of_the_bootstrap_list_does() -> None:
    """Clients bootstrap from whichever broker answers: the first being down is not
    "nothing listens"."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    up = server.sockets[0].getsockname()[1]
    down = free_port()
    try:
        assert await listening(f"127.0.0.1:{down}, 127.0.0.1:{up}")
        assert not await listening(f"127.0.0.1:{down}")
    finally:
        server.close()
        await server.wait_closed()


def _free_ports(tmp_path: Path, **overrides: object) -> Settings:
    ports = {
        "kafka_bootstrap": f"127.0.0.1:{free_port()}",
        "api_port": free_port(),
        "worker_metrics_port": free_port(),
        "proxy_port": free_port(),
    }
    return Settings.model_validate({"data_dir": tmp_path, **ports, **overrides})


def test_up_listens_on_the_broker_s_the_api_s_the_worker_s_and_the_proxy_s_port(
    tmp_path: Path,
) -> None:
    settings = _free_ports(tmp_path)
    assert [(listener.setting, listener.port) for listener in ports.listeners(settings)] == [
        ("kafka_bootstrap", int(settings.kafka_bootstrap.rsplit(":", 1)[1])),
        ("api_port", settings.api_port),
        ("worker_metrics_port", settings.worker_metrics_port),
        ("proxy_port", settings.proxy_port),
    ]
    assert ports.problems(settings) == []
    # No worker metrics, and a Kafka of its own: neither is up's to listen on.
    alone = _free_ports(tmp_path, worker_metrics_port=0, embedded_broker=False)
    assert [listener.setting for listener in ports.listeners(alone)] == ["api_port", "proxy_port"]


async def test_two_settings_naming_one_port_fail_the_start_before_anything_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, the worker took the proxy's port, its /healthz answered the ingress's
    readiness check, and the ingress, unable to bind, was restarted for ever."""
    settings = _free_ports(tmp_path)
    clash = settings.model_copy(update={"worker_metrics_port": settings.proxy_port})
    supervisor = Supervisor(clash)
    with caplog.at_level("ERROR", logger="llmtap.up"):
        assert await supervisor.run() == 1
    assert supervisor.children == []
    assert f"worker_metrics_port and proxy_port both name port {settings.proxy_port}" in caplog.text
    # On every address (0.0.0.0) it clashes with one address; on two others, not.
    anywhere = settings.model_copy(
        update={"api_host": "0.0.0.0", "worker_metrics_port": settings.api_port}
    )
    assert ports.clashes(ports.listeners(anywhere)) == [
        f"api_port and worker_metrics_port both name port {settings.api_port}"
    ]
    apart = settings.model_copy(
        update={"api_host": "127.0.0.2", "worker_metrics_port": settings.api_port}
    )
    assert ports.clashes(ports.listeners(apart)) == []
    # A name and an address it resolves to are one address.
    named = settings.model_copy(
        update={"api_host": "localhost", "worker_metrics_port": settings.api_port}
    )
    assert ports.clashes(ports.listeners(named)) == [
        f"api_port and worker_metrics_port both name port {settings.api_port}"
    ]
    # Every IPv6 address and every IPv4 one: asyncio binds the two apart.
    families = settings.model_copy(
        update={
            "api_host": "::",
            "worker_metrics_host": "0.0.0.0",
            "worker_metrics_port": settings.api_port,
        }
    )
    assert ports.clashes(ports.listeners(families)) == []


async def test_a_port_another_program_listens_on_fails_the_start_naming_its_setting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second `llmtap up` (or anything else) on the API's port: said at once, rather
    than its /healthz taken for our store's."""
    settings = _free_ports(tmp_path)
    other = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", settings.api_port)
    try:
        supervisor = Supervisor(settings)
        with caplog.at_level("ERROR", logger="llmtap.up"):
            assert await supervisor.run() == 1
        assert supervisor.children == []
        assert f"cannot listen on api_port 127.0.0.1:{settings.api_port} (" in caplog.text
    finally:
        other.close()
        await other.wait_closed()
    assert ports.problems(settings) == []  # let go: free again


def test_what_is_no_port_in_use_gets_no_hint_of_one(tmp_path: Path) -> None:
    settings = _free_ports(tmp_path, proxy_host="192.0.2.1")  # not this machine's
    [problem] = ports.problems(settings)
    assert problem.startswith(f"cannot listen on proxy_port 192.0.2.1:{settings.proxy_port} (")
    assert "another llmtap up" not in problem


async def test_a_ready_file_left_by_an_earlier_worker_is_not_taken_for_the_new_one_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker killed (or stopped just as it started) leaves its ready file behind.
    Before, `up` saw it at once, said "llmtap is up" and started the ingress while a
    worker that cannot start (here: a file where its Faust directory goes) was started
    again and again. Now the file is removed before each start, and the start fails."""
    settings = _free_ports(tmp_path)
    for name in ("data_dir", "kafka_bootstrap", "api_port", "worker_metrics_port", "proxy_port"):
        monkeypatch.setenv(f"LLMTAP_{name.upper()}", str(getattr(settings, name)))  # children's
    ready_file(settings).parent.mkdir(parents=True)
    ready_file(settings).touch()
    (tmp_path / "faust").write_text("x")
    supervisor = Supervisor(settings)
    running = asyncio.create_task(supervisor.run())

    async def ended_or_ingress_started() -> bool:
        return running.done() or any(c.name == "ingress" for c in supervisor.children)

    try:
        with caplog.at_level("ERROR", logger="llmtap.up"):
            await until(ended_or_ingress_started, "up ended or started the ingress", 150)
            assert [c.name for c in supervisor.children] == ["broker", "store", "worker"]
            assert await running == 1
    finally:
        supervisor.stopping.set()
        await running
    assert "startup failed: worker exited while waiting for stream worker" in caplog.text
    assert not [c.name for c in supervisor.children if c.running]


async def test_a_worker_given_partitions_once_its_stop_began_leaves_no_ready_file(
    tmp_path: Path,
) -> None:
    """A Ctrl-C just after `up` started: the worker's partitions came after its stop
    began, and it wrote its ready file ("stream worker ready" after "Stopping...") after
    on_stop had removed it, for the next `up` to find."""
    settings = Settings(data_dir=tmp_path, worker_metrics_port=0)
    app, stage, spikes = create_app(settings)
    worker = StreamWorker(app, stage, spikes, settings)
    ready = asyncio.create_task(worker._ready_once_assigned())
    worker._stopped_set()  # what Service.stop does first, then on_stop
    await worker.on_stop()
    stage.assigned.set()
    await ready
    assert not ready_file(settings).exists()


def test_a_hangup_stops_up_unless_it_runs_under_nohup() -> None:
    """`nohup llmtap up &` ignores SIGHUP so that a logout leaves it running; the handler
    that stops `up` in order on a hangup replaced that, and a logout stopped it."""
    before = signal.getsignal(signal.SIGHUP)
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        assert signal.SIGHUP in stop_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup leaves
        assert stop_signals() == (signal.SIGINT, signal.SIGTERM)
    finally:
        signal.signal(signal.SIGHUP, before)


# Loaded by every process of the `up` below (PYTHONPATH): migrations that take their time
# once they apply anything (an upgrade's backfills over a large store), and an `up` that
# waits less for a stage to be ready, so that their sum passes it.
SLOW_MIGRATIONS = """
import os, time
import sql.migrate
import llmtap.supervisor

_migrate = sql.migrate.migrate


def slow(store):
    applied = _migrate(store)
    if applied:
        time.sleep(float(os.environ["SLOW_MIGRATIONS_S"]))
    return applied


sql.migrate.migrate = slow
llmtap.supervisor.STARTUP_TIMEOUT_S = float(os.environ["SHORT_STARTUP_TIMEOUT_S"])
"""


async def test_migrations_longer_than_a_stage_s_start_do_not_fail_up(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The store migrates before it answers, and `up` gave it STARTUP_TIMEOUT_S: an
    upgrade of a large store (3M calls: ~11 s here, more with more) had `up` kill the
    store mid-migration as not ready, again at each start. `up` now migrates first, in
    a process of its own, with no deadline."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLOW_MIGRATIONS)
    env = {
        "PYTHONPATH": os.pathsep.join([str(shim), *sys.path]),
        "SLOW_MIGRATIONS_S": "40",
        "SHORT_STARTUP_TIMEOUT_S": "30",
    }
    async with run_llmtap(tmp_path / "data", upstream, env) as running:
        said = "\n".join(running.output)
        assert "store's migrations applied" in said
        assert '"process":"migrate"' in said and "applied migration 0001_calls" in said


# Loaded by every process of the `up` below (PYTHONPATH): a stage that exits is started
# again only after 30 s, so that a stop comes while it is down.
SLOW_RESTARTS = """
import llmtap.supervisor

llmtap.supervisor.Backoff.after = lambda self, ran_s: 30.0
"""


async def test_a_stop_while_the_worker_is_down_still_meters_what_the_proxy_published(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The worker died (between two restarts) when Ctrl-C came: the calls the proxy had
    published meanwhile were never costed, and died with the embedded broker, without
    a word (the drain passed over a stage not running)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SLOW_RESTARTS)
    env = {"PYTHONPATH": os.pathsep.join([str(shim), *sys.path])}
    async with run_llmtap(tmp_path / "data", upstream, env) as running:
        os.kill(running.child_pids()["worker"], signal.SIGKILL)

        async def worker_down() -> bool:
            return any("worker exited with code -9" in line for line in running.output)

        await until(worker_down, "up saw the worker die", 30)
        async with running.openai() as sdk:
            for _ in range(5):
                await sdk.chat.completions.create(
                    model="gpt-4o-mini-while-down", messages=[{"role": "user", "content": "x"}]
                )
        running.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(running.process.wait(), 90) == 0
    assert [name for name, pid in running.child_pids().items() if pid_alive(pid)] == []
    assert stored_calls(tmp_path / "data", "gpt-4o-mini-while-down" + SNAPSHOT) == 5


async def test_a_stage_that_cannot_be_started_again_is_tried_again_not_taken_for_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stage died, and starting it again failed (fork or exec refused: ENOMEM under
    the memory pressure that killed it, EAGAIN, EMFILE). Its keeper raised, and `up`
    took that for the broker's exit: it said "killing worker: its broker is gone",
    stopped everything, the healthy broker too (and with it every event not yet
    stored), and started it all over. The start is tried again instead."""
    monkeypatch.setattr(Backoff, "after", lambda self, ran_s: 0.0)
    supervisor = Supervisor(Settings(data_dir=tmp_path))
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    broker = await supervisor.spawn("broker", sleeper)
    first = await supervisor.spawn("stage", [sys.executable, "-c", "pass"])  # exits at once
    start = supervisor._start
    refused = 0

    async def fork_refused_once(name: str, argv: list[str], log_file: Path | None) -> Child:
        nonlocal refused
        if refused == 0:
            refused += 1
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return await start(name, sleeper, log_file)

    monkeypatch.setattr(supervisor, "_start", fork_refused_once)
    keeping = asyncio.create_task(supervisor._keep_all())
    try:

        async def started_again() -> bool:
            return keeping.done() or supervisor.children[1] is not first

        with caplog.at_level("ERROR", logger="llmtap.up"):
            await until(started_again, "the stage started again, or up gave up", 30)
            assert not keeping.done(), "taken for the broker's exit"
        assert broker.running
        assert "stage could not be started again" in caplog.text
    finally:
        supervisor.stopping.set()
        await keeping
        await supervisor.stop_all()
    assert not [c.name for c in supervisor.children if c.running]


async def test_an_empty_host_served_on_every_address_is_asked_on_this_machine_s(
    tmp_path: Path,
) -> None:
    """An empty proxy_host (or api_host) binds every address, as the port check reads it
    and as the servers bind it; `up` asked http://:PORT/healthz, no URL, waited out its
    120 s for a proxy that was serving, and failed the start ("ingress not ready"), and
    its banner said http://:PORT/v1."""
    port = free_port()
    app = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "", port).start()  # what the ingress does with proxy_host ""
    try:
        settings = _free_ports(tmp_path, proxy_host="", proxy_port=port, api_host="")
        assert ports.problems(settings.model_copy(update={"proxy_port": free_port()})) == []
        assert await http_ok(settings.health_url("ingress"))
        assert settings.proxy_url == f"http://127.0.0.1:{port}/v1"
        assert settings.api_url == f"http://127.0.0.1:{settings.api_port}/api/v1"
    finally:
        await runner.cleanup()


async def test_a_broker_that_dies_as_it_starts_fails_the_start_pointing_at_its_log(
    tmp_path: Path,
) -> None:
    """The embedded broker's output goes to its log file alone. One that could not
    start (here its port, free at up's check, taken since: Tansu logs AddrInUse and
    exits, status 0) failed the start with "broker exited while waiting for broker",
    and nothing said where to read why."""
    failed = await _broker_start_failing(_free_ports(tmp_path))
    broker_log = tmp_path / "logs" / "broker.log"
    assert failed == f"broker exited (code 0; its log: {broker_log}) while waiting for broker"
    assert "Address in use" in broker_log.read_text()


async def test_a_broker_that_exits_points_at_its_log_by_an_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative data_dir (`LLMTAP_DATA_DIR=.llmtap`) gave "its log: .llmtap/logs/
    broker.log", relative to wherever `up` was started, not said by the line."""
    monkeypatch.chdir(tmp_path)
    failed = await _broker_start_failing(_free_ports(tmp_path, data_dir="relative"))
    broker_log = tmp_path / "relative" / "logs" / "broker.log"
    assert f"its log: {broker_log.resolve()})" in failed


async def _broker_start_failing(settings: Settings) -> str:
    """Why the embedded broker's start failed, its port, free at up's check, taken
    since (Tansu logs AddrInUse and exits, status 0)."""
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    other = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    supervisor = Supervisor(settings)
    try:
        with pytest.raises(StartupFailed) as failed:
            await supervisor._start_broker()
    finally:
        other.close()
        await other.wait_closed()
        await supervisor.stop_all()
    return str(failed.value)


async def test_a_port_taken_while_everything_restarts_fails_the_start_naming_its_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker died, and `up` stopped everything to start it all again. Meanwhile
    another program (a second `llmtap up`, its own ports checked while ours were free)
    took the API's port. Only the first start checked the ports: our store could not
    bind and was restarted again and again, while the other's /healthz passed for it,
    and `up` said "llmtap is up again". Every start checks them now."""
    monkeypatch.setattr(Backoff, "after", lambda self, ran_s: 2.0)
    settings = _free_ports(tmp_path)
    for name in ("data_dir", "kafka_bootstrap", "api_port", "worker_metrics_port", "proxy_port"):
        monkeypatch.setenv(f"LLMTAP_{name.upper()}", str(getattr(settings, name)))  # children's
    supervisor = Supervisor(settings)
    other = web.Application()

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})  # as another llmtap's store answers

    other.router.add_get("/healthz", healthz)
    runner = web.AppRunner(other)
    await runner.setup()
    with caplog.at_level("INFO", logger="llmtap.up"):
        running = asyncio.create_task(supervisor.run())
        try:

            async def up() -> bool:
                return running.done() or "ingress ready" in caplog.text

            await until(up, "llmtap up started", 150)
            assert not running.done()
            supervisor.children[0].process.kill()  # the broker

            async def restarting() -> bool:
                return running.done() or "starting everything again in" in caplog.text

            await until(restarting, "up stopped everything to start again", 60)
            await web.TCPSite(runner, "127.0.0.1", settings.api_port).start()
            async with asyncio.timeout(60):
                assert await running == 1
        finally:
            supervisor.stopping.set()
            await asyncio.gather(running, return_exceptions=True)
            await runner.cleanup()
    assert f"cannot listen on api_port 127.0.0.1:{settings.api_port} (" in caplog.text
    assert "llmtap is up again" not in caplog.text
    assert not [c.name for c in supervisor.children if c.running]


BURST = 10
LAST_RULE = {  # one window of one call is its history; the burst's window fires
    "name": "last-burst",
    "dimension": "feature",
    "metric": "requests",
    "window_s": 1,
    "min_history": 1,
    "history_windows": 3,
    "min_value": 3,
    "cooldown_windows": 30,
}


async def test_what_the_worker_wrote_last_is_read_by_the_store_before_it_stops(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The drain waited for the worker on responses and the writer on costed events
    only, then stopped the worker and the store: windows and alerts the worker wrote in
    its last seconds, not yet read by the store, died with the embedded broker (a spike
    alert is never raised again). The store is held back (SIGSTOP) from before the
    worker wrote them until the worker has stopped: the store then reads them all
    before it is stopped itself."""
    bootstrap = f"127.0.0.1:{free_port()}"
    env = {
        "LLMTAP_KAFKA_BOOTSTRAP": bootstrap,
        "LLMTAP_WINDOW_SIZES_S": "[1]",
        # The burst's windows close this long after it: the store is held back by then.
        "LLMTAP_WINDOW_GRACE_S": "4",
        "LLMTAP_SPIKE_RULES": json.dumps([LAST_RULE]),
    }
    kafka, names = Kafka(bootstrap), Names()
    data = tmp_path / "data"
    async with run_llmtap(data, upstream, env) as running:
        pids = running.child_pids()
        async with running.openai() as sdk:

            async def call() -> None:
                await sdk.chat.completions.create(
                    model="gpt-4o-mini-last-windows",
                    messages=[{"role": "user", "content": "x"}],
                    extra_headers={"x-llmtap-feature": "last-burst"},
                )

            async def rows(query: str) -> int:
                return int((await sql(running, query))[0]["n"])

            await call()

            async def history_stored() -> bool:
                query = "SELECT count() AS n FROM windows WHERE value = 'last-burst'"
                return await rows(query) > 0

            await until(history_stored, "the first call's window stored", 60)
            await asyncio.gather(*(call() for _ in range(BURST)))

            async def calls_written() -> bool:
                query = "SELECT count() AS n FROM calls WHERE feature = 'last-burst'"
                stored = await rows(query) == 1 + BURST
                return stored and await topics.lag(kafka, names.sink_group, names.costed) == 0

            await until(calls_written, "the burst's calls stored and committed", 60)
        os.kill(pids["store"], signal.SIGSTOP)
        try:

            async def unread() -> bool:
                windows = [
                    wire.decode_window(r) for r in await topics.read_all(kafka, names.windows)
                ]
                return (
                    sum(w.requests for w in windows if w.value == "last-burst") == 1 + BURST
                    and await topics.lag(kafka, names.webhook_group, names.alerts) > 0
                    and await topics.lag(kafka, names.sink_group, names.windows) > 0
                )

            # Every call's window closed, and the burst's spike alert raised, unread.
            await until(unread, "the burst's windows and spike alert unread by the store", 60)
            running.process.send_signal(signal.SIGTERM)

            async def worker_gone() -> bool:
                return not pid_alive(pids["worker"])

            await until(worker_gone, "the worker stopped", 90)
            # Everything the worker wrote (only it writes these topics), as the
            # embedded broker holds it before it is stopped.
            windows = [
                wire.decode_window(raw) for raw in await topics.read_all(kafka, names.windows)
            ]
            alerts = [
                Alert.model_validate_json(r) for r in await topics.read_all(kafka, names.alerts)
            ]
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pids["store"], signal.SIGCONT)
        assert await asyncio.wait_for(running.process.wait(), 90) == 0
    ours = {str(w.event_id) for w in windows if w.value == "last-burst"}
    spikes = {str(a.event_id) for a in alerts if a.rule == "last-burst"}
    assert spikes, "no spike alert raised"
    store = Store(f"chdb:///{data / 'clickhouse'}")
    try:
        stored_windows = store.rows(
            "SELECT toString(event_id) AS id FROM windows WHERE value = 'last-burst'", {}
        )
        stored_alerts = store.rows(
            "SELECT toString(event_id) AS id FROM alerts WHERE rule = 'last-burst'", {}
        )
    finally:
        store.close()
    stored = ({r["id"] for r in stored_windows}, {r["id"] for r in stored_alerts})
    assert stored == (ours, spikes)
    assert not [line for line in running.output if "events behind" in line]
