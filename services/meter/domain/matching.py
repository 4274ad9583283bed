"""What an event contributes to each meter of its tenant: the rows the consumer
and the backfill fold (pure; the store makes folding idempotent)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.meter.domain.aggregation import MeterSpec, extract, group_key, meter_matches
from services.meter.domain.values import MetaValue


@dataclass(frozen=True)
class FoldedEvent:
    """One (meter, event) row. `value` holds numbers, `text_value` the canonical
    string UNIQUE_COUNT counts; a `skip_reason` records why nothing counted."""

    meter_id: str
    event_id: str
    customer_id: str
    event_time: datetime
    value: Decimal | None
    text_value: str | None
    dims: dict[str, str]
    skip_reason: str | None


def fold_event(
    meters: Sequence[tuple[str, MeterSpec]],
    *,
    event_id: str,
    customer_id: str,
    event_name: str,
    event_time: datetime,
    metadata: Mapping[str, MetaValue],
) -> list[FoldedEvent]:
    rows = []
    for meter_id, meter in meters:
        if not meter_matches(meter, event_name, metadata):
            continue
        value, skip_reason = extract(meter, metadata)
        rows.append(
            FoldedEvent(
                meter_id=meter_id,
                event_id=event_id,
                customer_id=customer_id,
                event_time=event_time,
                value=value if isinstance(value, Decimal) else None,
                text_value=value if isinstance(value, str) else None,
                dims=group_key(meter, metadata),
                skip_reason=skip_reason,
            )
        )
    return rows
