"""PERCENTAGE: payment-style fees, against cases worked by hand (in the
comments), then the validation of its fields."""

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.invoice import build_invoice
from services.billing.domain.money import to_minor
from services.billing.domain.pricing import (
    PriceModel,
    UsagePrice,
    percentage_fees,
    price_usage,
    validate_usage_price,
)
from services.common.errors import InvalidArgument

D = Decimal
START, END = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)


def fee(**fields: object) -> UsagePrice:
    base: dict[str, object] = {"rate": D("2.9"), "transaction_key": "payment_id"}
    base.update(fields)
    return UsagePrice("m-pay", PriceModel.PERCENTAGE, **base)  # type: ignore[arg-type]


STRIPE_LIKE = fee(fixed_fee=D("0.30"), min_fee=D("0.50"))


@pytest.mark.parametrize(
    ("transactions", "amount", "raised", "lowered", "minor"),
    [
        # 100 × 2.9% + 0.30 = 3.20 (no bound applies)
        (["100"], "3.20", 0, 0, 320),
        # 5 × 2.9% + 0.30 = 0.445, raised to 0.50
        (["5"], "0.50", 1, 0, 50),
        # 6.89 × 2.9% + 0.30 = 0.49981 -> 0.50; 6.90 -> 0.5001 stays
        (["6.89", "6.90"], "1.0001", 1, 0, 100),
        # 3.20 + 0.50 + (20 × 2.9% + 0.30 = 0.88) + (0.99: 0.32871 -> 0.50) = 5.08
        (["100", "5", "20", "0.99"], "5.08", 2, 0, 508),
        # a full refund (<= 0) pays nothing, not even the minimum
        (["0", "-12.50", "100"], "3.20", 0, 0, 320),
        ([], "0", 0, 0, 0),
    ],
)
def test_percentage_with_a_minimum_per_transaction(
    transactions: list[str], amount: str, raised: int, lowered: int, minor: int
) -> None:
    charge = price_usage(D(0), STRIPE_LIKE, [D(a) for a in transactions])
    assert charge.amount == D(amount)
    assert charge.fees is not None
    assert (charge.fees.raised_to_min, charge.fees.lowered_to_max) == (raised, lowered)
    assert to_minor(charge.amount, "USD") == minor


def test_a_maximum_per_transaction() -> None:
    # 1.5% + 0.25, max 5: 1000 -> 15.25 lowered to 5; 100 -> 1.75
    price = fee(rate=D("1.5"), fixed_fee=D("0.25"), max_fee=D(5))
    fees = percentage_fees([D(1000), D(100)], price)
    assert fees.percentage_amount == D("16.5")  # 1.5% of 1100
    assert fees.fixed_amount == D("0.50")
    assert fees.adjustment == D("-10.25")
    assert (fees.raised_to_min, fees.lowered_to_max) == (0, 1)
    assert price_usage(D(0), price, [D(1000), D(100)]).amount == D("6.75")


@pytest.mark.parametrize(
    ("free_threshold", "free_transactions", "amount"),
    [
        # 2.9% of (100 + 20 - 50 free) + 0.30 × 2 = 2.03 + 0.60
        ("50", 0, "2.63"),
        # 2.9% of 120 + 0.30 × (2 - 1 free) = 3.48 + 0.30
        ("0", 1, "3.78"),
        # free amount above the total: no percentage; 3 free transactions: no fixed fee
        ("500", 3, "0"),
    ],
)
def test_free_amount_and_free_transactions(
    free_threshold: str, free_transactions: int, amount: str
) -> None:
    price = fee(
        fixed_fee=D("0.30"),
        free_threshold=D(free_threshold),
        free_transactions=free_transactions,
    )
    charge = price_usage(D(0), price, [D(100), D(20)])
    assert charge.amount == D(amount)
    assert charge.consumed == D(120)
    assert charge.free == min(D(120), D(free_threshold))


def test_without_transaction_key_it_is_a_rate_of_the_quantity() -> None:
    # 2.9% of (1234.56 - 34.56 free) = 34.80; the meter's SUM is enough.
    price = UsagePrice("m-pay", PriceModel.PERCENTAGE, rate=D("2.9"), free_threshold=D("34.56"))
    charge = price_usage(D("1234.56"), price)
    assert (charge.billable, charge.amount, charge.fees) == (D(1200), D("34.800"), None)


