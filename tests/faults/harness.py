"""Each llmtap process as a real subprocess of its own, started, killed and restarted
one at a time, with the readiness checks `llmtap up` uses (llmtap/supervisor.py):

| process | started as                       | ready when                                   |
|---------|----------------------------------|----------------------------------------------|
| broker  | ``supervisor.broker_argv``       | it answers, llmtap's topics exist            |
| store   | ``python -m llmtap store``       | ``GET /healthz`` on the API port is 200      |
| worker  | ``python -m llmtap worker``      | its ready file exists (``ready_file``)       |
| ingress | ``python -m llmtap ingress``     | ``GET /readyz`` is 200 and ``/healthz`` says |
|         |                                  | the producer is connected (``/healthz`` if   |
|         |                                  | the broker is meant to be down)              |

Every process gets the environment `llmtap up` would give it: ``LLMTAP_*`` settings
(here as environment variables, as a config file would be inherited) on ports of its
own. ClickHouse is read through the store's own SQL endpoint (``POST /api/v1/sql``
with an admin key): chDB lets one process open its directory, and that is the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ingress.guards.keys import create_key
from llmtap import topics
from llmtap.config import Settings
from llmtap.probes import topics_ready
from llmtap.stopping import die_with_parent
from llmtap.supervisor import broker_argv
from stream.app import ready_file
from tests.fake_provider import free_port

ADMIN_KEY = "admin-key-for-fault-tests"
PROVIDER_KEY = "sk-provider-secret-for-fault-tests"
ANTHROPIC_KEY = "sk-ant-provider-secret-for-fault-tests"
TENANT = "acme"
TEAM = "search"

START_TIMEOUT_S = 90.0  # one process, from spawn to ready
STOP_GRACE_S = 10.0
NAMES = ("broker", "store", "worker", "ingress")  # start order, as `llmtap up` has it


class HarnessError(AssertionError):
    """A process did not start, or a condition was not met in time."""


async def until(
    condition: Callable[[], Awaitable[bool]],
    what: str,
    seconds: float,
    *,
    every: float = 0.2,
    context: Callable[[], str] | None = None,
) -> None:
    """Poll ``condition`` until it is true; fail with ``what`` after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            detail = f"\n{context()}" if context is not None else ""
            raise HarnessError(f"not true after {seconds:.0f}s: {what}{detail}")
        await asyncio.sleep(every)


@dataclass
class Process:
    name: str
    argv: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} never started"
        return self.process.pid


