"""Usage windows aligned to the local wall clock of an IANA time zone.

A window starts at each instant where the local clock reads a round value (hh:mm:00
for MINUTE, hh:00:00 for HOUR, 00:00:00 for DAY, the 1st at 00:00:00 for MONTH).
Where the clock skips the round value (a DST gap), the window starts at the first
instant after the gap. Where the clock repeats a span (DST fall-back):
- MINUTE and HOUR count each occurrence, so a repeated hour is a window of its own
  and an hour window stays one real hour wherever transitions fall on the hour;
- DAY and MONTH use the first occurrence only, so a day is one calendar date: 23 or
  25 hours around DST changes.

Every datetime taken must be aware; every datetime returned is in UTC. Windows are
half-open, [start, end). Ranges must lie within [MIN_TIME, MAX_TIME]: finding a window
looks at the wall clock up to two months either side of an instant, and `datetime`
stops at the years 1 and 9999.
"""

from __future__ import annotations

import enum
import itertools
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.common.errors import InvalidArgument


class WindowSize(enum.Enum):
    # Values are the protobuf enum names (see filters.Operator).
    NONE = "WINDOW_SIZE_NONE"
    MINUTE = "WINDOW_SIZE_MINUTE"
    HOUR = "WINDOW_SIZE_HOUR"
    DAY = "WINDOW_SIZE_DAY"
    MONTH = "WINDOW_SIZE_MONTH"


# The instants a range may start or end at. A window is found from the local reading
# of an instant (up to ±26 h away) stepped up to two months either way, so these keep
# every intermediate value well inside datetime's years 1..9999.
MIN_TIME = datetime(2, 1, 1, tzinfo=UTC)
MAX_TIME = datetime(9999, 1, 1, tzinfo=UTC)

# Names that resolve to the host's own settings rather than to one IANA zone.
_HOST_DEPENDENT = frozenset({"localtime", "posixrules"})
_ONE_MICROSECOND = timedelta(microseconds=1)


def validate_time_zone(name: str, field: str = "time_zone") -> ZoneInfo:
    """The IANA zone of that name; "" means UTC. InvalidArgument on an unknown name."""
    if not name:
        return ZoneInfo("UTC")
    if name in _HOST_DEPENDENT:
        raise InvalidArgument(f"{field}: unknown time zone {name!r}")
    try:
        return ZoneInfo(name)
    # ValueError: malformed keys ("../x", absolute paths); OSError: a directory such
    # as "America".
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidArgument(f"{field}: unknown time zone {name!r}") from None


