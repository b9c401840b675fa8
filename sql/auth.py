"""Who is asking the analytics API, and what they may see.

Every request under ``/api/v1`` (but the OpenAPI document) presents
``Authorization: Bearer <key>``; without a known key it gets a 401.

- An admin key sees every tenant and may run SQL. Admin keys are configured as the
  SHA-256 hex digests of their secrets (``admin_key_hashes``), so neither the config
  nor the environment holds a usable key.
- A virtual key (the ingress's keys, ``llmtap keys create``; same key file, re-read
  within a second of a change) sees its own tenant only, and only its team's and its
  user's calls when it is bound to them (a developer's key shows that developer's
  usage). The server sets that scope; no query parameter can widen it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDictProxy

from ingress.guards.key_store import KeyStore
from ingress.guards.keys import VirtualKey, hash_key
from sql.params import Scope

KEY_RELOAD_S = 1.0  # how often the key file is checked for changes (as the ingress does)


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: an admin (no key record) or a virtual key."""

    key: VirtualKey | None

    @property
    def admin(self) -> bool:
        return self.key is None

    @property
    def scope(self) -> Scope:
        if self.key is None:
            return Scope()
        return Scope(
            tenant=self.key.tenant,  # always set for a virtual key, even if empty
            team=self.key.team or None,
            user=self.key.user or None,
        )


class Unauthorized(Exception):
    """A 401: no key, or one that is neither an admin key nor a live virtual key."""

    message = (
        "missing, unknown or revoked key: send 'Authorization: Bearer <key>' with an "
        "admin key or a virtual key made by `llmtap keys create`"
    )


def bearer(headers: CIMultiDictProxy[str]) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or ""."""
    scheme, _, token = headers.get("Authorization", "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class ApiAuth:
    """Admin key digests and the virtual key store; one per API app."""

    def __init__(self, admin_key_hashes: Iterable[str], key_file: Path) -> None:
        self._admin = tuple(h.lower() for h in admin_key_hashes)
        self.keys = KeyStore(key_file)

    def _is_admin(self, digest: str) -> bool:
        # Compare against every admin digest, in constant time each; no early exit.
        found = False
        for admin in self._admin:
            found |= hmac.compare_digest(digest, admin)
        return found

    def authenticate(self, headers: CIMultiDictProxy[str]) -> Caller:
        secret = bearer(headers)
        if not secret:
            raise Unauthorized
        if self._is_admin(hash_key(secret)):  # one that is not UTF-8 too: unknown, 401
            return Caller(key=None)
        key = self.keys.lookup(secret)  # None when unknown or revoked
        if key is None:
            raise Unauthorized
        return Caller(key=key)

    async def authenticated(self, headers: CIMultiDictProxy[str]) -> Caller:
        """:meth:`authenticate`, the key file read again first when a key presented is
        not known and the file changed (a key made a moment ago works at once)."""
        try:
            return self.authenticate(headers)
        except Unauthorized:
            if not bearer(headers) or not await self.keys.refreshed():
                raise
        return self.authenticate(headers)


AUTH = web.AppKey("api_auth", ApiAuth)
CALLER = web.RequestKey("api_caller", Caller)


def api_auth(
    admin_key_hashes: Iterable[str], key_file: Path
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: the app's :class:`ApiAuth`, its key file re-read when it changes."""
    hashes = tuple(admin_key_hashes)

    async def context(app: web.Application) -> AsyncIterator[None]:
        auth = app[AUTH] = ApiAuth(hashes, key_file)
        await asyncio.to_thread(auth.keys.reload)

        task = asyncio.create_task(auth.keys.follow(KEY_RELOAD_S), name="api-key-reload")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
