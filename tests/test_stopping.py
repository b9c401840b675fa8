"""A stop asked while `llmtap worker` or `llmtap store` waits for its broker, or while
`llmtap migrate` runs (llmtap/stopping.py): a real subprocess, SIGTERM as `docker stop`
sends it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmtap.config import CONFIG_ENV
from sql.migrate import available
from tests.conftest import Broker
from tests.fake_provider import free_port

STOPPED_WITHIN_S = 5.0


@contextlib.asynccontextmanager
async def no_broker() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """Nothing listening there: each probe is refused at once."""
    reached = asyncio.Event()
    reached.set()
    yield f"127.0.0.1:{free_port()}", reached


@contextlib.asynccontextmanager
async def silent_server(
    *, reached_at_connection: int = 1, reached_after: bytes = b""
) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A server that takes connections and answers nothing (a peer still starting, hung,
    or behind a proxy that holds the request): its client waits on it. ``reached`` is
    set once connection number ``reached_at_connection`` (or a later one) came and sent
    ``reached_after`` (if any): the client is then waiting on the answer, not still on
    its way to it, and a stop sent then is one sent mid-wait."""
    reached = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        if len(held) >= reached_at_connection:
            if reached_after:
                await reader.readuntil(reached_after)
            reached.set()
        await reader.read()  # until the client goes

    server = await asyncio.start_server(session, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", reached
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def silent_broker() -> contextlib.AbstractAsyncContextManager[tuple[str, asyncio.Event]]:
    """A broker that answers nothing: the process's probe waits on it, inside the Kafka
    client. Reached at the second connection, the Kafka client's (the first is the
    probe's bare TCP check)."""
    return silent_server(reached_at_connection=2)


@pytest.mark.parametrize("broker", [no_broker, silent_broker])
@pytest.mark.parametrize("command", ["worker", "store"])
async def test_sigterm_while_waiting_for_the_broker_stops_the_process_at_once_cleanly(
    command: str, broker: object, tmp_path: Path
) -> None:
    """The worker and the store wait for the broker and llmtap's topics before they
    start, and had no handler for SIGTERM meanwhile: it ended them at once, status
    -15, or, as a container's first process (compose runs each so), not at all (the
    kernel drops a signal PID 1 has no handler for), `docker stop` waiting out its 10 s
    and killing it. A probe under way (a broker that does not answer) is cut short."""
    assert callable(broker)
    async with broker() as (bootstrap, reached):
        env = {
            **os.environ,
            "LLMTAP_DATA_DIR": str(tmp_path),
            "LLMTAP_KAFKA_BOOTSTRAP": bootstrap,
            "LLMTAP_EMBEDDED_BROKER": "false",
            "LLMTAP_API_PORT": str(free_port()),
            "LLMTAP_WORKER_METRICS_PORT": str(free_port()),
        }
        env.pop(CONFIG_ENV, None)
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "llmtap", command),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        said: list[str] = []
        try:
            async with asyncio.timeout(60):
                await reached.wait()
                while not any("waiting for the broker" in line for line in said):
                    if broker is silent_broker:
                        break  # its probe hangs: nothing is said until it gives up
                    line = await process.stderr.readline()
                    assert line, f"{command} ended before it waited: {said}"
                    said.append(line.decode())
            process.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            asked_at = loop.time()
            rest = await asyncio.wait_for(process.stderr.read(), STOPPED_WITHIN_S)
            await asyncio.wait_for(process.wait(), STOPPED_WITHIN_S)
            took = loop.time() - asked_at
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        said.append(rest.decode())
        assert process.returncode == 0, "".join(said)[-2000:]
        assert took < STOPPED_WITHIN_S
        assert f"llmtap {command} stopped (SIGTERM) before it started" in "".join(said)
        assert "Traceback" not in "".join(said)


