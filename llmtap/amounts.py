"""Amounts of money as a message or a payload says them to people."""

from __future__ import annotations

from decimal import Decimal


def plain(amount: Decimal) -> str:
    """Exact and unpadded: "0.18", not "0.180000000" (as a spend read back from
    ClickHouse's Decimal(18, 9) has it, or a worst case reckoned to nine places); "100",
    not "1E+2"."""
    return format(amount.normalize(), "f")
