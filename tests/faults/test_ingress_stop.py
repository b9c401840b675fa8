"""The ingress stopped (SIGTERM, as a rolling deploy or `docker stop` does) while a
stream is in flight: the client gets the whole answer, and the call is metered; a
stream longer than the grace is cut, and recorded as cut by the proxy.

aiohttp stops taking connections at once, then lets running handlers finish (up to
shutdown_grace_s) before the app's cleanup, which flushes the publisher, runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from openai import APIConnectionError, AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

from llmtap.probes import listening
from tests.faults.conftest import MakeCluster, Upstream
from tests.faults.harness import Cluster, until

pytestmark = pytest.mark.faults

FEATURE = "ingress-stop"


async def stopped_mid_stream(
    make_cluster: MakeCluster, env: dict[str, str]
) -> tuple[Cluster, list[ChatCompletionChunk], APIConnectionError | None]:
    """Start a cluster, open a stream, and once its first chunk is here stop the
    ingress; then read the stream to its end. What the client received, and the error
    that ended it early (None: it ended whole). The ingress must have stopped, not been
    killed; a new one is started, as a deploy would."""
    cluster = await make_cluster(env)
    await cluster.start_all()
    cut: APIConnectionError | None = None
    async with a_stream_begun(cluster) as (received, chunks):
        stopping = asyncio.create_task(cluster.terminate("ingress"))
        await refusing_connections(cluster)
        try:
            async for chunk in chunks:
                received.append(chunk)
        except APIConnectionError as exc:  # cut: no final chunk, as a broken upstream
            cut = exc
    await stopping
    ingress = cluster.processes["ingress"].process
    assert ingress is not None and ingress.returncode == 0  # stopped, not killed
    await cluster.start("ingress")
    await cluster.quiet()
    return cluster, received, cut


async def refusing_connections(cluster: Cluster) -> None:
    """Wait until the stopping ingress refuses new connections (its stop runs)."""

    async def refusing() -> bool:
        return not await listening(f"127.0.0.1:{cluster.proxy_port}")

    await until(refusing, "the stopping ingress refuses new connections", 5)


async def ended_whole_and_metered(
    cluster: Cluster,
    ingress: asyncio.subprocess.Process,
    received: list[ChatCompletionChunk],
    words: Sequence[str],
) -> None:
    """The stream reached the client whole, the ingress stopped by itself (exit 0), and
    the call is metered once, ok, as read by an ingress started again."""
    assert text(received) == "".join(words)
    assert await asyncio.wait_for(ingress.wait(), 30) == 0
    await cluster.start("ingress")
    await cluster.quiet()
    row = await only_call(cluster)
    assert (row["rows"], row["status"]) == (1, "ok")


@contextlib.asynccontextmanager
async def a_stream_begun(
    cluster: Cluster,
) -> AsyncIterator[tuple[list[ChatCompletionChunk], AsyncIterator[ChatCompletionChunk]]]:
    """A streamed call through the ingress, its first chunk received: the chunks
    received (to add to), and the rest of the stream."""
    async with AsyncOpenAI(
        base_url=cluster.proxy_url, api_key=cluster.api_key, max_retries=0
    ) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "a long answer"}],
            stream=True,
            extra_headers={"x-llmtap-feature": FEATURE},
        )
        chunks = stream.__aiter__()
        yield [await chunks.__anext__()], chunks


def text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def only_call(cluster: Cluster) -> dict[str, Any]:
    (row,) = (await cluster.calls_by_request(FEATURE)).values()
    return row


async def test_a_stream_in_flight_when_the_ingress_stops_ends_whole_and_is_metered(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    fake = upstream_faults.provider.fake
    fake.chunk_delay_s = 0.4  # five words: the stream lasts ~2 s, within the grace
    cluster, received, cut = await stopped_mid_stream(make_cluster, {})
    assert cut is None
    assert text(received) == "".join(fake.words)
    row = await only_call(cluster)
    assert (row["rows"], row["status"]) == (1, "ok")
    assert row["output_tokens"] == fake.completion_tokens


async def test_a_stream_longer_than_the_grace_is_cut_and_recorded_as_cut_by_the_proxy(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    fake = upstream_faults.provider.fake
    fake.chunk_delay_s = 1.0  # the stream would last ~5 s
    cluster, received, cut = await stopped_mid_stream(
        make_cluster, {"LLMTAP_SHUTDOWN_GRACE_S": "2"}
    )
    assert cut is not None
    assert text(received) != "".join(fake.words)
    row = await only_call(cluster)
    assert (row["rows"], row["status"], row["error_class"]) == (1, "proxy_stopped", "proxy_stopped")
    # Counted from what was streamed (the usage chunk never came).
    assert (row["output_tokens"] > 0) == bool(text(received))


async def test_a_second_signal_while_the_ingress_stops_cuts_nothing(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    """No shutdown delay: SIGTERM, then SIGINT once the stop runs (a second Ctrl-C, a
    supervisor's repeated signal). aiohttp's own handler, still in place, stopped the
    stop halfway: the stream in flight cut, its events not flushed, exit 1. The second
    signal is now ignored, as with a delay: the stream ends whole, and is metered."""
    fake = upstream_faults.provider.fake
    fake.chunk_delay_s = 1.0  # five words: ~5 s, within the grace
    cluster = await make_cluster({})
    await cluster.start_all()
    async with a_stream_begun(cluster) as (received, chunks):
        ingress = cluster.processes["ingress"].process
        assert ingress is not None
        ingress.send_signal(signal.SIGTERM)
        await refusing_connections(cluster)
        ingress.send_signal(signal.SIGINT)
        received.extend([chunk async for chunk in chunks])
    await ended_whole_and_metered(cluster, ingress, received, fake.words)


async def readyz_says_stopping(cluster: Cluster) -> bool:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{cluster.proxy_port}/readyz") as response,
    ):
        return response.status == 503 and (await response.json()).get("stopping") is True


async def sigtermed(cluster: Cluster) -> asyncio.subprocess.Process:
    """SIGTERM the ingress (given a shutdown delay), once /readyz says it is stopping."""
    ingress = cluster.processes["ingress"].process
    assert ingress is not None
    ingress.send_signal(signal.SIGTERM)
    await until(lambda: readyz_says_stopping(cluster), "/readyz says stopping (503)", 10)
    return ingress


async def test_a_sigtermed_ingress_with_a_shutdown_delay_is_unready_and_takes_calls(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    """Within the delay: /readyz says stopping, a call on a new connection is answered
    (and metered), its answer closing the connection; another SIGTERM stops it."""
    cluster = await make_cluster({"LLMTAP_SHUTDOWN_DELAY_S": "600"})
    await cluster.start_all()
    ingress = await sigtermed(cluster)
    async with AsyncOpenAI(
        base_url=cluster.proxy_url, api_key=cluster.api_key, max_retries=0
    ) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-llmtap-feature": FEATURE},
        )
    assert raw.headers["connection"] == "close"
    reply = raw.parse()
    assert reply.choices[0].message.content == "".join(upstream_faults.provider.fake.words)
    ingress.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(ingress.wait(), 30) == 0  # not after 600 s
    await cluster.start("ingress")
    await cluster.quiet()
    row = await only_call(cluster)
    assert (row["rows"], row["status"]) == (1, "ok")


async def test_a_sigtermed_ingress_stops_by_itself_once_its_shutdown_delay_is_over(
    make_cluster: MakeCluster,
) -> None:
    cluster = await make_cluster({"LLMTAP_SHUTDOWN_DELAY_S": "2"})
    await cluster.start_all()
    ingress = await sigtermed(cluster)
    assert await asyncio.wait_for(ingress.wait(), 30) == 0


async def test_a_stream_in_flight_outlives_a_cut_short_delay_and_its_timer(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    """SIGTERM, then SIGTERM again within the delay: the stop runs, and the stream in
    flight ends whole within the grace, though it runs past when the delay would have
    ended (its timer, left running, stopped the stop halfway: the stream cut, the
    events not flushed, exit 1)."""
    fake = upstream_faults.provider.fake
    fake.chunk_delay_s = 1.0  # five words: ~5 s, past the delay, within the grace
    cluster = await make_cluster({"LLMTAP_SHUTDOWN_DELAY_S": "2"})
    await cluster.start_all()
    async with a_stream_begun(cluster) as (received, chunks):
        ingress = await sigtermed(cluster)
        ingress.send_signal(signal.SIGTERM)
        received.extend([chunk async for chunk in chunks])
    await ended_whole_and_metered(cluster, ingress, received, fake.words)
