"""Invoice building: price each meter's usage, round each line once to minor
units (half-up), apply the period's spend commitment, and total the rounded
lines, so that the lines always add up to the total shown. Numbers in
descriptions are printed normalised ("0.01", not "0.010")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Final

from services.billing.domain import commitments
from services.billing.domain.commitments import Commitment
from services.billing.domain.money import from_minor, minor_units, to_minor
from services.billing.domain.pricing import (
    FeeCharge,
    PriceModel,
    TierCharge,
    UsageCharge,
    UsagePrice,
    package_count,
    plain,
    price_usage,
)
from services.common.errors import FailedPrecondition

# amount_minor is an int64 on the wire and a bigint in the store.
INT64_MAX: Final = 2**63 - 1
# What a line bills (InvoiceLine.kind on the wire, upper-cased there).
FIXED_FEE: Final = "fixed_fee"
USAGE: Final = "usage"
MAXIMUM_SPEND: Final = "maximum_spend"  # the cap: a negative line
MINIMUM_SPEND: Final = "minimum_spend"  # the true-up of a shortfall
LATE_USAGE: Final = "late_usage"  # an earlier period re-priced (domain/late.py)
# Decimal places a proration ratio is shown with (the amount uses it exactly).
RATIO_PLACES: Final = 4
# A usage entry: (price, meter name, consumed), where consumed is each
# transaction's amount for a price with transaction_key.
Usage = tuple[UsagePrice, str, Decimal | tuple[Decimal, ...]]


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
class LineCredits:
    """What credits did for a usage line (InvoiceLineCredits on the wire):
    quantities in the meter's unit, credits in the credit type's."""

    credit_type_id: str
    credit_type_name: str
    credit_rate: Decimal
    credits_drawn: Decimal
    quantity_covered: Decimal
    overage_quantity: Decimal  # quantity - quantity_covered
    overage_rule: str  # FORGIVE, BILL or DEFICIT
    billable_overage_quantity: Decimal  # the overage under BILL, else 0
    overage_amount_minor: int  # the line's amount: it bills only the overage


@dataclass(frozen=True)
class MeterChange:
    """One meter's quantity in a period as billed and as re-priced."""

    meter_id: str
    meter_name: str
    billed_quantity: Decimal
    quantity: Decimal


@dataclass(frozen=True)
class LateUsage:
    """What a LATE_USAGE line corrects (InvoiceLineLateUsage on the wire): the
    period, its invoice, the totals in minor units, the meters that changed."""

    period_start: datetime
    period_end: datetime
    invoice_id: str
    invoice_number: str
    billed_total_minor: int
    repriced_total_minor: int
    meters: tuple[MeterChange, ...]


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
    kind: str = USAGE
    credits: LineCredits | None = None  # a usage line whose price draws credits
    late_usage: LateUsage | None = None  # a LATE_USAGE line


@dataclass(frozen=True)
class InvoiceDraft:
    currency: str
    period_start: datetime
    period_end: datetime
    lines: tuple[InvoiceLine, ...]
    subtotal_minor: int
    total_minor: int


def _fmt(value: Decimal) -> str:
    # Plain and normalised: "1000", not "1E+3"; "0.01", not "0.010".
    return plain(value)


def _money(minor: int, currency: str) -> str:
    # Minor units as the currency writes them: 6258 USD -> "62.58".
    return f"{from_minor(minor, currency):f} {currency}"


def _round_half_up(value: Fraction) -> int:
    """Half away from zero, like ROUND_HALF_UP, on an exact rational."""
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def _usage_description(name: str, price: UsagePrice, charge: UsageCharge) -> str:
    text = (
        f"{name}: {_fmt(charge.consumed)} consumed, {_fmt(charge.free)} free, "
        f"{_fmt(charge.billable)} billable"
    )
    if charge.fees is not None:
        return f"{text} {_fees_text(price, charge.fees)}"
    if price.model is PriceModel.PERCENTAGE:
        return f"{text} × {_fmt(price.rate)}%"
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


