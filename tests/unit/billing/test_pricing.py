"""Each price model against cases worked by hand (in the comments), then
properties that must hold for any valid price."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.money import to_minor
from services.billing.domain.pricing import (
    PRICE_MODELS,
    PriceModel,
    Tier,
    TierCharge,
    UsagePrice,
    graduated,
    package,
    per_unit,
    price_usage,
    volume,
)

D = Decimal

# (0, 1000] × 0.02, (1000, 5000] × 0.01, (5000, ∞) × 0.005
TIERS = (Tier(D(1000), D("0.02")), Tier(D(5000), D("0.01")), Tier(None, D("0.005")))
# (0, 100] × 1 + 10 flat, (100, ∞) × 0.5 + 20 flat
FLAT_TIERS = (Tier(D(100), D(1), D(10)), Tier(None, D("0.5"), D(20)))


# --- PER_UNIT -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("quantity", "unit_price", "amount"),
    [
        ("1500", "0.02", "30"),  # 1500 × 0.02
        ("0", "0.02", "0"),
        ("0.5", "0.02", "0.01"),  # fractional quantity
        ("1", "0.000125", "0.000125"),  # kept exact, not rounded to cents
        ("2500", "0.000125", "0.3125"),
        ("2.5", "3", "7.5"),
        ("1000", "0", "0"),
    ],
)
def test_per_unit(quantity: str, unit_price: str, amount: str) -> None:
    price = UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=D(unit_price))
    assert per_unit(D(quantity), price) == (D(amount), ())


# --- GRADUATED ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiers", "quantity", "amount", "per_tier"),
    [
        (TIERS, "0", "0", []),  # no unit falls in any tier
        (TIERS, "0.25", "0.005", ["0.25"]),  # 0.25 × 0.02
        (TIERS, "1000", "20", ["1000"]),  # on the bound: all in tier 1
        (TIERS, "1000.5", "20.005", ["1000", "0.5"]),  # 20 + 0.5 × 0.01
        (TIERS, "5000", "60", ["1000", "4000"]),  # 20 + 4000 × 0.01
        (TIERS, "7000", "70", ["1000", "4000", "2000"]),  # 60 + 2000 × 0.005
        (FLAT_TIERS, "0", "10", ["0"]),  # no unit, but the first tier's flat fee
        (FLAT_TIERS, "1", "11", ["1"]),  # 1 × 1 + 10
        (FLAT_TIERS, "100", "110", ["100"]),  # 100 × 1 + 10; tier 2 untouched
        (FLAT_TIERS, "100.1", "130.05", ["100", "0.1"]),  # 110 + 0.1 × 0.5 + 20
    ],
)
def test_graduated(
    tiers: tuple[Tier, ...], quantity: str, amount: str, per_tier: list[str]
) -> None:
    total, charges = graduated(
        D(quantity), UsagePrice("meter-1", PriceModel.GRADUATED, tiers=tiers)
    )
    assert total == D(amount)
    assert [c.quantity for c in charges] == [D(q) for q in per_tier]
    assert sum(c.amount for c in charges) == total


def test_graduated_tier_charges_show_the_arithmetic() -> None:
    _, charges = graduated(
        D("100.1"), UsagePrice("meter-1", PriceModel.GRADUATED, tiers=FLAT_TIERS)
    )
    assert charges == (
        TierCharge(D(100), D(100), D(1), D(10), D(110)),
        TierCharge(None, D("0.1"), D("0.5"), D(20), D("20.05")),
    )


# --- VOLUME -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tiers", "quantity", "amount", "up_to"),
    [
        (TIERS, "0", "0", None),  # nothing reached: no tier, no flat
        (TIERS, "0.5", "0.01", D(1000)),  # 0.5 × 0.02
        (TIERS, "1000", "20", D(1000)),  # up_to is inclusive: 1000 × 0.02
        (TIERS, "1000.5", "10.005", D(5000)),  # every unit at 0.01
        (TIERS, "5000", "50", D(5000)),  # 5000 × 0.01
        (TIERS, "5000.000001", "25.000000005", None),  # 5000.000001 × 0.005
        (TIERS, "7000", "35", None),  # 7000 × 0.005
        (FLAT_TIERS, "0", "10", D(100)),  # no unit, but the first tier's flat fee
        (FLAT_TIERS, "100", "110", D(100)),  # 100 × 1 + 10
        (FLAT_TIERS, "101", "70.5", None),  # 101 × 0.5 + 20
    ],
)
def test_volume(tiers: tuple[Tier, ...], quantity: str, amount: str, up_to: Decimal | None) -> None:
    total, charges = volume(D(quantity), UsagePrice("meter-1", PriceModel.VOLUME, tiers=tiers))
    assert total == D(amount)
    if D(amount) == 0:
        assert charges == ()
    else:
        assert len(charges) == 1
        assert charges[0].up_to == up_to
        assert charges[0].quantity == D(quantity)


# --- PACKAGE ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "package_price", "quantity", "amount"),
    [
        ("1000", "5", "0", "0"),
        ("1000", "5", "1", "5"),  # a started package is paid: ceil(0.001) = 1
        ("1000", "5", "1000", "5"),  # exactly one package
        ("1000", "5", "1000.001", "10"),  # ceil(1.000001) = 2
        ("1000", "5", "2500", "15"),  # ceil(2.5) = 3
        ("0.5", "0.1", "1.2", "0.3"),  # ceil(2.4) = 3 packages of 0.1
        ("3", "0.000125", "10", "0.0005"),  # ceil(3.33) = 4 × 0.000125
    ],
)
def test_package(size: str, package_price: str, quantity: str, amount: str) -> None:
    price = UsagePrice(
        "meter-1", PriceModel.PACKAGE, package_size=D(size), package_price=D(package_price)
    )
    assert package(D(quantity), price) == (D(amount), ())


def test_every_model_is_in_the_table() -> None:
    assert set(PRICE_MODELS) == set(PriceModel)


def test_models_refuse_a_negative_quantity() -> None:
    price = UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=D(1))
    with pytest.raises(ValueError):
        per_unit(D(-1), price)


# --- price_usage: the free threshold first ------------------------------------


def test_canonical_case() -> None:
    # 2500 consumed, 1000 free, 0.02 per unit: 1500 billable × 0.02 = 30 USD = 3000 cents.
    price = UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=D("0.02"), free_threshold=D(1000))
    charge = price_usage(D(2500), price)
    assert (charge.consumed, charge.free, charge.billable) == (D(2500), D(1000), D(1500))
    assert charge.amount == D(30)
    assert charge.unit_price == D("0.02")
    assert to_minor(charge.amount, "USD") == 3000


@pytest.mark.parametrize(
    ("consumed", "free", "billable"),
    [
        ("800", "800", "0"),  # below the threshold: all free
        ("1000", "1000", "0"),  # exactly the threshold
        ("1000.5", "1000", "0.5"),
        ("0", "0", "0"),
        ("-5", "0", "0"),  # a negative SUM bills nothing and frees nothing
    ],
)
def test_free_threshold(consumed: str, free: str, billable: str) -> None:
    price = UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=D("0.02"), free_threshold=D(1000))
    charge = price_usage(D(consumed), price)
    assert (charge.free, charge.billable) == (D(free), D(billable))
    assert charge.amount == D(billable) * D("0.02")


def test_free_threshold_applies_before_tiers() -> None:
    # 2500 - 1000 free = 1500 billable, tiered from zero: 1000 × 0.02 + 500 × 0.01 = 25.
    price = UsagePrice("meter-1", PriceModel.GRADUATED, tiers=TIERS, free_threshold=D(1000))
    charge = price_usage(D(2500), price)
    assert charge.billable == D(1500)
    assert charge.amount == D(25)
    assert charge.unit_price is None


def test_volume_reports_the_unit_price_of_its_tier() -> None:
    charge = price_usage(D(2000), UsagePrice("meter-1", PriceModel.VOLUME, tiers=TIERS))
    assert charge.unit_price == D("0.01")
    assert (
        price_usage(D(0), UsagePrice("meter-1", PriceModel.VOLUME, tiers=TIERS)).unit_price is None
    )


@pytest.mark.parametrize(
    ("consumed", "currency", "minor"),
    [
        ("2500", "USD", 31),  # 0.3125 USD -> 31.25 cents -> 31
        ("4000", "USD", 50),  # exactly 0.5 USD
        ("4000", "JPY", 1),  # 0.5 JPY -> 1 (half-up)
        ("3999", "JPY", 0),  # 0.499875 JPY -> 0
        ("2500", "KWD", 313),  # 0.3125 KWD -> 312.5 fils -> 313 (half-up)
        ("2460", "KWD", 308),  # 0.3075 KWD -> 307.5 fils -> 308
    ],
)
def test_tiny_unit_price_rounds_once(consumed: str, currency: str, minor: int) -> None:
    price = UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=D("0.000125"))
    assert to_minor(price_usage(D(consumed), price).amount, currency) == minor


def test_price_usage_does_not_touch_its_inputs() -> None:
    price = UsagePrice("meter-1", PriceModel.GRADUATED, tiers=TIERS, free_threshold=D(10))
    before = (price, price.tiers)
    price_usage(D(9000), price)
    assert (price, price.tiers) == before


# --- properties -----------------------------------------------------------------

quantities = st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False)
prices = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False)


@st.composite
def tier_lists(draw: st.DrawFn) -> tuple[Tier, ...]:
    bounds = sorted(
        draw(
            st.sets(
                st.decimals(min_value="0.001", max_value=10**6, places=3, allow_nan=False),
                max_size=5,
            )
        )
    )
    ups: list[Decimal | None] = [*bounds, None]
    return tuple(Tier(up, draw(prices), draw(prices)) for up in ups)


@given(tier_lists(), quantities, quantities)
def test_graduated_never_decreases_as_quantity_grows(
    tiers: tuple[Tier, ...], a: Decimal, b: Decimal
) -> None:
    price = UsagePrice("meter-1", PriceModel.GRADUATED, tiers=tiers)
    low, high = sorted((a, b))
    assert graduated(low, price)[0] <= graduated(high, price)[0]


@given(tier_lists(), quantities)
def test_graduated_tiers_add_up_to_the_quantity(tiers: tuple[Tier, ...], q: Decimal) -> None:
    _, charges = graduated(q, UsagePrice("meter-1", PriceModel.GRADUATED, tiers=tiers))
    assert sum((c.quantity for c in charges), D(0)) == q


@given(prices, quantities)
def test_one_unbounded_tier_is_the_same_in_every_model(unit_price: Decimal, q: Decimal) -> None:
    tiers = (Tier(None, unit_price, D(0)),)
    expected = per_unit(q, UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=unit_price))[0]
    assert graduated(q, UsagePrice("meter-1", PriceModel.GRADUATED, tiers=tiers))[0] == expected
    assert volume(q, UsagePrice("meter-1", PriceModel.VOLUME, tiers=tiers))[0] == expected


@given(tier_lists(), quantities)
def test_graduated_and_volume_agree_inside_the_first_tier(
    tiers: tuple[Tier, ...], q: Decimal
) -> None:
    first = tiers[0].up_to
    if first is not None and q > first:
        q = first
    assert (
        graduated(q, UsagePrice("meter-1", PriceModel.GRADUATED, tiers=tiers))[0]
        == volume(q, UsagePrice("meter-1", PriceModel.VOLUME, tiers=tiers))[0]
    )


@given(quantities, quantities)
def test_free_plus_billable_is_consumed(consumed: Decimal, threshold: Decimal) -> None:
    price = UsagePrice("meter-1", PriceModel.PER_UNIT, unit_price=D(1), free_threshold=threshold)
    charge = price_usage(consumed, price)
    assert charge.free + charge.billable == consumed
    assert charge.free <= threshold
