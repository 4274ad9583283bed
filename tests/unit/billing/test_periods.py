from datetime import UTC, date, datetime, timedelta, timezone
from fractions import Fraction
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.billing.domain.periods import (
    MAX_START_OFFSET,
    Interval,
    cancellation_end,
    check_as_of,
    check_start,
    period_containing,
    period_share,
    period_start,
    periods_ended,
    proration,
)
from services.common.errors import InvalidArgument


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


# --- period_start ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "starts"),
    [
        # Leap year: Jan 31 -> Feb 29 -> Mar 31 -> Apr 30 -> May 31, never stuck on the 29th.
        (
            utc(2024, 1, 31, 10, 30),
            [(2024, 1, 31), (2024, 2, 29), (2024, 3, 31), (2024, 4, 30), (2024, 5, 31)],
        ),
        # Non-leap year: Feb 28, then back to the 31st.
        (utc(2023, 1, 31, 10, 30), [(2023, 1, 31), (2023, 2, 28), (2023, 3, 31), (2023, 4, 30)]),
        (utc(2023, 1, 30, 10, 30), [(2023, 1, 30), (2023, 2, 28), (2023, 3, 30)]),
        # Across a year end.
        (utc(2023, 11, 30, 10, 30), [(2023, 11, 30), (2023, 12, 30), (2024, 1, 30), (2024, 2, 29)]),
    ],
)
def test_month_end_anchors_do_not_drift(
    anchor: datetime, starts: list[tuple[int, int, int]]
) -> None:
    got = [period_start(anchor, Interval.MONTH, n) for n in range(len(starts))]
    assert got == [utc(*ymd, 10, 30) for ymd in starts]


def test_month_backwards() -> None:
    assert period_start(utc(2024, 3, 31), Interval.MONTH, -1) == utc(2024, 2, 29)
    assert period_start(utc(2024, 1, 15), Interval.MONTH, -13) == utc(2022, 12, 15)


def test_year_from_february_29() -> None:
    anchor = utc(2024, 2, 29, 8)
    got = [period_start(anchor, Interval.YEAR, n) for n in range(5)]
    assert got == [
        utc(2024, 2, 29, 8),
        utc(2025, 2, 28, 8),
        utc(2026, 2, 28, 8),
        utc(2027, 2, 28, 8),
        utc(2028, 2, 29, 8),  # computed from the anchor: back to the 29th
    ]


@pytest.mark.parametrize(
    ("interval", "n", "expected"),
    [
        (Interval.DAY, 0, utc(2024, 1, 1, 23, 59, 59)),
        (Interval.DAY, 1, utc(2024, 1, 2, 23, 59, 59)),
        (Interval.DAY, 366, utc(2025, 1, 1, 23, 59, 59)),  # 2024 has 366 days
        (Interval.WEEK, 2, utc(2024, 1, 15, 23, 59, 59)),
        (Interval.MONTH, 1, utc(2024, 2, 1, 23, 59, 59)),
        (Interval.YEAR, 1, utc(2025, 1, 1, 23, 59, 59)),
    ],
)
def test_each_interval_keeps_the_time_of_day(
    interval: Interval, n: int, expected: datetime
) -> None:
    assert period_start(utc(2024, 1, 1, 23, 59, 59), interval, n) == expected


def test_times_must_be_utc() -> None:
    with pytest.raises(ValueError):
        period_start(datetime(2024, 1, 1), Interval.DAY, 1)
    with pytest.raises(ValueError):
        period_start(datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))), Interval.DAY, 1)
    # Any zero-offset tzinfo is UTC.
    zero = datetime(2024, 1, 1, tzinfo=timezone(timedelta(0)))
    assert period_start(zero, Interval.DAY, 1) == utc(2024, 1, 2)


