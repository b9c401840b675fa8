"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

A call's tokens are unknown until it ends, so it is admitted on an estimate, as
OpenAI's own limiter does (:func:`estimate`: its prompt by its body's bytes, its output
by the most it names), and a request and the estimate are taken then: calls in flight
at once cannot spend past the limit. It goes only if the bucket holds the estimate, or
is full (a call larger than the limit could never go otherwise). When it ends, its real
count is settled against the estimate, the difference given back or taken (the bucket
may go negative, holding back the calls after it until the debt is refilled); a call
refused after admission, before it reached the provider, gives back both. Pure
arithmetic over a clock passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmtap.events import Usage

BYTES_PER_TOKEN = 4  # about, in English text and JSON (OpenAI's rule of thumb)
# The retry-after of a call held back by what the key's calls in flight reserved (not
# by what it spent): they settle, most at far less, within seconds.
HELD_RETRY_S = 1.0


@dataclass
class TokenBucket:
    """``capacity`` units, refilled continuously at ``capacity`` per minute."""

    capacity: float
    level: float = field(init=False)
    stamp: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.level = self.capacity

    @property
    def per_second(self) -> float:
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if self.stamp is not None:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_second)
        self.stamp = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` is available (0 when it is now)."""
        self.refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.per_second

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def give(self, amount: float, now: float) -> None:
        """Put back ``amount`` taken before, never above capacity."""
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)


def remade(bucket: TokenBucket | None, capacity: int | None, now: float) -> TokenBucket | None:
    """A bucket of a changed ``capacity`` (None: no limit), holding what ``bucket`` held
    at most: a new limit neither refills a key nor forgives its debt."""
    if not capacity:
        return None
    new = TokenBucket(capacity)
    if bucket is not None:
        bucket.refill(now)
        new.level, new.stamp = min(new.capacity, bucket.level), bucket.stamp
    return new


@dataclass(frozen=True)
class Estimate:
    """A call's tokens, reckoned before it goes."""

    prompt: int
    output: int

    @property
    def tokens(self) -> int:
        return self.prompt + self.output


def estimate(request_bytes: int, max_tokens: int | None, answers: int = 1) -> Estimate:
    """The prompt by the body's bytes, the output by ``max_tokens`` for each of
    ``answers`` (none if the call names no ceiling)."""
    return Estimate(request_bytes // BYTES_PER_TOKEN, (max_tokens or 0) * max(answers, 1))


def spent(estimate: Estimate, usage: Usage) -> int:
    """The tokens an ended call counts: its usage; when that lacks the prompt (no usage
    reported, or a stream cut before its usage came, its output counted by llmtap), the
    prompt as estimated, and at least the whole estimate (the provider bills it all)."""
    counted = usage.input_tokens + usage.output_tokens
    if usage.usage_missing or (usage.output_tokens_counted and usage.input_tokens == 0):
        return max(estimate.prompt + counted, estimate.tokens)
    return counted


@dataclass
class Ticket:
    """An admitted call's hold on its key's buckets, settled or given back once."""

    key_id: str
    estimate: Estimate
    reserved: int  # tokens taken at admission
    request: bool  # a request taken
    done: bool = False


@dataclass(frozen=True)
class Wait:
    """A call refused: seconds until it would be admitted (retry-after), and the limit
    that holds it longest (named as OpenAI's rate-limit errors name it, their type)."""

    seconds: float
    limit: Literal["requests", "tokens"]


@dataclass
class KeyLimits:
    rpm: int | None
    tpm: int | None
    requests: TokenBucket | None
    tokens: TokenBucket | None
    held: int = 0  # tokens reserved by its calls in flight, not settled yet
    # The buckets of a limit taken off, kept for it to be put back: made anew, full, a
    # key's debt was forgiven by an edit to unlimited and back.
    lifted_requests: TokenBucket | None = None
    lifted_tokens: TokenBucket | None = None


class RateLimiter:
    """Buckets per key id, made on first use; one is remade, holding what it held, when
    its limit changes (taken off and put back too)."""

    def __init__(self) -> None:
        self._keys: dict[str, KeyLimits] = {}

    def _limits(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> KeyLimits:
        limits = self._keys.get(key_id)
        if limits is None:
            limits = KeyLimits(rpm, tpm, remade(None, rpm, now), remade(None, tpm, now))
            self._keys[key_id] = limits
        if limits.rpm != rpm:
            before = limits.requests or limits.lifted_requests
            limits.rpm, limits.requests = rpm, remade(before, rpm, now)
            limits.lifted_requests = None if rpm else before
        if limits.tpm != tpm:
            before = limits.tokens or limits.lifted_tokens
            limits.tpm, limits.tokens = tpm, remade(before, tpm, now)
            limits.lifted_tokens = None if tpm else before
        return limits

    def admit(
        self, key_id: str, rpm: int | None, tpm: int | None, estimate: Estimate, now: float
    ) -> Ticket | Wait:
        """A ticket, one request and the estimated tokens taken, if the call may go; else
        how long to wait, and for which limit."""
        limits = self._limits(key_id, rpm, tpm, now)
        requests, tokens = limits.requests, limits.tokens
        reserved = estimate.tokens if tokens else 0
        for_request = requests.wait_for(1, now) if requests else 0.0
        for_tokens = tokens.wait_for(min(reserved, tokens.capacity), now) if tokens else 0.0
        if for_tokens > 0 and limits.held > 0:
            assert tokens is not None
            # Held back (in part) by its calls in flight: what they reserved comes back
            # as they end, most of it. Told the wait their debt would leave, at least
            # HELD_RETRY_S: the wait as if they spent all they reserved was minutes (the
            # SDKs told not to retry), for a call admitted a second later.
            free = min(tokens.capacity, tokens.level + limits.held)
            missing = min(reserved, tokens.capacity) - free
            unheld = max(0.0, missing) / tokens.per_second
            for_tokens = min(for_tokens, max(unheld, HELD_RETRY_S))
        if for_request > 0 or for_tokens > 0:
            if for_request >= for_tokens:
                return Wait(for_request, "requests")
            return Wait(for_tokens, "tokens")
        if requests:
            requests.take(1, now)
        if tokens:
            tokens.take(reserved, now)
            limits.held += reserved
        return Ticket(key_id, estimate, reserved, requests is not None)

    def settle(self, ticket: Ticket, usage: Usage, now: float) -> None:
        """The call ended: charge what it spent instead of its reservation."""
        if ticket.done:
            return
        ticket.done = True
        limits = self._keys.get(ticket.key_id)
        if limits is not None:
            limits.held -= ticket.reserved
        if limits is not None and limits.tokens is not None:
            extra = spent(ticket.estimate, usage) - ticket.reserved
            if extra >= 0:
                limits.tokens.take(extra, now)
            else:
                limits.tokens.give(-extra, now)

    def release(self, ticket: Ticket, now: float) -> None:
        """The call was refused before it reached the provider: give back what it took."""
        if ticket.done:
            return
        ticket.done = True
        limits = self._keys.get(ticket.key_id)
        if limits is not None:
            limits.held -= ticket.reserved
        if limits is not None and limits.requests is not None and ticket.request:
            limits.requests.give(1, now)
        if limits is not None and limits.tokens is not None:
            limits.tokens.give(ticket.reserved, now)
