"""meter's use cases: define meters, fold events into them, answer usage."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.logs import get_logger
from services.meter import convert
from services.meter.domain.aggregation import Aggregation, MeterSpec, average, validate_meter
from services.meter.domain.matching import FoldedEvent, fold_event
from services.meter.domain.values import format_decimal
from services.meter.domain.windows import WindowSize, validate_time_zone, windows
from services.meter.store import MeterRecord, MeterStore, UsageGroup
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

log = get_logger(__name__)

MAX_WINDOWS = 100_000


@dataclass(frozen=True)
class UsageRow:
    window_start: datetime
    window_end: datetime
    customer_id: str
    group: dict[str, str]
    value: str


def _fold(
    meters: Sequence[tuple[str, MeterSpec]], tenant_id: str, events: Iterable[ingest_pb2.Event]
) -> list[tuple[str, FoldedEvent]]:
    rows: list[tuple[str, FoldedEvent]] = []
    for event in events:
        for row in fold_event(
            meters,
            event_id=event.event_id,
            customer_id=event.customer_id,
            event_name=event.event_name,
            event_time=convert.to_datetime(event.timestamp),
            metadata=convert.metadata(event.metadata),
        ):
            rows.append((tenant_id, row))
    return rows


def _value(meter: MeterRecord, group: UsageGroup) -> str:
    if group.value is None:
        return "0"
    if meter.aggregation == Aggregation.AVG.name:
        return format_decimal(average(group.value, group.count))
    return format_decimal(group.value)


def _window_count_bound(start: datetime, end: datetime, size: WindowSize) -> int:
    """An upper bound on the windows of [start, end), known before building them."""
    seconds = {WindowSize.MINUTE: 60, WindowSize.HOUR: 1800, WindowSize.DAY: 82800}
    if size is WindowSize.NONE:
        return 1
    if size is WindowSize.MONTH:
        return (end.year - start.year) * 12 + end.month - start.month + 2
    return int((end - start).total_seconds() // seconds[size]) + 2


class MeterService:
    def __init__(self, store: MeterStore) -> None:
        self._store = store
        # Set by the wiring: starts the backfill of a new meter.
        self.on_created: Callable[[MeterRecord], None] = lambda record: None

    async def create_meter(
        self, tenant_id: str, request: meter_pb2.CreateMeterRequest
    ) -> MeterRecord:
        domain_filter = (
            convert.domain_filter(request.filter) if request.HasField("filter") else None
        )
        validate_meter(
            request.name,
            request.event_name,
            convert.aggregation(request.aggregation),
            request.property,
            domain_filter,
            list(request.group_by),
        )
        record = await self._store.create_meter(
            tenant_id,
            name=request.name,
            event_name=request.event_name,
            aggregation=convert.aggregation(request.aggregation).name,
            property=request.property,
            filter=convert.filter_json(request.filter) if domain_filter else None,
            group_by=list(request.group_by),
            measurement_unit=request.measurement_unit,
            description=request.description,
        )
        log.info("meter_created", meter_id=record.id, name=record.name)
        self.on_created(record)
        return record

    async def fold_batches(self, batches: Sequence[ingest_pb2.EventBatch]) -> int:
        """Folds the events of fetched messages into every matching meter, in one
        transaction. Meters are loaded after the fetch, so a meter created before
        an event was consumed either sees it here or in its backfill."""
        tenants = sorted({b.tenant_id for b in batches})
        by_tenant: dict[str, list[tuple[str, MeterSpec]]] = defaultdict(list)
        for record in await self._store.active_meters(tenants):
            by_tenant[record.tenant_id].append((record.id, convert.spec(record)))
        rows: list[tuple[str, FoldedEvent]] = []
        for batch in batches:
            if by_tenant.get(batch.tenant_id):
                rows += _fold(by_tenant[batch.tenant_id], batch.tenant_id, batch.events)
        return await self._store.fold(rows)

    async def fold_for_meter(self, record: MeterRecord, events: Sequence[ingest_pb2.Event]) -> int:
        return await self._store.fold(
            _fold([(record.id, convert.spec(record))], record.tenant_id, events)
        )

    async def query_usage(
        self, tenant_id: str, request: meter_pb2.QueryUsageRequest
    ) -> list[UsageRow]:
        if not request.meter_id:
            raise InvalidArgument("meter_id: required")
        meter = await self._store.get_meter(tenant_id, request.meter_id)
        if not request.HasField("start_time") or not request.HasField("end_time"):
            raise InvalidArgument("start_time and end_time: both are required")
        start = convert.to_datetime(request.start_time)
        end = convert.to_datetime(request.end_time)
        if end <= start:
            raise InvalidArgument("end_time: must be after start_time")
        size = convert.window_size(request.window_size or meter_pb2.WINDOW_SIZE_NONE)
        tz = request.time_zone or "UTC"
        validate_time_zone(tz)
        unknown = [k for k in [*request.group_by, *request.group_filter] if k not in meter.group_by]
        if unknown:
            raise InvalidArgument(
                f"group_by: {unknown[0]!r} is not a dimension of meter {meter.name!r}"
                f" (its group_by is {list(meter.group_by)})"
            )
        if _window_count_bound(start, end, size) > MAX_WINDOWS:
            raise ResourceExhausted(
                f"window_size: the range holds too many windows; at most {MAX_WINDOWS} per query"
            )
        spans = windows(start, end, size, tz)
        groups = await self._store.usage(
            meter,
            customer_id=request.customer_id,
            bounds=[s for s, _ in spans],
            end=end,
            group_by=list(request.group_by),
            group_filter=dict(request.group_filter),
        )
        rows = [
            UsageRow(
                window_start=spans[g.window - 1][0],
                window_end=spans[g.window - 1][1],
                customer_id=g.customer_id,
                group=dict(zip(request.group_by, g.dims, strict=True)),
                value=_value(meter, g),
            )
            for g in groups
        ]
        if not rows and size is WindowSize.NONE and request.customer_id:
            group = {key: request.group_filter.get(key, "") for key in request.group_by}
            rows = [UsageRow(start, end, request.customer_id, group, "0")]
        return rows
