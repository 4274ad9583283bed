"""Price models: how a metered quantity becomes an exact amount.

Each model is one pure function of the billable quantity (after the free
threshold) and the price; `PRICE_MODELS` picks it by `PriceModel`. Amounts stay
exact here (computed under `money.EXACT`); rounding to minor units happens once,
per invoice line, in `invoice`.

Tier bounds: `up_to` is the inclusive cumulative upper bound, so tier 1 covers
(0, up_to1], tier 2 covers (up_to1, up_to2], ... and the last tier is unbounded.
A GRADUATED or VOLUME price whose first tier has a flat price bills that flat
price even when nothing is billable (as Lago and OpenMeter do): a flat price is
the fee for having the tier at all.

PERCENTAGE prices payment-style fees on a meter whose quantity is an amount;
see `percentage`.
"""

from __future__ import annotations

import decimal
import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Final

from services.billing.domain.money import EXACT
from services.common.errors import InvalidArgument

ZERO: Final = Decimal(0)


class PriceModel(enum.Enum):
    PER_UNIT = "per_unit"
    GRADUATED = "graduated"
    VOLUME = "volume"
    PACKAGE = "package"
    PERCENTAGE = "percentage"


# Limits on a product's prices, checked before any other work on a request
# (every usage price costs a meter lookup now and a usage query per period
# later). INVALID_ARGUMENT naming the field; stated in product.proto.
MAX_USAGE_PRICES: Final = 50
MAX_TIERS: Final = 100


@dataclass(frozen=True)
class Tier:
    up_to: Decimal | None  # inclusive cumulative bound; None: no upper bound
    unit_price: Decimal
    flat_price: Decimal = ZERO


@dataclass(frozen=True)
class UsagePrice:
    meter_id: str
    model: PriceModel
    # None means "not given", so that PER_UNIT can require it.
    unit_price: Decimal | None = None
    free_threshold: Decimal = ZERO
    tiers: tuple[Tier, ...] = ()
    package_size: Decimal | None = None
    package_price: Decimal = ZERO
    # PERCENTAGE only (see `percentage`): the rate in percent, the fee per
    # transaction, the per-transaction bounds (None: none), the meter's
    # group_by key that tells transactions apart ("": no per-transaction
    # parts), and the number of transactions free of the fixed fee.
    rate: Decimal = ZERO
    fixed_fee: Decimal = ZERO
    min_fee: Decimal | None = None
    max_fee: Decimal | None = None
    transaction_key: str = ""
    free_transactions: int = 0

    @property
    def per_transaction(self) -> bool:
        """Whether pricing needs each transaction's amount, not only the sum."""
        return bool(self.transaction_key)


@dataclass(frozen=True)
class FeeCharge:
    """How a PERCENTAGE price came to its amount (all exact)."""

    transactions: int  # transactions in the period (0 without transaction_key)
    charged_transactions: int  # of which pay the fixed fee
    percentage_amount: Decimal  # rate × billable amount
    fixed_amount: Decimal  # fixed_fee × charged_transactions
    raised_to_min: int  # transactions whose fee was raised to min_fee
    lowered_to_max: int  # transactions whose fee was lowered to max_fee
    adjustment: Decimal  # what the min/max bounds added (+) or took off (-)


@dataclass(frozen=True)
class TierCharge:
    up_to: Decimal | None
    quantity: Decimal
    unit_price: Decimal
    flat_price: Decimal
    amount: Decimal  # exact


@dataclass(frozen=True)
class UsageCharge:
    consumed: Decimal
    free: Decimal
    billable: Decimal
    amount: Decimal  # exact, NOT rounded
    unit_price: Decimal | None  # the price of every billable unit, when one price applies
    tiers: tuple[TierCharge, ...]
    fees: FeeCharge | None = None  # PERCENTAGE only


Priced = tuple[Decimal, tuple[TierCharge, ...]]
PriceFunction = Callable[[Decimal, UsagePrice], Priced]


def _check_quantity(quantity: Decimal) -> None:
    # A programming error, not a client's: price_usage never passes these.
    if not quantity.is_finite() or quantity < 0:
        raise ValueError(f"billable quantity must be finite and >= 0, got {quantity}")


