"""meter's limits, checked before work: window counts by arithmetic (against the real
window builder), filter sizes, group-by counts and meter quotas."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument, ResourceExhausted
from services.meter.domain.aggregation import MeterQuotas, check_meter_quotas
from services.meter.domain.filters import (
    MAX_FILTER_CONDITIONS,
    MAX_LIST_VALUES,
    MAX_NESTED_FILTERS,
    Condition,
    Conjunction,
    Filter,
    Operator,
    _ListLookup,
    _same,
    check_filter_size,
    condition_count,
    validate_filter,
)
from services.meter.domain.query import MAX_WINDOWS, plan_query
from services.meter.domain.values import MetaValue
from services.meter.domain.windows import WindowSize, window_count, windows
from usagebilling.common.v1 import value_pb2
from usagebilling.meter.v1 import meter_pb2

W = WindowSize
MINUTE, H, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


def assert_bounds(start: datetime, end: datetime, size: WindowSize, zone: str) -> None:
    count = window_count(start, end, size, zone)
    built = len(windows(start, end, size, zone))
    assert count.fewest <= built <= count.most, (start, end, size, zone, count, built)


# --- window counts ------------------------------------------------------------------------

# Ranges small enough to build, across DST changes, odd offsets, skipped and repeated
# days, month ends and leap years.
CASES = [
    ("UTC", W.MINUTE, utc(2024, 1, 1, 0, 0, 30), utc(2024, 1, 1, 3, 2, 1)),
    ("Europe/Berlin", W.MINUTE, utc(2024, 3, 30, 23), utc(2024, 3, 31, 3)),
    ("Europe/Berlin", W.MINUTE, utc(2024, 10, 26, 23), utc(2024, 10, 27, 3)),
    ("Europe/Berlin", W.HOUR, utc(2024, 1, 1), utc(2025, 1, 1)),
    ("Australia/Lord_Howe", W.HOUR, utc(2024, 1, 1, 0, 17), utc(2025, 6, 1)),
    ("Australia/Lord_Howe", W.MINUTE, utc(2024, 4, 6, 13), utc(2024, 4, 6, 17)),
    ("Asia/Kathmandu", W.HOUR, utc(2024, 1, 1, 0, 7), utc(2024, 3, 1)),
    ("America/Havana", W.DAY, utc(2023, 1, 1), utc(2025, 1, 1)),
    ("America/New_York", W.DAY, utc(2024, 3, 9, 12), utc(2024, 11, 4, 12)),
    ("Antarctica/Troll", W.DAY, utc(2023, 1, 1), utc(2024, 1, 1)),
    ("Africa/Casablanca", W.HOUR, utc(2023, 1, 1), utc(2024, 1, 1)),
    ("Africa/Casablanca", W.MONTH, utc(2000, 1, 1), utc(2040, 1, 1)),
    ("Pacific/Apia", W.DAY, utc(2011, 12, 20), utc(2012, 1, 10)),  # skipped 30 Dec 2011
    ("Pacific/Apia", W.HOUR, utc(2011, 12, 29), utc(2011, 12, 31, 12)),
    ("Pacific/Kwajalein", W.DAY, utc(1993, 8, 10), utc(1993, 9, 10)),  # skipped a day
    ("America/Sitka", W.DAY, utc(1867, 10, 1), utc(1867, 11, 1)),  # went back a day
    ("America/Sitka", W.MONTH, utc(1866, 1, 1), utc(1869, 1, 1)),
    ("Europe/Amsterdam", W.MINUTE, utc(1930, 1, 1, 0, 0, 5), utc(1930, 1, 2)),  # +00:19:32
    ("UTC", W.DAY, utc(2024, 2, 28, 6), utc(2024, 3, 1, 6)),
    ("UTC", W.MONTH, utc(2023, 11, 15), utc(2024, 3, 1)),
    ("Europe/Berlin", W.MONTH, utc(1900, 1, 1), utc(2100, 1, 1)),
    ("America/New_York", W.MONTH, utc(2024, 1, 31, 23), utc(2024, 3, 1, 5)),
]


@pytest.mark.parametrize(("zone", "size", "start", "end"), CASES)
def test_count_bounds_the_built_windows(
    zone: str, size: WindowSize, start: datetime, end: datetime
) -> None:
    assert_bounds(start, end, size, zone)


@pytest.mark.parametrize("size", [W.MINUTE, W.HOUR])
def test_minute_and_hour_counts_are_exact_where_the_offset_holds(size: WindowSize) -> None:
    start = utc(2024, 5, 1, 0, 0, 17)
    for zone in ("UTC", "Asia/Kolkata", "Europe/Berlin"):  # Berlin: no change in May
        count = window_count(start, start + 3 * DAY, size, zone)
        assert count.fewest == count.most == len(windows(start, start + 3 * DAY, size, zone))


def test_day_and_month_bounds_are_close() -> None:
    count = window_count(utc(1900, 1, 1), utc(2100, 1, 1), W.MONTH, "Europe/Berlin")
    assert count.most - count.fewest <= 3
    count = window_count(utc(2000, 1, 1), utc(2030, 1, 1), W.DAY, "America/New_York")
    assert count.most - count.fewest <= 6


SIZES_AND_SPANS = {
    W.MINUTE: timedelta(days=3),
    W.HOUR: timedelta(days=200),
    W.DAY: timedelta(days=800),
    W.MONTH: timedelta(days=9000),
}


@settings(max_examples=150, deadline=None)
@given(
    zone=st.sampled_from(
        [
            "UTC",
            "Europe/Berlin",
            "Europe/London",
            "America/New_York",
            "America/Havana",
            "America/Santiago",
            "Australia/Lord_Howe",
            "Africa/Casablanca",
            "Asia/Tehran",
            "Pacific/Apia",
            "Antarctica/Troll",
            "America/St_Johns",
            "Asia/Gaza",
        ]
    ),
    size=st.sampled_from(list(SIZES_AND_SPANS)),
    start=st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2080, 1, 1), timezones=st.just(UTC)
    ),
    fraction=st.floats(min_value=0, max_value=1),
)
def test_count_bounds_hold_anywhere(
    zone: str, size: WindowSize, start: datetime, fraction: float
) -> None:
    assert_bounds(start, start + SIZES_AND_SPANS[size] * fraction, size, zone)


def test_windows_stop_one_past_the_limit() -> None:
    start = utc(2024, 1, 1)
    assert len(windows(start, start + 10 * DAY, W.HOUR, "Europe/Berlin", limit=7)) == 8
    assert len(windows(start, start + 10 * DAY, W.MONTH, "UTC", limit=0)) == 1
    whole = windows(start, start + 10 * H, W.HOUR, "UTC", limit=10)
    assert whole == windows(start, start + 10 * H, W.HOUR, "UTC")
    assert len(whole) == 10


def _plan(start: datetime, end: datetime, size: WindowSize, zone: str = "", **extra: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "customer_id": "",
        "start": start,
        "end": end,
        "window_size": size,
        "time_zone": zone,
        "group_by": (),
        "group_filter": {},
    }
    args.update(extra)
    return plan_query(["region"], **args)  # type: ignore[arg-type]


def test_the_measured_200000_minute_query_is_refused_before_any_window_is_built() -> None:
    # The case: 138.8 days of minutes took 12.2 s of CPU to refuse.
    start = utc(2024, 1, 1)
    begin = time.process_time()
    with pytest.raises(ResourceExhausted) as info:
        _plan(start, start + 200_000 * MINUTE, W.MINUTE, "UTC")
    spent = time.process_time() - begin
    print(f"refusing 200,000 minute windows: {spent * 1000:.2f} ms of CPU")
    assert str(info.value) == (
        "window_size: the range holds 200,000 WINDOW_SIZE_MINUTE windows; at most 100,000 per query"
    )
    assert spent < 0.5  # was 12.2 s; ~0.2 ms here
    # Across Berlin's March change the count has a margin of 2 windows either way.
    with pytest.raises(ResourceExhausted, match=r"holds at least 199,998 WINDOW_SIZE_MINUTE"):
        _plan(start, start + 200_000 * MINUTE, W.MINUTE, "Europe/Berlin")
    # The largest range datetime allows, in minutes: refused as cheaply.
    with pytest.raises(ResourceExhausted, match=r"^window_size: the range holds at least "):
        _plan(utc(2, 1, 1), utc(9999, 1, 1), W.MINUTE, "America/New_York")


def test_the_limit_is_exact_near_it() -> None:
    start = utc(2024, 5, 1)
    plan = _plan(start, start + MAX_WINDOWS * MINUTE, W.MINUTE, "UTC")
    assert len(plan.windows) == MAX_WINDOWS
    with pytest.raises(ResourceExhausted, match=r"holds 100,001 WINDOW_SIZE_MINUTE windows"):
        _plan(start, start + (MAX_WINDOWS + 1) * MINUTE, W.MINUTE, "UTC")
    # Hours in Berlin: the arithmetic leaves a margin (2 per DST change); windows are
    # then built, at most one past the limit, to decide exactly.
    berlin = windows(start, start + (MAX_WINDOWS + 30) * H, W.HOUR, "Europe/Berlin")
    last = berlin[MAX_WINDOWS - 1][1]
    assert len(_plan(start, last, W.HOUR, "Europe/Berlin").windows) == MAX_WINDOWS
    with pytest.raises(ResourceExhausted, match=r"more than 100,000 WINDOW_SIZE_HOUR"):
        _plan(start, last + timedelta(seconds=1), W.HOUR, "Europe/Berlin")


@pytest.mark.parametrize(
    ("size", "zone", "start"),
    [
        (W.MINUTE, "Europe/Berlin", utc(2024, 1, 1)),
        (W.HOUR, "Australia/Lord_Howe", utc(2000, 1, 1)),
        (W.DAY, "America/New_York", utc(1800, 1, 1)),
        (W.MONTH, "Europe/Berlin", utc(100, 1, 1)),
    ],
)
def test_the_largest_allowed_query_plans_quickly(
    size: WindowSize, zone: str, start: datetime
) -> None:
    span = {W.MINUTE: MINUTE, W.HOUR: H, W.DAY: DAY, W.MONTH: timedelta(days=30)}[size]
    end = start + (MAX_WINDOWS - 100) * span
    begin = time.process_time()
    plan = _plan(start, end, size, zone)
    spent = time.process_time() - begin
    print(f"planning {len(plan.windows):,} {size.name} windows in {zone}: {spent * 1000:.0f} ms")
    assert len(plan.windows) > MAX_WINDOWS * 0.9
    assert spent < 5  # ~30 ms (MINUTE) to ~0.5 s (MONTH) on an idle core


def test_group_by_and_group_filter_are_counted_first() -> None:
    start = utc(2024, 1, 1)
    many = [f"k{i}" for i in range(100_000)]
    with pytest.raises(InvalidArgument, match=r"^group_by: at most 10 keys"):
        _plan(start, start + H, W.NONE, group_by=many)
    with pytest.raises(InvalidArgument, match=r"^group_filter: at most 10 entries"):
        _plan(start, start + H, W.NONE, group_filter=dict.fromkeys(many, "x"))
    assert _plan(start, start + H, W.NONE, group_by=["region"]).group_by == ("region",)


# --- filter sizes ----------------------------------------------------------------------


def _or(n: int, operator: Operator = Operator.EQUALS) -> Filter:
    return Filter(Conjunction.OR, tuple(Condition(f"k{i}", operator, f"v{i}") for i in range(n)))


def _proto_or(n: int) -> meter_pb2.Filter:
    message = meter_pb2.Filter(conjunction=meter_pb2.CONJUNCTION_OR)
    for i in range(n):
        message.conditions.add(
            key="region",
            operator=meter_pb2.OPERATOR_EQUALS,
            value=value_pb2.Value(string_value=f"r{i}"),
        )
    return message


def test_the_measured_20000_condition_filter_is_refused_cheaply() -> None:
    message = _proto_or(20_000)
    begin = time.process_time()
    with pytest.raises(InvalidArgument) as info:
        check_filter_size(message)
    spent = time.process_time() - begin
    assert str(info.value) == (
        "filter.conditions: at most 100 conditions in a filter, nested filters included"
    )
    assert spent < 0.05  # no condition is looked at
    with pytest.raises(InvalidArgument, match=r"^filter\.conditions: at most 100"):
        validate_filter(_or(20_000))


def test_filter_size_limits_at_and_over() -> None:
    validate_filter(_or(MAX_FILTER_CONDITIONS))
    check_filter_size(_proto_or(MAX_FILTER_CONDITIONS))
    # Conditions count across levels: 60 at the top and 41 nested is one too many.
    nested = Filter(conditions=_or(60).conditions, filters=(_or(40), _or(1)))
    validate_filter(Filter(conditions=_or(59).conditions, filters=(_or(40), _or(1))))
    with pytest.raises(InvalidArgument, match=r"^filter\.filters\[1\]\.conditions: at most 100"):
        validate_filter(nested)

    values = tuple(f"v{i}" for i in range(MAX_LIST_VALUES))
    validate_filter(Filter(conditions=(Condition("k", Operator.IN, values=values),)))
    with pytest.raises(InvalidArgument, match=r"^filter\.conditions\[1\]\.values: at most 100"):
        validate_filter(
            Filter(
                conditions=(
                    Condition("k", Operator.EXISTS),
                    Condition("k", Operator.NOT_IN, values=(*values, "x")),
                )
            )
        )
    message = meter_pb2.Filter()
    message.conditions.add(key="k", operator=meter_pb2.OPERATOR_IN).values.extend(
        value_pb2.Value(int_value=i) for i in range(5_000)
    )
    with pytest.raises(InvalidArgument, match=r"^filter\.conditions\[0\]\.values: at most 100"):
        check_filter_size(message)

    empty = Filter(Conjunction.AND)
    validate_filter(Filter(filters=(empty,) * MAX_NESTED_FILTERS))
    with pytest.raises(InvalidArgument, match=r"^filter\.filters: at most 20 nested filters"):
        validate_filter(Filter(filters=(empty,) * (MAX_NESTED_FILTERS + 1)))
    with pytest.raises(InvalidArgument, match=r"^filter\.filters: at most 20"):
        check_filter_size(meter_pb2.Filter(filters=[meter_pb2.Filter()] * 10_000))
    deep = meter_pb2.Filter(
        filters=[meter_pb2.Filter(filters=[meter_pb2.Filter(filters=[meter_pb2.Filter()])])]
    )
    with pytest.raises(
        InvalidArgument, match=r"^filter\.filters\[0\]\.filters\[0\]\.filters\[0\]: "
    ):
        check_filter_size(deep)

    with pytest.raises(InvalidArgument, match=r"^filter\.conditions\[0\]\.key: at most 100"):
        check_filter_size(Filter(conditions=(Condition("k" * 101, Operator.EXISTS),)))


def test_the_largest_allowed_filter_is_cheap_per_event() -> None:
    # 100 conditions of 100 numbers each, against a numeric string that matches none:
    # was ~18 ms per event per meter before EQUALS/IN became set look-ups.
    numbers = tuple(Decimal(i) for i in range(MAX_LIST_VALUES))
    f = Filter(
        Conjunction.OR,
        tuple(Condition("k", Operator.IN, values=numbers) for _ in range(MAX_FILTER_CONDITIONS)),
    )
    # Within the count limits, over MAX_FILTER_BYTES (80 KB of numbers): an upper
    # bound on what any allowed filter costs per event.
    with pytest.raises(InvalidArgument, match=r"^filter: at most 16384 bytes"):
        validate_filter(f)
    from services.meter.domain.filters import matches

    metadata: dict[str, MetaValue] = {"k": "1000.5"}
    assert not matches(f, metadata)
    begin = time.process_time()
    for _ in range(100):
        matches(f, metadata)
    per_event = (time.process_time() - begin) / 100
    print(f"largest allowed filter: {per_event * 1e6:.0f} us per event")
    assert per_event < 0.005


VALUES = st.one_of(
    st.booleans(),
    st.sampled_from(["1", "1.0", "01", "1e0", "-0", "0", "0e-20000", "abc", "", "true", "1e400"]),
    st.text(max_size=3),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, max_value=10, min_value=-10),
    st.sampled_from([Decimal("1"), Decimal("1.00"), Decimal("0E-20000"), Decimal("1E+400")]),
)


@settings(max_examples=300, deadline=None)
@given(actual=VALUES, listed=st.lists(VALUES, min_size=1, max_size=5))
def test_list_lookup_decides_like_same(actual: MetaValue, listed: list[MetaValue]) -> None:
    expected = any(_same(actual, v) for v in listed)
    assert _ListLookup.of(tuple(listed)).holds(actual) == expected
    single = Filter(conditions=(Condition("k", Operator.EQUALS, listed[0]),))
    from services.meter.domain.filters import matches

    assert matches(single, {"k": actual}) == _same(actual, listed[0])


# --- quotas ---------------------------------------------------------------------------------


def test_meter_quotas_name_the_quota_and_the_setting() -> None:
    quotas = MeterQuotas(per_tenant=100, per_event=20)
    check_meter_quotas(quotas, 99, 19, "api.call")
    with pytest.raises(ResourceExhausted) as info:
        check_meter_quotas(quotas, 100, 0, "api.call")
    assert "USAGEBILLING_MAX_METERS_PER_TENANT = 100" in str(info.value)
    assert str(info.value).startswith("meters: the tenant has 100 active meters")
    with pytest.raises(ResourceExhausted) as info:
        check_meter_quotas(quotas, 20, 20, "api.call")
    assert str(info.value).startswith("event_name: 20 active meters already count 'api.call'")
    assert "USAGEBILLING_MAX_METERS_PER_EVENT = 20" in str(info.value)
    check_meter_quotas(quotas, 5, 5, "e", conditions=150, new_conditions=50)
    with pytest.raises(ResourceExhausted) as info:
        check_meter_quotas(quotas, 5, 5, "e", conditions=150, new_conditions=51)
    assert str(info.value).startswith(
        "filter: the active meters on 'e' would check 201 filter conditions per event"
    )
    assert "USAGEBILLING_MAX_FILTER_CONDITIONS_PER_EVENT = 200" in str(info.value)


def test_condition_count_takes_nested_filters_and_protobuf() -> None:
    f = Filter(conditions=_or(3).conditions, filters=(_or(4), Filter(filters=(_or(5),))))
    assert condition_count(f) == 12
    assert condition_count(None) == 0
    assert condition_count(_proto_or(7)) == 7


@pytest.mark.parametrize("size", [W.MINUTE, W.HOUR, W.DAY, W.MONTH])
def test_planning_at_the_ends_of_time(size: WindowSize) -> None:
    for start, end in (
        (utc(2, 1, 1), utc(2, 1, 1, 0, 30)),
        (utc(9998, 12, 31, 23, 30), utc(9999, 1, 1)),
    ):
        plan = _plan(start, end, size, "Pacific/Kiritimati")
        assert plan.windows[0][0] == start and plan.windows[-1][1] == end
