"""Amounts a hard cap holds, by whom, and their sum, kept as they come and go.

Admission asks of every capped call what its budgets hold (ingress/guards/budgets.py):
the worst cases of the calls in flight, and what the other ingress processes announce
they hold. :class:`RunningSum` keeps each answer as a running sum, so a call costs the
same however many are in flight or announcing: summed at each admission, 1,000 calls in
flight on one budget cost ~45 µs a capped call (a burst held up by a slow provider made
each next call dearer), 20 replicas ~20 µs a call and budget.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, MutableMapping
from decimal import Context, Decimal, Rounded

# Adds and takes away without rounding, or says it would have to (Rounded): then the
# sum is made again as summing gives it.
_EXACT = Context(traps=[Rounded])
ZERO = Decimal(0)


def exponent_of(amount: Decimal) -> int:
    """The exponent of a finite amount (its last digit's place: -9 for 0.000000001)."""
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int), "an amount held is finite"
    return exponent


class RunningSum(MutableMapping[Hashable, Decimal]):
    """Amounts by whom they are held for (a call, a process), and their sum
    (:attr:`total`) as summing them in order gives it, digits too: its exponent the
    least of theirs (and 0's), as ``sum(values, Decimal(0))`` has it, not that of every
    amount it ever held. Not :attr:`exact` once an amount had more digits than a
    Decimal adds exactly: then it is summed again at each ask (rounded as summing
    rounds, in the order held)."""

    __slots__ = ("_by_whom", "_exponents", "_sum", "_sum_exponent", "_total")

    def __init__(self) -> None:
        self._by_whom: dict[Hashable, tuple[Decimal, int]] = {}  # the amount, its exponent
        self._exponents: dict[int, int] = {}  # how many amounts held have each
        self._sum: Decimal | None = ZERO  # None: too many digits to add exactly
        self._sum_exponent = 0
        self._total: Decimal | None = ZERO  # the answer, until something changes

    @property
    def exact(self) -> bool:
        return self._sum is not None

    @property
    def total(self) -> Decimal:
        total = self._total
        if total is None:
            total = self._total = self._reckoned()
        return total

    def _reckoned(self) -> Decimal:
        if self._sum is None:  # rounded as summing rounds
            return sum((amount for amount, _ in self._by_whom.values()), ZERO)
        least = min(0, min(self._exponents, default=0))
        if least != self._sum_exponent:  # its amounts of the least exponent are let go
            self._sum = self._sum.quantize(Decimal((0, (1,), least)))  # no digit is lost
            self._sum_exponent = least
        return self._sum

    def __getitem__(self, whom: Hashable) -> Decimal:
        return self._by_whom[whom][0]

    def __setitem__(self, whom: Hashable, amount: Decimal) -> None:
        self.reserve(whom, amount, exponent_of(amount))

    def reserve(self, whom: Hashable, amount: Decimal, exponent: int) -> None:
        """Hold ``amount`` (of ``exponent``: :func:`exponent_of`) for ``whom``, in place of
        what it held."""
        held = (amount, exponent)
        before = self._by_whom.setdefault(whom, held)
        if before is not held:  # held for them already: replaced, in its place
            self._let_go(before)
            self._by_whom[whom] = held
        exponents = self._exponents
        exponents[exponent] = exponents.get(exponent, 0) + 1
        if self._sum is not None:
            try:
                self._sum = _EXACT.add(self._sum, amount)
            except Rounded:
                self._sum = None
            if exponent < self._sum_exponent:
                self._sum_exponent = exponent
        self._total = None

    def __delitem__(self, whom: Hashable) -> None:
        self._let_go(self._by_whom.pop(whom))

    def pop(self, whom: Hashable, *default: Decimal | None) -> Decimal | None:  # type: ignore[override]
        held = self._by_whom.pop(whom, None)
        if held is None:
            if default:
                return default[0]
            raise KeyError(whom)
        self._let_go(held)
        return held[0]

    def _let_go(self, held: tuple[Decimal, int]) -> None:
        amount, exponent = held
        left = self._exponents[exponent] - 1
        if left:
            self._exponents[exponent] = left
        else:
            del self._exponents[exponent]
        self._total = None
        if not self._by_whom:  # none left: exact again
            self._sum, self._sum_exponent = ZERO, 0
        elif self._sum is not None:
            try:
                self._sum = _EXACT.subtract(self._sum, amount)
            except Rounded:
                self._sum = None

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._by_whom)

    def __len__(self) -> int:
        return len(self._by_whom)
