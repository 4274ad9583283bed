"""Spend commitments: a minimum and a maximum spend per billing period.

A commitment is set on a product, and a subscription may override it (the
subscription's commitment replaces the product's whole, both bounds). All in
integer minor units of the product's currency, so no rounding but proration's:

* The maximum caps the usage lines: when they add up to more, a negative line
  takes the excess off, so the invoice shows what was used and what was capped.
* The minimum is compared with what the period spends after the cap (the fixed
  fee and the usage lines): a shortfall is billed on a true-up line.
* A period cut short (a cancellation) has both bounds prorated by the share of
  the period served, the share that prorates the fixed fee, each rounded once
  to minor units, half-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

from services.common.errors import InvalidArgument

# amount_minor is an int64 on the wire and a bigint in the store.
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True)
class Commitment:
    minimum_minor: int = 0  # 0: no minimum
    maximum_minor: int = 0  # 0: no maximum

    @property
    def empty(self) -> bool:
        return not self.minimum_minor and not self.maximum_minor


@dataclass(frozen=True)
class Adjustment:
    """A line a commitment adds: the cap (negative) or the true-up (positive)."""

    kind: str  # "maximum" or "minimum"
    bound_minor: int  # the bound, prorated
    spent_minor: int  # what it was compared with
    amount_minor: int


def validate_commitment(commitment: Commitment, field: str = "commitment") -> None:
    """Bounds are 0 (none) or positive, in int64, and a maximum is not below
    the minimum; InvalidArgument naming the field otherwise."""
    for name, value in (
        ("minimum_spend_minor", commitment.minimum_minor),
        ("maximum_spend_minor", commitment.maximum_minor),
    ):
        if value < 0:
            raise InvalidArgument(f"{field}.{name}: must not be negative")
        if value > _INT64_MAX:
            raise InvalidArgument(f"{field}.{name}: beyond the int64 range")
    if commitment.maximum_minor and commitment.maximum_minor < commitment.minimum_minor:
        raise InvalidArgument(f"{field}.maximum_spend_minor: must not be less than the minimum")


def effective(product: Commitment | None, subscription: Commitment | None) -> Commitment | None:
    """The subscription's commitment when it has one, else the product's."""
    return subscription if subscription is not None else product


def prorate(bound_minor: int, share: Fraction) -> int:
    """bound × share, rounded half-up (shares are within [0, 1], so >= 0)."""
    return math.floor(bound_minor * share + Fraction(1, 2))


def apply(
    commitment: Commitment, fixed_minor: int, usage_minor: int, share: Fraction = Fraction(1)
) -> list[Adjustment]:
    """The lines `commitment` adds to a period whose fixed fee line is
    `fixed_minor` and whose usage lines add up to `usage_minor`: the cap
    first, then the true-up. $100 minimum against $37.42 of usage: a true-up
    of 62.58 (6258 minor units)."""
    adjustments: list[Adjustment] = []
    if commitment.maximum_minor:
        maximum = prorate(commitment.maximum_minor, share)
        if usage_minor > maximum:
            adjustments.append(Adjustment("maximum", maximum, usage_minor, maximum - usage_minor))
            usage_minor = maximum
    if commitment.minimum_minor:
        minimum = prorate(commitment.minimum_minor, share)
        spent = fixed_minor + usage_minor
        if spent < minimum:
            adjustments.append(Adjustment("minimum", minimum, spent, minimum - spent))
    return adjustments