def _fees_text(price: UsagePrice, fees: FeeCharge) -> str:
    """ "× 2.9% + 0.3 × 4 transactions, 2 raised to the 0.5 minimum"; "× 2.9%
    + 0.3 × 3 of 4 transactions" with a free one; "× 2.9%, 4 transactions"
    without a fixed fee."""
    noun = "transaction" if fees.transactions == 1 else "transactions"
    if price.fixed_fee:
        some = fees.charged_transactions
        counted = f"{some} of {fees.transactions}" if some != fees.transactions else f"{some}"
        text = f"× {_fmt(price.rate)}% + {_fmt(price.fixed_fee)} × {counted} {noun}"
    else:
        text = f"× {_fmt(price.rate)}%, {fees.transactions} {noun}"
    if fees.raised_to_min and price.min_fee is not None:
        text += f", {fees.raised_to_min} raised to the {_fmt(price.min_fee)} minimum"
    if fees.lowered_to_max and price.max_fee is not None:
        text += f", {fees.lowered_to_max} lowered to the {_fmt(price.max_fee)} maximum"
    return text


def _unit_and_flat(tier: TierCharge) -> str:
    flat = f" + {_fmt(tier.flat_price)} flat" if tier.flat_price else ""
    return f"{_fmt(tier.unit_price)}{flat}"


def _fixed_line(
    currency: str, fixed_price_minor: int, product_name: str, proration: Fraction
) -> InvoiceLine:
    if proration == 1:
        quantity, description = Decimal(1), f"{product_name}: fixed fee"
    else:
        quantity, shown = ratio(proration)
        description = f"{product_name}: fixed fee, prorated × {shown}"
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
        kind=FIXED_FEE,
    )


def ratio(share: Fraction) -> tuple[Decimal, str]:
    """A ratio for people: rounded half-up to RATIO_PLACES decimals and
    normalised, with "≈" when that is not exact (15/31 -> 0.4839, "≈0.4839";
    1/2 -> 0.5, "0.5"). Display only: amounts use the exact fraction."""
    rounded = _round_half_up(share * 10**RATIO_PLACES)
    text = plain(Decimal(rounded).scaleb(-RATIO_PLACES))
    exact = Fraction(rounded, 10**RATIO_PLACES) == share
    return Decimal(text), text if exact else f"≈{text}"


def _commitment_lines(
    commitment: Commitment, currency: str, lines: Sequence[InvoiceLine], share: Fraction
) -> list[InvoiceLine]:
    fixed = sum(line.amount_minor for line in lines if line.kind == FIXED_FEE)
    usage = sum(line.amount_minor for line in lines if line.kind == USAGE)
    prorated = "" if share == 1 else f", prorated × {ratio(share)[1]}"
    added = []
    for adjustment in commitments.apply(commitment, fixed, usage, share):
        bound = _money(adjustment.bound_minor, currency)
        spent = _money(adjustment.spent_minor, currency)
        if adjustment.kind == "maximum":
            kind = MAXIMUM_SPEND
            description = f"Maximum spend: usage of {spent} capped at {bound} per period{prorated}"
        else:
            kind = MINIMUM_SPEND
            description = f"Minimum spend: {bound} per period{prorated}, {spent} spent; true-up"
        added.append(
            InvoiceLine(
                description=description,
                meter_id="",
                meter_name="",
                quantity=Decimal(1),
                free_quantity=Decimal(0),
                billable_quantity=Decimal(1),
                unit_price=from_minor(adjustment.amount_minor, currency),
                amount_minor=adjustment.amount_minor,
                tiers=(),
                kind=kind,
            )
        )
    return added


def build_invoice(
    currency: str,
    fixed_price_minor: int,
    product_name: str,
    usage: Sequence[Usage],
    period_start: datetime,
    period_end: datetime,
    proration: Decimal | Fraction = Decimal(1),
    commitment: Commitment | None = None,
) -> InvoiceDraft:
    """One invoice for one period: the fixed fee (times `proration` for a
    period cut short), one line per (price, meter name, consumed), then the
    lines of the spend commitment (see `commitments`; its bounds prorated
    like the fixed fee)."""
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
        if isinstance(consumed, tuple):
            charge = price_usage(Decimal(0), price, consumed)
        else:
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
    if commitment is not None and not commitment.empty:
        lines += _commitment_lines(commitment, currency, lines, share)
    total = sum(line.amount_minor for line in lines)
    if abs(total) > INT64_MAX:
        raise Unpriceable(
            f"total_minor: the lines of the period starting {period_start.isoformat()} add "
            f"up to {_magnitude(total)} minor units of {currency}, beyond the int64 range",
            cause="amount_out_of_range",
        )
    return InvoiceDraft(currency, period_start, period_end, tuple(lines), total, total)