def per_unit(quantity: Decimal, price: UsagePrice) -> Priced:
    """quantity × unit_price."""
    _check_quantity(quantity)
    if price.unit_price is None:
        raise ValueError("PER_UNIT price without unit_price: validate it first")
    with decimal.localcontext(EXACT):
        return quantity * price.unit_price, ()


def _first_flat(price: UsagePrice) -> Priced:
    """Nothing billable: the first tier's flat price alone (0 without one)."""
    first = price.tiers[0] if price.tiers else None
    if first is None or not first.flat_price:
        return ZERO, ()
    return first.flat_price, (
        TierCharge(first.up_to, ZERO, first.unit_price, first.flat_price, first.flat_price),
    )


def graduated(quantity: Decimal, price: UsagePrice) -> Priced:
    """Each tier prices the units that fall in it, plus its flat price when any
    unit does: 1500 over (0,1000] × 0.02 and (1000,∞) × 0.01 = 20 + 5. With
    nothing billable, the first tier's flat price is still billed."""
    _check_quantity(quantity)
    if quantity == 0:
        return _first_flat(price)
    charges: list[TierCharge] = []
    lower = ZERO
    with decimal.localcontext(EXACT):
        for tier in price.tiers:
            if quantity <= lower:
                break
            upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
            inside = upper - lower
            amount = inside * tier.unit_price + tier.flat_price
            charges.append(TierCharge(tier.up_to, inside, tier.unit_price, tier.flat_price, amount))
            if tier.up_to is None:
                break
            lower = tier.up_to
        else:
            if quantity > lower:
                raise ValueError("quantity exceeds the last tier's up_to: validate tiers first")
        return sum((c.amount for c in charges), ZERO), tuple(charges)


def volume(quantity: Decimal, price: UsagePrice) -> Priced:
    """The tier that the whole quantity reaches prices every unit, plus its flat
    price. up_to is inclusive: exactly 1000 is in the tier whose up_to is 1000.
    With nothing billable, the first tier's flat price is still billed."""
    _check_quantity(quantity)
    if quantity == 0:
        return _first_flat(price)
    tier = next((t for t in price.tiers if t.up_to is None or quantity <= t.up_to), None)
    if tier is None:
        raise ValueError("quantity exceeds the last tier's up_to: validate tiers first")
    with decimal.localcontext(EXACT):
        amount = quantity * tier.unit_price + tier.flat_price
    return amount, (TierCharge(tier.up_to, quantity, tier.unit_price, tier.flat_price, amount),)


def package(quantity: Decimal, price: UsagePrice) -> Priced:
    """ceil(quantity / package_size) × package_price: a started package is paid."""
    _check_quantity(quantity)
    size = price.package_size
    if size is None or size <= 0:
        raise ValueError("PACKAGE price without a positive package_size: validate it first")
    with decimal.localcontext(EXACT):
        return package_count(quantity, size) * price.package_price, ()


def package_count(quantity: Decimal, size: Decimal) -> Decimal:
    """ceil(quantity / size) for quantity >= 0 and size > 0."""
    with decimal.localcontext(EXACT):
        # // and % are exact (no rounded quotient), unlike /.
        return quantity // size + (1 if quantity % size else 0)


def percent_of(amount: Decimal, rate: Decimal) -> Decimal:
    """rate % of amount, exact (÷ 100 is a shift of the exponent, not a division)."""
    with decimal.localcontext(EXACT):
        return (amount * rate).scaleb(-2)


def percentage(quantity: Decimal, price: UsagePrice) -> Priced:
    """rate % of the billable amount: the whole fee of a PERCENTAGE price
    without transaction_key (no per-transaction parts). See `percentage_fees`
    for the per-transaction form."""
    _check_quantity(quantity)
    return percent_of(quantity, price.rate), ()