@dataclass
class Cluster:
    """One llmtap deployment (broker, store, worker, ingress) under a test's control;
    given ``shared_broker`` (another cluster's bootstrap), it uses that broker instead
    of starting one, as a second deployment on the same Kafka does."""

    root: Path
    upstream_url: str  # the fake provider's root, e.g. http://127.0.0.1:1234
    extra_env: dict[str, str] = field(default_factory=dict)
    shared_broker: str | None = None

    def __post_init__(self) -> None:
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.bootstrap = self.shared_broker or f"127.0.0.1:{free_port()}"
        self.proxy_port, self.api_port = free_port(), free_port()
        self.worker_port = free_port()
        self.env: dict[str, str] = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "LLMTAP_DATA_DIR": str(self.data_dir),
            "LLMTAP_KAFKA_BOOTSTRAP": self.bootstrap,
            "LLMTAP_PROXY_PORT": str(self.proxy_port),
            "LLMTAP_API_PORT": str(self.api_port),
            "LLMTAP_WORKER_METRICS_PORT": str(self.worker_port),
            "LLMTAP_OPENAI_BASE_URL": f"{self.upstream_url}/v1",
            "LLMTAP_OPENAI_API_KEY_ENV": "FAULTS_OPENAI_KEY",
            "FAULTS_OPENAI_KEY": PROVIDER_KEY,
            "LLMTAP_ANTHROPIC_BASE_URL": self.upstream_url,
            "LLMTAP_ANTHROPIC_API_KEY_ENV": "FAULTS_ANTHROPIC_KEY",
            "FAULTS_ANTHROPIC_KEY": ANTHROPIC_KEY,
            "LLMTAP_SINK_BATCH_SECONDS": "0.2",
            "LLMTAP_TOPIC_PARTITIONS": "2",
            "LLMTAP_ADMIN_KEY_HASHES": json.dumps([hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]),
            **self.extra_env,
        }
        self.env.pop("LLMTAP_CONFIG", None)
        # What the harness itself needs of the children's settings: paths and topics.
        self.settings = Settings(
            data_dir=self.data_dir,
            kafka_bootstrap=self.bootstrap,
            topic_partitions=2,
            kafka_namespace=self.env.get("LLMTAP_KAFKA_NAMESPACE", "llmtap"),
        )
        self.api_key, _ = create_key(self.settings.key_file, tenant=TENANT, team=TEAM)
        python = [sys.executable, "-m", "llmtap"]
        self.processes = {
            "broker": Process("broker", broker_argv(self.bootstrap), self.logs / "broker.log"),
            **{
                name: Process(name, [*python, name], self.logs / f"{name}.log")
                for name in NAMES[1:]
            },
        }

    # -- addresses ------------------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        """What the OpenAI SDK takes as base_url."""
        return f"http://127.0.0.1:{self.proxy_port}/v1"

    @property
    def proxy_root(self) -> str:
        """What the Anthropic SDK takes as base_url (it adds /v1 itself)."""
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def api_root(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    # -- lifecycle ------------------------------------------------------------------------

    async def start_all(self) -> None:
        for name in NAMES:
            await self.start(name)

    async def start(self, name: str, *, ready: bool = True, broker_up: bool = True) -> None:
        """Spawn ``name`` and (with ``ready``) wait for its readiness check. An ingress
        started with ``broker_up=False`` is ready when it answers /healthz (its /readyz
        is 200 too while the spool has room); otherwise once its producer is connected."""
        proc = self.processes[name]
        assert not proc.running, f"{name} is already running"
        if name == "broker" and self.shared_broker:  # another cluster's: make our topics
            await until(self.checks()["broker"], "the shared broker has our topics", 30)
            return
        if name == "worker":
            # A killed worker leaves its ready file behind: never take it for the new one's.
            ready_file(self.settings).unlink(missing_ok=True)
        with proc.log_path.open("ab") as log:
            log.write(f"\n==== start #{proc.starts + 1} of {name}\n".encode())
            log.flush()
            proc.process = await asyncio.create_subprocess_exec(
                *proc.argv,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, signal.SIGKILL, os.getpid()),
            )
        proc.starts += 1
        if ready:
            await self.wait_ready(name, broker_up=broker_up)

    async def wait_ready(self, name: str, *, broker_up: bool = True) -> None:
        proc = self.processes[name]
        check = self.checks(broker_up=broker_up)[name]

        async def ready() -> bool:
            if not proc.running:
                raise HarnessError(f"{name} exited while starting:\n{self.tail(name)}")
            return await check()

        await until(ready, f"{name} ready", START_TIMEOUT_S, every=0.1)

    def checks(self, *, broker_up: bool = True) -> dict[str, Callable[[], Awaitable[bool]]]:
        """Each process's readiness check."""
        return {
            "broker": lambda: topics_ready(self.settings.kafka, self.settings.topic_partitions),
            "store": lambda: self.http_ok(f"{self.api_root}/healthz"),
            "worker": lambda: asyncio.to_thread(ready_file(self.settings).exists),
            "ingress": self.ingress_connected if broker_up else self.ingress_answers,
        }

    async def kill(self, name: str) -> None:
        """SIGKILL: no cleanup of any kind runs in the process."""
        proc = self.processes[name]
        assert proc.running and proc.process is not None, f"{name} is not running"
        proc.process.kill()
        await proc.process.wait()

    async def terminate(self, name: str) -> None:
        proc = self.processes[name]
        if not proc.running or proc.process is None:
            return
        proc.process.terminate()
        try:
            await asyncio.wait_for(proc.process.wait(), STOP_GRACE_S)
        except TimeoutError:
            proc.process.kill()
            await proc.process.wait()

    def pause(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        os.kill(self.processes[name].pid, signal.SIGCONT)

    async def close(self) -> None:
        for name in reversed(NAMES):
            proc = self.processes[name]
            if proc.running and proc.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)  # a paused process cannot stop
                await self.terminate(name)

    def dead(self) -> list[str]:
        """Processes that were started and are no longer running."""
        return [n for n, p in self.processes.items() if p.starts and not p.running]

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.processes[name].log_path
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"--- {name} log (last {lines} lines)\n" + "\n".join(text.splitlines()[-lines:])

    def tails(self, lines: int = 15) -> str:
        return "\n".join(self.tail(name, lines) for name in NAMES)

    def log(self, name: str) -> str:
        path = self.processes[name].log_path
        return path.read_text(errors="replace") if path.exists() else ""

    # -- asking the processes -------------------------------------------------------------

    @staticmethod
    async def http_ok(url: str) -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def ingress_answers(self) -> bool:
        return await self.http_ok(f"{self.proxy_root}/healthz")

    async def ingress_connected(self) -> bool:
        """Ready, and its producer connected (/readyz alone is 200 while it spools)."""
        if not await self.http_ok(f"{self.proxy_root}/readyz"):
            return False
        return bool((await self.ingress_health()).get("broker_connected"))

    async def ingress_health(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{self.proxy_root}/healthz") as response,
        ):
            assert response.status == 200
            health: dict[str, Any] = await response.json()
            return health

    async def store_health(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{self.api_root}/healthz") as response,
        ):
            assert response.status == 200
            health: dict[str, Any] = await response.json()
            return health

    async def sql(self, query: str) -> list[dict[str, Any]]:
        """Rows of a read-only query, through the store's SQL endpoint (admin key)."""
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
            session.post(
                f"{self.api_root}/api/v1/sql",
                json={"query": query, "max_rows": 10_000},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            ) as response,
        ):
            body = await response.json()
            if response.status != 200:
                raise HarnessError(f"SQL {query!r} failed: {response.status} {body}")
        assert not body["truncated"], "more rows than the SQL endpoint returns"
        names = [c["name"] for c in body["columns"]]
        return [dict(zip(names, row, strict=True)) for row in body["rows"]]

    async def calls_by_request(self, feature: str) -> dict[str, dict[str, Any]]:
        """Per request id of one scenario's calls: how many rows, and their sums."""
        assert re.fullmatch(r"[a-z0-9-]+", feature), feature
        rows = await self.sql(
            "SELECT toString(request_id) AS request_id, count() AS rows, "
            "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
            "any(status) AS status, any(http_status) AS http_status, "
            "any(error_class) AS error_class, toString(sum(cost_total)) AS cost "
            f"FROM calls WHERE feature = '{feature}' GROUP BY request_id"
        )
        return {row["request_id"]: row for row in rows}

    async def lag(self) -> dict[str, int]:
        """Events each stage has not yet committed: the worker on responses, the writer
        on costed events, the webhook dispatcher on alerts. Windows (the worker's spikes
        group and the writer's), which `llmtap up` also waits for when it drains, are
        not counted."""
        names = self.settings.kafka.names
        stages = [
            ("worker", names.stream_group, names.responses),
            ("writer", names.sink_group, names.costed),
            ("dispatcher", names.webhook_group, names.alerts),
        ]
        return {
            name: await topics.lag(self.settings.kafka, group, topic)
            for name, group, topic in stages
        }

    async def quiet(self, seconds: float = 60.0) -> None:
        """Wait until nothing is left anywhere on the way to ClickHouse: the ingress holds
        no event in memory or in its spool, and every stage has committed all it read."""
        last: dict[str, Any] = {}

        async def idle() -> bool:
            health = await self.ingress_health()
            last["ingress"] = {k: health[k] for k in ("events_backlog", "spool_bytes")}
            if health["events_backlog"] or health["spool_bytes"] or not health["broker_connected"]:
                return False
            last["lag"] = await self.lag()
            return not any(last["lag"].values())

        await until(
            idle, "the pipeline is idle", seconds, every=0.5, context=lambda: f"last seen: {last}"
        )
