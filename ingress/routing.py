"""Which provider serves a call: pure resolution from the model name and the config."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from llmtap.config import Settings
from llmtap.config_sections import ApiKind, ProviderConfig
from llmtap.events import GEO_PATTERN, GLOBAL_GEO, STANDARD_TIER
from stream.catalog import TIERS

OPENAI_HOST = "api.openai.com"
_GEO = re.compile(GEO_PATTERN)
MISTRAL_HOST = "api.mistral.ai"


@dataclass(frozen=True)
class Route:
    provider: str
    config: ProviderConfig
    upstream_model: str  # the model name the provider is sent


def openai_tiers(provider: str, config: ProviderConfig) -> bool:
    """Whether the tier an answer of ``provider`` names is OpenAI's (ProviderConfig.
    service_tiers; unset: the provider named ``openai``, or one on OpenAI's own API, its
    data-residency endpoints' hosts too: ``eu.api.openai.com``)."""
    if config.service_tiers is not None:
        return config.service_tiers
    return provider == "openai" or _openai_region(config) is not None


def priced_tier(provider: str, config: ProviderConfig, tier: str) -> str:
    """The tier a call whose answer says ``tier`` served it is priced at: the standard
    one for a provider whose tiers are not OpenAI's (:func:`openai_tiers`); else the
    tier, OpenAI's tiers (flex, priority, ultrafast) by name, any other one as named
    (no price covers it: the call is unpriced, never priced at standard rates) when the
    answer is OpenAI's own (its API's host, or ``service_tiers: true``). The provider
    named ``openai`` sent to another server (an Azure-style gateway, a mock) names
    tiers of its own: one that is not OpenAI's is standard there, as before."""
    if tier == STANDARD_TIER or not openai_tiers(provider, config):
        return STANDARD_TIER
    if tier in TIERS or config.service_tiers or _openai_region(config) is not None:
        return tier
    return STANDARD_TIER


def _openai_region(config: ProviderConfig) -> str | None:
    """The region of OpenAI's API the provider's ``base_url`` is on: ``""`` for
    ``api.openai.com``, the prefix of a data-residency endpoint's host (``eu`` of
    ``eu.api.openai.com``); None for a host not OpenAI's."""
    host = (urlsplit(config.base_url).hostname or "").casefold()
    if host == OPENAI_HOST:
        return ""
    region, dot, rest = host.partition(".")
    return region if dot and rest == OPENAI_HOST and _GEO.fullmatch(region) else None


def endpoint_geo(config: ProviderConfig) -> str:
    """Where OpenAI runs and bills the calls of a provider of its API: the region of a
    data-residency endpoint (``eu`` for ``https://eu.api.openai.com/v1``, priced by the
    model's ``geo_multipliers``: 10% more on models released on or after 2026-03-05),
    else ``"global"`` (OpenAI's own host, or any other server)."""
    return _openai_region(config) or GLOBAL_GEO


def asks_stream_usage(config: ProviderConfig) -> bool:
    """Whether a stream's usage is asked of the provider (ProviderConfig.stream_usage;
    unset: of any but one on Mistral's API, which refuses the field)."""
    if config.stream_usage is not None:
        return config.stream_usage
    return urlsplit(config.base_url).hostname != MISTRAL_HOST


class NoRoute(ValueError):
    """The model cannot be served on this API; the message says why."""

    error_class = "no_route"


class NoModel(NoRoute):
    """``<provider>/`` with no model after it: an empty model, which would be sent as ""."""

    error_class = "missing_model"


def resolve(model: str, api: ApiKind, settings: Settings) -> Route:
    """Resolve, in order: ``<provider>/<model>``, unless a route of ``model_routes`` is
    written for the whole name, ``<provider>/`` included, to another provider
    (``"openai/gpt-oss-*": groq``: Groq and OpenRouter name models so); ``model_routes``
    (exact, then the longest ``prefix*``); the provider named like the API (``openai``,
    ``anthropic``)."""
    providers = settings.providers_by_name
    routes = settings.model_routes
    pattern = _route_of(model, routes)
    head, slash, rest = model.partition("/")
    named_whole = (
        pattern is not None and pattern.startswith(head + slash) and routes[pattern] != head
    )
    if slash and head in providers and not named_whole:
        if not rest:
            raise NoModel(
                f"you must provide a model parameter: {model!r} names the provider "
                f"{head!r} but no model after it"
            )
        name, upstream_model = head, rest
    else:
        name = routes[pattern] if pattern is not None else api
        upstream_model = model
    config = providers.get(name)
    if config is None:
        raise NoRoute(f"model {model!r} is routed to provider {name!r}, which is not configured")
    if config.kind != api:
        raise NoRoute(
            f"model {model!r} is served by provider {name!r}, which speaks the {config.kind} "
            f"API, not the {api} API of this route"
        )
    return Route(name, config, upstream_model)


def _route_of(model: str, routes: dict[str, str]) -> str | None:
    """The pattern of ``routes`` that routes ``model``: its exact name, else the longest
    ``prefix*`` it starts with; None if none does."""
    if model in routes:
        return model
    prefixes = [p for p in routes if p.endswith("*") and model.startswith(p[:-1])]
    return max(prefixes, key=len) if prefixes else None