def percentage_fees(transactions: Sequence[Decimal], price: UsagePrice) -> FeeCharge:
    """The fees of a PERCENTAGE price with transaction_key, one transaction at a
    time, exact. `transactions` holds each transaction's amount: the meter's
    SUM grouped by transaction_key, one value per distinct key in the period
    (events without the key count together as one transaction).

    A transaction of amount a pays rate % × a + fixed_fee, raised to min_fee
    and lowered to max_fee when they are set; a transaction of amount <= 0 (a
    full refund) pays nothing. 2.9% + 0.30, min 0.50: 100 -> 3.20, 5 -> 0.445
    raised to 0.50.

    Free allowances are order-free: free_threshold is an amount on which no
    percentage is charged (rate % × (Σa − free_threshold)⁺), free_transactions
    is a number of transactions that pay no fixed fee. Which transaction an
    allowance would go to is not defined without an order, so validation
    refuses them together with min_fee or max_fee."""
    charged = [a for a in transactions if a > 0]
    with decimal.localcontext(EXACT):
        total = sum(charged, ZERO)
        billable = max(total - price.free_threshold, ZERO)
        paying = max(len(charged) - price.free_transactions, 0)
        rated = percent_of(billable, price.rate)
        fixed = price.fixed_fee * paying
        adjustment = ZERO
        raised = lowered = 0
        if price.min_fee is not None or price.max_fee is not None:
            # validation guarantees no free allowance here: every charged
            # transaction pays rate % × a + fixed_fee before its bounds.
            share = price.rate.scaleb(-2)  # exact: a shift of the exponent
            for amount in charged:
                fee = amount * share + price.fixed_fee
                if price.min_fee is not None and fee < price.min_fee:
                    adjustment += price.min_fee - fee
                    raised += 1
                elif price.max_fee is not None and fee > price.max_fee:
                    adjustment -= fee - price.max_fee
                    lowered += 1
    return FeeCharge(len(transactions), paying, rated, fixed, raised, lowered, adjustment)


PRICE_MODELS: Final[dict[PriceModel, PriceFunction]] = {
    PriceModel.PER_UNIT: per_unit,
    PriceModel.GRADUATED: graduated,
    PriceModel.VOLUME: volume,
    PriceModel.PACKAGE: package,
    PriceModel.PERCENTAGE: percentage,
}


def price_usage(
    consumed: Decimal, price: UsagePrice, transactions: Sequence[Decimal] | None = None
) -> UsageCharge:
    """Applies the free threshold, then the price's model, to `consumed`.

    free = min(consumed, threshold), billable = (consumed − threshold)⁺. A
    negative consumption (a SUM of negative values) bills nothing and is free of
    nothing. A PERCENTAGE price with transaction_key needs `transactions`
    (each transaction's amount; `consumed` is then their positive sum).
    """
    if price.per_transaction:
        if transactions is None:
            raise ValueError("a price with transaction_key needs each transaction's amount")
        return _price_fees(transactions, price)
    if not consumed.is_finite():
        raise ValueError(f"consumed must be finite, got {consumed}")
    with decimal.localcontext(EXACT):
        free = max(min(consumed, price.free_threshold), ZERO)
        billable = max(consumed - price.free_threshold, ZERO)
    amount, tiers = PRICE_MODELS[price.model](billable, price)
    unit_price: Decimal | None = None
    if price.model is PriceModel.PER_UNIT:
        unit_price = price.unit_price
    elif price.model is PriceModel.VOLUME and tiers:
        unit_price = tiers[0].unit_price
    return UsageCharge(consumed, free, billable, amount, unit_price, tiers)


def _price_fees(transactions: Sequence[Decimal], price: UsagePrice) -> UsageCharge:
    fees = percentage_fees(transactions, price)
    with decimal.localcontext(EXACT):
        consumed = sum((a for a in transactions if a > 0), ZERO)
        free = min(consumed, price.free_threshold)
        amount = fees.percentage_amount + fees.fixed_amount + fees.adjustment
    return UsageCharge(consumed, free, consumed - free, amount, None, (), fees)


# --- validation: every message names the field, as the API's clients see it ---


def _non_negative(value: Decimal, field: str) -> None:
    if not value.is_finite():
        raise InvalidArgument(f"{field}: must be a finite number")
    if value < 0:
        raise InvalidArgument(f"{field}: must not be negative")