def windows(
    start: datetime,
    end: datetime,
    size: WindowSize,
    tz: str,
    *,
    limit: int | None = None,
) -> list[tuple[datetime, datetime]]:
    """The windows that cover [start, end) exactly, in order, the first and last clipped
    to the range. NONE gives the one window (start, end); an empty range gives no
    sized window. InvalidArgument, naming start_time or end_time, for a range that is
    reversed or not within [MIN_TIME, MAX_TIME].

    With a `limit`, building stops after limit + 1 windows: a longer answer than
    `limit` means the range holds more (the rest is not built)."""
    zone, start, end = _checked_range(start, end, tz)
    if size is WindowSize.NONE:
        return [(start, end)]
    stop = limit + 1 if limit is not None else None
    out: list[tuple[datetime, datetime]] = []
    grid = _GRID.get(size)
    cursor = start
    while cursor < end and (stop is None or len(out) < stop):
        offset = _offset(cursor, zone)
        if size in _FIRST_OCCURRENCE and _offset(cursor - _CHANGES_APART, zone) != offset:
            # A change of offset in the last two days may have shown a round value
            # already (a day or month starts at its first occurrence): exact path.
            cursor = _exact_window(cursor, end, size, zone, out)
            continue
        if grid is None:
            # MONTH: windows are not of one length; each is checked on its own.
            after = _month_run(cursor, end, offset, zone, out, stop)
            cursor = after if after > cursor else _exact_window(cursor, end, size, zone, out)
            continue
        first = _next_round(cursor, offset, size)
        # MINUTE, HOUR, DAY: while the offset stays the same, the round readings are
        # a grid of fixed step in UTC; emit it up to the next change in one go.
        reach = end  # with a limit, no further than the windows still wanted
        if stop is not None and (end - first) // grid > stop - len(out):
            reach = first + grid * (stop - len(out))
        until = _constant_until(cursor, reach, offset, zone)
        if first >= until:
            cursor = _exact_window(cursor, end, size, zone, out)  # the change is near
            continue
        count = -((first - until) // grid)  # boundaries first + k * grid < until
        if stop is not None:
            count = min(count, stop - len(out))
        bounds = [cursor, *(first + k * grid for k in range(count))]
        out += itertools.pairwise(bounds)
        cursor = bounds[-1]
        if until >= end and (stop is None or len(out) < stop):
            out.append((cursor, end))
            cursor = end
    return out if stop is None else out[:stop]


class WindowCount(NamedTuple):
    """Bounds on how many windows a range holds: fewest <= len(windows(...)) <= most."""

    fewest: int
    most: int


def window_count(start: datetime, end: datetime, size: WindowSize, tz: str) -> WindowCount:
    """How many windows `windows(start, end, size, tz)` gives, by arithmetic on the
    range, without building any: the count C of round local readings between the
    readings at start and end, widened by what changes of the zone's offset can add
    or take away. MINUTE and HOUR: C +- 2 per change, the changes found by sampling
    the offset every two days (at most about 2,200 look-ups), so exact where the
    offset does not change. DAY: C - 4 .. C + 2. MONTH: C - 2 .. C + 1.
    Raises like `windows`."""
    zone, start, end = _checked_range(start, end, tz)
    if size is WindowSize.NONE:
        return WindowCount(1, 1)
    if start == end:
        return WindowCount(0, 0)
    if size is WindowSize.MONTH:
        # Month starts the local clock reaches in (reading(start), reading(end)).
        here, there = _reading(start, zone), _reading(end, zone)
        months = (there.year - here.year) * 12 + there.month - here.month
        if _floor(there, size) == there:
            months -= 1
        return WindowCount(max(1, months - 1), months + 2)
    grid = _GRID[size]
    if size is WindowSize.DAY:
        # Days the local clock starts in (reading(start), reading(end)).
        day = _step(_floor(_reading(start, zone), size), size, 1)
        base = 1 + max(0, -((day - _reading(end, zone)) // grid))
        return WindowCount(max(1, base - 4), base + 2)
    # MINUTE, HOUR: the grid of the start's offset, then each change of offset adds
    # or removes at most 2 boundaries (the grid after it is shifted, plus the instant
    # of the change itself).
    first = _next_round(start, _offset(start, zone), size)
    base = 1 + max(0, -((first - end) // grid))
    if end - start <= _SAMPLED_SPAN:
        changes = _changes(start, end, zone)
    else:
        changes = (end - start) // _CHANGES_APART + 1
    return WindowCount(max(1, base - 2 * changes), base + 2 * changes)


def check_time(ts: datetime, field: str) -> None:
    """InvalidArgument naming the field unless MIN_TIME <= ts <= MAX_TIME."""
    if not MIN_TIME <= ts <= MAX_TIME:
        raise InvalidArgument(
            f"{field}: must be between {MIN_TIME.isoformat()} and {MAX_TIME.isoformat()}"
        )


def window_of(ts: datetime, size: WindowSize, tz: str) -> tuple[datetime, datetime]:
    """The whole (unclipped) window that holds the instant `ts`
    (MIN_TIME <= ts < MAX_TIME)."""
    if size is WindowSize.NONE:
        raise ValueError("WINDOW_SIZE_NONE has no window of its own: use the query range")
    ts = _utc(ts, "ts")
    if not MIN_TIME <= ts < MAX_TIME:
        raise ValueError(f"ts must be in [{MIN_TIME}, {MAX_TIME}), got {ts!r}")
    return _window_of(ts, size, validate_time_zone(tz))


def clip(
    window: tuple[datetime, datetime], start: datetime, end: datetime
) -> tuple[datetime, datetime]:
    """The window cut to [start, end)."""
    return max(window[0], _utc(start, "start")), min(window[1], _utc(end, "end"))


# --- internals ------------------------------------------------------------------------

# Offsets change at most once in any two days: in tzdb 2024 the closest two changes
# of a zone's UTC offset are 95 hours apart (Africa/Freetown, 1939). So an offset
# found equal at two instants at most this far apart held all along between them.
# The exact path (_window_of) needs no such assumption; the fast paths rely on it,
# and the property tests check them against it across every zone.
_CHANGES_APART = timedelta(days=2)
# MINUTE/HOUR counts sample the offset when the range is at most this long (about
# 2,200 look-ups); a longer range of hours holds far more than any query may ask.
_SAMPLED_SPAN = timedelta(days=4400)
# Sizes whose round readings form a fixed-step grid while the offset holds.
_GRID = {
    WindowSize.MINUTE: timedelta(minutes=1),
    WindowSize.HOUR: timedelta(hours=1),
    WindowSize.DAY: timedelta(days=1),
}
# Sizes whose windows start at the first occurrence of a repeated round reading.
_FIRST_OCCURRENCE = frozenset({WindowSize.DAY, WindowSize.MONTH})


def _checked_range(start: datetime, end: datetime, tz: str) -> tuple[ZoneInfo, datetime, datetime]:
    zone = validate_time_zone(tz)
    start, end = _utc(start, "start"), _utc(end, "end")
    check_time(start, "start_time")
    check_time(end, "end_time")
    if end < start:
        raise InvalidArgument("end_time: must not be before start_time")
    return zone, start, end


def _offset(instant: datetime, zone: ZoneInfo) -> timedelta:
    offset = instant.astimezone(zone).utcoffset()
    assert offset is not None  # a ZoneInfo always knows its offset
    return offset


def _next_round(cursor: datetime, offset: timedelta, size: WindowSize) -> datetime:
    """The first instant after `cursor` at which the clock reads a round value, if
    the offset stays `offset` until then."""
    reading = (cursor + offset).replace(tzinfo=None)
    return cursor + (_step(_floor(reading, size), size, 1) - reading)


def _constant_until(cursor: datetime, end: datetime, offset: timedelta, zone: ZoneInfo) -> datetime:
    """The first instant in (cursor, end] whose offset differs from `offset`, or end."""
    probe = cursor
    while probe < end:
        ahead = min(probe + _CHANGES_APART, end)
        if _offset(ahead, zone) != offset:
            return _change_in(probe, ahead, zone)
        probe = ahead
    return end


def _change_in(lo: datetime, hi: datetime, zone: ZoneInfo) -> datetime:
    """The instant of the one change of offset in (lo, hi] (offsets differ at the
    ends), to the microsecond."""
    offset = _offset(lo, zone)
    while hi - lo > _ONE_MICROSECOND:
        mid = lo + (hi - lo) // 2
        if _offset(mid, zone) == offset:
            lo = mid
        else:
            hi = mid
    return hi


def _changes(start: datetime, end: datetime, zone: ZoneInfo) -> int:
    """How many times the offset changes in (start, end]: exact, given _CHANGES_APART."""
    count, probe, offset = 0, start, _offset(start, zone)
    while probe < end:
        probe = min(probe + _CHANGES_APART, end)
        later = _offset(probe, zone)
        count += later != offset
        offset = later
    return count


def _month_run(
    cursor: datetime,
    end: datetime,
    offset: timedelta,
    zone: ZoneInfo,
    out: list[tuple[datetime, datetime]],
    stop: int | None,
) -> datetime:
    """Appends month windows from `cursor` (whose offset is `offset`, unchanged in
    the two days before) while the next month start reads under that offset and
    no change falls in the two days before it either, so no change can move the
    boundary; returns where it stopped."""
    while cursor < end and (stop is None or len(out) < stop):
        reading = (cursor + offset).replace(tzinfo=None)
        years, month0 = divmod(reading.month, 12)
        following = cursor + (datetime(reading.year + years, month0 + 1, 1) - reading)
        if _offset(following, zone) != offset:
            break
        if _offset(following - _CHANGES_APART, zone) != offset:
            break
        out.append((cursor, min(following, end)))
        cursor = following
    return cursor


def _exact_window(
    cursor: datetime,
    end: datetime,
    size: WindowSize,
    zone: ZoneInfo,
    out: list[tuple[datetime, datetime]],
) -> datetime:
    """Appends the window from `cursor` found the exact (slow) way; returns its end."""
    _, window_end = _window_of(cursor, size, zone)
    out.append((cursor, min(window_end, end)))
    return window_end


def _utc(ts: datetime, name: str) -> datetime:
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {ts!r}")
    return ts.astimezone(UTC)


def _reading(instant: datetime, zone: ZoneInfo) -> datetime:
    """What the local clock reads at the instant, as a naive datetime."""
    return instant.astimezone(zone).replace(tzinfo=None)


def _floor(local: datetime, size: WindowSize) -> datetime:
    """The round wall-clock value at or before a naive local reading."""
    local = local.replace(second=0, microsecond=0, fold=0)
    if size is WindowSize.MINUTE:
        return local
    local = local.replace(minute=0)
    if size is WindowSize.HOUR:
        return local
    local = local.replace(hour=0)
    if size is WindowSize.DAY:
        return local
    return local.replace(day=1)


def _step(value: datetime, size: WindowSize, n: int) -> datetime:
    """The round wall-clock value n units after `value` (naive arithmetic: wall time)."""
    if size is WindowSize.MINUTE:
        return value + timedelta(minutes=n)
    if size is WindowSize.HOUR:
        return value + timedelta(hours=n)
    if size is WindowSize.DAY:
        return value + timedelta(days=n)
    years, month0 = divmod(value.month - 1 + n, 12)
    return value.replace(year=value.year + years, month=month0 + 1)


def _boundaries(value: datetime, zone: ZoneInfo, every_occurrence: bool) -> list[datetime]:
    """The UTC instants at which the local clock reads `value` (both occurrences in a
    repeated span when `every_occurrence`, else the first); for a value the clock
    skips, the first instant after the gap."""
    found: list[datetime] = []
    for fold in (0, 1) if every_occurrence else (0,):
        instant = value.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if _reading(instant, zone) == value and instant not in found:
            found.append(instant)
    return found or [_first_instant_after_gap(value, zone)]


def _first_instant_after_gap(value: datetime, zone: ZoneInfo) -> datetime:
    # For a skipped wall time, PEP 495 maps fold=1 with the offset after the
    # transition (an instant before it) and fold=0 with the offset before it (an
    # instant after it), so the transition lies between the two. zoneinfo does not
    # expose transitions: bisect to the microsecond on "the clock reads >= value".
    a = value.replace(tzinfo=zone, fold=1).astimezone(UTC)
    b = value.replace(tzinfo=zone, fold=0).astimezone(UTC)
    lo, hi = min(a, b), max(a, b)
    while hi - lo > _ONE_MICROSECOND:
        mid = lo + (hi - lo) // 2
        if _reading(mid, zone) >= value:
            hi = mid
        else:
            lo = mid
    return hi


def _window_of(ts: datetime, size: WindowSize, zone: ZoneInfo) -> tuple[datetime, datetime]:
    every_occurrence = size in (WindowSize.MINUTE, WindowSize.HOUR)
    here = _floor(_reading(ts, zone), size)
    # The boundaries around `here` bracket ts even when a transition sits next to it
    # (a repeated span can put the next value's first occurrence before ts).
    candidates = sorted(
        {
            b
            for n in (-1, 0, 1, 2)
            for b in _boundaries(_step(here, size, n), zone, every_occurrence)
        }
    )
    start = max(b for b in candidates if b <= ts)
    end = min(b for b in candidates if b > ts)
    if every_occurrence:
        # Where the clock is set back by more than the steps above reach (an hour, to
        # minute windows: 02:59:59 CEST, then 02:00:00 CET), the instant it jumps to a
        # round reading is a boundary they miss.
        jump = _backward_jump(ts, end, zone)
        if jump is not None and _floor(_reading(jump, zone), size) == _reading(jump, zone):
            end = jump
    return start, end


def _backward_jump(after: datetime, before: datetime, zone: ZoneInfo) -> datetime | None:
    """The instant in (after, before) at which the clock is set back, if there is
    one (at most one transition is assumed in between: windows are short)."""
    offset = after.astimezone(zone).utcoffset()
    later = (before - _ONE_MICROSECOND).astimezone(zone).utcoffset()
    assert offset is not None and later is not None
    if later >= offset:
        return None
    lo, hi = after, before - _ONE_MICROSECOND  # offset(lo) == offset, offset(hi) < offset
    while hi - lo > _ONE_MICROSECOND:
        mid = lo + (hi - lo) // 2
        if mid.astimezone(zone).utcoffset() == offset:
            lo = mid
        else:
            hi = mid
    return hi
