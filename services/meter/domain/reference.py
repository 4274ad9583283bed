"""The reference aggregator: usage computed straight from raw events, in Python.

It is the test oracle for the SQL rollups and queries: for the same events, meter and
query they must return the same rows. It favours being obviously right over speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType

from services.meter.domain.aggregation import (
    HELD,
    Aggregation,
    Contribution,
    MeterSpec,
    aggregate,
    extract,
    format_decimal,
    group_values,
    meter_matches,
)
from services.meter.domain.gauges import Held
from services.meter.domain.values import MetaValue
from services.meter.domain.windows import WindowSize, clip, window_of, windows


@dataclass(frozen=True)
class RawEvent:
    event_id: str
    customer_id: str
    event_name: str
    timestamp: datetime
    metadata: Mapping[str, MetaValue]


@dataclass(frozen=True)
class Row:
    window_start: datetime
    window_end: datetime
    customer_id: str
    group: dict[str, str]
    value: str


_NO_GROUP_FILTER: Mapping[str, str] = MappingProxyType({})

_BucketKey = tuple[str, datetime, datetime, tuple[tuple[str, str], ...]]


def aggregate_events(
    events: Iterable[RawEvent],
    meter: MeterSpec,
    start: datetime,
    end: datetime,
    window_size: WindowSize,
    tz: str,
    customer_id: str | None,
    group_by: tuple[str, ...] = (),
    group_filter: Mapping[str, str] = _NO_GROUP_FILTER,
) -> list[Row]:
    """The usage rows of one tenant's events for the query, sorted by (customer_id,
    window_start, group items).

    An event counts when its event_name and filter match the meter, start <= timestamp
    < end, its customer is the one asked for (None or "" asks for every customer),
    every `group_filter` dimension equals the given string (a missing dimension is ""),
    and it has a value for the aggregation (see `extract`). A row exists only for a
    (customer, window, group) with at least one counted event, except that
    WINDOW_SIZE_NONE with a customer_id always gives one row: when nothing counted,
    its value is "0" (for MIN/MAX/AVG/LATEST too, since a query for a customer's
    usage always answers a number) and its group has each `group_by` key, valued as
    `group_filter` gives it, else "".

    Events must have distinct event_ids (ingest guarantees it); a repeat raises
    ValueError rather than be counted twice.

    The HELD aggregations (domain.gauges) read events before `start` too, and
    give a row for every window of a (customer, group) from the window in which
    the first of its events falls (or the first window, for events before
    `start`) on.
    """
    # windows() validates the zone and the range, and gives them in UTC.
    [(start, end)] = windows(start, end, WindowSize.NONE, tz)
    wanted = customer_id or None
    if meter.aggregation in HELD:
        return _held_rows(
            events, meter, start, end, window_size, tz, wanted, group_by, group_filter
        )
    buckets: dict[_BucketKey, list[Contribution]] = {}
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen:
            raise ValueError(f"event_id {event.event_id!r} appears twice")
        seen.add(event.event_id)
        if wanted is not None and event.customer_id != wanted:
            continue
        if not start <= event.timestamp < end:
            continue
        if not meter_matches(meter, event.event_name, event.metadata):
            continue
        dimensions = group_values(tuple(group_filter), event.metadata)
        if any(dimensions[k] != v for k, v in group_filter.items()):
            continue
        value, skip_reason = extract(meter, event.metadata)
        if skip_reason is not None or value is None:
            continue
        if window_size is WindowSize.NONE:
            window_start, window_end = start, end
        else:
            window_start, window_end = clip(window_of(event.timestamp, window_size, tz), start, end)
        group = tuple(sorted(group_values(group_by, event.metadata).items()))
        assert not isinstance(value, tuple)  # a seat's: held, above
        contribution: Contribution = value
        if meter.aggregation is Aggregation.LATEST:
            assert isinstance(value, Decimal)
            contribution = (event.timestamp, event.event_id, value)
        key = (event.customer_id, window_start, window_end, group)
        buckets.setdefault(key, []).append(contribution)

    rows = []
    for (customer, window_start, window_end, group), contributions in buckets.items():
        result = aggregate(contributions, meter.aggregation)
        assert result is not None  # a bucket holds at least one contribution
        rows.append(Row(window_start, window_end, customer, dict(group), format_decimal(result)))
    if not rows and window_size is WindowSize.NONE and wanted is not None:
        zero_group = {k: group_filter.get(k, "") for k in group_by}
        rows.append(Row(start, end, wanted, zero_group, "0"))
    rows.sort(key=lambda r: (r.customer_id, r.window_start, sorted(r.group.items())))
    return rows


def _held_rows(
    events: Iterable[RawEvent],
    meter: MeterSpec,
    start: datetime,
    end: datetime,
    window_size: WindowSize,
    tz: str,
    wanted: str | None,
    group_by: tuple[str, ...],
    group_filter: Mapping[str, str],
) -> list[Row]:
    """aggregate_events for gauges and seats: every event of a (customer, group)
    before `end` goes to `aggregate` for each window, which finds its lines'
    values from them."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Contribution]] = {}
    seen: set[str] = set()
    for event in events:
        if event.event_id in seen:
            raise ValueError(f"event_id {event.event_id!r} appears twice")
        seen.add(event.event_id)
        if wanted is not None and event.customer_id != wanted:
            continue
        if event.timestamp >= end or not meter_matches(meter, event.event_name, event.metadata):
            continue
        dimensions = group_values(tuple(group_filter), event.metadata)
        if any(dimensions[k] != v for k, v in group_filter.items()):
            continue
        value, skip_reason = extract(meter, event.metadata)
        if skip_reason is not None or value is None:
            continue
        # A line: the customer and all the meter's dimensions (a series), and
        # for seats the item.
        series = (event.customer_id, tuple(group_values(meter.group_by, event.metadata).items()))
        if isinstance(value, tuple):
            item, state = value
            held = Held(event.timestamp, event.event_id, (series, item), state)
        else:
            assert isinstance(value, Decimal)
            held = Held(event.timestamp, event.event_id, series, value)
        group = tuple(sorted(group_values(group_by, event.metadata).items()))
        groups.setdefault((event.customer_id, group), []).append(held)
    spans = windows(start, end, window_size, tz)
    rows = []
    for (customer, group), contributions in groups.items():
        for window_start, window_end in spans:
            result = aggregate(contributions, meter.aggregation, (window_start, window_end))
            if result is not None:
                rows.append(
                    Row(window_start, window_end, customer, dict(group), format_decimal(result))
                )
    if not rows and window_size is WindowSize.NONE and wanted is not None:
        rows.append(Row(start, end, wanted, {k: group_filter.get(k, "") for k in group_by}, "0"))
    rows.sort(key=lambda r: (r.customer_id, r.window_start, sorted(r.group.items())))
    return rows
