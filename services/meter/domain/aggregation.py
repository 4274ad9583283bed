"""Meter definitions and aggregation.

The store pushes aggregation down to SQL for speed; `aggregate` here is the pure
oracle that the SQL must agree with. Every aggregation is order-free: LATEST picks
the greatest (timestamp, event_id), not the last one seen, and so do the HELD
aggregations (gauges and seats, domain.gauges) for each line's value.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    ROUND_HALF_EVEN,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    localcontext,
)
from typing import TypeAlias

from services.common.errors import InvalidArgument, ResourceExhausted
from services.meter.domain import gauges
from services.meter.domain.filters import Filter, matches, validate_filter
from services.meter.domain.values import MetaValue, canonical, check_text, to_number
from services.meter.domain.values import format_decimal as format_decimal

MAX_NAME_LENGTH = 255
MAX_DESCRIPTION_LENGTH = 4096
MAX_GROUP_BY = 10

# Sums, minima and maxima are exact: an unbounded context that raises rather than
# round (the `decimal` docs' recipe for exact arithmetic).
EXACT = Context(
    prec=MAX_PREC,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    traps=[InvalidOperation, Overflow, Inexact, Rounded],
)
# An average is a quotient that may not terminate (1/3): 50 significant digits,
# half-even, is what the SQL side must reproduce.
AVG_PRECISION = 50
_AVG = Context(prec=AVG_PRECISION, rounding=ROUND_HALF_EVEN, traps=[InvalidOperation, Overflow])

SKIP_MISSING_PROPERTY = "missing_property"
SKIP_NOT_A_NUMBER = "not_a_number"


class Aggregation(enum.Enum):
    # Values are the protobuf enum names (see filters.Operator).
    COUNT = "AGGREGATION_COUNT"
    SUM = "AGGREGATION_SUM"
    MAX = "AGGREGATION_MAX"
    MIN = "AGGREGATION_MIN"
    AVG = "AGGREGATION_AVG"
    UNIQUE_COUNT = "AGGREGATION_UNIQUE_COUNT"
    LATEST = "AGGREGATION_LATEST"
    # Held over time (domain.gauges): gauges and seats.
    TIME_WEIGHTED_AVG = "AGGREGATION_TIME_WEIGHTED_AVG"
    TIME_WEIGHTED_SUM = "AGGREGATION_TIME_WEIGHTED_SUM"
    SEATS_END = "AGGREGATION_SEATS_END"
    SEATS_MAX = "AGGREGATION_SEATS_MAX"
    SEATS_PRORATED = "AGGREGATION_SEATS_PRORATED"


# Aggregations whose value in a window depends on events before it: a reading or
# an active item holds until the next event of its line (domain.gauges).
GAUGES = frozenset({Aggregation.TIME_WEIGHTED_AVG, Aggregation.TIME_WEIGHTED_SUM})
SEATS = frozenset({Aggregation.SEATS_END, Aggregation.SEATS_MAX, Aggregation.SEATS_PRORATED})
HELD = GAUGES | SEATS
# A seat event's operation, under the meter's operation_property.
DEFAULT_OPERATION_PROPERTY = "operation"
SEAT_OPERATIONS = {"add": Decimal(1), "remove": Decimal(0)}
SKIP_NOT_AN_OPERATION = "not_an_operation"


@dataclass(frozen=True)
class MeterQuotas:
    """How many active (not archived) meters a tenant may have, in all and per
    event name, and how many filter conditions the active meters of one event name
    may hold together: each is work the consumer does for every event of that name
    (one more row per meter, one more check per condition). The settings
    USAGEBILLING_MAX_METERS_PER_TENANT, _PER_EVENT and
    USAGEBILLING_MAX_FILTER_CONDITIONS_PER_EVENT."""

    per_tenant: int = 100
    per_event: int = 20
    conditions_per_event: int = 200


def check_meter_quotas(
    quotas: MeterQuotas,
    active: int,
    same_event: int,
    event_name: str,
    *,
    conditions: int = 0,
    new_conditions: int = 0,
) -> None:
    """ResourceExhausted, naming the quota and its setting, when one more active meter
    (`active` in all, `same_event` on `event_name`, whose filters hold `conditions`)
    with a filter of `new_conditions` would pass a quota."""
    if active >= quotas.per_tenant:
        raise ResourceExhausted(
            f"meters: the tenant has {active} active meters, its quota"
            f" (USAGEBILLING_MAX_METERS_PER_TENANT = {quotas.per_tenant});"
            " archive one to create another"
        )
    if same_event >= quotas.per_event:
        raise ResourceExhausted(
            f"event_name: {same_event} active meters already count {event_name!r}, the quota"
            f" per event name (USAGEBILLING_MAX_METERS_PER_EVENT = {quotas.per_event})"
        )
    if new_conditions and conditions + new_conditions > quotas.conditions_per_event:
        raise ResourceExhausted(
            f"filter: the active meters on {event_name!r} would check"
            f" {conditions + new_conditions} filter conditions per event, over the quota"
            " (USAGEBILLING_MAX_FILTER_CONDITIONS_PER_EVENT ="
            f" {quotas.conditions_per_event})"
        )


@dataclass(frozen=True)
class MeterSpec:
    event_name: str
    aggregation: Aggregation
    property: str = ""
    filter: Filter | None = None
    group_by: tuple[str, ...] = ()
    # Seat meters: the metadata key of the operation ("add" or "remove");
    # `property` is the key of the item's id.
    operation_property: str = ""


def validate_meter(
    name: str,
    event_name: str,
    aggregation: Aggregation,
    property: str,
    filter: Filter | None,
    group_by: Sequence[str],
    *,
    measurement_unit: str = "",
    description: str = "",
    operation_property: str = "",
) -> MeterSpec:
    """Raise InvalidArgument naming the field; return the spec when all is well.

    A `property` given to a COUNT meter is allowed and ignored. Seat meters take
    `operation_property` (default DEFAULT_OPERATION_PROPERTY), no other meter
    does; it must differ from `property`. Limits: names, event
    name and property at most MAX_NAME_LENGTH characters, description at most
    MAX_DESCRIPTION_LENGTH, at most MAX_GROUP_BY group-by keys, the filter's size
    limits (filters.check_filter_size).
    """
    for field, text in (("name", name), ("event_name", event_name)):
        if not text:
            raise InvalidArgument(f"{field}: required")
        check_text(text, field, MAX_NAME_LENGTH)
    if not name.strip():
        raise InvalidArgument("name: must not be blank (only whitespace)")
    if not isinstance(aggregation, Aggregation):
        raise InvalidArgument(f"aggregation: unknown aggregation {aggregation!r}")
    if aggregation is not Aggregation.COUNT and not property:
        raise InvalidArgument(f"property: required for {aggregation.value}")
    check_text(property, "property", MAX_NAME_LENGTH)
    if aggregation in SEATS:
        operation_property = operation_property or DEFAULT_OPERATION_PROPERTY
        check_text(operation_property, "operation_property", MAX_NAME_LENGTH)
        if operation_property == property:
            raise InvalidArgument(
                "operation_property: must differ from property (the item id's key)"
            )
    elif operation_property:
        raise InvalidArgument(
            f"operation_property: only for seat aggregations, not {aggregation.value}"
        )
    check_text(measurement_unit, "measurement_unit", MAX_NAME_LENGTH)
    check_text(description, "description", MAX_DESCRIPTION_LENGTH)
    if len(group_by) > MAX_GROUP_BY:
        raise InvalidArgument(f"group_by: at most {MAX_GROUP_BY} keys")
    seen: set[str] = set()
    for i, key in enumerate(group_by):
        if not key:
            raise InvalidArgument(f"group_by[{i}]: must not be empty")
        check_text(key, f"group_by[{i}]", MAX_NAME_LENGTH)
        if key in seen:
            raise InvalidArgument(f"group_by[{i}]: duplicate key {key!r}")
        seen.add(key)
    if filter is not None:
        validate_filter(filter, "filter")
    return MeterSpec(
        event_name=event_name,
        aggregation=aggregation,
        property=property,
        filter=filter,
        group_by=tuple(group_by),
        operation_property=operation_property,
    )


# --- what one event contributes ------------------------------------------------------


def meter_matches(meter: MeterSpec, event_name: str, metadata: Mapping[str, MetaValue]) -> bool:
    """Whether the event belongs to the meter: same event name (case-sensitive), passes
    the filter."""
    return event_name == meter.event_name and matches(meter.filter, metadata)


def extract(
    meter: MeterSpec, metadata: Mapping[str, MetaValue]
) -> tuple[Decimal | str | tuple[str, Decimal] | None, str | None]:
    """The value a matching event contributes, or (None, skip reason).

    COUNT -> Decimal(1); SUM/MIN/MAX/AVG/LATEST and the gauges -> the property as
    a number; UNIQUE_COUNT -> the property as a canonical string (1 and 1.0 are
    one value); seats -> (the item id as a canonical string, 1 for "add" or 0 for
    "remove"): an operation other than those two exact strings is skipped as
    SKIP_NOT_AN_OPERATION. For LATEST and the held aggregations the caller pairs
    the value with the event's timestamp and id.
    """
    if meter.aggregation is Aggregation.COUNT:
        return Decimal(1), None
    if meter.property not in metadata:
        return None, SKIP_MISSING_PROPERTY
    raw = metadata[meter.property]
    if meter.aggregation in SEATS:
        key = meter.operation_property or DEFAULT_OPERATION_PROPERTY
        if key not in metadata:
            return None, SKIP_MISSING_PROPERTY
        operation = metadata[key]
        state = SEAT_OPERATIONS.get(operation) if isinstance(operation, str) else None
        if state is None:
            return None, SKIP_NOT_AN_OPERATION
        return (canonical(raw), state), None
    if meter.aggregation is Aggregation.UNIQUE_COUNT:
        return canonical(raw), None
    number = to_number(raw)
    if number is None:
        return None, SKIP_NOT_A_NUMBER
    return number, None


def group_values(keys: Sequence[str], metadata: Mapping[str, MetaValue]) -> dict[str, str]:
    """Each dimension's canonical value; "" when the event lacks it."""
    return {k: canonical(metadata[k]) if k in metadata else "" for k in keys}


