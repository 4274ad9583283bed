"""Meter filters: conditions on event metadata, joined by AND/OR, at most 3 levels deep.

Matching rules (also in API.md):
- An event that lacks the key fails every condition but NOT_EXISTS; so NOT_EQUALS,
  NOT_IN and DOES_NOT_CONTAIN on a missing key fail too.
- EQUALS (and IN): when both sides are numbers (per `to_number`, numeric strings
  included) they compare numerically, so 1, 1.0 and "1.00" are equal; otherwise a
  string equals only the same string (case-sensitive) and a bool only the same bool.
  A bool never equals a number or a string.
- Ordering operators fail unless both sides are numbers.
- CONTAINS / DOES_NOT_CONTAIN are case-sensitive substring tests on string values;
  on a non-string value both fail.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

from services.common.errors import InvalidArgument
from services.meter.domain.values import MetaValue, check_text, to_number

MAX_FILTER_DEPTH = 3
# A filter is evaluated for every event of its meter's name as the consumer folds
# it, on meter's one event loop: its size bounds that per-event cost. Counted over
# the whole tree, nested filters included.
MAX_FILTER_CONDITIONS = 100
MAX_NESTED_FILTERS = 20
MAX_LIST_VALUES = 100  # per OPERATOR_IN / OPERATOR_NOT_IN condition
# Ingest accepts metadata keys of at most 100 characters and strings of at most 500:
# a longer key or string in a condition could never match, so it is a mistake.
MAX_KEY_LENGTH = 100
MAX_STRING_LENGTH = 500
# Keys and values of the whole tree, strings in UTF-8 bytes (a number or a bool
# counts 8). The counts above still allow 100 x 100 strings of 500 characters
# (some 5 MB, 20 MB in 4-byte characters); this bounds a meter's stored and
# listed size (ingest reads every meter of a tenant on each weight refresh)
# while leaving room for real lists: 100 UUIDs in an IN list are some 3.7 KB.
MAX_FILTER_BYTES = 16 * 1024
# What a number or a bool counts: the wire size of a double or an int64.
_SCALAR_BYTES = 8


class Operator(enum.Enum):
    # Values are the protobuf enum names: the gRPC layer maps by name, and messages
    # show the name clients know.
    EQUALS = "OPERATOR_EQUALS"
    NOT_EQUALS = "OPERATOR_NOT_EQUALS"
    GREATER_THAN = "OPERATOR_GREATER_THAN"
    GREATER_THAN_OR_EQUALS = "OPERATOR_GREATER_THAN_OR_EQUALS"
    LESS_THAN = "OPERATOR_LESS_THAN"
    LESS_THAN_OR_EQUALS = "OPERATOR_LESS_THAN_OR_EQUALS"
    CONTAINS = "OPERATOR_CONTAINS"
    DOES_NOT_CONTAIN = "OPERATOR_DOES_NOT_CONTAIN"
    IN = "OPERATOR_IN"
    NOT_IN = "OPERATOR_NOT_IN"
    EXISTS = "OPERATOR_EXISTS"
    NOT_EXISTS = "OPERATOR_NOT_EXISTS"


class Conjunction(enum.Enum):
    AND = "CONJUNCTION_AND"
    OR = "CONJUNCTION_OR"


@dataclass(frozen=True)
class Condition:
    key: str
    operator: Operator
    value: MetaValue | None = None
    values: tuple[MetaValue, ...] = ()

    @functools.cached_property
    def _predicate(self) -> Predicate:
        return OPERATORS[self.operator]

    @functools.cached_property
    def _number(self) -> Decimal | None:
        # `value` as a number (or None), parsed once rather than per event.
        return None if self.value is None else to_number(self.value)

    @functools.cached_property
    def _lookup(self) -> _ListLookup:
        # Built on first use, kept with the condition: EQUALS and IN are then a
        # few set look-ups per event instead of one comparison per listed value.
        return _ListLookup.of(self.values or (() if self.value is None else (self.value,)))


@dataclass(frozen=True)
class Filter:
    conjunction: Conjunction = Conjunction.AND
    conditions: tuple[Condition, ...] = ()
    filters: tuple[Filter, ...] = ()


_ORDERING = frozenset(
    {
        Operator.GREATER_THAN,
        Operator.GREATER_THAN_OR_EQUALS,
        Operator.LESS_THAN,
        Operator.LESS_THAN_OR_EQUALS,
    }
)
_SUBSTRING = frozenset({Operator.CONTAINS, Operator.DOES_NOT_CONTAIN})
_LIST = frozenset({Operator.IN, Operator.NOT_IN})
_PRESENCE = frozenset({Operator.EXISTS, Operator.NOT_EXISTS})


# --- validation -------------------------------------------------------------------


class ConditionShape(Protocol):
    """What `check_filter_size` reads of a condition: the domain's or the protobuf's."""

    @property
    def key(self) -> str: ...

    @property
    def value(self) -> object: ...

    @property
    def values(self) -> Collection[object]: ...


class FilterShape(Protocol):
    """What `check_filter_size` reads of a filter: the domain's or the protobuf's."""

    @property
    def conditions(self) -> Sequence[ConditionShape]: ...

    @property
    def filters(self) -> Sequence[FilterShape]: ...


def check_filter_size(f: FilterShape, field: str = "filter") -> None:
    """InvalidArgument naming the field when the filter is over a size limit: more
    than MAX_FILTER_CONDITIONS conditions or MAX_NESTED_FILTERS nested filters in
    the whole tree, more than MAX_FILTER_DEPTH levels, more than MAX_LIST_VALUES
    values in one condition, a key over MAX_KEY_LENGTH characters, more than
    MAX_FILTER_BYTES bytes of keys and values in the whole tree (strings counted
    in UTF-8 bytes, a number or a bool 8).

    Takes the protobuf message as well as the domain filter, so that a request is
    measured before it is converted; it looks at no more than the limits allow (list
    lengths are O(1), and bytes are counted only once the counts are within their
    limits, stopping at the first byte over), so a filter of any size is refused in
    bounded time."""
    _check_size(f, field, 1, [0, 0])
    if filter_bytes(f, stop_after=MAX_FILTER_BYTES) > MAX_FILTER_BYTES:
        raise InvalidArgument(
            f"{field}: at most {MAX_FILTER_BYTES} bytes of condition keys and values"
            " in a filter (strings in UTF-8), nested filters included"
        )


def _value_bytes(v: object) -> int:
    """A condition value's bytes: a domain value (str, Decimal, bool, None) or a
    protobuf Value (whichever of its kinds is set)."""
    if v is None:
        return 0
    if isinstance(v, str):
        return len(v.encode("utf-8", "surrogatepass"))
    which = getattr(v, "WhichOneof", None)
    if which is not None:  # a protobuf Value
        kind = which("kind")
        if kind is None:
            return 0
        if kind == "string_value":
            return _value_bytes(v.string_value)  # type: ignore[attr-defined]
    return _SCALAR_BYTES


def filter_bytes(f: FilterShape, stop_after: int | None = None) -> int:
    """Bytes of the filter's keys and values, nested filters included (see
    MAX_FILTER_BYTES); with `stop_after`, counting stops once the total passes it
    (the result is then some total over `stop_after`)."""
    total = 0
    pending = [f]
    while pending:
        g = pending.pop()
        for c in g.conditions:
            total += len(c.key.encode("utf-8", "surrogatepass")) + _value_bytes(c.value)
            for v in c.values:
                total += _value_bytes(v)
                if stop_after is not None and total > stop_after:
                    return total
            if stop_after is not None and total > stop_after:
                return total
        pending.extend(g.filters)
    return total


def _check_size(f: FilterShape, field: str, level: int, seen: list[int]) -> None:
    conditions, filters = f.conditions, f.filters
    seen[0] += len(conditions)
    if seen[0] > MAX_FILTER_CONDITIONS:
        raise InvalidArgument(
            f"{field}.conditions: at most {MAX_FILTER_CONDITIONS} conditions in a filter,"
            " nested filters included"
        )
    for i, c in enumerate(conditions):
        if len(c.values) > MAX_LIST_VALUES:
            raise InvalidArgument(
                f"{field}.conditions[{i}].values: at most {MAX_LIST_VALUES} values"
            )
        if len(c.key) > MAX_KEY_LENGTH:
            raise InvalidArgument(
                f"{field}.conditions[{i}].key: at most {MAX_KEY_LENGTH} characters"
            )
    if not filters:
        return
    if level >= MAX_FILTER_DEPTH:
        raise InvalidArgument(
            f"{field}.filters[0]: filters nest at most {MAX_FILTER_DEPTH} levels deep"
        )
    seen[1] += len(filters)
    if seen[1] > MAX_NESTED_FILTERS:
        raise InvalidArgument(
            f"{field}.filters: at most {MAX_NESTED_FILTERS} nested filters in a filter"
        )
    for i, child in enumerate(filters):
        _check_size(child, f"{field}.filters[{i}]", level + 1, seen)


def condition_count(f: FilterShape | None) -> int:
    """How many conditions the filter holds, nested filters included (what one event
    costs the meter to check, at most). For a filter within the size limits."""
    if f is None:
        return 0
    return len(f.conditions) + sum(condition_count(g) for g in f.filters)


def validate_filter(f: Filter, field: str = "filter") -> None:
    """Raise InvalidArgument, naming the field, when the filter is over a size limit
    (see `check_filter_size`) or cannot be evaluated."""
    check_filter_size(f, field)
    _validate_filter(f, field, level=1)


def _validate_filter(f: Filter, field: str, level: int) -> None:
    if level > MAX_FILTER_DEPTH:
        raise InvalidArgument(f"{field}: filters nest at most {MAX_FILTER_DEPTH} levels deep")
    if not isinstance(f.conjunction, Conjunction):
        raise InvalidArgument(f"{field}.conjunction: unknown conjunction {f.conjunction!r}")
    for i, condition in enumerate(f.conditions):
        _validate_condition(condition, f"{field}.conditions[{i}]")
    for i, child in enumerate(f.filters):
        _validate_filter(child, f"{field}.filters[{i}]", level + 1)


def _validate_condition(c: Condition, field: str) -> None:
    if not c.key:
        raise InvalidArgument(f"{field}.key: required")
    check_text(c.key, f"{field}.key", MAX_KEY_LENGTH)
    if not isinstance(c.operator, Operator):
        raise InvalidArgument(f"{field}.operator: unknown operator {c.operator!r}")
    op = c.operator.value
    if c.value is not None:
        _validate_value(c.value, f"{field}.value")
    for i, v in enumerate(c.values):
        _validate_value(v, f"{field}.values[{i}]")

    if c.operator in _PRESENCE:
        if c.value is not None:
            raise InvalidArgument(f"{field}.value: {op} takes no value")
        if c.values:
            raise InvalidArgument(f"{field}.values: {op} takes no values")
        return
    if c.operator in _LIST:
        if c.value is not None:
            raise InvalidArgument(f"{field}.value: {op} takes values, not value")
        if not c.values:
            raise InvalidArgument(f"{field}.values: {op} needs at least one value")
        return
    if c.values:
        raise InvalidArgument(f"{field}.values: {op} takes value, not values")
    if c.value is None:
        raise InvalidArgument(f"{field}.value: {op} needs a value")
    if c.operator in _ORDERING and to_number(c.value) is None:
        raise InvalidArgument(f"{field}.value: {op} needs a number")
    if c.operator in _SUBSTRING and not isinstance(c.value, str):
        raise InvalidArgument(f"{field}.value: {op} needs a string")


def _validate_value(v: object, field: str) -> None:
    if isinstance(v, Decimal):
        if not v.is_finite():
            raise InvalidArgument(f"{field}: must be a finite number")
    elif isinstance(v, str):
        check_text(v, field, MAX_STRING_LENGTH)
    elif not isinstance(v, bool):
        raise InvalidArgument(f"{field}: must be a string, a number or a bool")


# --- matching ---------------------------------------------------------------------

# Every condition on a key parses the event's string value again, once per meter
# and per condition; remembering recent parses makes that a look-up. Strings only:
# equal strings are the same text, whereas equal Decimals (0 and 0E-20000) can
# differ in whether they are storable.
_string_number = functools.lru_cache(maxsize=4096)(to_number)


def _number(value: MetaValue) -> Decimal | None:
    return _string_number(value) if isinstance(value, str) else to_number(value)


def _same(actual: MetaValue, expected: MetaValue) -> bool:
    """Equality as EQUALS and IN define it (see the module docstring); what
    `_ListLookup` decides by look-up, and the tests' oracle for it."""
    if type(actual) is type(expected) and actual == expected:
        return True  # the common case, decided without parsing numbers
    a, e = _number(actual), _number(expected)
    if a is not None and e is not None:
        return a == e
    if isinstance(actual, bool) or isinstance(expected, bool):
        return isinstance(actual, bool) and isinstance(expected, bool) and actual == expected
    return isinstance(actual, str) and isinstance(expected, str) and actual == expected


