"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Requests are taken when a call is admitted. Tokens are unknown until a call ends, so
a call is admitted while the key's token bucket is not in debt, and its real token
count is settled when it ends (the bucket may go negative, holding back the calls
after it until the debt is refilled). Pure arithmetic over a clock passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


@dataclass
class KeyLimits:
    rpm: int | None
    tpm: int | None
    requests: TokenBucket | None
    tokens: TokenBucket | None


class RateLimiter:
    """Buckets per key id, made on first use and remade when the key's limits change."""

    def __init__(self) -> None:
        self._keys: dict[str, KeyLimits] = {}

    def _limits(self, key_id: str, rpm: int | None, tpm: int | None) -> KeyLimits:
        limits = self._keys.get(key_id)
        if limits is None or (limits.rpm, limits.tpm) != (rpm, tpm):
            limits = KeyLimits(
                rpm, tpm, TokenBucket(rpm) if rpm else None, TokenBucket(tpm) if tpm else None
            )
            self._keys[key_id] = limits
        return limits

    def admit(self, key_id: str, rpm: int | None, tpm: int | None, now: float) -> float:
        """0 and one request taken if the call may go; else seconds to wait (retry-after)."""
        limits = self._limits(key_id, rpm, tpm)
        waits = [
            limits.requests.wait_for(1, now) if limits.requests else 0.0,
            limits.tokens.wait_for(0, now) if limits.tokens else 0.0,
        ]
        wait = max(waits)
        if wait == 0 and limits.requests:
            limits.requests.take(1, now)
        return wait

    def settle(self, key_id: str, tokens: int, now: float) -> None:
        limits = self._keys.get(key_id)
        if limits is not None and limits.tokens is not None:
            limits.tokens.take(tokens, now)
