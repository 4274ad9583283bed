"""Event metadata values as the meter domain sees them.

The gRPC layer converts `usagebilling.common.v1.Value` into a `MetaValue`:
string -> `str`, number_value (a double) -> `Decimal(repr(x))` (its shortest repr, so
0.1 becomes Decimal("0.1")), int_value -> `Decimal(int)`, bool -> `bool`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import TypeAlias

from services.common.errors import InvalidArgument
from services.common.values import is_storable_number, numeric_string

MetaValue: TypeAlias = str | Decimal | bool


def to_number(value: MetaValue) -> Decimal | None:
    """The value as a number the meter can store, or None when it is not one.

    Numeric strings ("12.5", "-3", "1e3") count as numbers, since many clients send
    numbers as strings. A bool is never a number. NaN, infinities and numbers outside
    the bounds of services.common.values (the one definition of a storable value,
    which ingest applies too) are not numbers: "0e-20000", a zero whose scale
    PostgreSQL's driver cannot encode, is one of them.
    """
    if isinstance(value, bool):  # checked first: bool is not a number here
        return None
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, str):
        parsed = numeric_string(value)
        if parsed is None:
            return None
        number = parsed
    else:
        return None
    return number if is_storable_number(number) else None


def format_decimal(number: Decimal) -> str:
    """A finite decimal in plain notation without trailing zeros: "1", "0.000125", "-2.5".

    Done by hand rather than with `Decimal.normalize()`, which rounds to the context
    precision (28 digits by default) and would change long values.
    """
    if not number.is_finite():
        raise ValueError(f"not a finite number: {number}")
    if number.is_zero():
        return "0"  # also for -0 and 0E-5
    text = str(number)
    if "E" not in text and (text[-1] != "0" or "." not in text):
        # Already plain, with no zero to trim (an integer, or a fraction that
        # does not end in 0): the common case, a quarter of the rebuild's time.
        return text
    sign, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite, so never "n"/"N"/"F"
    coefficient = list(digits)
    while exponent < 0 and coefficient[-1] == 0:
        coefficient.pop()
        exponent += 1
    # format "f" without a precision is exact and never uses an exponent.
    return format(Decimal((sign, tuple(coefficient), exponent)), "f")


def canonical(value: MetaValue) -> str:
    """The value as one string, for UNIQUE_COUNT and group-by dimensions.

    Numbers are normalized so that 1, 1.0 and 1E+0 are one value. Strings are kept
    exactly as sent, so the identifiers "007" and "7" stay distinct. Booleans become
    "true"/"false". Untagged on purpose: the number 42 and the string "42" are one value,
    as a client that sends an id sometimes as a number and sometimes as a string means.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format_decimal(value) if value.is_finite() else str(value)
    return value


def check_text(value: str, field: str, limit: int) -> None:
    """InvalidArgument naming the field when the text is longer than `limit` or holds a
    NUL character (which PostgreSQL's text and jsonb cannot store)."""
    if len(value) > limit:
        raise InvalidArgument(f"{field}: at most {limit} characters")
    if "\x00" in value:
        raise InvalidArgument(f"{field}: must not contain a NUL character")
