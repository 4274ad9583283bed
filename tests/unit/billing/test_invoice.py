from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.invoice import INT64_MAX, Unpriceable, build_invoice
from services.billing.domain.money import to_minor
from services.billing.domain.pricing import PriceModel, Tier, UsagePrice, price_usage
from services.common.errors import InvalidArgument

D = Decimal
START, END = datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)
API_CALLS = UsagePrice("m-api", PriceModel.PER_UNIT, unit_price=D("0.02"), free_threshold=D(1000))
TIERS = (Tier(D(1000), D("0.02")), Tier(None, D("0.01")))


def test_canonical_invoice() -> None:
    draft = build_invoice("USD", 0, "Pro", [(API_CALLS, "api-calls", D(2500))], START, END)
    (line,) = draft.lines
    assert line.description == "api-calls: 2500 consumed, 1000 free, 1500 billable × 0.02"
    assert (line.meter_id, line.meter_name) == ("m-api", "api-calls")
    assert (line.quantity, line.free_quantity, line.billable_quantity) == (
        D(2500),
        D(1000),
        D(1500),
    )
    assert line.unit_price == D("0.02")
    assert line.amount_minor == 3000
    assert (draft.subtotal_minor, draft.total_minor) == (3000, 3000)
    assert (draft.currency, draft.period_start, draft.period_end) == ("USD", START, END)


def test_fixed_fee_comes_first() -> None:
    draft = build_invoice("USD", 1999, "Pro", [(API_CALLS, "api-calls", D(500))], START, END)
    fixed, usage = draft.lines
    assert fixed.description == "Pro: fixed fee"
    assert (fixed.meter_id, fixed.quantity, fixed.unit_price) == ("", D(1), D("19.99"))
    assert fixed.amount_minor == 1999
    assert usage.amount_minor == 0  # 500 consumed, all free: the line is still shown
    assert draft.total_minor == 1999


def test_no_fixed_line_without_a_fixed_fee() -> None:
    assert build_invoice("USD", 0, "Pro", [], START, END).lines == ()


@pytest.mark.parametrize(
    ("fixed", "proration", "minor", "shown"),
    [
        (1999, D("0.5"), 1000, "0.5"),  # 999.5 -> 1000, half-up
        (1999, D("0.25"), 500, "0.25"),  # 499.75 -> 500
        (1000, D(0), 0, "0"),
        (3, Fraction(5, 6), 3, "≈0.8333"),  # exactly 2.5 -> 3; 0.8333333 would give 2
        (3, Fraction(1, 3), 1, "≈0.3333"),  # exactly 1
        (3100, Fraction(15, 31), 1500, "≈0.4839"),  # 15 of 31 days, not 28 digits
    ],
)
def test_fixed_fee_of_a_cut_period_is_prorated_and_rounded_once(
    fixed: int, proration: Decimal | Fraction, minor: int, shown: str
) -> None:
    draft = build_invoice("USD", fixed, "Pro", [], START, END, proration)
    assert draft.lines[0].amount_minor == minor
    # A readable ratio: RATIO_PLACES decimals at most, "≈" when rounded.
    assert draft.lines[0].description == f"Pro: fixed fee, prorated × {shown}"
    assert draft.lines[0].quantity == D(shown.lstrip("≈"))


def test_each_line_is_rounded_then_summed() -> None:
    # Three lines of 0.005 USD each: each rounds to 1 cent, total 3 cents.
    # Rounding the exact sum 0.015 instead would give 2 cents.
    half_cent = UsagePrice("m", PriceModel.PER_UNIT, unit_price=D("0.000125"))
    usage = [(half_cent, f"meter-{i}", D(40)) for i in range(3)]
    draft = build_invoice("USD", 0, "Pro", usage, START, END)
    assert [line.amount_minor for line in draft.lines] == [1, 1, 1]
    assert draft.total_minor == 3


@pytest.mark.parametrize(
    ("currency", "minor"),
    [
        ("USD", 3000),  # 30 USD
        ("JPY", 30),  # 30 JPY: no minor unit
        ("KWD", 30000),  # 30 KWD = 30.000
    ],
)
def test_currency_minor_units(currency: str, minor: int) -> None:
    draft = build_invoice(currency, 0, "Pro", [(API_CALLS, "api-calls", D(2500))], START, END)
    assert draft.total_minor == minor


@pytest.mark.parametrize(
    ("price", "consumed", "description", "minor"),
    [
        (
            UsagePrice("m", PriceModel.GRADUATED, tiers=TIERS),
            "1500",
            "calls: 1500 consumed, 0 free, 1500 billable (1000 × 0.02; 500 × 0.01)",
            2500,  # 20 + 5
        ),
        (
            UsagePrice("m", PriceModel.GRADUATED, tiers=TIERS),
            "0",
            "calls: 0 consumed, 0 free, 0 billable",
            0,
        ),
        (
            UsagePrice("m", PriceModel.VOLUME, tiers=(Tier(D(1000), D("0.02"), D(5)), *TIERS[1:])),
            "1000",
            "calls: 1000 consumed, 0 free, 1000 billable × 0.02 + 5 flat",
            2500,  # 1000 × 0.02 + 5
        ),
        (
            UsagePrice("m", PriceModel.PACKAGE, package_size=D(1000), package_price=D(5)),
            "1500",
            "calls: 1500 consumed, 0 free, 1500 billable, 2 packages of 1000 × 5",
            1000,
        ),
        (
            UsagePrice("m", PriceModel.PACKAGE, package_size=D(1000), package_price=D(5)),
            "1E+3",
            "calls: 1000 consumed, 0 free, 1000 billable, 1 package of 1000 × 5",
            500,
        ),
    ],
)
def test_descriptions(price: UsagePrice, consumed: str, description: str, minor: int) -> None:
    (line,) = build_invoice("USD", 0, "Pro", [(price, "calls", D(consumed))], START, END).lines
    assert line.description == description
    assert line.amount_minor == minor