def group_key(meter: MeterSpec, metadata: Mapping[str, MetaValue]) -> dict[str, str]:
    """The event's values for the meter's group-by dimensions."""
    return group_values(meter.group_by, metadata)


# --- folding contributions -----------------------------------------------------------

# LATEST contributions carry what decides the winner: (timestamp, event_id, value).
LatestContribution: TypeAlias = tuple[datetime, str, Decimal]
Contribution: TypeAlias = Decimal | str | LatestContribution | gauges.Held


def _numbers(values: Sequence[Contribution]) -> list[Decimal]:
    out = []
    for v in values:
        if not isinstance(v, Decimal):
            raise TypeError(f"expected Decimal contributions, got {type(v).__name__}")
        out.append(v)
    return out


def _exact_sum(numbers: Sequence[Decimal]) -> Decimal:
    with localcontext(EXACT):
        return sum(numbers, Decimal(0))


def _count(values: Sequence[Contribution]) -> Decimal | None:
    return Decimal(len(values))


def _sum(values: Sequence[Contribution]) -> Decimal | None:
    return _exact_sum(_numbers(values))


def _max(values: Sequence[Contribution]) -> Decimal | None:
    numbers = _numbers(values)
    return max(numbers) if numbers else None


def _min(values: Sequence[Contribution]) -> Decimal | None:
    numbers = _numbers(values)
    return min(numbers) if numbers else None


