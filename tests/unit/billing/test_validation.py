"""Every rule on a product's usage prices fails with InvalidArgument naming the
field as the API's client sent it."""

import re
from decimal import Decimal

import pytest

from services.billing.domain.fields import check_text
from services.billing.domain.pricing import (
    PriceModel,
    Tier,
    UsagePrice,
    parse_decimal,
    validate_tiers,
    validate_usage_price,
)
from services.common.errors import InvalidArgument

D = Decimal
OPEN = Tier(None, D("0.01"))


@pytest.mark.parametrize(
    "price",
    [
        UsagePrice("m", PriceModel.PER_UNIT, unit_price=D("0.02"), free_threshold=D(1000)),
        UsagePrice("m", PriceModel.PER_UNIT, unit_price=D(0)),  # a free meter, shown on invoices
        UsagePrice("m", PriceModel.GRADUATED, tiers=(Tier(D("0.5"), D(1), D(2)), OPEN)),
        UsagePrice("m", PriceModel.VOLUME, tiers=(OPEN,)),
        # Zero is what an empty string parses to, so it is tolerated on other models.
        UsagePrice("m", PriceModel.VOLUME, unit_price=D(0), package_size=D(0), tiers=(OPEN,)),
        UsagePrice("m", PriceModel.PACKAGE, package_size=D("0.5"), package_price=D(0)),
    ],
)
def test_valid_prices_pass(price: UsagePrice) -> None:
    validate_usage_price(price, 0)


@pytest.mark.parametrize(
    ("price", "message"),
    [
        (
            UsagePrice("", PriceModel.PER_UNIT, unit_price=D(1)),
            "usage_prices[3].meter_id: required",
        ),
        (
            UsagePrice("m", PriceModel.PER_UNIT, unit_price=D(1), free_threshold=D(-1)),
            "usage_prices[3].free_threshold: must not be negative",
        ),
        (
            UsagePrice("m", PriceModel.PER_UNIT),
            "usage_prices[3].unit_price: required for PRICE_MODEL_PER_UNIT",
        ),
        (
            UsagePrice("m", PriceModel.PER_UNIT, unit_price=D("-0.01")),
            "usage_prices[3].unit_price: must not be negative",
        ),
        (
            UsagePrice("m", PriceModel.PER_UNIT, unit_price=D("NaN")),
            "usage_prices[3].unit_price: must be a finite number",
        ),
        (
            UsagePrice("m", PriceModel.GRADUATED),
            "usage_prices[3].tiers: at least one tier is required",
        ),
        (
            UsagePrice("m", PriceModel.VOLUME),
            "usage_prices[3].tiers: at least one tier is required",
        ),
        (
            UsagePrice("m", PriceModel.PACKAGE, package_price=D(5)),
            "usage_prices[3].package_size: required for PRICE_MODEL_PACKAGE",
        ),
        (
            UsagePrice("m", PriceModel.PACKAGE, package_size=D(0), package_price=D(5)),
            "usage_prices[3].package_size: must be greater than 0",
        ),
        (
            UsagePrice("m", PriceModel.PACKAGE, package_size=D(-10), package_price=D(5)),
            "usage_prices[3].package_size: must be greater than 0",
        ),
        (
            UsagePrice("m", PriceModel.PACKAGE, package_size=D(10), package_price=D(-5)),
            "usage_prices[3].package_price: must not be negative",
        ),
        # A field of another model means the client picked the wrong model.
        (
            UsagePrice("m", PriceModel.PER_UNIT, unit_price=D(1), tiers=(OPEN,)),
            "usage_prices[3].tiers: not used by PRICE_MODEL_PER_UNIT",
        ),
        (
            UsagePrice("m", PriceModel.GRADUATED, unit_price=D(1), tiers=(OPEN,)),
            "usage_prices[3].unit_price: not used by PRICE_MODEL_GRADUATED",
        ),
        (
            UsagePrice("m", PriceModel.PER_UNIT, unit_price=D(1), package_size=D(100)),
            "usage_prices[3].package_size: not used by PRICE_MODEL_PER_UNIT",
        ),
        (
            UsagePrice("m", PriceModel.VOLUME, tiers=(OPEN,), package_price=D(1)),
            "usage_prices[3].package_price: not used by PRICE_MODEL_VOLUME",
        ),
    ],
)
def test_each_price_rule_names_its_field(price: UsagePrice, message: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{re.escape(message)}"):
        validate_usage_price(price, 3)


@pytest.mark.parametrize(
    ("tiers", "message"),
    [
        (
            (Tier(D(1000), D(1)), Tier(D(500), D(1)), OPEN),
            "usage_prices[0].tiers[1].up_to: must be greater than the previous tier's up_to",
        ),
        (
            (Tier(D(1000), D(1)), Tier(D(1000), D(1)), OPEN),  # equal is not ascending
            "usage_prices[0].tiers[1].up_to: must be greater than the previous tier's up_to",
        ),
        (
            (Tier(D(0), D(1)), OPEN),
            "usage_prices[0].tiers[0].up_to: must be greater than 0",
        ),
        (
            (Tier(D(-5), D(1)), OPEN),
            "usage_prices[0].tiers[0].up_to: must be greater than 0",
        ),
        (
            (OPEN, Tier(D(1000), D(1)), OPEN),
            "usage_prices[0].tiers[0].up_to: only the last tier may be unbounded",
        ),
        (
            (Tier(D(1000), D(1)), Tier(D(2000), D(1))),
            "usage_prices[0].tiers[1].up_to: the last tier must be unbounded",
        ),
        (
            (Tier(D("Infinity"), D(1)), OPEN),
            "usage_prices[0].tiers[0].up_to: must be a finite number",
        ),
        (
            (Tier(D(10), D(1)), Tier(None, D(-1))),
            "usage_prices[0].tiers[1].unit_price: must not be negative",
        ),
        (
            (Tier(D(10), D(1), D("-0.5")), OPEN),
            "usage_prices[0].tiers[0].flat_price: must not be negative",
        ),
    ],
)
@pytest.mark.parametrize("model", [PriceModel.GRADUATED, PriceModel.VOLUME])
def test_each_tier_rule_names_its_field(
    model: PriceModel, tiers: tuple[Tier, ...], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^{re.escape(message)}"):
        validate_usage_price(UsagePrice("m", model, tiers=tiers), 0)


def test_validate_tiers_defaults_to_a_bare_field_name() -> None:
    with pytest.raises(InvalidArgument, match=r"^tiers: at least one tier"):
        validate_tiers([])


def test_validation_does_not_sort_the_callers_tiers() -> None:
    tiers = [Tier(D(1000), D(1)), Tier(D(500), D(1)), OPEN]
    with pytest.raises(InvalidArgument):
        validate_tiers(tiers)
    assert [t.up_to for t in tiers] == [D(1000), D(500), None]


# --- parse_decimal --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1500", D(1500)),
        ("0.02", D("0.02")),
        ("0.000125", D("0.000125")),
        ("2.5e3", D(2500)),
        ("1E-3", D("0.001")),
        ("1e99", D("1e99")),  # 100 digits in plain notation: the most
        ("1e-98", D("1e-98")),  # "0." and 98 digits: 100 characters
        (".5", D("0.5")),
        ("5.", D(5)),
        ("-1.5", D("-1.5")),  # the sign is validate_usage_price's business
        ("+7", D(7)),
    ],
)
def test_parse_decimal_accepts_plain_decimals(text: str, value: Decimal) -> None:
    assert parse_decimal(text, "x") == value


