"""Gauges over time and seats (domain.gauges through `aggregate` and the
reference), with the cases written out by hand."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.common.errors import InvalidArgument
from services.meter.domain.aggregation import (
    SKIP_MISSING_PROPERTY,
    SKIP_NOT_AN_OPERATION,
    Aggregation,
    MeterSpec,
    aggregate,
    extract,
    format_decimal,
    validate_meter,
)
from services.meter.domain.gauges import Held
from services.meter.domain.reference import RawEvent, aggregate_events
from services.meter.domain.values import MetaValue
from services.meter.domain.windows import WindowSize

D = Decimal
Agg = Aggregation
JUNE = datetime(2024, 6, 1, tzinfo=UTC)
JULY = datetime(2024, 7, 1, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def gauge(when: datetime, value: str, event_id: str = "", line: str = "s") -> Held:
    return Held(when, event_id or when.isoformat(), line, D(value))


def seat(when: datetime, item: str, op: str, event_id: str = "") -> Held:
    return Held(when, event_id or f"{when.isoformat()}-{item}", item, D(op == "add"))


def value(kind: Aggregation, events: list[Held], start: datetime, end: datetime) -> str | None:
    result = aggregate(events, kind, (start, end))
    return None if result is None else format_decimal(result)


# --- gauges -------------------------------------------------------------------------

# 10 GB from June 1 for 10 days, then 40 GB for the remaining 20 days of June.
STORAGE = [gauge(JUNE, "10"), gauge(JUNE + 10 * DAY, "40")]


def test_storage_month_average_and_gb_hours() -> None:
    assert value(Agg.TIME_WEIGHTED_AVG, STORAGE, JUNE, JULY) == "30"
    # 10 x 240 h + 40 x 480 h
    assert value(Agg.TIME_WEIGHTED_SUM, STORAGE, JUNE, JULY) == "21600"


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_arrival_order_changes_nothing(order: tuple[int, ...]) -> None:
    events = [
        gauge(JUNE - DAY, "7"),  # before the window: holds into it
        gauge(JUNE + 10 * DAY, "40", "b"),
        gauge(JUNE + 10 * DAY, "99", "a"),  # same instant: "b" sorts last and wins
        gauge(JUNE + 20 * DAY, "1"),
    ]
    shuffled = [events[i] for i in order]
    # 7 x 10 days + 40 x 10 days + 1 x 10 days = 480 value-days
    assert value(Agg.TIME_WEIGHTED_SUM, shuffled, JUNE, JULY) == "11520"
    assert value(Agg.TIME_WEIGHTED_AVG, shuffled, JUNE, JULY) == "16"


def test_value_before_the_window_comes_from_the_last_earlier_reading() -> None:
    events = [gauge(JUNE - 3 * DAY, "100"), gauge(JUNE - DAY, "4"), gauge(JUNE + 15 * DAY, "8")]
    # 4 for 15 days, 8 for 15 days
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE, JULY) == "6"


def test_no_reading_before_a_window_counts_zero_until_the_first() -> None:
    events = [gauge(JUNE + 15 * DAY, "8")]
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE, JULY) == "4"
    assert value(Agg.TIME_WEIGHTED_SUM, events, JUNE, JULY) == str(8 * 15 * 24)


def test_no_reading_before_the_window_end_is_no_row() -> None:
    events = [gauge(JULY, "8")]  # exactly at the end: the next window's
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE, JULY) is None
    assert value(Agg.TIME_WEIGHTED_AVG, events, JULY, JULY + DAY) == "8"


def test_a_reading_exactly_at_a_window_boundary_starts_the_next_window() -> None:
    events = [gauge(JUNE + 12 * HOUR, "3"), gauge(JUNE + DAY, "5")]
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE, JUNE + DAY) == "1.5"
    assert value(Agg.TIME_WEIGHTED_SUM, events, JUNE, JUNE + DAY) == "36"
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE + DAY, JUNE + 2 * DAY) == "5"
    assert value(Agg.TIME_WEIGHTED_SUM, events, JUNE + DAY, JUNE + 2 * DAY) == "120"


def test_lines_add_up() -> None:
    events = [gauge(JUNE, "10", "a", "eu"), gauge(JUNE + 15 * DAY, "2", "b", "us")]
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE, JULY) == "11"


def test_a_second_is_exact_and_a_third_rounds_as_avg_does() -> None:
    events = [gauge(JUNE, "1")]
    assert value(Agg.TIME_WEIGHTED_SUM, events, JUNE, JUNE + timedelta(seconds=36)) == "0.01"
    # 1 for 1 s, 0 for 2 s before it: 1/3, to 50 significant digits
    events = [gauge(JUNE + timedelta(seconds=2), "1")]
    assert value(Agg.TIME_WEIGHTED_AVG, events, JUNE, JUNE + timedelta(seconds=3)) == (
        "0." + "3" * 50
    )


def test_exact_beyond_the_default_precision() -> None:
    events = [gauge(JUNE, "1e20"), gauge(JUNE + HOUR, "0.00000000000000000001")]
    assert value(Agg.TIME_WEIGHTED_SUM, events, JUNE, JUNE + 2 * HOUR) == (
        "100000000000000000000.00000000000000000001"
    )


# --- seats --------------------------------------------------------------------------

T = datetime(2024, 6, 3, 10, 0, tzinfo=UTC)


def test_seat_added_and_removed_in_the_same_minute() -> None:
    events = [
        seat(T + timedelta(seconds=10), "u1", "add"),
        seat(T + timedelta(seconds=40), "u1", "remove"),
    ]
    assert value(Agg.SEATS_END, events, T, T + MINUTE) == "0"
    assert value(Agg.SEATS_MAX, events, T, T + MINUTE) == "1"
    assert value(Agg.SEATS_PRORATED, events, T, T + MINUTE) == "0.5"
    assert (
        value(Agg.SEATS_PRORATED, events, T, T + HOUR)
        == "0.00" + "8" + "3" * 49  # 1/120 to 50 significant digits
    )


def test_seats_carry_over_into_a_period_with_no_events() -> None:
    may = datetime(2024, 5, 1, tzinfo=UTC)
    events = [
        seat(may + DAY, "u1", "add"),
        seat(may + 2 * DAY, "u2", "add"),
        seat(may + 3 * DAY, "u3", "add"),
        seat(may + 4 * DAY, "u3", "remove"),
    ]
    for kind in (Agg.SEATS_END, Agg.SEATS_MAX, Agg.SEATS_PRORATED):
        assert value(kind, events, JUNE, JULY) == "2"
        assert value(kind, events, JULY, JULY + 31 * DAY) == "2"


def test_set_semantics_add_twice_and_remove_an_inactive_item() -> None:
    events = [
        seat(JUNE, "u1", "add"),
        seat(JUNE + DAY, "u1", "add"),  # already active: nothing changes
        seat(JUNE + DAY, "u2", "remove"),  # never active: nothing changes
        seat(JUNE + 2 * DAY, "u1", "remove"),
        seat(JUNE + 3 * DAY, "u1", "remove"),  # already inactive
    ]
    assert value(Agg.SEATS_MAX, events, JUNE, JULY) == "1"
    assert value(Agg.SEATS_END, events, JUNE, JULY) == "0"
    assert value(Agg.SEATS_PRORATED, events, JUNE, JUNE + 4 * DAY) == "0.5"


def test_same_instant_is_ordered_by_event_id() -> None:
    add_then_remove = [seat(T, "u1", "add", "e1"), seat(T, "u1", "remove", "e2")]
    assert value(Agg.SEATS_MAX, add_then_remove, T, T + HOUR) == "0"  # never active
    remove_then_add = [seat(T, "u1", "remove", "e1"), seat(T, "u1", "add", "e2")]
    assert value(Agg.SEATS_MAX, remove_then_add, T, T + HOUR) == "1"
    assert value(Agg.SEATS_END, remove_then_add, T, T + HOUR) == "1"


def test_seat_max_is_the_most_at_one_instant() -> None:
    events = [
        seat(JUNE, "a", "add"),
        seat(JUNE + DAY, "a", "remove"),
        seat(JUNE + DAY, "b", "add"),  # a leaves as b comes: never 2 at once
        seat(JUNE + 2 * DAY, "c", "add"),
    ]
    assert value(Agg.SEATS_MAX, events, JUNE, JULY) == "2"
    assert value(Agg.SEATS_MAX, events, JUNE, JUNE + 2 * DAY) == "1"
    assert value(Agg.SEATS_END, events, JUNE, JUNE + 2 * DAY) == "1"


# --- meters: validation and extraction ----------------------------------------------


def test_seat_meters_take_an_operation_property() -> None:
    spec = validate_meter("seats", "user.changed", Agg.SEATS_MAX, "user_id", None, [])
    assert spec.operation_property == "operation"
    spec = validate_meter(
        "seats", "user.changed", Agg.SEATS_MAX, "user_id", None, [], operation_property="op"
    )
    assert spec.operation_property == "op"


@pytest.mark.parametrize(
    ("kind", "prop", "operation_property", "field"),
    [
        (Agg.SEATS_END, "", "", "property"),
        (Agg.TIME_WEIGHTED_AVG, "", "", "property"),
        (Agg.SEATS_END, "user", "user", "operation_property"),
        (Agg.SUM, "v", "op", "operation_property"),
        (Agg.TIME_WEIGHTED_SUM, "gb", "op", "operation_property"),
        (Agg.SEATS_PRORATED, "user", "x" * 256, "operation_property"),
    ],
)
def test_meter_validation_names_the_field(
    kind: Aggregation, prop: str, operation_property: str, field: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}: "):
        validate_meter("m", "e", kind, prop, None, [], operation_property=operation_property)


SEATS = MeterSpec("user.changed", Agg.SEATS_END, "user_id", operation_property="op")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"user_id": "u1", "op": "add"}, (("u1", D(1)), None)),
        ({"user_id": D("7.0"), "op": "remove"}, (("7", D(0)), None)),
        ({"user_id": "u1", "op": "ADD"}, (None, SKIP_NOT_AN_OPERATION)),
        ({"user_id": "u1", "op": True}, (None, SKIP_NOT_AN_OPERATION)),
        ({"user_id": "u1"}, (None, SKIP_MISSING_PROPERTY)),
        ({"op": "add"}, (None, SKIP_MISSING_PROPERTY)),
    ],
)
def test_seat_extraction(metadata: dict[str, MetaValue], expected: object) -> None:
    assert extract(SEATS, metadata) == expected


# --- through the reference: windows, zones, groups ----------------------------------


def raw(event_id: str, when: datetime, customer: str = "c1", **metadata: MetaValue) -> RawEvent:
    return RawEvent(event_id, customer, "storage", when, metadata)


STORAGE_METER = MeterSpec("storage", Agg.TIME_WEIGHTED_SUM, "gb", group_by=("region",))


def test_reference_rows_carry_over_windows_and_start_with_the_first_event() -> None:
    events = [
        raw("e1", JUNE + 12 * HOUR, gb=D(2), region="eu"),
        raw("e2", JUNE + 2 * DAY, gb=D(1), region="us"),
        raw("e3", JUNE - DAY, gb=D(5), region="eu", customer="c2"),
    ]
    rows = aggregate_events(
        events, STORAGE_METER, JUNE, JUNE + 3 * DAY, WindowSize.DAY, "", None, ("region",)
    )
    got = [(r.customer_id, r.window_start.day, r.group["region"], r.value) for r in rows]
    assert got == [
        ("c1", 1, "eu", "24"),
        ("c1", 2, "eu", "48"),
        ("c1", 3, "eu", "48"),
        ("c1", 3, "us", "24"),
        ("c2", 1, "eu", "120"),
        ("c2", 2, "eu", "120"),
        ("c2", 3, "eu", "120"),
    ]
    # Without group_by the regions add up; a group_filter picks series.
    rows = aggregate_events(events, STORAGE_METER, JUNE, JUNE + 3 * DAY, WindowSize.NONE, "", "c1")
    assert [r.value for r in rows] == ["144"]
    rows = aggregate_events(
        events,
        STORAGE_METER,
        JUNE,
        JUNE + 3 * DAY,
        WindowSize.NONE,
        "",
        "c1",
        group_filter={"region": "us"},
    )
    assert [r.value for r in rows] == ["24"]


def test_reference_day_windows_follow_the_zone_across_dst() -> None:
    # Europe/Berlin springs forward on 2024-03-31: that local day has 23 hours.
    meter = MeterSpec("storage", Agg.TIME_WEIGHTED_AVG, "gb")
    start = datetime(2024, 3, 30, 23, tzinfo=UTC)  # 2024-03-31 00:00 in Berlin
    events = [raw("e1", start - DAY, gb=D(23)), raw("e2", start + 12 * HOUR, gb=D(0))]
    rows = aggregate_events(
        events, meter, start, start + 23 * HOUR, WindowSize.DAY, "Europe/Berlin", "c1"
    )
    assert [(r.window_end - r.window_start, r.value) for r in rows] == [(23 * HOUR, "12")]


def test_reference_zero_row_for_a_customer_with_no_events() -> None:
    rows = aggregate_events([], STORAGE_METER, JUNE, JULY, WindowSize.NONE, "", "c9", ("region",))
    assert [(r.group, r.value) for r in rows] == [({"region": ""}, "0")]