def _avg(values: Sequence[Contribution]) -> Decimal | None:
    numbers = _numbers(values)
    if not numbers:
        return None
    return average(_exact_sum(numbers), len(numbers))


def average(total: Decimal, count: int) -> Decimal:
    """AVG from an exact sum and a count: also how the store's SQL sums become
    averages, since PostgreSQL's avg() rounds differently."""
    with localcontext(_AVG):
        return total / Decimal(count)


def _unique_count(values: Sequence[Contribution]) -> Decimal | None:
    distinct: set[str] = set()
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"expected str contributions, got {type(v).__name__}")
        distinct.add(v)
    return Decimal(len(distinct))


def _latest(values: Sequence[Contribution]) -> Decimal | None:
    entries: list[LatestContribution] = []
    for v in values:
        if not isinstance(v, tuple) or isinstance(v, gauges.Held):
            raise TypeError(f"expected (timestamp, event_id, value), got {type(v).__name__}")
        entries.append(v)
    if not entries:
        return None
    # Greatest timestamp wins; ties go to the greatest event_id (by code point: the
    # SQL side must compare with COLLATE "C").
    return max(entries, key=lambda e: (e[0], e[1]))[2]


def quotient(numerator: Decimal, denominator: Decimal) -> Decimal:
    """A division rounded as AVG's is (AVG_PRECISION significant digits)."""
    with localcontext(_AVG):
        return numerator / denominator


