"""Dashboard sessions: a browser cannot send ``Authorization: Bearer`` on navigation.

A person logs in once with the same key the API takes (admin or virtual). The browser
then holds only a random session token, in an HttpOnly, SameSite=Strict cookie; the key
stays on the server, in memory, with the session. Every page view authenticates that
key again through the API's own :class:`~sql.auth.ApiAuth`, so a key revoked in the key
file ends its sessions within a second, exactly as it is refused by the API. Sessions
live in this process's memory only: a restart logs everyone out.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from ingress.guards.keys import hash_key
from sql.auth import AUTH, ApiAuth, Caller, Unauthorized

COOKIE = "llmtap_dashboard"
COOKIE_PATH = "/dashboard"
SESSION_TTL = timedelta(hours=12)  # from login; then the key is asked for again
PER_KEY = 20  # one key's sessions (its browsers); past this, that key's oldest go first
# Every key's: past this, a login is refused (TooManySessions) until sessions expire or
# close, never let evict another key's. A key holds PER_KEY at most, so filling it takes
# MAX_SESSIONS / PER_KEY keys, which only the operator can make.
MAX_SESSIONS = 10_000


class TooManySessions(Exception):
    """MAX_SESSIONS are open: no new one until some expire or close."""


@dataclass(frozen=True)
class Session:
    secret: str  # the key, held here only: never sent back to the browser
    expires: datetime


def _digest(token: str) -> str:
    """A token's or a key's SHA-256, as the key file's (one from a cookie with bytes that
    are not UTF-8 too: an unknown session, not an exception)."""
    return hash_key(token)


class Sessions:
    """Open sessions by the SHA-256 of their token (the token itself is not kept)."""

    def __init__(
        self, ttl: timedelta = SESSION_TTL, limit: int = MAX_SESSIONS, per_key: int = PER_KEY
    ) -> None:
        self.ttl = ttl
        self.limit = limit
        self.per_key = per_key
        self._open: dict[str, Session] = {}
        # By the SHA-256 of the key: its sessions' digests, oldest first.
        self._of_key: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, secret: str, now: datetime) -> str:
        """A new session for an authenticated key; returns its token (for the cookie).
        Past ``per_key``, the key's own oldest session is closed; with ``limit`` open
        (after the expired are dropped), raises :class:`TooManySessions`."""
        self._expire(now)
        key = _digest(secret)
        mine = self._of_key.get(key, {})
        while len(mine) >= self.per_key:
            self._drop(next(iter(mine)))
        if len(self._open) >= self.limit:
            raise TooManySessions
        token = secrets.token_urlsafe(32)
        digest = _digest(token)
        self._open[digest] = Session(secret, now + self.ttl)
        self._of_key.setdefault(key, {})[digest] = None
        return token

    def get(self, token: str, now: datetime) -> Session | None:
        session = self._open.get(_digest(token)) if token else None
        if session is None:
            return None
        if now >= session.expires:
            self.close(token)
            return None
        return session

    def close(self, token: str) -> None:
        self._drop(_digest(token))

    def _drop(self, digest: str) -> None:
        session = self._open.pop(digest, None)
        if session is None:
            return
        key = _digest(session.secret)
        mine = self._of_key[key]
        del mine[digest]
        if not mine:
            del self._of_key[key]

    def _expire(self, now: datetime) -> None:
        for digest in [d for d, s in self._open.items() if now >= s.expires]:
            self._drop(digest)


def authenticate(auth: ApiAuth, secret: str) -> Caller:
    """The caller a key stands for, checked exactly as the API checks a bearer key
    (raises :class:`~sql.auth.Unauthorized`)."""
    if not secret:
        raise Unauthorized
    return auth.authenticate(_bearing(secret))


async def authenticated(auth: ApiAuth, secret: str) -> Caller:
    """:func:`authenticate` at a login: a key made a moment ago is known at once
    (:meth:`~sql.auth.ApiAuth.authenticated`)."""
    if not secret:
        raise Unauthorized
    return await auth.authenticated(_bearing(secret))


def _bearing(secret: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {secret}"}))


def caller_of(request: web.Request, sessions: Sessions, now: datetime) -> Caller | None:
    """The caller of this request's session, or None (no, unknown, expired session, or a
    key no longer valid: that session is closed)."""
    token = request.cookies.get(COOKIE, "")
    session = sessions.get(token, now)
    if session is None:
        return None
    try:
        return authenticate(request.app[AUTH], session.secret)
    except Unauthorized:
        sessions.close(token)
        return None


def over_https(request: web.Request) -> bool:
    """Whether the browser reached the dashboard over HTTPS: to llmtap itself, or to a
    proxy that ended TLS in front of it and says so (X-Forwarded-Proto, Forwarded), as
    production deployments do; its cookie is then Secure. A client claiming it falsely
    only gets a cookie its browser will not send back over plain HTTP."""
    if request.secure:
        return True
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
    if forwarded.lower() == "https":
        return True
    return any(str(hop.get("proto", "")).lower() == "https" for hop in request.forwarded[:1])


def set_cookie(
    response: web.StreamResponse, request: web.Request, token: str, ttl: timedelta
) -> None:
    response.set_cookie(
        COOKIE,
        token,
        path=COOKIE_PATH,
        max_age=int(ttl.total_seconds()),
        httponly=True,
        samesite="Strict",
        secure=over_https(request),  # over plain HTTP on localhost a Secure one is not kept
    )


def clear_cookie(response: web.StreamResponse, request: web.Request) -> None:
    response.del_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="Strict", secure=over_https(request)
    )
