"""The store process (`llmtap store`, sinks/app.py) as a real subprocess, on a real
broker (Tansu) and its own chDB store."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.conftest import start_broker
from tests.fake_provider import free_port

EXIT_S = 120.0  # from spawn (imports, migrations, joining the group) to exit

# The store process with a bug that raises a BaseException, not an Exception, when the
# writer repeats the uncommitted inserts of the partitions it is given.
BUGGY_STORE = """
import sys

from llmtap.cli import main
from sinks.clickhouse import replay


class Bug(BaseException):
    pass


async def repeat_uncommitted(*args):
    raise Bug("a bug in the repeat")


replay.repeat_uncommitted = repeat_uncommitted
sys.exit(main(["store"]))
"""


async def test_a_writer_that_fails_stops_the_store_process(tmp_path: Path) -> None:
    """The writer's takeover raises: the store process exits, with status 1, for its
    supervisor (`llmtap up`, compose's restart policy) to start it again. The writer's
    task ended and the process served on, its /healthz 200, writing nothing."""
    async with start_broker() as broker:
        env = {
            **os.environ,
            "LLMTAP_DATA_DIR": str(tmp_path),
            "LLMTAP_KAFKA_BOOTSTRAP": broker.bootstrap,
            "LLMTAP_API_PORT": str(free_port()),
            "LLMTAP_SINK_DECODE_PROCESSES": "0",
        }
        env.pop("LLMTAP_CONFIG", None)
        store = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            BUGGY_STORE,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with asyncio.timeout(EXIT_S):
                _, stderr = await store.communicate()
        except TimeoutError:
            raise AssertionError(f"the store process still running after {EXIT_S:.0f} s") from None
        finally:
            if store.returncode is None:
                store.kill()
                await store.wait()
    log = stderr.decode()
    assert store.returncode == 1, log
    assert "taking partitions over failed" in log and "the store process exits" in log, log
