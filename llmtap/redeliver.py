"""`llmtap alerts redeliver`: ask the running store process to send given-up webhook
deliveries again (sinks/webhooks/redeliver.py does it there).

The store process owns the store (one process owns a chDB path) and the endpoints'
workers, so the command asks it over the API, as an admin: the admin key's secret in
``LLMTAP_ADMIN_KEY`` (``llmtap keys admin`` makes one), at the API's address from the
same configuration as `llmtap up` (or ``--url``).
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from llmtap.config import ADMIN_KEY_ENV, Settings

TIMEOUT_S = 60.0


def since(value: str) -> datetime:
    """``--since``: an ISO 8601 time; one without an offset is UTC."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {value!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _ssl(settings: Settings, url: str) -> ssl.SSLContext | bool:
    """Over HTTPS, the server is verified (the key is a secret): by the system's CAs,
    and by the store's own certificate (``tls_certfile``, which may be self-signed)."""
    if not url.startswith("https:"):
        return True  # aiohttp's default (no TLS on http)
    context = ssl.create_default_context()
    if settings.tls_certfile is not None:
        context.load_verify_locations(settings.tls_certfile)
        # Its own certificate trusted as it is: a leaf an internal CA signed, that CA
        # not among the system's, verifies too.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


async def _post(
    settings: Settings, url: str, key: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
        session.post(
            url, json=body, headers={"Authorization": f"Bearer {key}"}, ssl=_ssl(settings, url)
        ) as response,
    ):
        try:
            answer = await response.json(content_type=None)
        except ValueError:
            answer = {"error": {"message": (await response.text())[:300]}}
        return response.status, answer if isinstance(answer, dict) else {}


def run(
    settings: Settings,
    endpoint: str,
    alert_ids: list[uuid.UUID],
    given_up_since: datetime | None,
    api_url: str | None,
) -> int:
    """Ask; print how many deliveries were made due again. 0 done, 1 failed, 2 refused."""
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if not key:
        print(
            f"llmtap: set {ADMIN_KEY_ENV} to an admin key's secret (`llmtap keys admin`): "
            "the running store process is asked, as an admin",
            file=sys.stderr,
        )
        return 2
    base = (api_url or settings.api_url).rstrip("/")
    url = f"{base}/webhooks/{quote(endpoint, safe='')}/redeliver"
    body: dict[str, Any] = {"alert_ids": [str(i) for i in alert_ids]}
    if given_up_since is not None:
        body["since"] = given_up_since.isoformat()
    try:
        status, answer = asyncio.run(_post(settings, url, key, body))
    except aiohttp.ClientConnectorCertificateError as exc:
        print(
            f"llmtap: the store process at {base} did not present a certificate this "
            f"trusts ({exc.certificate_error}): its tls_certfile (or a CA that signed it) "
            "must name the host asked (for 127.0.0.1, an IP address in its names), or "
            "give --url with the name it has",
            file=sys.stderr,
        )
        return 1
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        print(
            f"llmtap: cannot reach the store process at {base} ({type(exc).__name__}: {exc}): "
            "is `llmtap up` (or `llmtap store`) running with this configuration?",
            file=sys.stderr,
        )
        return 1
    if status != 200:
        message = answer.get("error", {}).get("message", "") or f"HTTP {status}"
        print(f"llmtap: redelivery refused (HTTP {status}): {message}", file=sys.stderr)
        return 2 if 400 <= status < 500 else 1
    count = int(answer.get("redelivered", 0))
    print(
        f"{count} given-up deliveries to {endpoint} made due again "
        "(sent by the store process, with their alert id as webhook-id)"
    )
    return 0
