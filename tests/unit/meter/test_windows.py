import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import InvalidArgument
from services.meter.domain.windows import (
    WindowSize,
    clip,
    validate_time_zone,
    window_of,
    windows,
)

W = WindowSize
H = timedelta(hours=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


def lengths(ws: list[tuple[datetime, datetime]]) -> list[timedelta]:
    return [b - a for a, b in ws]


# --- time zones -------------------------------------------------------------------------


def test_validate_time_zone() -> None:
    assert validate_time_zone("") == ZoneInfo("UTC")
    assert validate_time_zone("Europe/Berlin") == ZoneInfo("Europe/Berlin")


@pytest.mark.parametrize(
    "name",
    ["Mars/Olympus", "europe/berlin ", "America", "../etc/passwd", "/etc/localtime", "localtime"],
)
def test_unknown_time_zones_are_rejected(name: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^tz: unknown time zone"):
        validate_time_zone(name, field="tz")
    with pytest.raises(InvalidArgument, match=r"^time_zone: unknown time zone"):
        windows(utc(2024, 1, 1), utc(2024, 1, 2), W.DAY, name)


# --- UTC ----------------------------------------------------------------------------------


def test_none_is_the_whole_range() -> None:
    start, end = utc(2024, 1, 1, 0, 0, 7), utc(2024, 2, 3, 4, 5, 6)
    assert windows(start, end, W.NONE, "") == [(start, end)]
    assert windows(start, start, W.NONE, "") == [(start, start)]


def test_empty_and_reversed_ranges() -> None:
    assert windows(utc(2024, 1, 1), utc(2024, 1, 1), W.HOUR, "UTC") == []
    with pytest.raises(InvalidArgument, match=r"^end_time:"):
        windows(utc(2024, 1, 2), utc(2024, 1, 1), W.HOUR, "UTC")


def test_utc_minutes() -> None:
    ws = windows(utc(2024, 1, 1, 10, 0, 30), utc(2024, 1, 1, 10, 3), W.MINUTE, "UTC")
    assert ws == [
        (utc(2024, 1, 1, 10, 0, 30), utc(2024, 1, 1, 10, 1)),
        (utc(2024, 1, 1, 10, 1), utc(2024, 1, 1, 10, 2)),
        (utc(2024, 1, 1, 10, 2), utc(2024, 1, 1, 10, 3)),
    ]


def test_utc_hours_clipped_to_the_second() -> None:
    ws = windows(utc(2024, 1, 1, 10, 15, 1), utc(2024, 1, 1, 12, 59, 59), W.HOUR, "")
    assert ws == [
        (utc(2024, 1, 1, 10, 15, 1), utc(2024, 1, 1, 11)),
        (utc(2024, 1, 1, 11), utc(2024, 1, 1, 12)),
        (utc(2024, 1, 1, 12), utc(2024, 1, 1, 12, 59, 59)),
    ]


def test_utc_days() -> None:
    ws = windows(utc(2024, 2, 28, 6), utc(2024, 3, 1, 6), W.DAY, "UTC")
    assert ws == [
        (utc(2024, 2, 28, 6), utc(2024, 2, 29)),
        (utc(2024, 2, 29), utc(2024, 3, 1)),
        (utc(2024, 3, 1), utc(2024, 3, 1, 6)),
    ]


def test_utc_months() -> None:
    ws = windows(utc(2023, 11, 15), utc(2024, 3, 1), W.MONTH, "UTC")
    assert [a for a, _ in ws] == [
        utc(2023, 11, 15),
        utc(2023, 12, 1),
        utc(2024, 1, 1),
        utc(2024, 2, 1),
    ]
    assert ws[-1][1] == utc(2024, 3, 1)
    assert lengths(ws)[2:] == [timedelta(days=31), timedelta(days=29)]


def test_window_of_utc() -> None:
    ts = utc(2024, 7, 4, 13, 45, 12, 5)
    assert window_of(ts, W.MINUTE, "") == (utc(2024, 7, 4, 13, 45), utc(2024, 7, 4, 13, 46))
    assert window_of(ts, W.HOUR, "") == (utc(2024, 7, 4, 13), utc(2024, 7, 4, 14))
    assert window_of(ts, W.DAY, "") == (utc(2024, 7, 4), utc(2024, 7, 5))
    assert window_of(ts, W.MONTH, "") == (utc(2024, 7, 1), utc(2024, 8, 1))
    assert window_of(utc(2024, 12, 31, 23), W.MONTH, "") == (utc(2024, 12, 1), utc(2025, 1, 1))
    # A window includes its start and excludes its end.
    assert window_of(utc(2024, 7, 4, 14), W.HOUR, "")[0] == utc(2024, 7, 4, 14)
    with pytest.raises(ValueError):
        window_of(ts, W.NONE, "")


def test_naive_datetimes_are_a_bug() -> None:
    with pytest.raises(ValueError):
        window_of(datetime(2024, 1, 1), W.HOUR, "UTC")
    with pytest.raises(ValueError):
        windows(datetime(2024, 1, 1), utc(2024, 1, 2), W.HOUR, "UTC")


def test_returns_utc_whatever_the_input_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = datetime(2024, 1, 1, 12, tzinfo=berlin)
    [(a, b)] = windows(start, start + H, W.NONE, "Europe/Berlin")
    assert a.tzinfo is UTC and b.tzinfo is UTC
    assert a == utc(2024, 1, 1, 11)


def test_clip() -> None:
    window = (utc(2024, 1, 1), utc(2024, 1, 2))
    assert clip(window, utc(2024, 1, 1, 5), utc(2024, 1, 3)) == (
        utc(2024, 1, 1, 5),
        utc(2024, 1, 2),
    )


# --- DST and odd offsets ----------------------------------------------------------------------


def test_berlin_spring_day_has_23_hours() -> None:
    ws = windows(utc(2024, 3, 30, 23), utc(2024, 4, 1, 22), W.DAY, "Europe/Berlin")
    assert ws == [
        (utc(2024, 3, 30, 23), utc(2024, 3, 31, 22)),  # 00:00 CET .. 00:00 CEST
        (utc(2024, 3, 31, 22), utc(2024, 4, 1, 22)),
    ]
    assert lengths(ws) == [23 * H, 24 * H]


def test_berlin_autumn_day_has_25_hours() -> None:
    assert window_of(utc(2024, 10, 27, 12), W.DAY, "Europe/Berlin") == (
        utc(2024, 10, 26, 22),
        utc(2024, 10, 27, 23),
    )


def test_berlin_hours_across_dst_stay_one_hour() -> None:
    spring = windows(utc(2024, 3, 30, 23), utc(2024, 3, 31, 3), W.HOUR, "Europe/Berlin")
    assert [a for a, _ in spring] == [utc(2024, 3, 30, 23 + i) for i in range(1)] + [
        utc(2024, 3, 31, i) for i in range(3)
    ]
    assert lengths(spring) == [H] * 4
    # Autumn: 02:00-03:00 local happens twice; each occurrence is its own window.
    autumn = windows(utc(2024, 10, 26, 23), utc(2024, 10, 27, 3), W.HOUR, "Europe/Berlin")
    assert [a for a, _ in autumn] == [utc(2024, 10, 26, 23)] + [
        utc(2024, 10, 27, i) for i in range(3)
    ]
    assert lengths(autumn) == [H] * 4


def test_new_york_months() -> None:
    ws = windows(utc(2024, 2, 1, 5), utc(2024, 12, 1, 5), W.MONTH, "America/New_York")
    assert [a for a, _ in ws][:4] == [
        utc(2024, 2, 1, 5),  # EST
        utc(2024, 3, 1, 5),  # EST: DST starts on 10 March
        utc(2024, 4, 1, 4),  # EDT
        utc(2024, 5, 1, 4),
    ]
    assert ws[9] == (utc(2024, 11, 1, 4), utc(2024, 12, 1, 5))  # DST ends on 3 November
    assert lengths(ws)[1] == timedelta(days=31) - H  # March
    assert lengths(ws)[9] == timedelta(days=30) + H  # November


def test_kolkata_hours_start_at_half_past_utc() -> None:
    ws = windows(utc(2024, 1, 1, 9, 10, 5), utc(2024, 1, 1, 11), W.HOUR, "Asia/Kolkata")
    assert ws == [
        (utc(2024, 1, 1, 9, 10, 5), utc(2024, 1, 1, 9, 30)),  # 14:40:05 .. 15:00 IST
        (utc(2024, 1, 1, 9, 30), utc(2024, 1, 1, 10, 30)),
        (utc(2024, 1, 1, 10, 30), utc(2024, 1, 1, 11)),
    ]
    assert window_of(utc(2024, 1, 1, 18, 29, 59), W.DAY, "Asia/Kolkata") == (
        utc(2023, 12, 31, 18, 30),
        utc(2024, 1, 1, 18, 30),
    )


def test_lord_howe_half_hour_dst_shift() -> None:
    # 2024-10-06 02:00 local (+10:30) jumps to 02:30 (+11): the "02" hour is 30 minutes.
    ws = windows(utc(2024, 10, 5, 14, 30), utc(2024, 10, 5, 17), W.HOUR, "Australia/Lord_Howe")
    assert ws == [
        (utc(2024, 10, 5, 14, 30), utc(2024, 10, 5, 15, 30)),
        (utc(2024, 10, 5, 15, 30), utc(2024, 10, 5, 16)),
        (utc(2024, 10, 5, 16), utc(2024, 10, 5, 17)),
    ]


def test_havana_day_without_a_midnight_starts_after_the_gap() -> None:
    # 2024-03-10 00:00 local does not exist (the clock goes 23:59:59 -> 01:00).
    assert window_of(utc(2024, 3, 10, 12), W.DAY, "America/Havana") == (
        utc(2024, 3, 10, 5),
        utc(2024, 3, 11, 4),
    )
    # 2024-11-03 01:00 CDT -> 00:00 CST: midnight happens twice; the day starts at the first.
    assert window_of(utc(2024, 11, 3, 12), W.DAY, "America/Havana") == (
        utc(2024, 11, 3, 4),
        utc(2024, 11, 4, 5),
    )


# --- properties -------------------------------------------------------------------------------

ZONES = sorted(available_timezones() - {"localtime", "posixrules"})
SPANS = {
    W.MINUTE: timedelta(hours=3),
    W.HOUR: timedelta(days=3),
    W.DAY: timedelta(days=70),
    W.MONTH: timedelta(days=800),
}


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(["", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata", *ZONES]),
    size=st.sampled_from(list(SPANS)),
    start=st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    fraction=st.floats(min_value=0, max_value=1),
)
def test_windows_partition_the_range(
    zone: str, size: WindowSize, start: datetime, fraction: float
) -> None:
    end = start + SPANS[size] * fraction
    ws = windows(start, end, size, zone)
    if start == end:
        assert ws == []
        return
    assert ws[0][0] == start
    assert ws[-1][1] == end
    for (_, b), (c, _) in itertools.pairwise(ws):
        assert b == c  # no gap, no overlap
    tz = validate_time_zone(zone)
    for a, b in ws:
        assert a < b
        assert clip(window_of(a, size, zone), start, end) == (a, b)
        if a != start:
            # An interior start is a round local time, or the instant a transition
            # skipped one.
            local = a.astimezone(tz)
            round_ = local.second == 0 and local.microsecond == 0
            if size is not W.MINUTE:
                round_ = round_ and local.minute == 0
            if size in (W.DAY, W.MONTH):
                round_ = round_ and local.hour == 0
            if size is W.MONTH:
                round_ = round_ and local.day == 1
            before = a - timedelta(microseconds=1)
            assert round_ or before.astimezone(tz).utcoffset() != local.utcoffset()


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    size=st.sampled_from(list(SPANS)),
    ts=st.datetimes(
        min_value=datetime(1950, 1, 1), max_value=datetime(2060, 1, 1), timezones=st.just(UTC)
    ),
)
def test_window_of_holds_the_instant(zone: str, size: WindowSize, ts: datetime) -> None:
    a, b = window_of(ts, size, zone)
    assert a <= ts < b
    assert window_of(a, size, zone) == (a, b)
    assert window_of(b - timedelta(microseconds=1), size, zone) == (a, b)
    if size is W.DAY:
        # A day is at most 24 hours plus the largest DST shift anywhere (2 h, Troll).
        assert b - a <= 26 * H


@given(
    # No DST since 2000 in any of these; Kathmandu is +05:45.
    zone=st.sampled_from(["UTC", "Asia/Kolkata", "Asia/Kathmandu", "Etc/GMT-1", "Etc/GMT+11"]),
    ts=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
)
def test_fixed_offset_zones_have_exact_hours(zone: str, ts: datetime) -> None:
    a, b = window_of(ts, W.HOUR, zone)
    assert b - a == H
    local = a.astimezone(ZoneInfo(zone))
    assert (local.minute, local.second, local.microsecond) == (0, 0, 0)