def validate_tiers(tiers: Sequence[Tier], field: str = "tiers") -> None:
    """At least one tier; up_to > 0 and strictly ascending; only the last tier
    unbounded, and it must be; prices non-negative."""
    if not tiers:
        raise InvalidArgument(f"{field}: at least one tier is required")
    previous: Decimal | None = None
    last = len(tiers) - 1
    for i, tier in enumerate(tiers):
        at = f"{field}[{i}]"
        if tier.up_to is None:
            if i != last:
                raise InvalidArgument(f"{at}.up_to: only the last tier may be unbounded (empty)")
        elif i == last:
            raise InvalidArgument(f"{at}.up_to: the last tier must be unbounded (empty up_to)")
        elif not tier.up_to.is_finite():
            raise InvalidArgument(f"{at}.up_to: must be a finite number")
        elif previous is None and tier.up_to <= 0:
            raise InvalidArgument(f"{at}.up_to: must be greater than 0")
        elif previous is not None and tier.up_to <= previous:
            raise InvalidArgument(f"{at}.up_to: must be greater than the previous tier's up_to")
        _non_negative(tier.unit_price, f"{at}.unit_price")
        _non_negative(tier.flat_price, f"{at}.flat_price")
        previous = tier.up_to


def validate_usage_price(price: UsagePrice, index: int) -> None:
    """Checks one entry of a product's `usage_prices`. Fields another model
    would use are refused when set, so that a mistyped model is not billed
    silently by rules the client did not mean."""
    at = f"usage_prices[{index}]"
    model = f"PRICE_MODEL_{price.model.name}"
    if not price.meter_id:
        raise InvalidArgument(f"{at}.meter_id: required")
    _non_negative(price.free_threshold, f"{at}.free_threshold")

    tiered = price.model in (PriceModel.GRADUATED, PriceModel.VOLUME)
    if tiered:
        validate_tiers(price.tiers, f"{at}.tiers")
    elif price.tiers:
        raise InvalidArgument(f"{at}.tiers: not used by {model}")

    if price.model is PriceModel.PER_UNIT:
        if price.unit_price is None:
            raise InvalidArgument(f"{at}.unit_price: required for {model}")
        _non_negative(price.unit_price, f"{at}.unit_price")
    elif price.unit_price is not None and price.unit_price != 0:
        # 0 is tolerated: it is what an empty string parses to by default.
        raise InvalidArgument(f"{at}.unit_price: not used by {model}")

    _check_percentage(price, at, model)

    if price.model is PriceModel.PACKAGE:
        size = price.package_size
        if size is None:
            raise InvalidArgument(f"{at}.package_size: required for {model}")
        if not size.is_finite() or size <= 0:
            raise InvalidArgument(f"{at}.package_size: must be greater than 0")
        _non_negative(price.package_price, f"{at}.package_price")
    else:
        if price.package_size is not None and price.package_size != 0:
            raise InvalidArgument(f"{at}.package_size: not used by {model}")
        if price.package_price != 0:
            raise InvalidArgument(f"{at}.package_price: not used by {model}")


