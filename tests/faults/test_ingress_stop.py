"""The ingress stopped (SIGTERM, as a rolling deploy or `docker stop` does) while a
stream is in flight: the client gets the whole answer, and the call is metered; a
stream longer than the grace is cut, and recorded as cut by the proxy.

aiohttp stops taking connections at once, then lets running handlers finish (up to
shutdown_grace_s) before the app's cleanup, which flushes the publisher, runs.
"""

from __future__ import annotations

import asyncio

import pytest
from openai import APIConnectionError, AsyncOpenAI

from llmtap.supervisor import listening
from tests.faults.conftest import MakeCluster, Upstream
from tests.faults.harness import until

pytestmark = pytest.mark.faults

FEATURE = "ingress-stop"


async def test_a_stream_in_flight_when_the_ingress_stops_ends_whole_and_is_metered(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    fake = upstream_faults.provider.fake
    fake.chunk_delay_s = 0.4  # five words: the stream lasts ~2 s
    cluster = await make_cluster()
    await cluster.start_all()
    proxy = f"127.0.0.1:{cluster.proxy_port}"
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
        received = [await chunks.__anext__()]
        stopping = asyncio.create_task(cluster.terminate("ingress"))

        async def refusing() -> bool:
            return not await listening(proxy)

        await until(refusing, "the stopping ingress refuses new connections", 5)
        received += [chunk async for chunk in chunks]
    await stopping
    ingress = cluster.processes["ingress"].process
    assert ingress is not None and ingress.returncode == 0  # stopped, not killed
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text == "".join(fake.words)

    await cluster.start("ingress")  # the next one, as a deploy brings it
    await cluster.quiet()
    (row,) = (await cluster.calls_by_request(FEATURE)).values()
    assert (row["rows"], row["status"]) == (1, "ok")
    assert row["output_tokens"] == fake.completion_tokens


async def test_a_stream_longer_than_the_grace_is_cut_and_recorded_as_cut_by_the_proxy(
    make_cluster: MakeCluster, upstream_faults: Upstream
) -> None:
    fake = upstream_faults.provider.fake
    fake.chunk_delay_s = 1.0  # the stream would last ~5 s
    cluster = await make_cluster({"LLMTAP_SHUTDOWN_GRACE_S": "2"})
    await cluster.start_all()
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
        received = [await chunks.__anext__()]
        stopping = asyncio.create_task(cluster.terminate("ingress"))
        with pytest.raises(APIConnectionError):  # cut: no final chunk, as a broken upstream
            async for chunk in chunks:
                received.append(chunk)
    await stopping
    ingress = cluster.processes["ingress"].process
    assert ingress is not None and ingress.returncode == 0
    streamed = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert streamed != "".join(fake.words)

    await cluster.start("ingress")
    await cluster.quiet()
    (row,) = (await cluster.calls_by_request(FEATURE)).values()
    assert (row["rows"], row["status"], row["error_class"]) == (1, "proxy_stopped", "proxy_stopped")
    # Counted from what was streamed (the usage chunk never came).
    assert (row["output_tokens"] > 0) == bool(streamed)
