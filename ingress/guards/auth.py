"""Who is calling: the virtual key a call presents, and the attribution it may claim."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDictProxy

from ingress.forward.call import (
    BadClaim,
    Claimed,
    Claims,
    attribution_from,
    claimed,
    credential_of,
    key_id,
)
from ingress.guards.key_store import KeyStore
from ingress.guards.keys import VirtualKey
from llmtap.config import Settings
from llmtap.events import Attribution


@dataclass(frozen=True)
class Refusal(Exception):
    """A call refused before it reaches a provider, with a message for the caller."""

    status: int
    message: str
    error_class: str
    code: str | None = None
    # Who is refused, when that is known (a valid key making a false claim, or one its
    # event could not carry): the call is recorded under the key's tenant, team and
    # user, so its tenant sees it.
    attribution: Attribution | None = None
    param: str | None = None  # what it names: a header, in OpenAI's error's param


@dataclass(frozen=True)
class Identity:
    attribution: Attribution
    key: VirtualKey | None  # None in passthrough mode


_BOUND = ("tenant", "team", "user")

# A key's identity for the x-llmtap-* headers it came with, as made last time: most
# calls repeat both, and making it (claims, checks, the attribution model) is most of
# what authenticating costs. An entry serves only the very key object the store
# returns now, so a key re-read from its file (revoked, edited) is judged afresh. At
# most Settings.identity_cache_size of them (~1.4 KB each, ~2.8 KB with the largest
# claims kept); when full, all go. Only claims of up to _CLAIMS_KEPT bytes are kept (a
# header may hold 8 KB: 4,096 entries of large ones would be gigabytes); a claim unique
# to each call is made each time.
_made: dict[tuple[str, Claimed], tuple[VirtualKey, Identity]] = {}
_CLAIMS_KEPT = 1024


def authenticate(headers: CIMultiDictProxy[str], settings: Settings, keys: KeyStore) -> Identity:
    """The caller's identity, or a :class:`Refusal` (401 unknown key, 403 false claim,
    400 a claim no event could carry: :class:`BadClaim`).

    A key's tenant, team and user are facts; ``x-llmtap-*`` headers may add what the
    key leaves open (a team on a tenant-wide key) but never contradict it.
    """
    if settings.auth == "passthrough":
        try:
            return Identity(attribution_from(headers), None)
        except BadClaim as bad:  # recorded under the credential's hash alone
            raise _bad_claim(bad, Attribution(key_id=key_id(credential_of(headers)))) from None
    key = keys.lookup(credential_of(headers))
    if key is None:
        raise Refusal(
            401,
            "Invalid, revoked or missing llmtap key. Send a key made by `llmtap keys create` "
            "as the API key of your SDK.",
            "invalid_key",
            code="invalid_api_key",
        )
    raw = claimed(headers)
    made = _made.get((key.hash, raw))
    if made is not None and made[0] is key:
        return made[1]
    try:
        identity = _identity(key, Claims.from_pairs(raw))
    except BadClaim as bad:
        raise _bad_claim(bad, _own(key)) from None
    if sum(len(name) + len(value) for name, value in raw) <= _CLAIMS_KEPT:
        if len(_made) >= settings.identity_cache_size:
            _made.clear()
        _made[(key.hash, raw)] = (key, identity)
    return identity


async def authenticated(
    headers: CIMultiDictProxy[str], settings: Settings, keys: KeyStore
) -> Identity:
    """:func:`authenticate`, the key file read again first (when it changed) for a key
    it does not know: one made a moment ago works at once, on every route that takes a
    key (the unmetered ones answered it 401 until the next periodic reload)."""
    try:
        return authenticate(headers, settings, keys)
    except Refusal as refusal:
        if refusal.status != 401 or not await keys.refreshed():
            raise
    return authenticate(headers, settings, keys)


def _own(key: VirtualKey) -> Attribution:
    """Whom a call refused for what its headers claim is recorded under: its key's
    tenant, team and user, so its tenant sees it."""
    return Attribution(tenant=key.tenant, team=key.team, user=key.user, key_id=key.id)


def _bad_claim(bad: BadClaim, attribution: Attribution) -> Refusal:
    return Refusal(
        400,
        bad.message,
        "invalid_attribution_header",
        code="invalid_attribution_header",
        attribution=attribution,
        param=bad.header,
    )


def _identity(key: VirtualKey, claimed: Claims) -> Identity:
    for field in _BOUND:
        bound, wanted = getattr(key, field), getattr(claimed, field)
        if bound and wanted and wanted != bound:
            raise Refusal(
                403,
                f"this key is bound to {field} {bound!r}; x-llmtap-{field} cannot claim {wanted!r}",
                "attribution_conflict",
                code="attribution_conflict",
                attribution=_own(key),
                param=f"x-llmtap-{field}",
            )
    attribution = Attribution(
        tenant=key.tenant,
        team=key.team or claimed.team,
        user=key.user or claimed.user,
        feature=claimed.feature,
        env=claimed.env,
        key_id=key.id,
        properties=claimed.properties,
    )
    return Identity(attribution, key)


def check_model(identity: Identity, model: str, payload: dict[str, Any] | None = None) -> None:
    """Refuse a model the key may not use: the call's own, and any a tool of its body
    names (Anthropic's advisor tool, OpenAI's image generation tool), which the
    provider runs and bills as well."""
    if identity.key is None:
        return
    for i, each in enumerate([model, *tool_models(payload or {})]):
        if not identity.key.allows(each):
            what = "model (named by a tool)" if i else "model"
            raise Refusal(
                403,
                f"this key may not use {what} {each!r}",
                "model_not_allowed",
                code="model_not_allowed",
            )


def tool_models(payload: dict[str, Any]) -> list[str]:
    """The models the tools of a body name (a tool the provider runs on a model of its
    own: ``{"type": "advisor_20260301", "model": ...}``)."""
    tools = payload.get("tools")
    return [
        tool["model"]
        for tool in (tools if isinstance(tools, list) else ())
        if isinstance(tool, dict) and isinstance(tool.get("model"), str)
    ]