def test_graduated_line_keeps_its_tiers() -> None:
    price = UsagePrice("m", PriceModel.GRADUATED, tiers=TIERS)
    (line,) = build_invoice("USD", 0, "Pro", [(price, "calls", D(1500))], START, END).lines
    assert [(t.quantity, t.amount) for t in line.tiers] == [(D(1000), D(20)), (D(500), D(5))]
    assert line.unit_price is None


def test_meter_id_stands_in_for_a_missing_name() -> None:
    (line,) = build_invoice("USD", 0, "Pro", [(API_CALLS, "", D(1))], START, END).lines
    assert line.description.startswith("m-api: ")


def test_bad_arguments() -> None:
    with pytest.raises(InvalidArgument, match=r"^currency: "):
        build_invoice("usd", 0, "Pro", [], START, END)
    with pytest.raises(ValueError):
        build_invoice("USD", 100, "Pro", [], START, END, D("1.5"))
    with pytest.raises(ValueError):
        build_invoice("USD", -1, "Pro", [], START, END)
    with pytest.raises(ValueError):
        build_invoice("USD", 0, "Pro", [], END, START)


def test_an_amount_beyond_int64_is_refused_naming_the_line() -> None:
    ok = UsagePrice("m-ok", PriceModel.PER_UNIT, unit_price=D(1))
    tokens = UsagePrice("m-tokens", PriceModel.PER_UNIT, unit_price=D("0.01"))
    with pytest.raises(Unpriceable) as caught:
        build_invoice(
            "USD", 500, "Pro", [(ok, "calls", D(1)), (tokens, "tokens", D("9e30"))], START, END
        )
    # The data is at fault, not the request: FAILED_PRECONDITION, not INVALID_ARGUMENT.
    assert not isinstance(caught.value, InvalidArgument)
    assert (caught.value.cause, caught.value.meter_id) == ("amount_out_of_range", "m-tokens")
    assert str(caught.value) == (
        "usage_prices[1] (meter 'tokens', m-tokens): 9000000000000000000000000000000 billable "
        "units come to 9.000e+30 minor units of USD, beyond the int64 range of amount_minor"
    )


def test_lines_within_int64_whose_total_is_not_are_refused() -> None:
    half = D(INT64_MAX // 2 + 1).scaleb(-2)  # USD: one such line fits, two do not
    prices = [(UsagePrice(m, PriceModel.PER_UNIT, unit_price=D(1)), m, half) for m in "ab"]
    with pytest.raises(Unpriceable, match=r"^total_minor: .* beyond the int64 range"):
        build_invoice("USD", 0, "Pro", prices, START, END)
    # The largest amount that fits is fine.
    draft = build_invoice("USD", 0, "Pro", [(*prices[0][:2], D(INT64_MAX).scaleb(-2))], START, END)
    assert draft.total_minor == INT64_MAX


amounts = st.decimals(min_value=0, max_value=10**7, places=4, allow_nan=False)
usage_prices = st.one_of(
    st.builds(
        lambda p, f: UsagePrice("m", PriceModel.PER_UNIT, unit_price=p, free_threshold=f),
        st.decimals(min_value=0, max_value=10, places=6, allow_nan=False),
        amounts,
    ),
    st.builds(
        lambda bound, a, b: UsagePrice(
            "m", PriceModel.VOLUME, tiers=(Tier(bound, a, b), Tier(None, b, a))
        ),
        st.decimals(min_value=1, max_value=10**4, places=2, allow_nan=False),
        st.decimals(min_value=0, max_value=10, places=6, allow_nan=False),
        st.decimals(min_value=0, max_value=10, places=6, allow_nan=False),
    ),
)


@given(
    st.sampled_from(["USD", "JPY", "KWD"]),
    st.integers(min_value=0, max_value=10**6),
    st.fractions(min_value=0, max_value=1),
    st.lists(st.tuples(usage_prices, amounts), max_size=6),
)
def test_total_is_the_sum_of_the_rounded_lines(
    currency: str,
    fixed: int,
    share: Fraction,
    usage: list[tuple[UsagePrice, Decimal]],
) -> None:
    draft = build_invoice(
        currency, fixed, "Pro", [(p, "calls", q) for p, q in usage], START, END, share
    )
    assert draft.total_minor == draft.subtotal_minor == sum(x.amount_minor for x in draft.lines)
    usage_lines = draft.lines[1:] if fixed else draft.lines
    for line, (price, consumed) in zip(usage_lines, usage, strict=True):
        assert line.amount_minor == to_minor(price_usage(consumed, price).amount, currency)
