"""meter's use cases: define meters, fold events into them, answer usage."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common.errors import InvalidArgument
from services.common.logs import get_logger
from services.meter import convert
from services.meter.domain.aggregation import Aggregation, MeterSpec, validate_meter
from services.meter.domain.matching import FoldedEvent, Matcher
from services.meter.domain.query import empty_row_group, plan_query, usage_value
from services.meter.store import MeterRecord, MeterStore
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

log = get_logger(__name__)


@dataclass(frozen=True)
class UsageRow:
    window_start: datetime
    window_end: datetime
    customer_id: str
    group: dict[str, str]
    value: str


def _fold(
    meters: Sequence[tuple[int, MeterSpec]], events: Iterable[ingest_pb2.Event]
) -> list[FoldedEvent]:
    # The consumer's hot path: only the metadata keys some meter reads are
    # converted, and only for events that some meter counts.
    matcher = Matcher(meters)
    rows: list[FoldedEvent] = []
    for event in events:
        keys = matcher.keys_for(event.event_name)
        if keys is None:
            continue
        raw = event.metadata
        rows += matcher.fold(
            event_id=event.event_id,
            customer_id=event.customer_id,
            event_name=event.event_name,
            event_time=convert.to_datetime(event.timestamp),
            metadata={k: convert.meta_value(raw[k]) for k in keys if k in raw},
        )
    return rows


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
            measurement_unit=request.measurement_unit,
            description=request.description,
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
        by_tenant: dict[str, list[tuple[int, MeterSpec]]] = defaultdict(list)
        for record in await self._store.active_meters(tenants):
            by_tenant[record.tenant_id].append((record.key, convert.spec(record)))
        rows: list[FoldedEvent] = []
        for batch in batches:
            if by_tenant.get(batch.tenant_id):
                rows += _fold(by_tenant[batch.tenant_id], batch.events)
        return await self._store.fold(rows)

    async def fold_for_meter(self, record: MeterRecord, events: Sequence[ingest_pb2.Event]) -> int:
        return await self._store.fold(_fold([(record.key, convert.spec(record))], events))

    async def get_meter(self, tenant_id: str, meter_id: str) -> tuple[MeterRecord, dict[str, int]]:
        """The meter and how many matching events it skipped, by reason."""
        if not meter_id:
            raise InvalidArgument("id: required")
        record = await self._store.get_meter(tenant_id, meter_id)
        return record, await self._store.skipped_counts(tenant_id, record.id)

    async def query_usage(
        self, tenant_id: str, request: meter_pb2.QueryUsageRequest
    ) -> list[UsageRow]:
        if not request.meter_id:
            raise InvalidArgument("meter_id: required")
        meter = await self._store.get_meter(tenant_id, request.meter_id)
        query = plan_query(
            meter.group_by,
            customer_id=request.customer_id,
            start=convert.optional_time(request, "start_time"),
            end=convert.optional_time(request, "end_time"),
            window_size=convert.window_size(request.window_size or meter_pb2.WINDOW_SIZE_NONE),
            time_zone=request.time_zone,
            group_by=list(request.group_by),
            group_filter=dict(request.group_filter),
        )
        groups = await self._store.usage(
            meter,
            customer_id=query.customer_id,
            bounds=[s for s, _ in query.windows],
            end=query.end,
            group_by=query.group_by,
            group_filter=dict(query.group_filter),
        )
        aggregation = Aggregation[meter.aggregation]
        rows = [
            UsageRow(
                window_start=query.windows[g.window - 1][0],
                window_end=query.windows[g.window - 1][1],
                customer_id=g.customer_id,
                group=dict(zip(query.group_by, g.dims, strict=True)),
                value=usage_value(aggregation, g.value, g.count),
            )
            for g in groups
        ]
        empty_group = empty_row_group(query)
        if not rows and empty_group is not None:
            rows = [UsageRow(query.start, query.end, query.customer_id, empty_group, "0")]
        return rows
