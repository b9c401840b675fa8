"""One proxied call: its identity, attribution, timings, and the two events it yields."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from multidict import CIMultiDict, CIMultiDictProxy

from ingress.guards.fields import recorded_model
from ingress.guards.keys import hash_key
from llmtap import wire
from llmtap.events import (
    MAX_DURATION_MS,
    PROPERTY_NAME,
    PROPERTY_NAME_RULE,
    Attribution,
    Status,
    Usage,
    utcnow,
)

ATTRIBUTION_PREFIX = "x-llmtap-"
PROPERTY_PREFIX = "x-llmtap-property-"

# Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus the ones the
# proxy recomputes itself. Never copied from one side to the other.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-encoding",
        "accept-encoding",
        # The client's expectation was met by this hop (aiohttp answered its 100 and the
        # body was read whole): passed on, the provider's 100 was awaited before the
        # body went, and a server that reads a body without one left the call hung.
        "expect",
    }
)


def _hop_by_hop(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """The headers not to pass on: the hop-by-hop ones, and those the message's
    ``Connection`` names as this hop's own (RFC 9110 §7.6.1)."""
    named = headers.getall("connection", ())
    if not named:
        return _HOP_BY_HOP
    return _HOP_BY_HOP | {t.strip().lower() for value in named for t in value.split(",")}


def key_id(credential: str) -> str:
    """A stable, non-reversible id for a credential: the first 16 hex chars of its
    :func:`~ingress.guards.keys.hash_key` (one sent with bytes that are not UTF-8 has
    one too, never an error)."""
    return hash_key(credential)[:16] if credential else ""


def bearer_token(headers: CIMultiDictProxy[str]) -> str:
    value = headers.get("authorization", "")
    return value[7:].strip() if value[:7].lower() == "bearer " else ""


def credential_of(headers: CIMultiDictProxy[str]) -> str:
    """The credential a client presented: its bearer token, its ``x-api-key``
    (Anthropic's), or its ``api-key`` (what Azure OpenAI's SDK sends): in passthrough
    its hash is the call's key_id, which one sent as ``api-key`` was recorded without."""
    return bearer_token(headers) or headers.get("x-api-key", "") or headers.get("api-key", "")


class BadClaim(ValueError):
    """An ``x-llmtap-*`` header whose claim cannot be recorded: the call is refused (400)
    before the provider is contacted, its message naming the header."""

    def __init__(self, header: str, message: str) -> None:
        super().__init__(message)
        self.header = header
        self.message = message


# What a call's x-llmtap-* claims may add up to, names and values, in characters. They
# are copied into both its events, which must fit the broker's 1 MiB message limit:
# aiohttp takes 128 header lines of 8190 bytes, and JSON escapes can grow a value 6x,
# so a call claiming that much was forwarded and its events refused by Kafka, never
# recorded. 64 KiB leaves any event far below the limit.
MAX_CLAIMS_CHARS = 65_536

# The x-llmtap-* headers read as attribution fields; any other is ignored (and dropped).
_CLAIM_FIELDS = frozenset(
    ATTRIBUTION_PREFIX + name for name in ("tenant", "team", "user", "feature", "env")
)