async def _migrate(env: dict[str, str], command: str = "migrate") -> asyncio.subprocess.Process:
    env = {**os.environ, **env}
    env.pop(CONFIG_ENV, None)
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmtap", command),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _stop(process: asyncio.subprocess.Process) -> tuple[str, float]:
    """SIGTERM, then what the process said on stderr until it ended, and how long that
    took (killed if it outlasts STOPPED_WITHIN_S)."""
    assert process.stderr is not None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(ProcessLookupError):  # ended already: a race lost
        process.send_signal(signal.SIGTERM)
    asked_at = loop.time()
    try:
        rest = await asyncio.wait_for(process.stderr.read(), STOPPED_WITHIN_S)
        await asyncio.wait_for(process.wait(), STOPPED_WITHIN_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return rest.decode(), loop.time() - asked_at


@pytest.mark.parametrize("command", ["migrate", "store"])
async def test_sigterm_while_migrate_waits_for_clickhouse_stops_it_at_once(
    tmp_path: Path, command: str, broker: Broker
) -> None:
    """`llmtap migrate` had no handler for SIGTERM: it ended at once (status -15), or,
    as a container's first process (a Job's, a one-off compose run's), not at all,
    `docker stop` waiting out its grace period; `llmtap store` migrated in a thread of
    its app's start, which a stop waited for. Waiting on a ClickHouse server that does
    not answer, each stops at once, status 1 (not migrated), saying so."""
    # Reached once a whole HTTP request came: the client then waits for its read
    # timeout (300 s).
    async with silent_server(reached_after=b"\r\n\r\n") as (address, reached):
        dsn = f"http://{address}/llmtap"
        env = {
            "LLMTAP_DATA_DIR": str(tmp_path),
            "LLMTAP_CLICKHOUSE_DSN": dsn,
            "LLMTAP_KAFKA_BOOTSTRAP": broker.bootstrap,  # the store's is up
        }
        process = await _migrate(env, command)
        try:
            async with asyncio.timeout(60):
                await reached.wait()
        finally:
            said, took = await _stop(process)
    assert process.returncode == 1, said[-2000:]
    assert took < STOPPED_WITHIN_S
    assert f"llmtap {command} stopped (SIGTERM) before it was done" in said
    assert "Traceback" not in said


async def test_sigterm_while_migrating_leaves_no_migration_half_recorded(
    tmp_path: Path,
) -> None:
    """Stopped between its migrations (chDB: a statement under way ends first), `llmtap
    migrate` exits 1 at once, and what it did not finish is not recorded: the next run
    applies the rest, each once, and the schema is whole.

    The stop is sent once the first migration is said applied; the rest take ~0.6 s
    here. A machine slow enough that they all end before the signal lands (status 0,
    or -15 once the handlers are put back) is a race lost, not a finding: run again
    on a fresh store, a few times at most."""
    for attempt in range(5):
        env = {"LLMTAP_DATA_DIR": str(tmp_path / f"try-{attempt}")}
        process = await _migrate(env)
        assert process.stderr is not None
        said: list[str] = []
        try:
            async with asyncio.timeout(60):
                while not any("applied migration 0001_" in line for line in said):
                    line = await process.stderr.readline()
                    assert line, f"migrate ended before it migrated: {said}"
                    said.append(line.decode())
        finally:
            rest, took = await _stop(process)
        said.append(rest)
        if process.returncode not in (0, -signal.SIGTERM):
            break
    assert process.returncode == 1, "".join(said)[-2000:]
    assert took < STOPPED_WITHIN_S
    assert "llmtap migrate stopped (SIGTERM) before it was done" in "".join(said)
    assert "Traceback" not in "".join(said)

    again = await _migrate(env)
    out, err = await asyncio.wait_for(again.communicate(), 120)
    assert again.returncode == 0, err.decode()[-2000:]
    applied = {int(v) for v in re.findall(r"applied migration (\d{4})_", "".join(said))}
    rest_applied = re.search(r"applied migrations: \[([\d, ]*)\]", out.decode())
    assert rest_applied, out.decode()
    now = {int(v) for v in rest_applied[1].split(",")}
    every = {m.version for m in available()}
    assert applied and now and applied | now == every
    assert applied.isdisjoint(now)  # none applied twice: each recorded once, when done
