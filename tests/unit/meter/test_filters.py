from collections.abc import Mapping
from decimal import Decimal

import pytest

from services.common.errors import InvalidArgument
from services.meter.domain.filters import (
    OPERATORS,
    Condition,
    Conjunction,
    Filter,
    Operator,
    matches,
    validate_filter,
)
from services.meter.domain.values import MetaValue

D = Decimal
Op = Operator


def one(
    key: str, op: Operator, value: MetaValue | None = None, values: tuple[MetaValue, ...] = ()
) -> Filter:
    return Filter(conditions=(Condition(key, op, value, values),))


EVENT: Mapping[str, MetaValue] = {
    "region": "eu-west",
    "tokens": D("1500"),
    "ratio": D("0.1"),
    "count_str": "12.5",
    "flag": True,
    "model": "GPT-4",
}

# (condition, expected on EVENT). Each operator: hit, miss, missing key, and the
# awkward types.
CASES = [
    # EQUALS
    (one("region", Op.EQUALS, "eu-west"), True),
    (one("region", Op.EQUALS, "EU-WEST"), False),  # case-sensitive
    (one("tokens", Op.EQUALS, D("1500.00")), True),  # numeric
    (one("tokens", Op.EQUALS, "1500"), True),  # numeric string vs number
    (one("count_str", Op.EQUALS, D("12.50")), True),
    (one("flag", Op.EQUALS, True), True),
    (one("flag", Op.EQUALS, D(1)), False),  # a bool is not a number
    (one("flag", Op.EQUALS, "true"), False),  # nor a string
    (one("tokens", Op.EQUALS, True), False),
    (one("absent", Op.EQUALS, "x"), False),
    # NOT_EQUALS
    (one("region", Op.NOT_EQUALS, "us-east"), True),
    (one("region", Op.NOT_EQUALS, "eu-west"), False),
    (one("region", Op.NOT_EQUALS, "EU-WEST"), True),
    (one("tokens", Op.NOT_EQUALS, D("1500.0")), False),
    (one("absent", Op.NOT_EQUALS, "x"), False),  # missing key fails
    # ordering
    (one("tokens", Op.GREATER_THAN, D(1000)), True),
    (one("tokens", Op.GREATER_THAN, D(1500)), False),
    (one("tokens", Op.GREATER_THAN_OR_EQUALS, D(1500)), True),
    (one("tokens", Op.GREATER_THAN_OR_EQUALS, D("1500.01")), False),
    (one("tokens", Op.LESS_THAN, D(2000)), True),
    (one("tokens", Op.LESS_THAN, D(1500)), False),
    (one("tokens", Op.LESS_THAN_OR_EQUALS, D(1500)), True),
    (one("tokens", Op.LESS_THAN_OR_EQUALS, D(1499)), False),
    (one("count_str", Op.GREATER_THAN, D(12)), True),  # numeric string counts
    (one("ratio", Op.LESS_THAN, "0.2"), True),
    (one("region", Op.GREATER_THAN, D(0)), False),  # not a number
    (one("region", Op.LESS_THAN, D(0)), False),
    (one("flag", Op.GREATER_THAN_OR_EQUALS, D(0)), False),  # bool is not a number
    (one("absent", Op.LESS_THAN, D(0)), False),
    # CONTAINS / DOES_NOT_CONTAIN
    (one("region", Op.CONTAINS, "west"), True),
    (one("region", Op.CONTAINS, "WEST"), False),
    (one("model", Op.CONTAINS, "GPT"), True),
    (one("tokens", Op.CONTAINS, "15"), False),  # not a string
    (one("absent", Op.CONTAINS, "x"), False),
    (one("region", Op.DOES_NOT_CONTAIN, "east"), True),
    (one("region", Op.DOES_NOT_CONTAIN, "west"), False),
    (one("region", Op.DOES_NOT_CONTAIN, "WEST"), True),
    (one("tokens", Op.DOES_NOT_CONTAIN, "x"), False),  # not a string
    (one("absent", Op.DOES_NOT_CONTAIN, "x"), False),
    # IN / NOT_IN
    (one("region", Op.IN, values=("us-east", "eu-west")), True),
    (one("region", Op.IN, values=("us-east", "EU-WEST")), False),
    (one("tokens", Op.IN, values=(D(1), D("1500.000"))), True),
    (one("absent", Op.IN, values=("x",)), False),
    (one("region", Op.NOT_IN, values=("us-east",)), True),
    (one("region", Op.NOT_IN, values=("us-east", "eu-west")), False),
    (one("tokens", Op.NOT_IN, values=("1500",)), False),
    (one("absent", Op.NOT_IN, values=("x",)), False),  # missing key fails
    # EXISTS / NOT_EXISTS
    (one("region", Op.EXISTS), True),
    (one("absent", Op.EXISTS), False),
    (one("region", Op.NOT_EXISTS), False),
    (one("absent", Op.NOT_EXISTS), True),
]


