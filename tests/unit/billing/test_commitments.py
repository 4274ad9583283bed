"""Spend commitments and the conventions of issue 15, cases worked by hand."""

from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain import commitments
from services.billing.domain.commitments import Commitment, validate_commitment
from services.billing.domain.invoice import build_invoice
from services.billing.domain.pricing import (
    MAX_TIERS,
    MAX_USAGE_PRICES,
    PriceModel,
    Tier,
    UsagePrice,
    check_limits,
    plain,
)
from services.common.errors import InvalidArgument

D = Decimal
START, END = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)
# 1 USD per unit, so that usage in units is usage in dollars.
DOLLAR = UsagePrice("m-api", PriceModel.PER_UNIT, unit_price=D(1))


FIX, USE, MAX, MIN = "fixed_fee", "usage", "maximum_spend", "minimum_spend"


def kinds_and_amounts(draft: object) -> list[tuple[str, int]]:
    return [(line.kind, line.amount_minor) for line in draft.lines]  # type: ignore[attr-defined]


def test_minimum_of_100_against_37_42_of_usage_bills_a_true_up_of_62_58() -> None:
    draft = build_invoice(
        "USD", 0, "Pro", [(DOLLAR, "api", D("37.42"))], START, END, commitment=Commitment(10000)
    )
    assert kinds_and_amounts(draft) == [(USE, 3742), (MIN, 6258)]
    assert draft.lines[1].description == (
        "Minimum spend: 100.00 USD per period, 37.42 USD spent; true-up"
    )
    assert draft.total_minor == 10000


@pytest.mark.parametrize(
    ("fixed", "usage", "commitment", "expected", "total"),
    [
        # the fixed fee counts towards the minimum: 100 - (20 + 37.42) = 42.58
        (2000, "37.42", Commitment(10000), [(FIX, 2000), (USE, 3742), (MIN, 4258)], 10000),
        # spending the minimum exactly: no true-up line
        (0, "100", Commitment(10000), [(USE, 10000)], 10000),
        # over the minimum: nothing added
        (0, "150.01", Commitment(10000), [(USE, 15001)], 15001),
        # nothing used: the whole minimum
        (0, "0", Commitment(10000), [(USE, 0), (MIN, 10000)], 10000),
        # a maximum of 500 against 734.20: -234.20; the fixed fee is not capped
        (1000, "734.20", Commitment(0, 50000), [(FIX, 1000), (USE, 73420), (MAX, -23420)], 51000),
        # under the maximum: nothing added
        (0, "499.99", Commitment(0, 50000), [(USE, 49999)], 49999),
        # both: capped at 500, over the minimum of 100
        (0, "734.20", Commitment(10000, 50000), [(USE, 73420), (MAX, -23420)], 50000),
        # both, under the minimum
        (0, "12", Commitment(10000, 50000), [(USE, 1200), (MIN, 8800)], 10000),
    ],
)  # fmt: skip
def test_commitment_lines(
    fixed: int,
    usage: str,
    commitment: Commitment,
    expected: list[tuple[str, int]],
    total: int,
) -> None:
    draft = build_invoice(
        "USD", fixed, "Pro", [(DOLLAR, "api", D(usage))], START, END, commitment=commitment
    )
    assert kinds_and_amounts(draft) == expected
    assert draft.total_minor == draft.subtotal_minor == total


def test_the_cap_line_shows_usage_and_maximum() -> None:
    draft = build_invoice(
        "USD", 0, "Pro", [(DOLLAR, "api", D("734.2"))], START, END, commitment=Commitment(0, 50000)
    )
    assert draft.lines[1].description == (
        "Maximum spend: usage of 734.20 USD capped at 500.00 USD per period"
    )


def test_a_cut_period_prorates_both_bounds_like_the_fixed_fee() -> None:
    # 15 of 30 days: minimum 100 -> 50, so 50 - 12 = 38; the fixed fee 20 -> 10.
    draft = build_invoice(
        "USD",
        2000,
        "Pro",
        [(DOLLAR, "api", D(12))],
        START,
        END,
        Fraction(1, 2),
        commitment=Commitment(10000, 30000),
    )
    assert kinds_and_amounts(draft) == [
        (FIX, 1000),
        (USE, 1200),
        (MIN, 2800),
    ]
    assert draft.lines[2].description == (
        "Minimum spend: 50.00 USD per period, prorated × 0.5, 22.00 USD spent; true-up"
    )


