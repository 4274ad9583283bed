"""Invoice building: price each meter's usage, round each line once to minor
units (half-up), and total the rounded lines, so that the lines always add up
to the total shown."""

from __future__ import annotations

import decimal
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Final

from services.billing.domain.money import from_minor, minor_units, to_minor
from services.billing.domain.pricing import (
    PriceModel,
    TierCharge,
    UsageCharge,
    UsagePrice,
    package_count,
    price_usage,
)
from services.common.errors import FailedPrecondition

# amount_minor is an int64 on the wire and a bigint in the store.
INT64_MAX: Final = 2**63 - 1


class Unpriceable(FailedPrecondition):
    """A period whose invoice cannot be built from the data it has (its usage,
    under its product's prices), not from anything wrong in a request.
    `cause` is a short, stable word for metrics; the message names the line
    (the usage_prices index and meter) and the cause."""

    def __init__(self, message: str, *, cause: str, meter_id: str = "") -> None:
        super().__init__(message)
        self.cause = cause
        self.meter_id = meter_id


def _magnitude(minor: int) -> str:
    # Scientific notation: the amount can have thousands of digits.
    return f"{Decimal(minor):.3e}"


@dataclass(frozen=True)
class InvoiceLine:
    description: str
    meter_id: str  # empty on the fixed-fee line
    meter_name: str
    quantity: Decimal
    free_quantity: Decimal
    billable_quantity: Decimal
    unit_price: Decimal | None  # major units; None when no single price applies
    amount_minor: int
    tiers: tuple[TierCharge, ...]


@dataclass(frozen=True)
class InvoiceDraft:
    currency: str
    period_start: datetime
    period_end: datetime
    lines: tuple[InvoiceLine, ...]
    subtotal_minor: int
    total_minor: int


def _fmt(value: Decimal) -> str:
    # Plain notation: "1000", not "1E+3".
    return format(value, "f")


def _round_half_up(value: Fraction) -> int:
    """Half away from zero, like ROUND_HALF_UP, on an exact rational."""
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def _usage_description(name: str, price: UsagePrice, charge: UsageCharge) -> str:
    text = (
        f"{name}: {_fmt(charge.consumed)} consumed, {_fmt(charge.free)} free, "
        f"{_fmt(charge.billable)} billable"
    )
    if price.model is PriceModel.PER_UNIT and price.unit_price is not None:
        return f"{text} × {_fmt(price.unit_price)}"
    if price.model is PriceModel.PACKAGE and price.package_size is not None:
        count = package_count(charge.billable, price.package_size)
        noun = "package" if count == 1 else "packages"
        return (
            f"{text}, {_fmt(count)} {noun} of {_fmt(price.package_size)} "
            f"× {_fmt(price.package_price)}"
        )
    if not charge.tiers:  # tiered, with nothing billable
        return text
    if price.model is PriceModel.VOLUME:
        # One tier prices every unit.
        return f"{text} × {_unit_and_flat(charge.tiers[0])}"
    parts = (f"{_fmt(t.quantity)} × {_unit_and_flat(t)}" for t in charge.tiers)
    return f"{text} ({'; '.join(parts)})"


def _unit_and_flat(tier: TierCharge) -> str:
    flat = f" + {_fmt(tier.flat_price)} flat" if tier.flat_price else ""
    return f"{_fmt(tier.unit_price)}{flat}"


def _fixed_line(
    currency: str, fixed_price_minor: int, product_name: str, proration: Fraction
) -> InvoiceLine:
    if proration == 1:
        quantity, description = Decimal(1), f"{product_name}: fixed fee"
    else:
        # Display only: the amount below uses the exact fraction.
        quantity = decimal.Context(prec=28).divide(
            Decimal(proration.numerator), Decimal(proration.denominator)
        )
        description = f"{product_name}: fixed fee, prorated × {_fmt(quantity)}"
    return InvoiceLine(
        description=description,
        meter_id="",
        meter_name="",
        quantity=quantity,
        free_quantity=Decimal(0),
        billable_quantity=quantity,
        unit_price=from_minor(fixed_price_minor, currency),
        amount_minor=_round_half_up(fixed_price_minor * proration),
        tiers=(),
    )


def build_invoice(
    currency: str,
    fixed_price_minor: int,
    product_name: str,
    usage: Sequence[tuple[UsagePrice, str, Decimal]],
    period_start: datetime,
    period_end: datetime,
    proration: Decimal | Fraction = Decimal(1),
) -> InvoiceDraft:
    """One invoice for one period: the fixed fee (times `proration` for a
    period cut short), then one line per (price, meter name, consumed)."""
    minor_units(currency)
    if fixed_price_minor < 0:
        raise ValueError("fixed_price_minor must not be negative")
    if period_end <= period_start:
        raise ValueError("period_end must be after period_start")
    share = Fraction(proration)  # exact, also from a Decimal
    if not 0 <= share <= 1:
        raise ValueError(f"proration must be within [0, 1], got {proration}")

    lines: list[InvoiceLine] = []
    if fixed_price_minor > 0:
        lines.append(_fixed_line(currency, fixed_price_minor, product_name, share))
    for index, (price, meter_name, consumed) in enumerate(usage):
        charge = price_usage(consumed, price)
        name = meter_name or price.meter_id
        amount_minor = to_minor(charge.amount, currency)
        if abs(amount_minor) > INT64_MAX:
            # The usage (not a request) is out of range: the caller decides
            # whether to refuse a preview or to hold the period's invoice.
            raise Unpriceable(
                f"usage_prices[{index}] (meter {name!r}, {price.meter_id}): "
                f"{_fmt(charge.billable)} billable units come to "
                f"{_magnitude(amount_minor)} minor units of {currency}, beyond the int64 "
                f"range of amount_minor",
                cause="amount_out_of_range",
                meter_id=price.meter_id,
            )
        lines.append(
            InvoiceLine(
                description=_usage_description(name, price, charge),
                meter_id=price.meter_id,
                meter_name=meter_name,
                quantity=charge.consumed,
                free_quantity=charge.free,
                billable_quantity=charge.billable,
                unit_price=charge.unit_price,
                amount_minor=amount_minor,
                tiers=charge.tiers,
            )
        )
    total = sum(line.amount_minor for line in lines)
    if abs(total) > INT64_MAX:
        raise Unpriceable(
            f"total_minor: the lines of the period starting {period_start.isoformat()} add "
            f"up to {_magnitude(total)} minor units of {currency}, beyond the int64 range",
            cause="amount_out_of_range",
        )
    return InvoiceDraft(currency, period_start, period_end, tuple(lines), total, total)
