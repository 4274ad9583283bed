"""One definition of a storable metadata value, shared by ingest (which rejects
what fails it, per event) and meter (which skips what fails it, per event), so
that whatever ingest accepts every later stage can store and read back.

Bounds, and where they come from:
- strings: at most 500 characters and no NUL (PostgreSQL `text` and `jsonb`
  cannot hold U+0000);
- int_value: int64, as the protobuf field already guarantees;
- number_value: a finite double (JSON and `numeric` have no NaN or infinity);
- a number, or a string that reads as one (meters count "12.5" as 12.5): a
  finite decimal whose adjusted exponent lies in [-1000, 1000], zero included,
  with at most 1000 significant digits. PostgreSQL `numeric` holds up to 131072
  digits before the point and 16383 after it, and asyncpg's binary codec
  refuses a scale beyond that (so "0e-20000", a zero with a 20000-digit scale,
  could not be written); every double and int64 lies far inside these bounds.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

MAX_STRING_VALUE = 500
MAX_ADJUSTED_EXPONENT = 1000
MIN_ADJUSTED_EXPONENT = -1000
MAX_DIGITS = 1000

# Plain decimal notation only, ASCII digits: no whitespace, no "_" separators, no
# "NaN"/"Infinity", no non-ASCII digits (all of which `Decimal(str)` would accept).
NUMERIC_STRING = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMBER_START = frozenset("0123456789+-.")

RawValue = str | int | float | bool


def is_storable_number(number: Decimal) -> bool:
    """True when `number` is finite and within the bounds above (zero included)."""
    if not number.is_finite():
        return False
    if len(number.as_tuple().digits) > MAX_DIGITS:
        return False
    return MIN_ADJUSTED_EXPONENT <= number.adjusted() <= MAX_ADJUSTED_EXPONENT


def numeric_string(value: str) -> Decimal | None:
    """The number a string reads as ("12.5", "-3", "1e3"), or None when it does
    not read as a number at all. The result may still fail is_storable_number."""
    # Cheap rejection first (most strings are words): a number starts with a
    # digit, a sign or a point. This runs for every event a filter checks.
    if not value or value[0] not in _NUMBER_START:
        return None
    if NUMERIC_STRING.fullmatch(value) is None:
        return None
    try:
        return Decimal(value)
    except InvalidOperation:  # an exponent too large for Decimal itself
        return Decimal("Infinity")


def value_problem(value: RawValue) -> str | None:
    """Why a metadata value cannot be stored and read back by every stage, in
    words that finish "metadata[key] ..."; None when it can."""
    if isinstance(value, int):  # bool too
        return None  # int_value is int64 by its wire type
    if isinstance(value, float):
        if not math.isfinite(value):
            return f"is {value}; numbers must be finite"
        return None
    if len(value) > MAX_STRING_VALUE:
        return f"is {len(value)} characters long; at most {MAX_STRING_VALUE} are allowed"
    if "\x00" in value:
        return "contains a NUL character"
    if value.isdigit() and value.isascii():  # the common case: within bounds
        return None
    number = numeric_string(value)
    if number is not None and not is_storable_number(number):
        return (
            f"reads as a number outside what meters can store (exponent within"
            f" 1e{MIN_ADJUSTED_EXPONENT}..1e{MAX_ADJUSTED_EXPONENT}, zero included,"
            f" at most {MAX_DIGITS} digits)"
        )
    return None
