import random
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.meter.domain.values import MetaValue, canonical, format_decimal, to_number


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("12.5"), Decimal("12.5")),
        (Decimal(-3), Decimal(-3)),
        ("12.5", Decimal("12.5")),
        ("-3", Decimal(-3)),
        ("+.5", Decimal("0.5")),
        ("1e3", Decimal(1000)),
        ("007", Decimal(7)),
        ("0", Decimal(0)),
    ],
)
def test_to_number_accepts_numbers_and_numeric_strings(value: MetaValue, expected: Decimal) -> None:
    assert to_number(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        True,
        False,
        "",
        "abc",
        " 1",
        "1 ",
        "1_000",
        "NaN",
        "Infinity",
        "-inf",
        "١٢",  # Arabic-Indic digits: Decimal() takes them, we do not
        "1e99999999999999999999",
        "1e1001",
        Decimal("NaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("1e-1001"),
    ],
)
def test_to_number_rejects(value: MetaValue) -> None:
    assert to_number(value) is None


def test_to_number_keeps_doubles_and_int64_in_range() -> None:
    for x in (1.7976931348623157e308, 5e-324, 0.1):
        assert to_number(Decimal(repr(x))) == Decimal(repr(x))
    assert to_number(Decimal(-(2**63))) == Decimal(-(2**63))


@pytest.mark.parametrize(
    ("number", "text"),
    [
        (Decimal("1.0"), "1"),
        (Decimal("1.25E-4"), "0.000125"),
        (Decimal("1E+3"), "1000"),
        (Decimal("-0"), "0"),
        (Decimal("0E-7"), "0"),
        (Decimal("-2.50"), "-2.5"),
        (Decimal("100"), "100"),
        (Decimal("10.5"), "10.5"),
        (Decimal("-123.4560"), "-123.456"),
        (Decimal("0.000001"), "0.000001"),
        (Decimal("0.0000010"), "0.000001"),
        (Decimal("1E-7"), "0.0000001"),
        (Decimal("12E+1"), "120"),
        # Longer than the default 28-digit context: must not be rounded.
        (Decimal("1.2345678901234567890123456789012340"), "1.234567890123456789012345678901234"),
    ],
)
def test_format_decimal(number: Decimal, text: str) -> None:
    assert format_decimal(number) == text


def test_format_decimal_matches_the_rebuild() -> None:
    """The plain-text shortcut answers what trimming the coefficient's zeros
    and formatting with "f" answers, over random signs, digits and exponents."""
    rng = random.Random(7)
    for _ in range(20_000):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
        number = Decimal(f"{rng.choice(['', '-'])}{digits}E{rng.randint(-45, 45)}")
        if number.is_zero():
            continue
        sign, coefficient, exponent = number.as_tuple()
        kept = list(coefficient)
        assert isinstance(exponent, int)
        while exponent < 0 and kept[-1] == 0:
            kept.pop()
            exponent += 1
        assert format_decimal(number) == format(Decimal((sign, tuple(kept), exponent)), "f")


def test_format_decimal_refuses_non_finite() -> None:
    with pytest.raises(ValueError):
        format_decimal(Decimal("NaN"))


@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_format_decimal_round_trips_without_exponent(number: Decimal) -> None:
    text = format_decimal(number)
    assert Decimal(text) == number
    assert "E" not in text and "e" not in text
    assert not ("." in text and text.endswith("0"))
    assert not text.endswith(".")


def test_canonical() -> None:
    assert canonical(Decimal("1.0")) == canonical(Decimal(1)) == canonical(Decimal("1E+0")) == "1"
    assert canonical("007") == "007"  # strings stay as sent
    assert canonical(True) == "true"
    assert canonical(False) == "false"
    assert canonical(Decimal("NaN")) == "NaN"
