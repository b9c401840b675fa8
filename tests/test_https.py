"""The proxy, the analytics API and the worker's metrics served over HTTPS
(``tls_certfile``): the official SDK, the API's clients and a scraper reach them with a
certificate from a test CA, and plain HTTP gets no answer."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from openai import AsyncOpenAI, DefaultAsyncHttpxClient

from tests.conftest import ADMIN_KEY, FakeUpstream, run_llmtap
from tests.fake_provider import SNAPSHOT
from tests.faults.harness import until


async def test_the_proxy_and_the_api_serve_https_with_the_certificate_given(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    ca = trustme.CA()
    served = ca.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "llmtap.pem", tmp_path / "llmtap.key"
    certfile.write_bytes(b"".join(pem.bytes() for pem in served.cert_chain_pems))
    served.private_key_pem.write_to_path(str(keyfile))
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    env = {"LLMTAP_TLS_CERTFILE": str(certfile), "LLMTAP_TLS_KEYFILE": str(keyfile)}
    async with run_llmtap(tmp_path / "data", upstream, env) as running:
        assert running.proxy_url.startswith("https://")
        async with (
            DefaultAsyncHttpxClient(verify=trusting) as http,
            AsyncOpenAI(
                base_url=running.proxy_url, api_key=running.api_key, http_client=http
            ) as sdk,
        ):
            completion = await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "over https"}]
            )
        assert completion.choices[0].message.content == "".join(upstream.provider.words)

        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        rows: list[dict[str, Any]] = []
        async with aiohttp.ClientSession(headers=admin) as session:

            async def metered() -> bool:
                url = f"{running.api_url}/analytics/models?range=24h"
                async with session.get(url, ssl=trusting) as response:
                    rows[:] = (await response.json())["data"]
                return any(r["model"] == "gpt-4o" + SNAPSHOT for r in rows)

            await until(metered, "the call in the analytics API, over https", 45)
            plain = running.proxy_url.replace("https://", "http://", 1)
            with pytest.raises(aiohttp.ClientError):  # no plain-HTTP answer on the port
                async with session.get(plain.removesuffix("/v1") + "/healthz") as response:
                    await response.read()

            assert running.worker_url.startswith("https://")
            metrics = f"{running.worker_url}/metrics"
            async with session.get(metrics, ssl=trusting) as response:
                assert response.status == 200
                assert "llmtap_worker_events_costed_total 1.0" in await response.text()
            with pytest.raises(aiohttp.ClientError):
                async with session.get(metrics.replace("https://", "http://", 1)) as response:
                    await response.read()
