import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.meter.domain.aggregation import (
    AGGREGATIONS,
    HELD,
    SKIP_MISSING_PROPERTY,
    SKIP_NOT_A_NUMBER,
    Aggregation,
    Contribution,
    MeterSpec,
    aggregate,
    extract,
    format_decimal,
    group_key,
    meter_matches,
    validate_meter,
)
from services.meter.domain.filters import Condition, Filter, Operator

D = Decimal
Agg = Aggregation
T0 = datetime(2024, 5, 1, tzinfo=UTC)


def test_every_aggregation_has_a_strategy() -> None:
    # The held ones (gauges, seats) need a window: aggregate() takes them apart.
    assert set(AGGREGATIONS) | HELD == set(Aggregation)


# --- aggregate ----------------------------------------------------------------------


def test_ten_tenths_sum_to_exactly_one() -> None:
    tenths = [D(repr(0.1))] * 10  # as the gRPC layer converts a double 0.1
    total = aggregate(tenths, Agg.SUM)
    assert total == D(1)
    assert total is not None and format_decimal(total) == "1"


def test_sum_is_exact_beyond_the_default_precision() -> None:
    values: list[Contribution] = [D("1e30"), D("0.000000000000000000000000000001"), D("-1e30")]
    assert aggregate(values, Agg.SUM) == D("1e-30")


@pytest.mark.parametrize(
    ("kind", "values", "expected"),
    [
        (Agg.COUNT, [D(1), D(1), D(1)], "3"),
        (Agg.SUM, [D("1.5"), D("2.25"), D("-1")], "2.75"),
        (Agg.MAX, [D("1.5"), D("12"), D("-1")], "12"),
        (Agg.MIN, [D("1.5"), D("12"), D("-1")], "-1"),
        (Agg.AVG, [D(1), D(2)], "1.5"),
        (Agg.AVG, [D("0.1"), D("0.2"), D("0.3")], "0.2"),
        (Agg.AVG, [D(1), D(1), D(1)], "1"),  # not "1.0000..."
        (Agg.AVG, [D(1), D(2), D(2)], "1.6666666666666666666666666666666666666666666666667"),
        (Agg.AVG, [D("0.000125"), D("0.000125")], "0.000125"),
        (Agg.UNIQUE_COUNT, ["a", "b", "a", "1"], "3"),
    ],
)
def test_aggregate(kind: Aggregation, values: list[Contribution], expected: str) -> None:
    result = aggregate(values, kind)
    assert result is not None
    assert format_decimal(result) == expected


def test_avg_keeps_fifty_significant_digits() -> None:
    result = aggregate([D(1), D(0), D(0)], Agg.AVG)
    assert result is not None
    assert format_decimal(result) == "0." + "3" * 50


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (Agg.COUNT, D(0)),
        (Agg.SUM, D(0)),
        (Agg.UNIQUE_COUNT, D(0)),
        (Agg.MIN, None),
        (Agg.MAX, None),
        (Agg.AVG, None),
        (Agg.LATEST, None),
    ],
)
def test_empty_input(kind: Aggregation, expected: Decimal | None) -> None:
    assert aggregate([], kind) == expected


def test_latest_takes_greatest_timestamp_whatever_the_order() -> None:
    entries: list[Contribution] = [
        (T0 + timedelta(seconds=5), "e1", D(50)),
        (T0 + timedelta(seconds=9), "e2", D(90)),
        (T0 + timedelta(seconds=1), "e3", D(10)),
    ]
    for _ in range(5):
        random.shuffle(entries)
        assert aggregate(entries, Agg.LATEST) == D(90)


def test_latest_breaks_timestamp_ties_by_greatest_event_id() -> None:
    entries: list[Contribution] = [(T0, "evt-b", D(2)), (T0, "evt-c", D(3)), (T0, "evt-a", D(1))]
    assert aggregate(entries, Agg.LATEST) == D(3)
    assert aggregate(list(reversed(entries)), Agg.LATEST) == D(3)


@given(
    st.lists(
        st.decimals(allow_nan=False, allow_infinity=False, places=6, min_value=-(10**9)),
        max_size=30,
    ),
    st.randoms(use_true_random=False),
)
def test_aggregation_does_not_depend_on_order(values: list[Decimal], rnd: random.Random) -> None:
    shuffled = list(values)
    rnd.shuffle(shuffled)
    for kind in (Agg.COUNT, Agg.SUM, Agg.MAX, Agg.MIN, Agg.AVG):
        assert aggregate(list(values), kind) == aggregate(list(shuffled), kind)


def test_aggregate_does_not_mutate_input() -> None:
    values: list[Contribution] = [(T0, "b", D(1)), (T0, "a", D(2))]
    before = list(values)
    aggregate(values, Agg.LATEST)
    assert values == before


def test_wrong_contribution_type_is_a_bug() -> None:
    with pytest.raises(TypeError):
        aggregate(["1"], Agg.SUM)
    with pytest.raises(TypeError):
        aggregate([D(1)], Agg.UNIQUE_COUNT)
    with pytest.raises(TypeError):
        aggregate([D(1)], Agg.LATEST)