# --- period_containing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "interval", "at", "expected"),
    [
        # [start, end): the start belongs to the period, the end to the next.
        (
            utc(2024, 1, 31, 10),
            Interval.MONTH,
            utc(2024, 1, 31, 10),
            (utc(2024, 1, 31, 10), utc(2024, 2, 29, 10), 0),
        ),
        (
            utc(2024, 1, 31, 10),
            Interval.MONTH,
            utc(2024, 2, 29, 9, 59),
            (utc(2024, 1, 31, 10), utc(2024, 2, 29, 10), 0),
        ),
        (
            utc(2024, 1, 31, 10),
            Interval.MONTH,
            utc(2024, 2, 29, 10),
            (utc(2024, 2, 29, 10), utc(2024, 3, 31, 10), 1),
        ),
        (
            utc(2024, 1, 15),
            Interval.MONTH,
            utc(2024, 5, 10),
            (utc(2024, 4, 15), utc(2024, 5, 15), 3),
        ),
        (
            utc(2024, 2, 29),
            Interval.YEAR,
            utc(2025, 3, 1),
            (utc(2025, 2, 28), utc(2026, 2, 28), 1),
        ),
        (
            utc(2024, 1, 1, 12),
            Interval.WEEK,
            utc(2024, 1, 15, 11),
            (utc(2024, 1, 8, 12), utc(2024, 1, 15, 12), 1),
        ),
        (
            utc(2024, 1, 1, 12),
            Interval.DAY,
            utc(2023, 12, 31, 13),  # before the anchor: period -1
            (utc(2023, 12, 31, 12), utc(2024, 1, 1, 12), -1),
        ),
    ],
)
def test_period_containing(
    anchor: datetime,
    interval: Interval,
    at: datetime,
    expected: tuple[datetime, datetime, int],
) -> None:
    assert period_containing(anchor, interval, at) == expected


def test_day_periods_over_decades_are_computed_directly() -> None:
    anchor = utc(2000, 1, 1, 6)
    start, end, n = period_containing(anchor, Interval.DAY, utc(9000, 6, 15, 12))
    assert n == (date(9000, 6, 15) - date(2000, 1, 1)).days
    assert (start, end) == (utc(9000, 6, 15, 6), utc(9000, 6, 16, 6))


times = st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda d: d.replace(tzinfo=UTC)
)


@given(times, times, st.sampled_from(Interval))
def test_the_containing_period_contains(anchor: datetime, at: datetime, interval: Interval) -> None:
    start, end, n = period_containing(anchor, interval, at)
    assert start <= at < end
    assert start == period_start(anchor, interval, n)
    assert end == period_start(anchor, interval, n + 1)


@given(times, st.integers(min_value=-240, max_value=240))
def test_month_starts_keep_the_anchor_day_when_the_month_has_it(anchor: datetime, n: int) -> None:
    start = period_start(anchor, Interval.MONTH, n)
    if start.day != anchor.day:
        # Only clamping changes the day: to the last day of a shorter month.
        assert start.day < anchor.day
        assert (start + timedelta(days=1)).day == 1
    assert start.time() == anchor.time()


# --- periods_ended -------------------------------------------------------------


ANCHOR = utc(2024, 1, 15, 10)


def test_periods_ended_lists_full_periods_only() -> None:
    # Mar 15 10:00 - Apr 15 10:00 has not ended at Apr 15 00:00.
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2024, 4, 15)) == [
        (utc(2024, 1, 15, 10), utc(2024, 2, 15, 10)),
        (utc(2024, 2, 15, 10), utc(2024, 3, 15, 10)),
    ]
    # ... and has at 10:00 (end <= as_of).
    assert len(periods_ended(ANCHOR, Interval.MONTH, utc(2024, 4, 15, 10))) == 3


def test_periods_ended_before_anything_ended() -> None:
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2024, 2, 15, 9)) == []
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2023, 1, 1)) == []