def test_the_invoice_line_says_how_the_fee_came_about() -> None:
    usage = [(STRIPE_LIKE, "payments", (D(100), D(5), D(20), D("0.99")))]
    (line,) = build_invoice("USD", 0, "Payments", usage, START, END).lines
    assert line.description == (
        "payments: 125.99 consumed, 0 free, 125.99 billable × 2.9% + 0.3 × 4 transactions, "
        "2 raised to the 0.5 minimum"
    )
    assert (line.amount_minor, line.kind) == (508, "usage")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rate": D(-1)}, "usage_prices[0].rate: must not be negative"),
        ({"rate": D(101)}, "usage_prices[0].rate: a percentage, at most 100"),
        ({"fixed_fee": D("-0.3")}, "usage_prices[0].fixed_fee: must not be negative"),
        ({"min_fee": D(2), "max_fee": D(1)}, "usage_prices[0].max_fee: must not be less"),
        ({"free_transactions": -1}, "usage_prices[0].free_transactions: must not be negative"),
        ({"transaction_key": "", "fixed_fee": D(1)}, "usage_prices[0].transaction_key: required"),
        ({"transaction_key": "", "min_fee": D(1)}, "usage_prices[0].transaction_key: required"),
        (
            {"min_fee": D(1), "free_threshold": D(10)},
            "usage_prices[0].min_fee: cannot be combined with free_threshold",
        ),
        (
            {"max_fee": D(1), "free_transactions": 2},
            "usage_prices[0].max_fee: cannot be combined",
        ),
    ],
)
def test_bad_percentage_fields_name_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_usage_price(fee(**fields), 0)


@pytest.mark.parametrize("field", ["rate", "fixed_fee", "min_fee", "max_fee"])
def test_other_models_refuse_percentage_fields(field: str) -> None:
    price = UsagePrice("m", PriceModel.PER_UNIT, unit_price=D(1), **{field: D(1)})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=rf"usage_prices\[0\]\.{field}: not used by"):
        validate_usage_price(price, 0)


def test_a_valid_percentage_price_passes() -> None:
    validate_usage_price(STRIPE_LIKE, 0)
    validate_usage_price(UsagePrice("m", PriceModel.PERCENTAGE, rate=D("2.9")), 0)


# --- properties: an independent oracle in Fractions, one transaction at a time --

amounts = st.decimals(min_value=-100, max_value=10**6, places=2, allow_nan=False)
money = st.decimals(min_value=0, max_value=50, places=2, allow_nan=False)
rates = st.decimals(min_value=0, max_value=100, places=3, allow_nan=False)


def oracle(transactions: list[Decimal], price: UsagePrice) -> Fraction:
    total = Fraction(0)
    for a in map(Fraction, transactions):
        if a <= 0:
            continue
        fee = a * Fraction(price.rate) / 100 + Fraction(price.fixed_fee)
        if price.min_fee is not None:
            fee = max(fee, Fraction(price.min_fee))
        if price.max_fee is not None:
            fee = min(fee, Fraction(price.max_fee))
        total += fee
    return total


@given(st.lists(amounts, max_size=30), rates, money, st.none() | money, st.none() | money)
def test_fees_equal_the_sum_of_each_transactions_bounded_fee(
    transactions: list[Decimal],
    rate: Decimal,
    fixed: Decimal,
    low: Decimal | None,
    high: Decimal | None,
) -> None:
    if low is not None and high is not None and high < low:
        low, high = high, low
    price = fee(rate=rate, fixed_fee=fixed, min_fee=low, max_fee=high)
    validate_usage_price(price, 0)
    charge = price_usage(D(0), price, transactions)
    assert Fraction(charge.amount) == oracle(transactions, price)
    assert charge.fees is not None
    assert charge.fees.transactions == len(transactions)


@pytest.mark.parametrize(
    ("fields", "described"),
    [
        ({"fixed_fee": D("0.3"), "free_transactions": 1}, "× 2.9% + 0.3 × 1 of 2 transactions"),
        ({"max_fee": D(1)}, "× 2.9%, 2 transactions, 1 lowered to the 1 maximum"),
    ],
)
def test_descriptions_of_free_transactions_and_no_fixed_fee(
    fields: dict[str, object], described: str
) -> None:
    usage = [(fee(**fields), "payments", (D(100), D(5)))]
    (line,) = build_invoice("USD", 0, "Payments", usage, START, END).lines
    assert line.description == f"payments: 105 consumed, 0 free, 105 billable {described}"
