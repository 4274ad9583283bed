"""Currencies, minor units and the one rounding step from an exact amount to an
integer number of minor units."""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from types import MappingProxyType
from typing import Final

from services.common.errors import InvalidArgument

# Unrounded arithmetic: amounts are exact until `to_minor` rounds them once.
# Inexact is trapped so that a result that would need rounding fails loudly
# instead of being rounded twice. Never divide under this context: with
# MAX_PREC an inexact quotient tries to allocate every digit (MemoryError).
EXACT: Final = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    rounding=ROUND_HALF_UP,
    traps=[decimal.Inexact, decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow],
)

# ISO 4217 code -> number of minor-unit digits (the standard's "minor unit").
CURRENCIES: Final = MappingProxyType(
    {
        "AED": 2, "ARS": 2, "AUD": 2, "BDT": 2, "BGN": 2, "BHD": 3, "BRL": 2,
        "CAD": 2, "CHF": 2, "CLP": 0, "CNY": 2, "COP": 2, "CZK": 2, "DKK": 2,
        "EGP": 2, "EUR": 2, "GBP": 2, "HKD": 2, "HUF": 2, "IDR": 2, "ILS": 2,
        "INR": 2, "IQD": 3, "ISK": 0, "JOD": 3, "JPY": 0, "KES": 2, "KRW": 0,
        "KWD": 3, "LKR": 2, "LYD": 3, "MAD": 2, "MXN": 2, "MYR": 2, "NGN": 2,
        "NOK": 2, "NZD": 2, "OMR": 3, "PEN": 2, "PHP": 2, "PKR": 2, "PLN": 2,
        "PYG": 0, "QAR": 2, "RON": 2, "RSD": 2, "RUB": 2, "SAR": 2, "SEK": 2,
        "SGD": 2, "THB": 2, "TND": 3, "TRY": 2, "TWD": 2, "UAH": 2, "UGX": 0,
        "USD": 2, "UYU": 2, "VND": 0, "XAF": 0, "XOF": 0, "ZAR": 2,
    }
)  # fmt: skip


def minor_units(currency: str, *, field: str = "currency") -> int:
    """Digits after the decimal point in `currency` (USD 2, JPY 0, KWD 3)."""
    try:
        return CURRENCIES[currency]
    except KeyError:
        pass
    if not currency:
        raise InvalidArgument(f"{field}: required (an ISO 4217 code such as USD)")
    # Codes are case sensitive on purpose: "usd" is a client bug, not USD.
    if currency.upper() in CURRENCIES:
        raise InvalidArgument(
            f"{field}: {currency!r} must be uppercase, as ISO 4217 writes it ({currency.upper()!r})"
        )
    raise InvalidArgument(
        f"{field}: {currency[:20]!r} is not a supported ISO 4217 code (such as USD, JPY, KWD)"
    )


def to_minor(amount: Decimal, currency: str) -> int:
    """`amount` in major units, rounded once, half-up (away from zero at .5),
    to an integer number of minor units: 12.345 USD -> 1235."""
    if not amount.is_finite():
        raise ValueError(f"amount must be finite, got {amount}")
    with decimal.localcontext(EXACT):
        scaled = amount.scaleb(minor_units(currency))
        return int(scaled.to_integral_value(rounding=ROUND_HALF_UP))


def from_minor(minor: int, currency: str) -> Decimal:
    """Minor units back to an exact amount in major units: 1235 USD -> 12.35."""
    with decimal.localcontext(EXACT):
        return Decimal(minor).scaleb(-minor_units(currency))


@dataclass(frozen=True)
class Money:
    """An integer number of minor units of one currency."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        minor_units(self.currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    @classmethod
    def of(cls, amount: Decimal, currency: str) -> Money:
        """An exact major-unit amount, rounded once to minor units."""
        return cls(to_minor(amount, currency), currency)

    @property
    def amount(self) -> Decimal:
        return from_minor(self.amount_minor, self.currency)

    def __add__(self, other: Money) -> Money:
        if not isinstance(other, Money):
            return NotImplemented
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        return Money(self.amount_minor + other.amount_minor, self.currency)
