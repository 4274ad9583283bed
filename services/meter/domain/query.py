"""Usage queries: what a QueryUsage request may ask, and the windows it covers.

`plan_query` checks a request against its meter and returns the windows to bucket by;
`usage_value` and `empty_row_group` finish the rows the store aggregated; `AnswerSize`
counts an answer's rows and bytes as it is built and refuses the row that would take
it past its `AnswerLimits`. Pure, like the rest of the domain: the service passes the
parsed request in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.common.errors import InvalidArgument, ResourceExhausted
from services.meter.domain.aggregation import (
    HELD,
    MAX_GROUP_BY,
    Aggregation,
    average,
    held_value,
)
from services.meter.domain.values import check_text, format_decimal
from services.meter.domain.windows import WindowSize, window_count, windows

MAX_WINDOWS = 100_000

# What a caller can do about an answer over its limits.
NARROW = (
    "narrow the query: a shorter range (start_time, end_time), a larger window_size,"
    " fewer group_by keys, a group_filter, or one customer_id"
)


@dataclass(frozen=True)
class AnswerLimits:
    """The most one QueryUsage answer may hold: `max_rows` rows and `max_bytes`
    bytes as encoded on the wire (estimated row by row by `row_bytes`)."""

    max_rows: int
    max_bytes: int


def _text_bytes(text: str) -> int:
    """A string field's encoded size: tag, length prefix (at most 3 bytes for the
    sizes allowed here) and UTF-8 bytes."""
    return 4 + (len(text) if text.isascii() else len(text.encode()))


# Two Timestamps (tag, length, seconds, nanos: at most 20 bytes each) and the
# row's own tag and length prefix.
_ROW_FIXED_BYTES = 2 * 20 + 6


def row_bytes(customer_id: str, group: Mapping[str, str], value: str) -> int:
    """An upper estimate of one UsageRow's encoded size in a QueryUsageResponse,
    in bytes: the group map's keys and values and the customer id dominate."""
    size = _ROW_FIXED_BYTES + _text_bytes(customer_id) + _text_bytes(value)
    for key, text in group.items():
        size += 4 + _text_bytes(key) + _text_bytes(text)  # each entry is a message
    return size


class AnswerSize:
    """The rows and bytes of an answer being built, checked against `limits` as
    each row is added: the answer over them is refused before it is built whole."""

    def __init__(self, limits: AnswerLimits) -> None:
        self.limits = limits
        self.rows = 0
        self.bytes = 0

    def add(self, size: int) -> None:
        """Counts one row of `size` bytes; ResourceExhausted naming the figure, the
        limit and what to narrow when the answer would pass a limit."""
        self.rows += 1
        self.bytes += size
        if self.rows > self.limits.max_rows:
            raise ResourceExhausted(
                f"answer: more than {self.limits.max_rows:,} rows; at most"
                f" {self.limits.max_rows:,} rows per QueryUsage answer; {NARROW}"
            )
        if self.bytes > self.limits.max_bytes:
            raise ResourceExhausted(
                f"answer: more than {self.limits.max_bytes:,} bytes after {self.rows:,} rows"
                f" ({self.bytes:,} bytes); at most {self.limits.max_bytes:,} bytes per"
                f" QueryUsage answer; {NARROW}"
            )


@dataclass(frozen=True)
class UsageQuery:
    customer_id: str  # "" for every customer
    start: datetime
    end: datetime
    window_size: WindowSize
    time_zone: str
    group_by: tuple[str, ...]
    group_filter: Mapping[str, str]
    windows: tuple[tuple[datetime, datetime], ...]  # in order; covers [start, end)


def _dimension(key: str, field: str, dimensions: Sequence[str]) -> None:
    if key not in dimensions:
        raise InvalidArgument(
            f"{field}: {key!r} is not a dimension of this meter"
            f" (its group_by is {list(dimensions)})"
        )


def plan_query(
    dimensions: Sequence[str],
    *,
    customer_id: str,
    start: datetime | None,
    end: datetime | None,
    window_size: WindowSize,
    time_zone: str,
    group_by: Sequence[str],
    group_filter: Mapping[str, str],
) -> UsageQuery:
    """The query, validated against the meter's group-by `dimensions`; InvalidArgument
    names the field at fault (at most MAX_GROUP_BY group_by keys and group_filter
    entries), ResourceExhausted when the range holds more than MAX_WINDOWS windows:
    counted by `window_count` before any is built, so refusing costs microseconds."""
    # Counted first: a request may carry any number of entries, and a meter has at
    # most MAX_GROUP_BY dimensions to name.
    if len(group_by) > MAX_GROUP_BY:
        raise InvalidArgument(f"group_by: at most {MAX_GROUP_BY} keys")
    if len(group_filter) > MAX_GROUP_BY:
        raise InvalidArgument(f"group_filter: at most {MAX_GROUP_BY} entries")
    check_text(customer_id, "customer_id", limit=255)
    if start is None:
        raise InvalidArgument("start_time: required")
    if end is None:
        raise InvalidArgument("end_time: required")
    if end <= start:
        raise InvalidArgument("end_time: must be after start_time")
    seen: set[str] = set()
    for i, key in enumerate(group_by):
        _dimension(key, f"group_by[{i}]", dimensions)
        if key in seen:
            raise InvalidArgument(f"group_by[{i}]: duplicate key {key!r}")
        seen.add(key)
    for key, value in sorted(group_filter.items()):
        _dimension(key, "group_filter", dimensions)
        check_text(value, f"group_filter[{key!r}]", limit=10_000)
    # Counted before any window is built (validates the zone and the range limits
    # too); built, up to one past the limit, only when the count may be within it.
    count = window_count(start, end, window_size, time_zone)
    if count.fewest > MAX_WINDOWS:
        held = f"{count.fewest:,}" if count.fewest == count.most else f"at least {count.fewest:,}"
        raise ResourceExhausted(
            f"window_size: the range holds {held} {window_size.value} windows;"
            f" at most {MAX_WINDOWS:,} per query"
        )
    spans = windows(start, end, window_size, time_zone, limit=MAX_WINDOWS)
    if len(spans) > MAX_WINDOWS:
        raise ResourceExhausted(
            f"window_size: the range holds more than {MAX_WINDOWS:,} {window_size.value}"
            f" windows; at most {MAX_WINDOWS:,} per query"
        )
    return UsageQuery(
        customer_id=customer_id,
        start=spans[0][0],
        end=spans[-1][1],
        window_size=window_size,
        time_zone=time_zone or "UTC",
        group_by=tuple(group_by),
        group_filter=dict(group_filter),
        windows=tuple(spans),
    )


def usage_value(
    aggregation: Aggregation,
    value: Decimal | None,
    count: int,
    window: tuple[datetime, datetime] | None = None,
) -> str:
    """The decimal string of one aggregated row: the store sums AVG's values, and
    the exact quotient is taken here (see `aggregation.average`); likewise the
    held aggregations' integrals over the `window` (`aggregation.held_value`)."""
    if value is None:
        return "0"
    if aggregation is Aggregation.AVG:
        return format_decimal(average(value, count))
    if aggregation in HELD:
        if window is None:
            raise ValueError(f"{aggregation.value} needs the window")
        return format_decimal(held_value(aggregation, value, *window))
    return format_decimal(value)


def empty_row_group(query: UsageQuery) -> dict[str, str] | None:
    """The group of the one row that WINDOW_SIZE_NONE with a customer_id answers when
    nothing counted (value "0"); None when such a query answers no row."""
    if query.window_size is not WindowSize.NONE or not query.customer_id:
        return None
    return {key: query.group_filter.get(key, "") for key in query.group_by}
