"""Drives meter's real code (servicer, service, store) against PostgreSQL, in process.

Events are built once and given to both sides: as `ingest_pb2.Event` to meter's
fold (the path the consumer and the backfill take) and as `RawEvent` to the pure
reference. The metadata conversion here follows API.md on its own (int ->
Decimal(int), float -> Decimal(repr(x))), so it checks meter's conversion rather
than reusing it.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from services.common.context import set_tenant
from services.meter.api import MeterServicer
from services.meter.domain.filters import Condition, Conjunction, Filter, Operator
from services.meter.domain.reference import RawEvent, Row
from services.meter.domain.values import MetaValue
from services.meter.service import MeterService
from services.meter.store import MeterStore
from tests.client import event as proto_event
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

# What a client sends: str, int (int_value), float (number_value) or bool.
Raw = str | int | float | bool

# A usage row as a comparable tuple: customer, window start, window end, group, value.
RowTuple = tuple[str, datetime, datetime, tuple[tuple[str, str], ...], str]


def meta(value: Raw) -> MetaValue:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def proto_value(value: Raw) -> value_pb2.Value:
    if isinstance(value, bool):
        return value_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return value_pb2.Value(int_value=value)
    if isinstance(value, float):
        return value_pb2.Value(number_value=value)
    return value_pb2.Value(string_value=value)


@dataclass(frozen=True)
class Ev:
    """One event in both forms."""

    proto: ingest_pb2.Event
    raw: RawEvent


def ev(
    event_id: str, customer: str, when: datetime, name: str = "api.call", /, **metadata: Raw
) -> Ev:
    return Ev(
        proto_event(event_id, customer, name, when, **metadata),
        RawEvent(event_id, customer, name, when, {k: meta(v) for k, v in metadata.items()}),
    )


@dataclass(frozen=True)
class Cond:
    """A filter condition in raw form, to build both the proto and the domain one."""

    key: str
    operator: str  # the Operator member's name, e.g. "EQUALS"
    value: Raw | None = None
    values: tuple[Raw, ...] = ()


@dataclass(frozen=True)
class Flt:
    conjunction: str = "AND"
    conditions: tuple[Cond, ...] = ()
    filters: tuple[Flt, ...] = ()

    def proto(self) -> meter_pb2.Filter:
        message = meter_pb2.Filter(
            conjunction=meter_pb2.Conjunction.Value(f"CONJUNCTION_{self.conjunction}"),
            filters=[f.proto() for f in self.filters],
        )
        for c in self.conditions:
            condition = message.conditions.add(
                key=c.key, operator=meter_pb2.Operator.Value(f"OPERATOR_{c.operator}")
            )
            if c.value is not None:
                condition.value.CopyFrom(proto_value(c.value))
            condition.values.extend(proto_value(v) for v in c.values)
        return message

    def domain(self) -> Filter:
        return Filter(
            conjunction=Conjunction[self.conjunction],
            conditions=tuple(
                Condition(
                    c.key,
                    Operator[c.operator],
                    None if c.value is None else meta(c.value),
                    tuple(meta(v) for v in c.values),
                )
                for c in self.conditions
            ),
            filters=tuple(f.domain() for f in self.filters),
        )


def row_tuples(rows: Sequence[meter_pb2.UsageRow]) -> list[RowTuple]:
    return sorted(
        (
            r.customer_id,
            r.window_start.ToDatetime(tzinfo=UTC),
            r.window_end.ToDatetime(tzinfo=UTC),
            tuple(sorted(r.group.items())),
            r.value,
        )
        for r in rows
    )


def reference_tuples(rows: Sequence[Row]) -> list[RowTuple]:
    return sorted(
        (r.customer_id, r.window_start, r.window_end, tuple(sorted(r.group.items())), r.value)
        for r in rows
    )


class Meters:
    """meter's servicer and service over one pool; each call names its tenant."""

    def __init__(self, store: MeterStore) -> None:
        self.store = store
        self.service = MeterService(store)
        self.servicer = MeterServicer(self.service, store)

    @staticmethod
    def new_tenant() -> str:
        return f"t-{uuid.uuid4().hex}"

    async def create(
        self,
        tenant: str,
        *,
        name: str = "",
        event_name: str = "api.call",
        aggregation: str = "COUNT",
        property: str = "",
        filter: Flt | meter_pb2.Filter | None = None,
        group_by: Sequence[str] = (),
        **extra: Any,
    ) -> meter_pb2.Meter:
        request = meter_pb2.CreateMeterRequest(
            name=name or f"m-{uuid.uuid4().hex[:8]}",
            event_name=event_name,
            aggregation=meter_pb2.Aggregation.Value(f"AGGREGATION_{aggregation}"),
            property=property,
            group_by=list(group_by),
            **extra,
        )
        if isinstance(filter, Flt):
            request.filter.CopyFrom(filter.proto())
        elif filter is not None:
            request.filter.CopyFrom(filter)
        set_tenant(tenant)
        return await self.servicer.CreateMeter(request, None)

    async def get(self, tenant: str, meter_id: str) -> meter_pb2.Meter:
        set_tenant(tenant)
        return await self.servicer.GetMeter(meter_pb2.GetMeterRequest(id=meter_id), None)

    async def archive(self, tenant: str, meter_id: str) -> meter_pb2.Meter:
        set_tenant(tenant)
        return await self.servicer.ArchiveMeter(meter_pb2.ArchiveMeterRequest(id=meter_id), None)

    async def send(self, tenant: str, events: Sequence[Ev]) -> int:
        """Folds the events as the consumer does: one fetched EventBatch."""
        batch = ingest_pb2.EventBatch(tenant_id=tenant, events=[e.proto for e in events])
        return await self.service.fold_batches([batch])

    async def query_request(
        self, tenant: str, request: meter_pb2.QueryUsageRequest
    ) -> list[RowTuple]:
        set_tenant(tenant)
        response = await self.servicer.QueryUsage(request, None)
        return row_tuples(response.rows)

    async def query(
        self,
        tenant: str,
        meter_id: str,
        start: datetime,
        end: datetime,
        *,
        window: str = "NONE",
        tz: str = "",
        customer: str = "",
        group_by: Sequence[str] = (),
        group_filter: Mapping[str, str] | None = None,
    ) -> list[RowTuple]:
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter_id,
            customer_id=customer,
            window_size=meter_pb2.WindowSize.Value(f"WINDOW_SIZE_{window}"),
            time_zone=tz,
            group_by=list(group_by),
            group_filter=dict(group_filter or {}),
        )
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)
        return await self.query_request(tenant, request)

    async def total(
        self, tenant: str, meter_id: str, start: datetime, end: datetime, customer: str
    ) -> str:
        [(_, _, _, _, value)] = await self.query(tenant, meter_id, start, end, customer=customer)
        return value
