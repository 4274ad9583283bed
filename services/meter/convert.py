"""Protobuf <-> meter's domain and store types."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument
from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.filters import (
    Condition,
    Conjunction,
    Filter,
    Operator,
    condition_count,
)
from services.meter.domain.values import MetaValue
from services.meter.domain.windows import WindowSize
from services.meter.store import MeterRecord
from usagebilling.common.v1 import value_pb2
from usagebilling.meter.v1 import meter_pb2

BACKFILL_STATES = {
    "RUNNING": meter_pb2.BACKFILL_STATE_RUNNING,
    "DONE": meter_pb2.BACKFILL_STATE_DONE,
    "FAILED": meter_pb2.BACKFILL_STATE_FAILED,
}


def meta_value(value: value_pb2.Value) -> MetaValue:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        # The shortest repr, so that 0.1 is exactly 0.1 (API.md).
        return Decimal(repr(value.number_value))
    if kind == "int_value":
        return Decimal(value.int_value)
    if kind == "bool_value":
        return value.bool_value
    return ""


def metadata(values: Mapping[str, value_pb2.Value]) -> dict[str, MetaValue]:
    return {key: meta_value(value) for key, value in values.items()}


def to_datetime(ts: Timestamp) -> datetime:
    # Cheaper than Timestamp.ToDatetime, which matters on the consumer's hot path.
    return datetime.fromtimestamp(ts.seconds, UTC).replace(microsecond=ts.nanos // 1000)


def optional_time(message: Any, field: str) -> datetime | None:
    """A request's Timestamp field as a UTC datetime, None when unset; InvalidArgument
    naming the field when it is not a valid Timestamp (seconds outside the years
    1..9999, nanos outside [0, 1e9))."""
    if not message.HasField(field):
        return None
    ts: Timestamp = getattr(message, field)
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise InvalidArgument(f"{field}: not a valid timestamp: {exc}") from None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_timestamp(when: datetime) -> Timestamp:
    """As Timestamp.FromDatetime (a naive datetime taken as UTC), by arithmetic:
    a third of its time (a month of HOUR windows converts 600 bounds per call)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    since = when - _EPOCH
    return Timestamp(seconds=since.days * 86_400 + since.seconds, nanos=since.microseconds * 1000)


def aggregation(value: int) -> Aggregation:
    result: Aggregation = _enum(Aggregation, meter_pb2.Aggregation, value, "aggregation")
    return result


def window_size(value: int) -> WindowSize:
    result: WindowSize = _enum(WindowSize, meter_pb2.WindowSize, value, "window_size")
    return result


def _enum(enum_type: Any, proto_enum: Any, value: int, field: str) -> Any:
    name = proto_enum.Name(value) if value in proto_enum.values() else ""
    try:
        return enum_type(name)
    except ValueError:
        raise InvalidArgument(f"{field}: {value} is not a known value") from None


def domain_filter(message: meter_pb2.Filter, field: str = "filter") -> Filter:
    return Filter(
        conjunction=_enum(
            Conjunction, meter_pb2.Conjunction, message.conjunction or 1, f"{field}.conjunction"
        ),
        conditions=tuple(
            Condition(
                key=c.key,
                operator=_enum(
                    Operator, meter_pb2.Operator, c.operator, f"{field}.conditions[{i}].operator"
                ),
                value=meta_value(c.value) if c.HasField("value") else None,
                values=tuple(meta_value(v) for v in c.values),
            )
            for i, c in enumerate(message.conditions)
        ),
        filters=tuple(
            domain_filter(f, f"{field}.filters[{i}]") for i, f in enumerate(message.filters)
        ),
    )


def spec(record: MeterRecord) -> MeterSpec:
    return MeterSpec(
        event_name=record.event_name,
        aggregation=Aggregation[record.aggregation],
        property=record.property,
        filter=domain_filter(json_format.ParseDict(record.filter, meter_pb2.Filter()))
        if record.filter
        else None,
        group_by=record.group_by,
        operation_property=record.operation_property,
    )


def condition_count_json(stored: dict[str, Any] | None) -> int:
    """How many conditions a stored filter (the JSON form) holds."""
    if not stored:
        return 0
    return condition_count(json_format.ParseDict(stored, meter_pb2.Filter()))


def filter_json(message: meter_pb2.Filter) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message)
    return result


def proto_meter(
    record: MeterRecord, skipped_events: Mapping[str, int] | None = None
) -> meter_pb2.Meter:
    meter = meter_pb2.Meter(
        id=record.id,
        name=record.name,
        event_name=record.event_name,
        aggregation=meter_pb2.Aggregation.Value(Aggregation[record.aggregation].value),
        property=record.property,
        group_by=record.group_by,
        measurement_unit=record.measurement_unit,
        description=record.description,
        operation_property=record.operation_property,
        create_time=to_timestamp(record.created_at),
        archived=record.archived_at is not None,
        backfill_state=BACKFILL_STATES.get(
            record.backfill_state, meter_pb2.BACKFILL_STATE_UNSPECIFIED
        ),
    )
    if skipped_events:
        meter.skipped_events.update(skipped_events)
    if record.filter:
        meter.filter.CopyFrom(json_format.ParseDict(record.filter, meter_pb2.Filter()))
    if record.archived_at:
        meter.archive_time.CopyFrom(to_timestamp(record.archived_at))
    return meter