@pytest.mark.parametrize(("f", "expected"), CASES)
def test_operator(f: Filter, expected: bool) -> None:
    validate_filter(f)
    assert matches(f, EVENT) is expected


def test_every_operator_has_a_strategy_and_a_case() -> None:
    assert set(OPERATORS) == set(Operator)
    assert {f.conditions[0].operator for f, _ in CASES} == set(Operator)


def test_none_and_empty_filters_match_all() -> None:
    assert matches(None, {})
    assert matches(Filter(), {})
    assert matches(Filter(Conjunction.OR), EVENT)


def test_and_or_nesting() -> None:
    eu = Condition("region", Op.EQUALS, "eu-west")
    us = Condition("region", Op.EQUALS, "us-east")
    big = Condition("tokens", Op.GREATER_THAN, D(1000))
    small = Condition("tokens", Op.LESS_THAN, D(10))
    # region = us-east OR (tokens > 1000 AND region = eu-west)
    f = Filter(Conjunction.OR, (us,), (Filter(Conjunction.AND, (big, eu)),))
    validate_filter(f)
    assert matches(f, EVENT)
    assert not matches(f, {**EVENT, "tokens": D(5)})
    assert matches(f, {"region": "us-east"})
    # AND of conditions and a nested OR that fails
    g = Filter(Conjunction.AND, (eu,), (Filter(Conjunction.OR, (us, small)),))
    assert not matches(g, EVENT)
    assert matches(g, {**EVENT, "tokens": D(1)})


def _nested(depth: int) -> Filter:
    f = Filter(conditions=(Condition("region", Op.EXISTS),))
    for _ in range(depth - 1):
        f = Filter(Conjunction.AND, (), (f,))
    return f


def test_depth_three_is_accepted() -> None:
    f = _nested(3)
    validate_filter(f)
    assert matches(f, EVENT)


def test_depth_four_is_rejected() -> None:
    with pytest.raises(
        InvalidArgument, match=r"^filter\.filters\[0\]\.filters\[0\]\.filters\[0\]:"
    ):
        validate_filter(_nested(4))


@pytest.mark.parametrize(
    ("f", "message"),
    [
        (one("", Op.EXISTS), r"filter\.conditions\[0\]\.key: required"),
        (one("k", "EQUALS"), r"filter\.conditions\[0\]\.operator: unknown"),  # type: ignore[arg-type]
        (
            Filter(conjunction="AND"),  # type: ignore[arg-type]
            r"filter\.conjunction: unknown",
        ),
        (one("k", Op.IN), r"filter\.conditions\[0\]\.values: OPERATOR_IN needs at least one"),
        (one("k", Op.IN, "a", ("a",)), r"\.value: OPERATOR_IN takes values, not value"),
        (one("k", Op.NOT_IN), r"\.values: OPERATOR_NOT_IN needs at least one"),
        (one("k", Op.EXISTS, "a"), r"\.value: OPERATOR_EXISTS takes no value"),
        (one("k", Op.NOT_EXISTS, values=("a",)), r"\.values: OPERATOR_NOT_EXISTS takes no"),
        (one("k", Op.EQUALS), r"\.value: OPERATOR_EQUALS needs a value"),
        (one("k", Op.EQUALS, "a", ("b",)), r"\.values: OPERATOR_EQUALS takes value, not values"),
        (one("k", Op.GREATER_THAN, "abc"), r"\.value: OPERATOR_GREATER_THAN needs a number"),
        (one("k", Op.LESS_THAN, True), r"\.value: OPERATOR_LESS_THAN needs a number"),
        (one("k", Op.CONTAINS, D(1)), r"\.value: OPERATOR_CONTAINS needs a string"),
        (one("k", Op.DOES_NOT_CONTAIN, True), r"OPERATOR_DOES_NOT_CONTAIN needs a string"),
        (one("k", Op.EQUALS, D("NaN")), r"\.value: must be a finite number"),
        (one("k", Op.EQUALS, 1.5), r"\.value: must be a string, a number or a bool"),  # type: ignore[arg-type]
        (one("k", Op.IN, values=("a", D("Infinity"))), r"\.values\[1\]: must be a finite"),
    ],
)
def test_validation_messages_name_the_field(f: Filter, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_filter(f)


def test_nested_field_path() -> None:
    f = Filter(
        filters=(
            Filter(
                conditions=(
                    Condition("a", Op.EXISTS),
                    Condition("b", Op.IN),
                )
            ),
        )
    )
    with pytest.raises(InvalidArgument) as info:
        validate_filter(f)
    assert str(info.value) == (
        "filter.filters[0].conditions[1].values: OPERATOR_IN needs at least one value"
    )
    with pytest.raises(InvalidArgument, match=r"^meter\.filter\.filters\[0\]"):
        validate_filter(f, "meter.filter")


def test_matching_does_not_mutate_metadata() -> None:
    metadata = dict(EVENT)
    for f, _ in CASES:
        matches(f, metadata)
    assert metadata == EVENT
