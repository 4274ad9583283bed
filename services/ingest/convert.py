"""Protobuf <-> ingest's domain and store types."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.values import RawValue
from services.ingest.domain.validation import IncomingEvent, InvalidTime
from services.ingest.store import EventRow
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2


def raw_value(value: value_pb2.Value) -> RawValue:
    kind = value.WhichOneof("kind")
    if kind is None:
        return ""
    result: RawValue = getattr(value, kind)
    return result


def proto_value(value: Any) -> value_pb2.Value:
    if isinstance(value, bool):
        return value_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return value_pb2.Value(int_value=value)
    if isinstance(value, float):
        return value_pb2.Value(number_value=value)
    return value_pb2.Value(string_value=str(value))


def to_datetime(ts: Timestamp) -> datetime:
    # Cheaper than Timestamp.ToDatetime, which matters per event.
    return datetime.fromtimestamp(ts.seconds, UTC).replace(microsecond=ts.nanos // 1000)


def to_timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def _event_time(event: ingest_pb2.Event) -> datetime | InvalidTime | None:
    if not event.HasField("timestamp"):
        return None
    try:
        return to_datetime(event.timestamp)
    except (ValueError, OverflowError, OSError):
        return InvalidTime(event.timestamp.seconds)


def incoming(event: ingest_pb2.Event) -> IncomingEvent:
    return IncomingEvent(
        event_id=event.event_id,
        customer_id=event.customer_id,
        event_name=event.event_name,
        timestamp=_event_time(event),
        metadata={key: raw_value(value) for key, value in event.metadata.items()},
    )


def proto_event(event: EventRow) -> ingest_pb2.Event:
    return ingest_pb2.Event(
        event_id=event.event_id,
        customer_id=event.customer_id,
        event_name=event.event_name,
        timestamp=to_timestamp(event.event_time),
        metadata={key: proto_value(value) for key, value in event.metadata.items()},
    )
