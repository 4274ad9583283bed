"""What an event contributes to each meter of its tenant: the rows the consumer
and the backfill fold (pure; the store makes folding idempotent).

`Matcher` is built once per batch of events: it finds an event's meters by
name, and knows which metadata keys they read, so that the caller converts only
those."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

from services.meter.domain.aggregation import (
    DEFAULT_OPERATION_PROPERTY,
    SEATS,
    MeterSpec,
    extract,
    group_key,
)
from services.meter.domain.filters import Filter, matches
from services.meter.domain.values import MetaValue

# PostgreSQL's text and jsonb cannot hold U+0000 (services.common.values): a
# UNIQUE_COUNT value or a group-by value holding one is skipped with this reason.
SKIP_CONTAINS_NUL = "contains_nul"


class FoldedEvent(NamedTuple):
    """One (meter, event) row. `value` holds numbers (a seat's: 1 for add, 0 for
    remove), `text_value` the canonical string UNIQUE_COUNT counts (a seat's item
    id), `dims` the group-by values (None when the meter
    has no group-by); a `skip_reason` records why nothing counted.

    A plain tuple, in the store's column order: the consumer makes one per
    meter per event, and the store copies them to PostgreSQL as they are."""

    meter_key: int
    customer_id: str
    event_time: datetime
    event_id: str
    value: Decimal | None
    text_value: str | None
    dims: dict[str, str] | None
    skip_reason: str | None


def filter_keys(f: Filter | None) -> tuple[str, ...]:
    """The metadata keys a filter reads, in a stable order."""
    if f is None:
        return ()
    keys = {c.key for c in f.conditions}
    for nested in f.filters:
        keys.update(filter_keys(nested))
    return tuple(sorted(keys))


def read_keys(meter: MeterSpec) -> set[str]:
    """Every metadata key that decides what an event contributes to the meter."""
    return {
        *filter_keys(meter.filter),
        *meter.group_by,
        *([meter.property] if meter.property else []),
        *([operation_key(meter)] if meter.aggregation in SEATS else []),
    }


def operation_key(meter: MeterSpec) -> str:
    """A seat meter's operation key."""
    return meter.operation_property or DEFAULT_OPERATION_PROPERTY


class Matcher:
    """Built from (meter key, spec) pairs."""

    def __init__(self, meters: Iterable[tuple[int, MeterSpec]]) -> None:
        self._by_name: dict[str, list[tuple[int, MeterSpec]]] = defaultdict(list)
        self._keys: dict[str, frozenset[str]] = {}
        for meter_key, spec in meters:
            self._by_name[spec.event_name].append((meter_key, spec))
        for name, group in self._by_name.items():
            self._keys[name] = frozenset(k for _, spec in group for k in read_keys(spec))

    def keys_for(self, event_name: str) -> frozenset[str] | None:
        """The metadata keys to convert for an event of this name; None when no
        meter counts it (the event can be skipped without looking inside)."""
        return self._keys.get(event_name)

    def fold(
        self,
        *,
        event_id: str,
        customer_id: str,
        event_name: str,
        event_time: datetime,
        metadata: Mapping[str, MetaValue],
    ) -> list[FoldedEvent]:
        rows = []
        for meter_key, spec in self._by_name.get(event_name, ()):
            if not matches(spec.filter, metadata):
                continue
            value, skip_reason = extract(spec, metadata)
            number = value if isinstance(value, Decimal) else None
            text = value if isinstance(value, str) else None
            if isinstance(value, tuple):  # a seat: (item id, 1 for add or 0)
                text, number = value
            dims = group_key(spec, metadata) if spec.group_by else None
            if (text is not None and "\x00" in text) or (
                dims is not None and any("\x00" in v for v in dims.values())
            ):
                number, text, dims, skip_reason = None, None, None, SKIP_CONTAINS_NUL
            rows.append(
                FoldedEvent(
                    meter_key,
                    customer_id,
                    event_time,
                    event_id,
                    number,
                    text,
                    dims,
                    skip_reason,
                )
            )
        return rows