# --- extract and group_key ------------------------------------------------------------


def spec(kind: Aggregation, prop: str = "v", group_by: tuple[str, ...] = ()) -> MeterSpec:
    return MeterSpec("api_call", kind, prop, None, group_by)


def test_extract_count_needs_no_property() -> None:
    assert extract(spec(Agg.COUNT, ""), {}) == (D(1), None)


@pytest.mark.parametrize("kind", [Agg.SUM, Agg.MIN, Agg.MAX, Agg.AVG, Agg.LATEST])
def test_extract_numeric(kind: Aggregation) -> None:
    meter = spec(kind)
    assert extract(meter, {"v": D("2.5")}) == (D("2.5"), None)
    assert extract(meter, {"v": "2.5"}) == (D("2.5"), None)
    assert extract(meter, {}) == (None, SKIP_MISSING_PROPERTY)
    assert extract(meter, {"v": "abc"}) == (None, SKIP_NOT_A_NUMBER)
    assert extract(meter, {"v": True}) == (None, SKIP_NOT_A_NUMBER)
    assert extract(meter, {"v": D("NaN")}) == (None, SKIP_NOT_A_NUMBER)


def test_extract_unique_count_normalizes_numbers() -> None:
    meter = spec(Agg.UNIQUE_COUNT)
    seen = [
        extract(meter, {"v": D("1")})[0],
        extract(meter, {"v": D("1.0")})[0],
        extract(meter, {"v": D("1E+0")})[0],
        extract(meter, {"v": "1"})[0],
        extract(meter, {"v": "user-7"})[0],
        extract(meter, {"v": True})[0],
    ]
    assert seen == ["1", "1", "1", "1", "user-7", "true"]
    values: list[Contribution] = [v for v in seen if isinstance(v, str)]
    assert aggregate(values, Agg.UNIQUE_COUNT) == D(3)
    assert extract(meter, {}) == (None, SKIP_MISSING_PROPERTY)


def test_group_key() -> None:
    meter = spec(Agg.COUNT, "", ("region", "tier"))
    assert group_key(meter, {"region": "eu", "tier": D("2.0"), "x": "y"}) == {
        "region": "eu",
        "tier": "2",
    }
    assert group_key(meter, {"region": "eu"}) == {"region": "eu", "tier": ""}


def test_meter_matches_event_name_and_filter() -> None:
    meter = MeterSpec(
        "api_call",
        Agg.COUNT,
        filter=Filter(conditions=(Condition("region", Operator.EQUALS, "eu"),)),
    )
    assert meter_matches(meter, "api_call", {"region": "eu"})
    assert not meter_matches(meter, "API_CALL", {"region": "eu"})  # case-sensitive
    assert not meter_matches(meter, "api_call", {"region": "us"})


# --- validate_meter -------------------------------------------------------------------


def test_validate_meter_returns_the_spec() -> None:
    f = Filter(conditions=(Condition("region", Operator.EXISTS),))
    meter = validate_meter("tokens", "llm_call", Agg.SUM, "tokens", f, ["model", "region"])
    assert meter == MeterSpec("llm_call", Agg.SUM, "tokens", f, ("model", "region"))
    assert validate_meter("calls", "api_call", Agg.COUNT, "", None, []).property == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", "e", Agg.COUNT, "", None, []), r"^name: required"),
        (("x" * 256, "e", Agg.COUNT, "", None, []), r"^name: at most 255"),
        ((" \t ", "e", Agg.COUNT, "", None, []), r"^name: must not be blank"),
        (("n", "", Agg.COUNT, "", None, []), r"^event_name: required"),
        (("n", "e" * 256, Agg.COUNT, "", None, []), r"^event_name: at most 255"),
        (("n", "e", "SUM", "v", None, []), r"^aggregation: unknown"),
        (("n", "e", Agg.SUM, "", None, []), r"^property: required for AGGREGATION_SUM"),
        (("n", "e", Agg.UNIQUE_COUNT, "", None, []), r"^property: required"),
        (("n", "e", Agg.LATEST, "", None, []), r"^property: required"),
        (("n", "e", Agg.COUNT, "", None, ["a", ""]), r"^group_by\[1\]: must not be empty"),
        (("n", "e", Agg.COUNT, "", None, ["a", "b", "a"]), r"^group_by\[2\]: duplicate"),
        (("n", "e", Agg.COUNT, "", None, [f"k{i}" for i in range(11)]), r"^group_by: at most 10"),
        (
            ("n", "e", Agg.COUNT, "", Filter(conditions=(Condition("k", Operator.IN),)), []),
            r"^filter\.conditions\[0\]\.values: OPERATOR_IN",
        ),
    ],
)
def test_validate_meter_rejects(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_meter(*args)  # type: ignore[arg-type]


def test_validate_meter_accepts_limits() -> None:
    validate_meter("x" * 255, "e" * 255, Agg.COUNT, "", None, [f"k{i}" for i in range(10)])