def test_parse_decimal_keeps_every_digit() -> None:
    text = "0.1234567890123456789012345678901234567890"
    assert str(parse_decimal(text, "x")) == text


def test_parse_decimal_drops_the_sign_of_zero() -> None:
    assert str(parse_decimal("-0", "x")) == "0"
    assert str(parse_decimal("-0.00", "x")) == "0.00"


def test_parse_decimal_empty() -> None:
    assert parse_decimal("", "x") == D(0)
    assert parse_decimal("", "x", default=D(7)) == D(7)
    with pytest.raises(InvalidArgument, match=r"^usage_prices\[0\]\.unit_price: required$"):
        parse_decimal("", "usage_prices[0].unit_price", allow_empty=False)


@pytest.mark.parametrize(
    "text",
    [
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-Infinity",
        "inf",
        " 1",
        "1 ",
        "1_000",  # Decimal() would accept it
        "1,5",
        "0x10",
        "١٢",  # Arabic-Indic digits: Decimal() would accept them too
        "1e",
        "e5",
        "--1",
        "1.2.3",
        "½",
    ],
)
def test_parse_decimal_refuses_what_is_not_a_plain_decimal(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^usage_prices\[0\]\.tiers\[1\]\.up_to: "):
        parse_decimal(text, "usage_prices[0].tiers[1].up_to")


@pytest.mark.parametrize("text", ["1e999999", "1e-20000", "9" * 101])
def test_parse_decimal_refuses_absurd_sizes(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^free_threshold: "):
        parse_decimal(text, "free_threshold")


@pytest.mark.parametrize("text", ["1e100", "1e-99", "1e131071", "-1e-16383"])
def test_parse_decimal_refuses_short_texts_that_print_long(text: str) -> None:
    # Stored, returned and printed in plain notation: "1e131071" would be 131,072
    # digits in every GetProduct and on every invoice line.
    with pytest.raises(InvalidArgument, match=r"^rate: .* is out of range"):
        parse_decimal(text, "rate")


@pytest.mark.parametrize(
    ("value", "required", "message"),
    [
        ("", True, r"^name: required$"),
        ("x" * 256, False, r"^name: at most 255 characters$"),
        ("a\x00b", False, r"^name: contains a NUL character$"),
    ],
)
def test_text_fields_name_themselves(value: str, required: bool, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check_text("name", value, required=required)
    check_text("name", "", required=False)  # optional and empty is fine
    check_text("name", "x" * 255, required=True)