def _text(header: str, value: str) -> str:
    """A claim's value, if it is text an event can carry. aiohttp reads a header's bytes
    that are not UTF-8 as lone surrogates (surrogateescape), which no event can encode:
    such a call went through unrecorded. Refused, not repaired: a value made up by
    replacing its bytes would attribute the call to a name its client never sent."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise BadClaim(
                header,
                f"the value of header {header} is not UTF-8 text: llmtap records "
                "attribution headers as given, so send them as UTF-8",
            ) from None
    return value


@dataclass(frozen=True)
class Claims:
    """What ``x-llmtap-*`` headers claim about a call's attribution."""

    tenant: str
    team: str
    user: str
    feature: str
    env: str
    properties: dict[str, str]

    @classmethod
    def of(cls, headers: CIMultiDictProxy[str]) -> Claims:
        return cls.from_pairs(claimed(headers))

    @classmethod
    def from_pairs(cls, pairs: Claimed) -> Claims:
        """From :func:`claimed`'s pairs: a field's first header, as ``headers.get``, and
        a property's first too (a header repeated: its later values are ignored).
        :class:`BadClaim` for a claim no event could carry, or a property the analytics
        API could not group by (its name: :data:`~llmtap.events.PROPERTY_NAME`)."""
        first: dict[str, str] = {}
        properties: dict[str, str] = {}
        size = 0
        for name, value in pairs:
            size += len(name) + len(value)
            if size > MAX_CLAIMS_CHARS:
                raise BadClaim(
                    name,
                    f"the x-llmtap-* headers claim more than {MAX_CLAIMS_CHARS} characters "
                    f"(names and values) by header {name}: llmtap records them with the "
                    "call, so send fewer or shorter",
                )
            if name in _CLAIM_FIELDS:
                first.setdefault(name, _text(name, value))
            elif name.startswith(PROPERTY_PREFIX):
                prop = name[len(PROPERTY_PREFIX) :]
                if not PROPERTY_NAME.fullmatch(prop):
                    raise BadClaim(
                        name,
                        f"invalid custom property header {name!r}: a property's name (after "
                        f"{PROPERTY_PREFIX}) must be {PROPERTY_NAME_RULE}, as "
                        "group_by=property:<name> of the analytics API takes",
                    )
                properties.setdefault(prop, _text(name, value))
        return cls(
            tenant=first.get("x-llmtap-tenant", ""),
            team=first.get("x-llmtap-team", ""),
            user=first.get("x-llmtap-user", ""),
            feature=first.get("x-llmtap-feature", ""),
            env=first.get("x-llmtap-env", ""),
            properties=properties,
        )


Claimed = tuple[tuple[str, str], ...]


def claimed(headers: CIMultiDictProxy[str]) -> Claimed:
    """Every ``x-llmtap-*`` header, its name in lower case, in order."""
    return tuple(
        (name.lower(), value)
        for name, value in headers.items()
        if name[: len(ATTRIBUTION_PREFIX)].lower() == ATTRIBUTION_PREFIX
    )


def attribution_from(headers: CIMultiDictProxy[str], *, user_field: str = "") -> Attribution:
    """Attribution claimed by ``x-llmtap-*`` headers (and the body's ``user`` field)."""
    claims = Claims.of(headers)
    return Attribution(
        tenant=claims.tenant,
        team=claims.team,
        user=claims.user or user_field,
        feature=claims.feature,
        env=claims.env,
        key_id=key_id(credential_of(headers)),
        properties=claims.properties,
    )


NOBODY = Attribution()

# What a client sends to say who it is to the provider: replaced by llmtap's own key.
# Azure's api-key too (a client may send its key there as well), and the OpenAI
# organization and project, which would pick what llmtap's key bills.
CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-api-key", "api-key", "openai-organization", "openai-project"}
)


# The credential of a provider that takes no key (a local server's): the client's are
# dropped all the same, and none is sent.
NO_CREDENTIAL = ("", "")


def upstream_headers(
    incoming: CIMultiDictProxy[str], *, credential: tuple[str, str] | None
) -> CIMultiDict[str]:
    """The client's headers as the provider should see them.

    Hop-by-hop headers and llmtap's own ``x-llmtap-*`` headers are dropped. With a
    ``credential`` (header, value), the provider key replaces every credential the
    client sent (CREDENTIAL_HEADERS), so the client's key never reaches the provider
    (:data:`NO_CREDENTIAL`: nothing replaces them).
    """
    out: CIMultiDict[str] = CIMultiDict()
    hop = _hop_by_hop(incoming)
    for name, value in incoming.items():
        lower = name.lower()
        if lower in hop or lower.startswith(ATTRIBUTION_PREFIX):
            continue
        if "_" in lower and lower.replace("_", "-").startswith(ATTRIBUTION_PREFIX):
            continue  # x_llmtap_*, x-llmtap_*: not read (no underscores in ours), not passed
        if credential is not None and lower in CREDENTIAL_HEADERS:
            continue
        out.add(name, value)
    if credential is not None and credential != NO_CREDENTIAL:
        out[credential[0]] = credential[1]
    return out


# What a provider's answer says about the account llmtap's key belongs to: not the
# caller's business (every tenant's calls share that account).
ACCOUNT_HEADERS = frozenset({"openai-organization", "openai-project", "anthropic-organization-id"})


