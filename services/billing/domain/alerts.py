"""When a usage alert's threshold is reached: pure."""

from __future__ import annotations

import decimal
from decimal import Decimal

from services.billing.domain.pricing import UsagePrice, price_usage

EXACT = decimal.Context(prec=60, traps=[decimal.InvalidOperation, decimal.Inexact])


def priced_minor(usage: Decimal, price: UsagePrice, digits: int) -> Decimal | None:
    """The usage priced by the price (free threshold and model applied; no
    commitments, credits or rounding), in minor units of a currency with
    `digits` decimals; None when the price needs each transaction's amount
    (a PERCENTAGE price with transaction_key), which a total cannot give."""
    if price.per_transaction:
        return None
    amount = price_usage(usage, price).amount
    with decimal.localcontext(EXACT):
        return amount.scaleb(digits)


def reached(
    usage: Decimal,
    quantity: Decimal | None,
    amount_minor: int | None,
    price: UsagePrice | None,
    digits: int,
) -> bool:
    """Whether usage is at or over the threshold: a quantity of the meter,
    or an amount of the price (never reached without a price it can use)."""
    if quantity is not None:
        return usage >= quantity
    if amount_minor is None or price is None:
        return False
    priced = priced_minor(usage, price, digits)
    return priced is not None and priced >= amount_minor