def _check_percentage(price: UsagePrice, at: str, model: str) -> None:
    """PERCENTAGE's fields: refused on other models, checked on PERCENTAGE."""
    given = {
        "rate": price.rate != 0,
        "fixed_fee": price.fixed_fee != 0,
        "min_fee": price.min_fee is not None,
        "max_fee": price.max_fee is not None,
        "transaction_key": bool(price.transaction_key),
        "free_transactions": price.free_transactions != 0,
    }
    if price.model is not PriceModel.PERCENTAGE:
        for name, is_set in given.items():
            if is_set:
                raise InvalidArgument(f"{at}.{name}: not used by {model}")
        return
    _non_negative(price.rate, f"{at}.rate")
    if price.rate > 100:
        raise InvalidArgument(f"{at}.rate: a percentage, at most 100")
    _non_negative(price.fixed_fee, f"{at}.fixed_fee")
    for name, bound in (("min_fee", price.min_fee), ("max_fee", price.max_fee)):
        if bound is not None:
            _non_negative(bound, f"{at}.{name}")
    if price.min_fee is not None and price.max_fee is not None and price.max_fee < price.min_fee:
        raise InvalidArgument(f"{at}.max_fee: must not be less than min_fee")
    if price.free_transactions < 0:
        raise InvalidArgument(f"{at}.free_transactions: must not be negative")
    if not price.transaction_key:
        for name in ("fixed_fee", "min_fee", "max_fee", "free_transactions"):
            if given[name]:
                raise InvalidArgument(
                    f"{at}.transaction_key: required with {name} (the meter's group_by key "
                    f"that tells one transaction from another)"
                )
    bounded = price.min_fee is not None or price.max_fee is not None
    if bounded and (price.free_threshold or price.free_transactions):
        name = "min_fee" if price.min_fee is not None else "max_fee"
        raise InvalidArgument(
            f"{at}.{name}: cannot be combined with free_threshold or free_transactions "
            f"(which transactions a free allowance goes to is not defined)"
        )


def check_limits(usage_prices: int, tiers: Sequence[int]) -> None:
    """MAX_USAGE_PRICES per product and MAX_TIERS per price, checked on the
    request's counts before anything else is done with it."""
    if usage_prices > MAX_USAGE_PRICES:
        raise InvalidArgument(
            f"usage_prices: at most {MAX_USAGE_PRICES} per product, got {usage_prices}"
        )
    for i, count in enumerate(tiers):
        if count > MAX_TIERS:
            raise InvalidArgument(f"usage_prices[{i}].tiers: at most {MAX_TIERS}, got {count}")


def plain(value: Decimal) -> str:
    """A decimal as people write it: plain notation, no trailing zeros after
    the point ("0.01", not "0.010"; "1000", not "1E+3"; "0", not "0.00")."""
    if value.is_zero():
        return "0"
    with decimal.localcontext(EXACT):
        text = format(value.normalize(), "f")
    return text


# Plain decimal notation only: no NaN/Infinity, no whitespace, no "1_000", no
# non-ASCII digits (all of which Decimal() would accept).
_DECIMAL_TEXT: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
MAX_DECIMAL_TEXT: Final = 100
# The range of PostgreSQL's numeric, where these values are stored; it also
# keeps exact arithmetic on them small (1e999999999 + 0.01 would need 10^9 digits).
MAX_INTEGER_DIGITS: Final = 131072
MAX_FRACTION_DIGITS: Final = 16383


def parse_decimal(
    text: str, field: str, *, allow_empty: bool = True, default: Decimal = ZERO
) -> Decimal:
    """A decimal string from the wire ("1500", "0.000125", "2.5e3") as an exact
    Decimal; empty gives `default` when `allow_empty`, else InvalidArgument."""
    if text == "":
        if allow_empty:
            return default
        raise InvalidArgument(f"{field}: required")
    if len(text) > MAX_DECIMAL_TEXT:
        raise InvalidArgument(f"{field}: longer than {MAX_DECIMAL_TEXT} characters")
    if not _DECIMAL_TEXT.fullmatch(text):
        raise InvalidArgument(f'{field}: {text!r} is not a decimal number such as "0.02"')
    value = Decimal(text)
    if not value.is_zero():
        # adjusted(): exponent of the leading digit; the last digit's is lower by len - 1.
        last_digit = value.adjusted() - len(value.as_tuple().digits) + 1
        if value.adjusted() >= MAX_INTEGER_DIGITS or last_digit < -MAX_FRACTION_DIGITS:
            raise InvalidArgument(f"{field}: {text!r} is out of range")
        # Stored, returned and printed in plain notation: a short "1e131071" would
        # be 131,072 digits in every answer and on every invoice line.
        if len(plain(value)) > MAX_DECIMAL_TEXT:
            raise InvalidArgument(
                f"{field}: {text!r} is out of range (over {MAX_DECIMAL_TEXT} characters in full)"
            )
    # "-0" would print as "-0" on an invoice.
    return value.copy_abs() if value.is_zero() else value
