"""Money as exact integers: every amount and price is a count of UNIT (10^-12 US dollars).

Prices are entered per million tokens and kept per token; 10^-12 keeps a price of $0.000001 per million
tokens exact, and a signed 64-bit column still holds balances up to nine million dollars.
"""

from __future__ import annotations

import time
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

UNIT = 10**12
"""Units in one US dollar."""
PER_MILLION = 10**6
MAX_USD = Decimal(1_000_000)
"""The largest amount (or price per million tokens) an admin may enter."""


class BadAmount(ValueError):
    pass


def units(usd: float | int | str | Decimal) -> int:
    """Dollars as entered (a JSON number or a numeric string) -> units, refusing what is not a finite amount."""
    try:
        amount = Decimal(str(usd))
    except InvalidOperation as e:
        raise BadAmount("is not a number") from e
    if not amount.is_finite():
        raise BadAmount("is not a finite number")
    if amount < 0:
        raise BadAmount("must not be negative")
    if amount > MAX_USD:
        raise BadAmount(f"must be at most {MAX_USD}")
    return int((amount * UNIT).to_integral_value(ROUND_HALF_EVEN))


def per_token(usd_per_million: float | int | str | Decimal) -> int:
    """A price entered per million tokens -> units per token."""
    return int((Decimal(units(usd_per_million)) / PER_MILLION).to_integral_value(ROUND_HALF_EVEN))


def usd(amount: int) -> float:
    """Units -> dollars for an answer (a JSON number)."""
    return float(Decimal(amount) / UNIT)


def fee(prompt_tokens: int, completion_tokens: int, price_in: int, price_out: int) -> int:
    return prompt_tokens * price_in + completion_tokens * price_out


def month_of(at: float | None = None) -> int:
    """The billing month of a moment in unix seconds (now by default), as YYYYMM (UTC)."""
    t = time.gmtime(at)
    return t.tm_year * 100 + t.tm_mon


CREDIT = UNIT // 10**6
"""LlmEndpoint's credit: 10^-4 cent (its costs are in cents, divided by 0.0001)."""