def _ordered(actual: MetaValue, c: Condition, accept: Callable[[Decimal, Decimal], bool]) -> bool:
    e = c._number
    if e is None:
        return False
    a = _number(actual)
    return a is not None and accept(a, e)


def _contains(actual: MetaValue, expected: MetaValue) -> bool:
    return isinstance(actual, str) and isinstance(expected, str) and expected in actual


# Each predicate sees the event's value for the key (the key is present: presence is
# decided in `_condition_matches`) and the condition.
Predicate = Callable[[MetaValue, Condition], bool]


def _expected(c: Condition) -> MetaValue:
    assert c.value is not None  # validate_filter guarantees it for value operators
    return c.value


def _equals(actual: MetaValue, c: Condition) -> bool:
    return c._lookup.holds(actual)  # _same(actual, c.value), decided by look-up


def _not_equals(actual: MetaValue, c: Condition) -> bool:
    return not c._lookup.holds(actual)


def _greater_than(actual: MetaValue, c: Condition) -> bool:
    return _ordered(actual, c, lambda a, e: a > e)


def _greater_than_or_equals(actual: MetaValue, c: Condition) -> bool:
    return _ordered(actual, c, lambda a, e: a >= e)


def _less_than(actual: MetaValue, c: Condition) -> bool:
    return _ordered(actual, c, lambda a, e: a < e)