def test_cancellation_cuts_the_last_period() -> None:
    until = utc(2024, 3, 20)
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2024, 6, 1), until) == [
        (utc(2024, 1, 15, 10), utc(2024, 2, 15, 10)),
        (utc(2024, 2, 15, 10), utc(2024, 3, 15, 10)),
        (utc(2024, 3, 15, 10), until),  # cut, and nothing after it
    ]
    # Before `until` the cut period has not ended yet.
    assert len(periods_ended(ANCHOR, Interval.MONTH, utc(2024, 3, 19), until)) == 2


def test_cancellation_on_a_boundary_adds_no_empty_period() -> None:
    until = utc(2024, 3, 15, 10)
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2024, 6, 1), until) == [
        (utc(2024, 1, 15, 10), utc(2024, 2, 15, 10)),
        (utc(2024, 2, 15, 10), utc(2024, 3, 15, 10)),
    ]


def test_cancellation_inside_the_first_period() -> None:
    until = utc(2024, 1, 20)
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2024, 6, 1), until) == [(ANCHOR, until)]
    assert periods_ended(ANCHOR, Interval.MONTH, utc(2024, 6, 1), utc(2024, 1, 1)) == []


def test_since_skips_what_was_billed() -> None:
    as_of = utc(2024, 6, 1)
    from_boundary = periods_ended(ANCHOR, Interval.MONTH, as_of, since=utc(2024, 3, 15, 10))
    assert [s for s, _ in from_boundary] == [utc(2024, 3, 15, 10), utc(2024, 4, 15, 10)]
    # A `since` inside a period starts at the next one.
    inside = periods_ended(ANCHOR, Interval.MONTH, as_of, since=utc(2024, 3, 16))
    assert [s for s, _ in inside] == [utc(2024, 4, 15, 10)]
    # The cut period still comes when it starts at or after `since`.
    cut = periods_ended(
        ANCHOR, Interval.MONTH, as_of, until=utc(2024, 4, 20), since=utc(2024, 4, 15, 10)
    )
    assert cut == [(utc(2024, 4, 15, 10), utc(2024, 4, 20))]


def test_day_periods_over_years() -> None:
    periods = periods_ended(utc(2020, 1, 1), Interval.DAY, utc(2024, 1, 1))
    assert len(periods) == 366 + 365 + 365 + 365
    assert all(a[1] == b[0] for a, b in pairwise(periods))
    assert periods[-1] == (utc(2023, 12, 31), utc(2024, 1, 1))


# as_of and until within 12 years of the anchor: decades of DAY periods (tens of
# thousands) took seconds per example on a loaded machine and add nothing here
# (test_day_periods_over_years covers long runs).
offsets = st.timedeltas(min_value=timedelta(days=-400), max_value=timedelta(days=12 * 366))


@settings(deadline=None)
@given(times, offsets, st.sampled_from(Interval), st.none() | offsets)
def test_ended_periods_are_contiguous_and_ended(
    anchor: datetime, to_as_of: timedelta, interval: Interval, to_until: timedelta | None
) -> None:
    as_of = anchor + to_as_of
    until = None if to_until is None else anchor + to_until
    periods = periods_ended(anchor, interval, as_of, until)[-300:]
    assert all(a[1] == b[0] for a, b in pairwise(periods))
    for start, end in periods:
        assert anchor <= start < end <= as_of
        assert until is None or end <= until


# --- proration -----------------------------------------------------------------


def test_proration() -> None:
    start, end = utc(2024, 1, 1), utc(2024, 1, 31)
    assert proration(start, end, utc(2024, 1, 16)) == Fraction(1, 2)
    assert proration(start, end, utc(2024, 1, 6)) == Fraction(1, 6)
    assert proration(start, end, end) == 1
    assert proration(start, end, utc(2025, 1, 1)) == 1
    assert proration(start, end, utc(2023, 1, 1)) == 0
    with pytest.raises(ValueError):
        proration(end, start, start)


# --- the share of a period billed (a fixed fee's proration) ---------------------


