from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.billing.domain.money import CURRENCIES, Money, from_minor, minor_units, to_minor
from services.common.errors import InvalidArgument


@pytest.mark.parametrize(
    ("currency", "digits"),
    [("USD", 2), ("EUR", 2), ("GBP", 2), ("JPY", 0), ("KRW", 0), ("KWD", 3), ("BHD", 3)],
)
def test_minor_units(currency: str, digits: int) -> None:
    assert minor_units(currency) == digits


def test_table_covers_the_most_used_currencies() -> None:
    two_digits = ["CHF", "CAD", "AUD", "INR", "CNY", "BRL", "MXN", "SEK", "NOK", "DKK", "PLN"]
    for code in two_digits:
        assert CURRENCIES[code] == 2
    assert len(CURRENCIES) >= 40


@pytest.mark.parametrize(
    ("currency", "message"),
    [
        ("usd", r"^currency: 'usd' must be uppercase, as ISO 4217 writes it \('USD'\)$"),
        ("Jpy", r"^currency: 'Jpy' must be uppercase"),
        ("XXXX", r"^currency: 'XXXX' is not a supported ISO 4217 code"),
        ("ABC", r"^currency: 'ABC' is not a supported ISO 4217 code"),
        ("", r"^currency: required"),
    ],
)
def test_unknown_or_lowercase_currency_is_invalid(currency: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        minor_units(currency)


def test_the_currency_message_names_the_callers_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^product\.currency: 'eur' must be uppercase"):
        minor_units("eur", field="product.currency")


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("30", "USD", 3000),  # the canonical 1500 × 0.02
        ("12.344", "USD", 1234),
        ("12.345", "USD", 1235),  # half-up at .5
        ("0.005", "USD", 1),
        ("0.0049999", "USD", 0),
        ("-0.005", "USD", -1),  # half away from zero
        ("1234.5", "JPY", 1235),  # JPY has no minor unit
        ("1234.49", "JPY", 1234),
        ("1.2345", "KWD", 1235),  # KWD has three digits: 1.2345 -> 1.235
        ("1.2344", "KWD", 1234),
        ("0.000125", "USD", 0),
        ("1E+3", "EUR", 100000),
    ],
)
def test_to_minor_rounds_once_half_up(amount: str, currency: str, minor: int) -> None:
    assert to_minor(Decimal(amount), currency) == minor


def test_to_minor_does_not_round_twice() -> None:
    # 0.0049 would become 0.005 at three digits and then 0.01: wrong; once gives 0.
    assert to_minor(Decimal("0.0049"), "USD") == 0
    # More digits than the default 28-digit context keeps: still exact, still once.
    assert to_minor(Decimal("0.00499999999999999999999999999999999"), "USD") == 0


def test_from_minor() -> None:
    assert from_minor(1235, "USD") == Decimal("12.35")
    assert str(from_minor(1235, "USD")) == "12.35"
    assert from_minor(1235, "JPY") == Decimal(1235)
    assert str(from_minor(1235, "KWD")) == "1.235"


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.sampled_from(sorted(CURRENCIES)))
def test_from_minor_round_trips(minor: int, currency: str) -> None:
    assert to_minor(from_minor(minor, currency), currency) == minor


def test_money_adds_one_currency() -> None:
    assert Money(150, "USD") + Money(250, "USD") == Money(400, "USD")
    assert Money.of(Decimal("12.345"), "USD") == Money(1235, "USD")
    assert Money(1235, "KWD").amount == Decimal("1.235")
    assert sum([Money(1, "EUR"), Money(2, "EUR")], Money.zero("EUR")) == Money(3, "EUR")


def test_money_refuses_to_mix_currencies() -> None:
    with pytest.raises(ValueError, match="cannot add EUR to USD"):
        Money(1, "USD") + Money(1, "EUR")


def test_money_refuses_an_unknown_currency() -> None:
    with pytest.raises(InvalidArgument):
        Money(1, "usd")