def _less_than_or_equals(actual: MetaValue, c: Condition) -> bool:
    return _ordered(actual, c, lambda a, e: a <= e)


def _contains_op(actual: MetaValue, c: Condition) -> bool:
    return _contains(actual, _expected(c))


def _does_not_contain(actual: MetaValue, c: Condition) -> bool:
    # A non-string fails, like a missing key: "does not contain" is about strings.
    return isinstance(actual, str) and not _contains(actual, _expected(c))


@dataclass(frozen=True)
class _ListLookup:
    """An IN list as sets that decide `any(_same(actual, v) for v in values)` in O(1).

    `_same` is: the same type and equal, else both numbers and numerically equal,
    else false. Bools live apart (True == Decimal(1) in Python, never here)."""

    bools: frozenset[bool]
    strings: frozenset[str]
    decimals: frozenset[Decimal]  # the listed Decimals as they are
    numbers: frozenset[Decimal]  # to_number of every listed value that is a number

    @staticmethod
    def of(values: tuple[MetaValue, ...]) -> _ListLookup:
        numbers = (_number(v) for v in values)
        return _ListLookup(
            bools=frozenset(v for v in values if isinstance(v, bool)),
            strings=frozenset(v for v in values if isinstance(v, str)),
            decimals=frozenset(v for v in values if isinstance(v, Decimal) and v.is_finite()),
            numbers=frozenset(n for n in numbers if n is not None),
        )

    def holds(self, actual: MetaValue) -> bool:
        if isinstance(actual, bool):
            return actual in self.bools
        if isinstance(actual, str):
            if actual in self.strings:
                return True
        elif actual.is_finite() and actual in self.decimals:
            return True
        number = _number(actual)
        return number is not None and number in self.numbers