def held_value(kind: Aggregation, total: Decimal, start: datetime, end: datetime) -> Decimal:
    """A gauge's or prorated seats' value from the exact integral `total` (value x
    microseconds) over the window [start, end); SEATS_END and SEATS_MAX are
    levels, not integrals, and pass through."""
    if kind is Aggregation.TIME_WEIGHTED_SUM:
        return quotient(total, Decimal(gauges.MICROS_PER_HOUR))
    if kind in (Aggregation.TIME_WEIGHTED_AVG, Aggregation.SEATS_PRORATED):
        return quotient(total, Decimal(gauges.micros(end - start)))
    return total


def _held(values: Sequence[Contribution]) -> list[gauges.Held]:
    out = []
    for v in values:
        if not isinstance(v, gauges.Held):
            raise TypeError(f"expected gauges.Held contributions, got {type(v).__name__}")
        out.append(v)
    return out


def _held_aggregate(
    kind: Aggregation, values: Sequence[Contribution], start: datetime, end: datetime
) -> Decimal | None:
    events = _held(values)
    if kind is Aggregation.SEATS_MAX:
        return gauges.peak(events, start, end)
    if kind is Aggregation.SEATS_END:
        return gauges.at_end(events, start, end)
    total = gauges.integral(events, start, end)
    return None if total is None else held_value(kind, total, start, end)


AGGREGATIONS: Mapping[Aggregation, Callable[[Sequence[Contribution]], Decimal | None]] = {
    Aggregation.COUNT: _count,
    Aggregation.SUM: _sum,
    Aggregation.MAX: _max,
    Aggregation.MIN: _min,
    Aggregation.AVG: _avg,
    Aggregation.UNIQUE_COUNT: _unique_count,
    Aggregation.LATEST: _latest,
}


def aggregate(
    values: Sequence[Contribution],
    kind: Aggregation,
    window: tuple[datetime, datetime] | None = None,
) -> Decimal | None:
    """Fold the contributions of one (customer, window, group).

    No contributions: Decimal(0) for COUNT, SUM and UNIQUE_COUNT; None (no row) for
    MIN, MAX, AVG and LATEST. Render the result with `format_decimal`.

    The HELD aggregations need the `window` [start, end) and take `gauges.Held`
    contributions: every event of the group, before the window too (those at or
    after its end are ignored); None when none is before its end.
    """
    if kind in HELD:
        if window is None:
            raise ValueError(f"{kind.value} needs the window")
        return _held_aggregate(kind, values, *window)
    return AGGREGATIONS[kind](values)