@pytest.mark.parametrize(
    ("interval", "start", "end", "share"),
    [
        # A whole period, of any length, is the whole fee.
        (Interval.MONTH, utc(2024, 1, 15, 10), utc(2024, 2, 15, 10), Fraction(1)),
        (Interval.MONTH, utc(2024, 2, 15, 10), utc(2024, 3, 15, 10), Fraction(1)),  # 29 days
        (Interval.DAY, utc(2024, 3, 1, 10), utc(2024, 3, 2, 10), Fraction(1)),
        # Cut by a cancellation: 5 of February's 29 days (Feb 15 10:00 - Feb 20 10:00).
        (Interval.MONTH, utc(2024, 2, 15, 10), utc(2024, 2, 20, 10), Fraction(5, 29)),
        # 6 hours of a day; 3.5 days of a week.
        (Interval.DAY, utc(2024, 3, 1, 10), utc(2024, 3, 1, 16), Fraction(1, 4)),
        (Interval.WEEK, utc(2024, 1, 15, 10), utc(2024, 1, 18, 22), Fraction(1, 2)),
        # 2024 is a leap year: 183 of 366 days (Jan 15 10:00 - Jul 16 10:00).
        (Interval.YEAR, utc(2024, 1, 15, 10), utc(2024, 7, 16, 10), Fraction(1, 2)),
    ],
)
def test_period_share(interval: Interval, start: datetime, end: datetime, share: Fraction) -> None:
    assert period_share(ANCHOR, interval, start, end) == share


# --- cancellation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "now", "immediately", "end"),
    [
        # At the end of the period that contains now.
        (Interval.MONTH, utc(2024, 3, 20), False, utc(2024, 4, 15, 10)),
        (Interval.DAY, utc(2024, 3, 20, 9), False, utc(2024, 3, 20, 10)),
        (Interval.WEEK, utc(2024, 1, 23), False, utc(2024, 1, 29, 10)),
        # On a boundary, the period that starts there is the current one.
        (Interval.MONTH, utc(2024, 3, 15, 10), False, utc(2024, 4, 15, 10)),
        # Month-end anchors: the period ends on the anchor day (or the last day).
        (Interval.YEAR, utc(2025, 1, 1), False, utc(2025, 1, 15, 10)),
        # At once.
        (Interval.MONTH, utc(2024, 3, 20, 12, 34, 56), True, utc(2024, 3, 20, 12, 34, 56)),
        # Not started yet: at once means it never bills; at period end, the first period.
        (Interval.MONTH, utc(2024, 1, 1), True, ANCHOR),
        (Interval.MONTH, utc(2024, 1, 1), False, utc(2024, 2, 15, 10)),
    ],
)
def test_cancellation_end(
    interval: Interval, now: datetime, immediately: bool, end: datetime
) -> None:
    assert cancellation_end(ANCHOR, interval, now, immediately=immediately) == end


def test_a_second_cancellation_never_ends_later() -> None:
    already = utc(2024, 3, 20)  # canceled at once earlier
    later = cancellation_end(
        ANCHOR, Interval.MONTH, utc(2024, 3, 19), immediately=False, current_end=already
    )
    assert later == already
    # ... but at once ends earlier than the end of period set before.
    sooner = cancellation_end(
        ANCHOR, Interval.MONTH, utc(2024, 3, 18), immediately=True, current_end=utc(2024, 4, 15, 10)
    )
    assert sooner == utc(2024, 3, 18)


def test_end_of_period_cancellation_bills_that_period_whole_and_no_later_one() -> None:
    end = cancellation_end(ANCHOR, Interval.MONTH, utc(2024, 3, 20), immediately=False)
    periods = periods_ended(ANCHOR, Interval.MONTH, utc(2024, 9, 1), until=end)
    assert periods[-1] == (utc(2024, 3, 15, 10), utc(2024, 4, 15, 10))
    assert len(periods) == 3
    assert period_share(ANCHOR, Interval.MONTH, *periods[-1]) == 1