def _in(actual: MetaValue, c: Condition) -> bool:
    return c._lookup.holds(actual)


def _not_in(actual: MetaValue, c: Condition) -> bool:
    return not _in(actual, c)


def _exists(actual: MetaValue, c: Condition) -> bool:
    return True


def _not_exists(actual: MetaValue, c: Condition) -> bool:
    return False


OPERATORS: Mapping[Operator, Predicate] = {
    Operator.EQUALS: _equals,
    Operator.NOT_EQUALS: _not_equals,
    Operator.GREATER_THAN: _greater_than,
    Operator.GREATER_THAN_OR_EQUALS: _greater_than_or_equals,
    Operator.LESS_THAN: _less_than,
    Operator.LESS_THAN_OR_EQUALS: _less_than_or_equals,
    Operator.CONTAINS: _contains_op,
    Operator.DOES_NOT_CONTAIN: _does_not_contain,
    Operator.IN: _in,
    Operator.NOT_IN: _not_in,
    Operator.EXISTS: _exists,
    Operator.NOT_EXISTS: _not_exists,
}


def _condition_matches(c: Condition, metadata: Mapping[str, MetaValue]) -> bool:
    if c.key not in metadata:
        return c.operator is Operator.NOT_EXISTS
    return c._predicate(metadata[c.key], c)


def matches(f: Filter | None, metadata: Mapping[str, MetaValue]) -> bool:
    """Whether an event with this metadata passes the (validated) filter.

    None and an empty filter (no conditions, no nested filters, whatever the
    conjunction) match every event.
    """
    if f is None or (not f.conditions and not f.filters):
        return True
    # Plain loops that stop at the first deciding result: this runs per event and
    # per meter in the consumer, and loops cost less than any()/all() over a chain.
    # OR stops at the first true, AND at the first false.
    decided = f.conjunction is Conjunction.OR
    for c in f.conditions:
        if _condition_matches(c, metadata) is decided:
            return decided
    for g in f.filters:
        if matches(g, metadata) is decided:
            return decided
    return not decided