def downstream_headers(upstream: CIMultiDictProxy[str], request_id: str) -> CIMultiDict[str]:
    """The provider's response headers as the client should see them: without what names
    llmtap's account (ACCOUNT_HEADERS) or its own CORS policy, with llmtap's
    ``x-request-id``, and the provider's own, if it sent one, as ``x-provider-request-id``."""
    hop = _hop_by_hop(upstream)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value)
        for name, value in upstream.items()
        if (lower := name.lower()) not in hop
        and lower not in ACCOUNT_HEADERS
        and not lower.startswith("access-control-")  # its CORS, not llmtap's (ingress/cors.py)
    )
    provider_id = out.get("x-request-id")
    if provider_id is not None:  # OpenAI's: what its support asks for, kept under a name
        out["x-provider-request-id"] = provider_id
    out["x-request-id"] = request_id
    return out


@dataclass
class Call:
    """Everything the ingress learns about one call while it passes through."""

    provider: str
    endpoint: str
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    ts_start: datetime = field(default_factory=utcnow)
    t_start: float = field(default_factory=time.perf_counter)
    model_requested: str = ""
    stream: bool = False
    attribution: Attribution = NOBODY  # frozen, so one instance serves every call
    t_upstream_sent: float | None = None
    t_first_byte: float | None = None
    t_upstream_done: float | None = None
    t_end: float | None = None  # when the call ended, if before its event is made

    def request_event(self, *, request_bytes: int, max_tokens: int | None) -> wire.Request:
        """The contract's ``RequestEvent``, as its msgspec mirror: built and encoded in
        ~4 us instead of ~10 (~3 of them its event id's uuid4); tests/test_wire.py holds
        it to the model."""
        return wire.Request(
            request_id=self.request_id,
            ts=self.ts_start,
            provider=self.provider,
            endpoint=self.endpoint,
            model_requested=self.model_requested,
            stream=self.stream,
            request_bytes=request_bytes,
            max_tokens=max_tokens,
            attribution=wire.attribution_of(self.attribution),
        )

    def mark_sent(self) -> None:
        self.t_upstream_sent = time.perf_counter()

    def mark_first_byte(self) -> None:
        if self.t_first_byte is None:
            self.t_first_byte = time.perf_counter()

    def mark_upstream_done(self) -> None:
        self.t_upstream_done = time.perf_counter()

    def mark_end(self) -> None:
        """The call ended now, for the client, though its event is made later (once
        llmtap has counted its output)."""
        self.t_end = time.perf_counter()

    def response_event(
        self,
        *,
        status: Status,
        http_status: int,
        usage: Usage,
        model_served: str = "",
        error_class: str = "",
    ) -> wire.Response:
        """The contract's ``ResponseEvent``, as its msgspec mirror: ~9 us instead of ~15."""
        t_end = self.t_end if self.t_end is not None else time.perf_counter()
        latency = t_end - self.t_start
        # Time spent in the proxy itself: before the provider was asked, and after its
        # last byte arrived. The wait on the provider is not ours.
        sent = self.t_upstream_sent if self.t_upstream_sent is not None else t_end
        done = self.t_upstream_done if self.t_upstream_done is not None else t_end
        overhead = max(0.0, (sent - self.t_start) + (t_end - max(done, sent)))
        # Time to first token: a stream's first event with output (capture.FirstEvent:
        # not its head, nor what the provider sends as it takes the call). A whole
        # answer's first byte comes once it is all generated: that is its latency, not a
        # time to first token.
        ttft = (
            None
            if self.t_first_byte is None or not self.stream
            else min((self.t_first_byte - self.t_start) * 1000, MAX_DURATION_MS)
        )
        return wire.Response(
            request_id=self.request_id,
            ts_start=self.ts_start,
            ts_end=self.ts_start + timedelta(seconds=latency),
            provider=self.provider,
            endpoint=self.endpoint,
            model_requested=self.model_requested,
            model_served=recorded_model(model_served),  # as the provider named it: bounded
            stream=self.stream,
            status=status,
            http_status=http_status,
            error_class=error_class,
            usage=wire.usage_of(usage),
            latency_ms=min(latency * 1000, MAX_DURATION_MS),  # as long as the contract holds
            ttft_ms=ttft,
            proxy_overhead_ms=min(overhead * 1000, MAX_DURATION_MS),
            attribution=wire.attribution_of(self.attribution),
        )
