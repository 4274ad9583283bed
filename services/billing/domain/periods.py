"""Billing periods anchored on a subscription's start.

Period n is [period_start(n), period_start(n + 1)). Every start is computed from
the anchor, never from the previous period, so month-end anchors do not drift:
Jan 31 -> Feb 28 (29) -> Mar 31 -> Apr 30. Times are timezone-aware UTC and keep
the anchor's time of day.
"""

from __future__ import annotations

import calendar
import enum
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Final

from services.common.errors import InvalidArgument


class Interval(enum.Enum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


# How far from now a subscription may start (about five years). Every period
# since the start is billed, so a start decades ago (a typo) would make the next
# cycle build thousands of invoices.
MAX_START_OFFSET: Final = timedelta(days=1827)
# The earliest instant a client may ask the billing cycle about. Nothing is
# billed before it, and it keeps `as_of - grace` and the period arithmetic far
# from datetime's year 1 (an OverflowError there would be an INTERNAL).
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)

_FIXED = {Interval.DAY: timedelta(days=1), Interval.WEEK: timedelta(weeks=1)}
_MONTHS = {Interval.MONTH: 1, Interval.YEAR: 12}


def _utc(value: datetime, name: str) -> datetime:
    # A naive or offset time would shift day boundaries silently.
    if value.tzinfo is None or value.utcoffset() != timedelta(0):
        raise ValueError(f"{name} must be a timezone-aware UTC datetime, got {value!r}")
    return value.astimezone(UTC)


def _add_months(anchor: datetime, months: int) -> datetime:
    year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + months, 12)
    last_day = calendar.monthrange(year, month0 + 1)[1]
    return anchor.replace(year=year, month=month0 + 1, day=min(anchor.day, last_day))


def period_start(anchor: datetime, interval: Interval, n: int) -> datetime:
    """The start of the n-th period; n = 0 is the anchor (n may be negative)."""
    anchor = _utc(anchor, "anchor")
    if interval in _FIXED:
        return anchor + _FIXED[interval] * n
    return _add_months(anchor, _MONTHS[interval] * n)


def _index(anchor: datetime, interval: Interval, at: datetime) -> int:
    """n such that period_start(n) <= at < period_start(n + 1), in O(1)."""
    if interval in _FIXED:
        return (at - anchor) // _FIXED[interval]
    step = _MONTHS[interval]
    # Whole calendar months apart is right to within one period; fix it up.
    n = ((at.year - anchor.year) * 12 + at.month - anchor.month) // step
    while period_start(anchor, interval, n) > at:
        n -= 1
    while period_start(anchor, interval, n + 1) <= at:
        n += 1
    return n


def period_containing(
    anchor: datetime, interval: Interval, at: datetime
) -> tuple[datetime, datetime, int]:
    """(start, end, n) of the period [start, end) that contains `at`."""
    anchor, at = _utc(anchor, "anchor"), _utc(at, "at")
    n = _index(anchor, interval, at)
    return period_start(anchor, interval, n), period_start(anchor, interval, n + 1), n


def periods_ended(
    anchor: datetime,
    interval: Interval,
    as_of: datetime,
    until: datetime | None = None,
    *,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[tuple[datetime, datetime]]:
    """Every period (start, end) whose end <= as_of, oldest first; at most
    `limit` of them (the oldest), built in O(limit) however far back the
    anchor lies.

    `until` (a cancellation's end) cuts the period that contains it at `until`
    and drops every later one. `since` skips the periods that start before it,
    so that a caller that billed up to `since` lists only what is new.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must not be negative, got {limit}")
    anchor, as_of = _utc(anchor, "anchor"), _utc(as_of, "as_of")
    first = 0  # the first period that starts at or after `since`
    if since is not None and _utc(since, "since") > anchor:
        first = _index(anchor, interval, since)
        if period_start(anchor, interval, first) < since:
            first += 1
    last = _index(anchor, interval, as_of)  # periods before it have ended
    cut: tuple[datetime, datetime] | None = None
    if until is not None:
        until = _utc(until, "until")
        n_until = _index(anchor, interval, until)
        start = period_start(anchor, interval, n_until)
        # If `until` falls on a boundary, the period before it ends there uncut.
        if start < until <= as_of and n_until >= first:
            cut = (start, until)
        last = min(last, n_until)
    if limit is not None:
        last = min(last, first + limit)
    periods = [
        (period_start(anchor, interval, n), period_start(anchor, interval, n + 1))
        for n in range(first, last)
    ]
    if cut is not None and (limit is None or len(periods) < limit):
        periods.append(cut)
    return periods


def proration(start: datetime, end: datetime, until: datetime) -> Fraction:
    """The share of [start, end) that [start, until) covers, in [0, 1], for
    prorating a fixed fee over a period cut by a cancellation. A Fraction, not
    a Decimal: a rounded ratio (5/6 = 0.8333...) could turn an exact half minor
    unit into a round-down, i.e. round twice."""
    start, end, until = _utc(start, "start"), _utc(end, "end"), _utc(until, "until")
    if end <= start:
        raise ValueError("end must be after start")
    until = min(max(until, start), end)
    micro = timedelta(microseconds=1)
    return Fraction((until - start) // micro, (end - start) // micro)


def period_share(anchor: datetime, interval: Interval, start: datetime, end: datetime) -> Fraction:
    """The share of its full period that the billed period [start, end) is: 1
    for a whole period, less for one cut short by a cancellation. `start` is a
    period start of the anchor's schedule."""
    full_start, full_end, _ = period_containing(anchor, interval, start)
    if _utc(end, "end") >= full_end:
        return Fraction(1)
    return proration(full_start, full_end, end)


def cancellation_end(
    anchor: datetime,
    interval: Interval,
    now: datetime,
    *,
    immediately: bool,
    current_end: datetime | None = None,
) -> datetime:
    """When a subscription canceled at `now` stops billing: at once (but not
    before it started), or at the end of the period that contains `now` (the
    first period, for a subscription that has not started yet). A subscription
    already set to end (`current_end`) never ends later than that."""
    anchor, now = _utc(anchor, "anchor"), _utc(now, "now")
    if immediately:
        end = max(now, anchor)
    else:
        _, end, _ = period_containing(anchor, interval, max(now, anchor))
    return end if current_end is None else min(end, _utc(current_end, "current_end"))


def check_start(start: datetime, now: datetime, field: str = "start_time") -> None:
    """A subscription's start must lie within MAX_START_OFFSET of now (which
    also refuses year 1 and year 9999: no period arithmetic near the ends of
    datetime's range)."""
    if not now - MAX_START_OFFSET <= start <= now + MAX_START_OFFSET:
        raise InvalidArgument(f"{field}: must be within {MAX_START_OFFSET.days} days of now")


def check_as_of(as_of: datetime, now: datetime, skew: timedelta, field: str = "as_of") -> None:
    """The instant a billing cycle bills up to: not before EARLIEST, and not
    further ahead of `now` than the clock `skew` allowed."""
    if as_of < EARLIEST:
        raise InvalidArgument(f"{field}: must not be before {EARLIEST.isoformat()}")
    if as_of > now + skew:
        raise InvalidArgument(f"{field}: must not be in the future")
