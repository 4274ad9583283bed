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
from datetime import UTC, datetime, timedelta
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
    start: datetime, end: datetime, size: WindowSize, tz: str
) -> list[tuple[datetime, datetime]]:
    """The windows that cover [start, end) exactly, in order, the first and last clipped
    to the range. NONE gives the one window (start, end); an empty range gives no
    sized window. InvalidArgument, naming start_time or end_time, for a range that is
    reversed or not within [MIN_TIME, MAX_TIME]."""
    zone = validate_time_zone(tz)
    start, end = _utc(start, "start"), _utc(end, "end")
    check_time(start, "start_time")
    check_time(end, "end_time")
    if end < start:
        raise InvalidArgument("end_time: must not be before start_time")
    if size is WindowSize.NONE:
        return [(start, end)]
    out: list[tuple[datetime, datetime]] = []
    cursor = start
    while cursor < end:
        _, window_end = _window_of(cursor, size, zone)
        out.append((cursor, min(window_end, end)))
        cursor = window_end
    return out


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


# The shortest a whole window of each size can be, for bounding how many a range holds
# before building them: an hour window may last 30 minutes (Lord Howe's half-hour DST
# shift), a day 22 hours (Antarctica/Troll shifts by 2 hours).
_SHORTEST = {
    WindowSize.MINUTE: timedelta(minutes=1),
    WindowSize.HOUR: timedelta(minutes=30),
    WindowSize.DAY: timedelta(hours=22),
}


def window_count_bound(start: datetime, end: datetime, size: WindowSize) -> int:
    """An upper bound on how many windows `windows(start, end, size, any zone)` gives,
    known without building them."""
    if size is WindowSize.NONE:
        return 1
    if size is WindowSize.MONTH:
        return (end.year - start.year) * 12 + end.month - start.month + 2
    return (end - start) // _SHORTEST[size] + 2


def clip(
    window: tuple[datetime, datetime], start: datetime, end: datetime
) -> tuple[datetime, datetime]:
    """The window cut to [start, end)."""
    return max(window[0], _utc(start, "start")), min(window[1], _utc(end, "end"))


# --- internals ------------------------------------------------------------------------


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