@pytest.mark.parametrize(
    ("bound", "share", "prorated"),
    [
        (10000, Fraction(15, 31), 4839),  # 4838.709... -> 4839
        (3, Fraction(5, 6), 3),  # exactly 2.5 -> 3, half-up
        (3, Fraction(1, 6), 1),  # exactly 0.5 -> 1
        (10000, Fraction(0), 0),
    ],
)
def test_proration_rounds_half_up_once(bound: int, share: Fraction, prorated: int) -> None:
    assert commitments.prorate(bound, share) == prorated


def test_a_subscription_commitment_replaces_the_products() -> None:
    product, own = Commitment(10000), Commitment(0, 5000)
    assert commitments.effective(product, own) == own
    assert commitments.effective(product, None) == product
    # a subscription's empty commitment removes the product's
    assert commitments.effective(product, Commitment()) == Commitment()


def test_an_empty_commitment_adds_no_line() -> None:
    draft = build_invoice(
        "USD", 0, "Pro", [(DOLLAR, "api", D(1))], START, END, commitment=Commitment()
    )
    assert kinds_and_amounts(draft) == [(USE, 100)]


@pytest.mark.parametrize(
    ("commitment", "message"),
    [
        (Commitment(-1), r"commitment\.minimum_spend_minor: must not be negative"),
        (Commitment(0, -1), r"commitment\.maximum_spend_minor: must not be negative"),
        (Commitment(10000, 5000), r"commitment\.maximum_spend_minor: must not be less"),
    ],
)
def test_bad_commitments_name_the_field(commitment: Commitment, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_commitment(commitment)


# --- conventions ----------------------------------------------------------------

FLAT_FIRST = (Tier(D(100), D("0.010"), D("5.00")), Tier(None, D("0.005")))


@pytest.mark.parametrize("model", [PriceModel.GRADUATED, PriceModel.VOLUME])
def test_a_first_tier_flat_fee_is_billed_at_zero_usage(model: PriceModel) -> None:
    price = UsagePrice("m", model, tiers=FLAT_FIRST, free_threshold=D(1000))
    # 400 consumed, all free: nothing billable, the flat fee of 5 is still due.
    (line,) = build_invoice("USD", 0, "Pro", [(price, "api", D(400))], START, END).lines
    assert line.amount_minor == 500
    assert line.description.endswith(
        "(0 × 0.01 + 5 flat)" if model is PriceModel.GRADUATED else "× 0.01 + 5 flat"
    )


def test_tiers_without_a_first_flat_fee_still_bill_zero() -> None:
    price = UsagePrice("m", PriceModel.GRADUATED, tiers=(Tier(D(1), D(1)), Tier(None, D(1), D(9))))
    (line,) = build_invoice("USD", 0, "Pro", [(price, "api", D(0))], START, END).lines
    assert (line.amount_minor, line.tiers) == (0, ())


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("0.010", "0.01"),
        ("1E+3", "1000"),
        ("1000", "1000"),
        ("0.00", "0"),
        ("-0", "0"),
        ("2.50", "2.5"),
        ("0.000125", "0.000125"),
        ("12345678901234567890.1234567890123456789000", "12345678901234567890.1234567890123456789"),
    ],
)
def test_numbers_are_printed_normalised(value: str, shown: str) -> None:
    assert plain(D(value)) == shown


def test_limits_live_in_the_domain_and_name_the_field() -> None:
    check_limits(MAX_USAGE_PRICES, [MAX_TIERS])
    with pytest.raises(InvalidArgument, match=r"^usage_prices: at most 50 per product, got 51"):
        check_limits(51, [])
    with pytest.raises(InvalidArgument, match=r"^usage_prices\[1\]\.tiers: at most 100, got 101"):
        check_limits(2, [1, 101])


# --- properties -----------------------------------------------------------------

bounds = st.integers(min_value=0, max_value=10**9)


@given(bounds, bounds, st.integers(min_value=0, max_value=10**6), bounds)
def test_a_commitment_bounds_the_total(fixed: int, usage: int, minimum: int, maximum: int) -> None:
    if maximum and maximum < minimum:
        minimum, maximum = maximum, minimum
    lines = commitments.apply(Commitment(minimum, maximum), fixed, usage)
    capped = usage + sum(a.amount_minor for a in lines if a.kind == "maximum")
    total = fixed + usage + sum(a.amount_minor for a in lines)
    assert capped == (min(usage, maximum) if maximum else usage)
    assert total == max(fixed + capped, minimum)
    assert all(a.amount_minor != 0 for a in lines)
