"""A stop asked while `llmtap worker` or `llmtap store` waits for its broker
(llmtap/stopping.py): a real subprocess, SIGTERM as `docker stop` sends it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llmtap.config import CONFIG_ENV
from tests.fake_provider import free_port

STOPPED_WITHIN_S = 5.0


@contextlib.asynccontextmanager
async def no_broker() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """Nothing listening there: each probe is refused at once."""
    reached = asyncio.Event()
    reached.set()
    yield f"127.0.0.1:{free_port()}", reached


@contextlib.asynccontextmanager
async def silent_broker() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A broker that takes connections and answers nothing (one still starting, or
    hung): the process's probe waits on it, inside the Kafka client. ``reached`` is set
    once a Kafka client connected (after the probe's bare TCP check)."""
    reached = asyncio.Event()
    sessions = 0
    held: list[asyncio.StreamWriter] = []

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sessions
        sessions += 1
        held.append(writer)
        if sessions >= 2:
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
