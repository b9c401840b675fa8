"""Who is calling: the virtual key a call presents, and the attribution it may claim."""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDictProxy

from ingress.forward.call import Claims, attribution_from, credential_of
from ingress.guards.keys import KeyStore, VirtualKey
from llmtap.config import Settings
from llmtap.events import Attribution


@dataclass(frozen=True)
class Refusal(Exception):
    """A call refused before it reaches a provider, with a message for the caller."""

    status: int
    message: str
    error_class: str
    code: str | None = None
    # Who is refused, when that is known (a valid key making a false claim): the call is
    # recorded under the key's tenant, team and user, so its tenant sees it.
    attribution: Attribution | None = None


@dataclass(frozen=True)
class Identity:
    attribution: Attribution
    key: VirtualKey | None  # None in passthrough mode


_BOUND = ("tenant", "team", "user")


def authenticate(headers: CIMultiDictProxy[str], settings: Settings, keys: KeyStore) -> Identity:
    """The caller's identity, or a :class:`Refusal` (401 unknown key, 403 false claim).

    A key's tenant, team and user are facts; ``x-llmtap-*`` headers may add what the
    key leaves open (a team on a tenant-wide key) but never contradict it.
    """
    if settings.auth == "passthrough":
        return Identity(attribution_from(headers), None)
    key = keys.lookup(credential_of(headers))
    if key is None:
        raise Refusal(
            401,
            "Invalid, revoked or missing llmtap key. Send a key made by `llmtap keys create` "
            "as the API key of your SDK.",
            "invalid_key",
            code="invalid_api_key",
        )
    claimed = Claims.of(headers)
    for field in _BOUND:
        bound, wanted = getattr(key, field), getattr(claimed, field)
        if bound and wanted and wanted != bound:
            raise Refusal(
                403,
                f"this key is bound to {field} {bound!r}; x-llmtap-{field} cannot claim {wanted!r}",
                "attribution_conflict",
                attribution=Attribution(
                    tenant=key.tenant, team=key.team, user=key.user, key_id=key.id
                ),
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


def check_model(identity: Identity, model: str) -> None:
    if identity.key is not None and not identity.key.allows(model):
        raise Refusal(
            403,
            f"this key may not use model {model!r}",
            "model_not_allowed",
            code="model_not_allowed",
        )