def test_immediate_cancellation_bills_the_part_served() -> None:
    end = cancellation_end(ANCHOR, Interval.MONTH, utc(2024, 3, 25, 10), immediately=True)
    periods = periods_ended(ANCHOR, Interval.MONTH, utc(2024, 9, 1), until=end)
    assert periods[-1] == (utc(2024, 3, 15, 10), utc(2024, 3, 25, 10))
    # 10 of the 31 days from Mar 15 10:00 to Apr 15 10:00.
    assert period_share(ANCHOR, Interval.MONTH, *periods[-1]) == Fraction(10, 31)


# --- a subscription's start -----------------------------------------------------


@pytest.mark.parametrize(
    "start",
    [utc(2024, 6, 1), utc(2019, 6, 1), utc(2029, 6, 1), utc(2024, 6, 1) - MAX_START_OFFSET],
)
def test_a_start_within_five_years_is_accepted(start: datetime) -> None:
    check_start(start, utc(2024, 6, 1))


@pytest.mark.parametrize(
    "start",
    [
        utc(1990, 1, 1),
        utc(2019, 5, 31),
        utc(2030, 1, 1),
        datetime(1, 1, 1, tzinfo=UTC),  # the ends of datetime's range
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ],
)
def test_a_start_further_away_is_refused_naming_the_field(start: datetime) -> None:
    with pytest.raises(InvalidArgument, match=r"^start_time: must be within 1827 days of now$"):
        check_start(start, utc(2024, 6, 1))


# --- the catch-up bound and as_of ------------------------------------------------


@settings(deadline=None)
@given(
    anchor=st.datetimes(min_value=datetime(2019, 1, 1), max_value=datetime(2024, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC)
    ),
    interval=st.sampled_from(list(Interval)),
    limit=st.integers(min_value=0, max_value=40),
    cancel_after=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
)
def test_limit_keeps_the_oldest_periods(
    anchor: datetime, interval: Interval, limit: int, cancel_after: int | None
) -> None:
    as_of = utc(2024, 6, 1)
    until = None if cancel_after is None else anchor + timedelta(days=cancel_after, hours=5)
    every = periods_ended(anchor, interval, as_of, until)
    assert periods_ended(anchor, interval, as_of, until, limit=limit) == every[:limit]


def test_a_limited_catch_up_takes_o_limit_time() -> None:
    # Five years of days, 31 at a time, from wherever the last run stopped.
    anchor = utc(2019, 6, 1, 3)
    since = None
    seen = []
    while batch := periods_ended(anchor, Interval.DAY, utc(2024, 6, 1), since=since, limit=31):
        assert len(batch) <= 31
        seen += batch
        since = batch[-1][1]
    assert seen == periods_ended(anchor, Interval.DAY, utc(2024, 6, 1))
    assert len(seen) == 1826
    with pytest.raises(ValueError):
        periods_ended(anchor, Interval.DAY, utc(2024, 6, 1), limit=-1)


@pytest.mark.parametrize(
    ("as_of", "message"),
    [
        (datetime(1, 1, 1, tzinfo=UTC), "as_of: must not be before 1970-01-01T00:00:00+00:00"),
        (utc(1969, 12, 31, 23, 59, 59), "as_of: must not be before 1970-01-01T00:00:00+00:00"),
        (utc(2024, 6, 1, 0, 0, 6), "as_of: must not be in the future"),
        (datetime(9999, 12, 31, tzinfo=UTC), "as_of: must not be in the future"),
    ],
)
def test_as_of_outside_its_range_is_refused_naming_it(as_of: datetime, message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_as_of(as_of, utc(2024, 6, 1), timedelta(seconds=5))
    assert str(caught.value) == message


@pytest.mark.parametrize("as_of", [utc(1970, 1, 1), utc(2024, 6, 1, 0, 0, 5), utc(2000, 1, 1)])
def test_as_of_inside_its_range_is_accepted(as_of: datetime) -> None:
    check_as_of(as_of, utc(2024, 6, 1), timedelta(seconds=5))
