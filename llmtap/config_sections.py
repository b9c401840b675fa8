"""The configuration's list entries, each checked on its own: the providers llmtap
forwards to, the webhook endpoints alerts go to, the budgets and the spike rules.
:class:`llmtap.config.Settings` holds lists of them, and checks them together.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import timedelta
from decimal import Decimal
from typing import Annotated, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from llmtap.dsn import port_ok
from llmtap.events import BudgetPeriod, BudgetScope, WindowDimension

ApiKind = Literal["openai", "anthropic"]
BUILT_IN_PROVIDERS = ("openai", "anthropic")


class ProviderConfig(BaseModel):
    """An upstream provider: which API it speaks, where, and the env var of its key.

    One named like a built-in provider (openai, anthropic) changes it: what it does not
    set is the built-in's (its kind, URL and key's variable). Another needs a
    ``base_url``; with no ``api_key_env`` it takes no key (a local server's), and calls
    go to it without one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ApiKind = "openai"
    base_url: str = ""
    api_key_env: str = ""
    # The header llmtap's key for it goes in, bare: "api-key" for Azure OpenAI's
    # deployments API, which reads a key sent as Authorization: Bearer as an Entra ID
    # token (a 401). None: its API's (Authorization: Bearer, Anthropic's x-api-key).
    api_key_header: str | None = None
    # Ask for a stream's usage (stream_options.include_usage) when the client did not:
    # false for a provider that refuses fields it does not know. Its streams are then
    # counted from their text, unless it sends usage unasked. None: true, but for one on
    # Mistral's API (api.mistral.ai), which refuses stream_options (a 422 for every
    # stream) and sends a stream's usage in its last chunk unasked.
    stream_usage: bool | None = None
    # The service tier OpenAI serves this provider's calls that name none (or "auto"):
    # the project's own (its Settings' Service Tier), which llmtap cannot see. "priority"
    # has a hard cap reserve such calls at the priority rates; billing follows the tier
    # each answer says served it either way.
    default_service_tier: Literal["standard", "priority"] = "standard"
    # Whether an answer's service_tier names OpenAI's tiers (flex, priority, ultrafast:
    # priced at the catalog's tier rates). None: for the provider named openai and any on
    # OpenAI's own API (a base_url on api.openai.com or <region>.api.openai.com) only.
    # Another OpenAI-compatible provider's tiers are its own (Groq answers "flex" for a
    # tier priced as its on-demand one): its calls are priced at the standard rates,
    # whatever tier the answer names.
    service_tiers: bool | None = None
    # What a hard cap does with a call of a model this provider serves that has no
    # price (budget_unpriced, for this provider): "admit" for a local server whose
    # models cost nothing, rather than price each at 0. None: budget_unpriced.
    unpriced: Literal["refuse", "admit"] | None = None

    @field_validator("base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return provider_url(value)  # given (the default, "", is not checked): a URL

    @field_validator("api_key_header")
    @classmethod
    def _a_header_name(cls, value: str | None) -> str | None:
        if value is not None and (
            not _HEADER_NAME.fullmatch(value) or value.lower().startswith("x-llmtap-")
        ):
            raise ValueError(
                f"api_key_header {value!r} is not a header name (letters, digits and "
                "!#$%&'*+-.^_`|~; not x-llmtap-*, which llmtap takes for its own)"
            )
        return value


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token (RFC 9110)


def provider_url(value: str) -> str:
    """A provider's base URL, without a trailing slash: an http(s) URL with a host and,
    if any, a port 1 to 65535 (each call is sent to it plus the endpoint's path)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok(parts):
        raise ValueError(
            "must be an http:// or https:// URL with a host (and, if any, a port 1 to "
            "65535), as https://api.groq.com/openai/v1"
        )
    return value.rstrip("/")


AlertType = Literal["spike", "budget"]


def _standard_secret(value: SecretStr) -> SecretStr:
    """A Standard Webhooks secret: "whsec_" + base64 of 24 to 64 random bytes."""
    encoded = value.get_secret_value().removeprefix("whsec_")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("must be whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError("must hold 24 to 64 bytes (whsec_ + base64)")
    return value


WebhookSecret = Annotated[SecretStr, AfterValidator(_standard_secret)]


# A delivery's retries (sinks/webhooks/deliver.py): the wait after each failed attempt.
BACKOFF_CAP_S = 300.0
MIN_RETRY_S = 1.0  # a retry-after of 0 (or a date past) or backoff_s 0: no tight loop
DEFAULT_MAX_AGE_S = 86_400.0  # a day: over ten times the default retries' longest


def backoff_wait_s(attempt: int, backoff_s: float) -> float:
    """The longest wait after failed attempt number ``attempt`` (1-based) but for a
    receiver's retry-after: ``backoff_s`` doubled each attempt, capped, at least a second."""
    # The exponent capped too: 2.0 ** 1024 overflows (a week of retries is ~2,000).
    return max(MIN_RETRY_S, min(BACKOFF_CAP_S, backoff_s * 2.0 ** min(attempt - 1, 64)))


class WebhookEndpoint(BaseModel):
    """A receiver of alerts (README, Webhooks): where, which alerts, and in what form.

    Each filter is a list; empty means all. ``template`` is a built-in ("json": the full
    alert, "slack": incoming-webhook blocks, "text": one short line) or the path of a
    Jinja2 file, rendered with ``alert`` (the alert as JSON-ready values).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    url: str = Field(repr=False)  # a Slack incoming webhook's path is its secret
    # Standard Webhooks form: "whsec_" + base64 of 24 to 64 random bytes.
    secret: WebhookSecret
    # Secrets being rotated out: every request is signed with each of them too (after the
    # current one's signature), so a receiver still verifying with one keeps accepting.
    previous_secrets: tuple[WebhookSecret, ...] = Field(default=(), max_length=3)
    alert_types: tuple[AlertType, ...] = ()
    rules: tuple[str, ...] = ()
    dimensions: tuple[WindowDimension, ...] = ()  # a spike's series or a budget's scope
    values: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()  # the alert's tenant (Alert.tenant); "" names none
    template: str = Field(default="json", min_length=1)
    # Standard Webhooks advises 15 to 30 s per attempt. Each attempt is signed as it
    # starts, and receivers refuse a timestamp over 5 minutes old: at most 120 s, leaving
    # room for the clocks' skew.
    timeout_s: float = Field(default=15.0, gt=0, le=120)
    # The default retries for 1 to 2 hours (waits doubling from 1 s up to the 300 s cap,
    # then one every 2.5 to 5 minutes), so a receiver down for a deploy misses nothing.
    # At most 10,000 (deliveries.attempt is a UInt16; a week at the 300 s cap is ~2,000).
    max_attempts: int = Field(default=33, ge=1, le=10_000)
    # The first retry waits about this long; each retry doubles it (jittered, capped, at
    # least a second).
    backoff_s: float = Field(default=1.0, ge=0)
    # An unfinished delivery whose sending began longer ago (`llmtap alerts redeliver`
    # begins one afresh) is dead-lettered unsent when it is resumed from ClickHouse: a
    # store process down for days, an endpoint configured again weeks later. It must
    # exceed the retry schedule's longest (:meth:`retry_schedule_s`). None: a day, or
    # twice that schedule if that is longer (max_age()).
    max_age_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _outlasts_its_retries(self) -> WebhookEndpoint:
        longest = self.retry_schedule_s()
        if self.max_age_s is not None and self.max_age_s <= longest:
            raise ValueError(
                f"max_age_s ({self.max_age_s:g}) must exceed the {longest:.0f} s that "
                f"max_attempts {self.max_attempts} can take (backoff_s {self.backoff_s:g}, "
                f"timeout_s {self.timeout_s:g}): a delivery would expire mid-retries"
            )
        return self

    def retry_schedule_s(self) -> float:
        """The longest a delivery's attempts take, each timing out and each wait at its
        longest, but for a receiver's longer retry-after."""
        waits = sum(backoff_wait_s(n, self.backoff_s) for n in range(1, self.max_attempts))
        return waits + self.max_attempts * self.timeout_s

    def max_age(self) -> timedelta:
        """How long ago an unfinished delivery's sending may have begun to be resumed."""
        default = max(DEFAULT_MAX_AGE_S, 2 * self.retry_schedule_s())
        return timedelta(seconds=self.max_age_s if self.max_age_s is not None else default)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        try:
            port_ok = parts.port != 0  # read: a port out of range or no number raises
        except ValueError:
            port_ok = False
        if not port_ok:
            raise ValueError("must be an http:// or https:// URL whose port is 1 to 65535")
        return value

    def secrets(self) -> list[str]:
        """What each request is signed with: the current secret first."""
        return [s.get_secret_value() for s in (self.secret, *self.previous_secrets)]


class _Named(Protocol):
    @property
    def name(self) -> str: ...


_N = TypeVar("_N", bound=_Named)


def unique_names(what: str) -> AfterValidator:
    """A list's validator: no two of its items (``what``: webhook endpoints, budgets,
    spike rules) share a name, by which each is published, stored and referred to."""

    def check(items: list[_N]) -> list[_N]:
        names = [item.name for item in items]
        if len(set(names)) != len(names):
            raise ValueError(f"{what} names must be unique")
        return items

    return AfterValidator(check)


class BudgetConfig(BaseModel):
    """A spend limit for one tenant, team, key, user or feature, per calendar period (UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    scope: BudgetScope
    value: str = Field(min_length=1)  # which tenant, team, key id, user or feature
    tenant: str = ""  # optional: count only this tenant's calls (for team/user/feature)
    period: BudgetPeriod = "month"
    # Below 10^9 and to nine places: money is stored as Decimal(18, 9) (calls' costs),
    # nine digits before the point; the limit is each of its alerts' baseline.
    limit_usd: Decimal = Field(gt=0, lt=Decimal(10**9), decimal_places=9)
    # Percent of the limit; one alert each. Past 100 is allowed: a soft budget's spend
    # goes on past its limit, and a hard cap's is past it once the limit is lowered. (At
    # most 10^18, as the spike rules' values: an alert's are Decimal(38, 9).)
    thresholds: tuple[Annotated[int, Field(gt=0, le=10**18)], ...] = (50, 80, 100)
    hard_cap: bool = True  # refuse calls that could overshoot the limit

    @field_validator("thresholds")
    @classmethod
    def _distinct_thresholds(cls, thresholds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(thresholds)) != len(thresholds):
            raise ValueError(
                "thresholds must be distinct: each percentage of the limit raises one alert"
            )
        return thresholds

    @model_validator(mode="after")
    def _tenant_of_a_tenant_budget(self) -> BudgetConfig:
        # A call counts if its tenant is the budget's value and its `tenant` both.
        if self.scope == "tenant" and self.tenant not in ("", self.value):
            raise ValueError(
                f"budget {self.name!r} of tenant {self.value!r} names another tenant, "
                f"{self.tenant!r}: it would count no call (a tenant budget needs no `tenant`)"
            )
        return self

    @property
    def owner(self) -> str:
        """The tenant the budget belongs to; "": none (it counts every tenant's calls)."""
        return self.value if self.scope == "tenant" else self.tenant


SpikeMetric = Literal["cost", "requests", "tokens", "error_rate", "p95_latency"]
Seasonality = Literal["none", "hour_of_day"]


class SpikeRule(BaseModel):
    """One spike rule from the configuration (``spike_rules``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    dimension: WindowDimension
    metric: SpikeMetric
    # The windows it judges, by length in seconds: one of window_sizes_s.
    window_s: int = Field(default=60, gt=0)
    # The robust z-score a window must exceed. 5 by default: at 4, one-minute windows of
    # Poisson-like traffic raise a false alert every few thousand windows per series
    # (tests/test_spikes.py measures it).
    sensitivity: Decimal = Field(default=Decimal(5), gt=0)
    # The observed value must reach this (in the metric's unit: USD, requests, tokens,
    # a 0..1 error rate, milliseconds).
    # (At most 10^18: an alert's values are exact to 9 places in Decimal(38, 9).)
    min_value: Decimal = Field(default=Decimal(0), ge=0, le=Decimal("1e18"))
    # ...and exceed the baseline by at least this much.
    min_increase: Decimal = Field(default=Decimal(0), ge=0, le=Decimal("1e18"))
    # error_rate and p95_latency: a window of fewer calls has no value (as one without
    # calls): one call failing of one is no 100% error rate, one slow call no p95.
    min_requests: int = Field(default=10, ge=1)
    # At most one firing alert per this many windows (but a warning grown critical, in
    # its episode).
    cooldown_windows: int = Field(default=10, ge=0)
    # How many recent closed windows the baseline is learned from (the scale costs
    # O(n^2 log n) per window, hence the cap)...
    history_windows: int = Field(default=30, ge=3, le=120)
    # ...and how many it needs before it judges anything.
    min_history: int = Field(default=5, ge=1)
    # The scale's floor as a fraction of the baseline (0.05: 5%).
    min_relative_scale: Decimal = Field(default=Decimal("0.05"), ge=0)
    seasonality: Seasonality = "none"
    # hour_of_day: how many previous days each UTC hour's profile keeps, and how many
    # it needs before the seasonal baseline replaces the recent one.
    seasonal_days: int = Field(default=7, ge=1, le=60)
    seasonal_min_days: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> SpikeRule:
        if self.min_history > self.history_windows:
            raise ValueError("min_history cannot exceed history_windows")
        if self.seasonal_min_days > self.seasonal_days:
            raise ValueError("seasonal_min_days cannot exceed seasonal_days")
        if self.metric == "error_rate" and max(self.min_value, self.min_increase) > 1:
            # 5 meant as 5%: never reached, so the rule never fired, without a word.
            raise ValueError("an error_rate's min_value and min_increase are 0..1 (0.05: 5%)")
        return self
