"""Fixtures of the fault suite: a provider that can fail on demand, and clusters of
real llmtap processes (tests/faults/harness.py), each torn down after its test."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.fake_provider import free_port, serve
from tests.faults.harness import Cluster
from tests.faults.upstream import FaultyProvider

MakeCluster = Callable[..., Awaitable[Cluster]]


class Upstream:
    def __init__(self, provider: FaultyProvider, port: int, runner: web.AppRunner) -> None:
        self.provider = provider
        self.port = port
        self.runner = runner

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def faulty_upstream() -> AsyncIterator[Upstream]:
    """The fake provider (tests/faults/upstream.py), served on a port of its own."""
    provider = FaultyProvider()
    port = free_port()
    runner = await serve(provider.app(), port)
    try:
        yield Upstream(provider, port, runner)
    finally:
        await runner.cleanup()


@pytest.fixture
async def upstream_faults() -> AsyncIterator[Upstream]:
    async with faulty_upstream() as upstream:
        yield upstream


@pytest.fixture
async def make_cluster(
    tmp_path: Path, upstream_faults: Upstream, request: pytest.FixtureRequest
) -> AsyncIterator[MakeCluster]:
    """Build a cluster (not started) in front of the fake provider; every process of it
    is stopped when the test ends, and on failure the tail of each log is printed."""
    made: list[Cluster] = []

    async def make(
        extra_env: dict[str, str] | None = None, shared_broker: str | None = None
    ) -> Cluster:
        cluster = Cluster(
            tmp_path / f"cluster{len(made)}",
            upstream_faults.root_url,
            extra_env or {},
            shared_broker,
        )
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        await cluster.close()
        if request.session.testsfailed:
            print(cluster.tails(25))
