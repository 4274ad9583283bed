"""MeterService over gRPC, fed by ingest through JetStream: status codes and the
messages that name the field, exactly-once counting, skipped events in GetMeter,
LATEST whatever the arrival order, archiving."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from tests.client import Client, event, eventually, status_of
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def _meter(client: Client, aggregation: str = "COUNT", **fields: Any) -> meter_pb2.Meter:
    meter: meter_pb2.Meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=fields.pop("name", f"m-{uuid.uuid4().hex[:8]}"),
            event_name=fields.pop("event_name", "api.call"),
            aggregation=meter_pb2.Aggregation.Value(f"AGGREGATION_{aggregation}"),
            **fields,
        ),
    )
    return meter


async def _ingest(
    client: Client, events: list[ingest_pb2.Event]
) -> ingest_pb2.IngestEventsResponse:
    answer: ingest_pb2.IngestEventsResponse = await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events)
    )
    assert not answer.rejections, answer.rejections
    return answer


def _usage_request(
    meter_id: str, customer: str, start: datetime, end: datetime
) -> meter_pb2.QueryUsageRequest:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id=customer)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    return request


async def _usage(
    client: Client, meter_id: str, customer: str, start: datetime, end: datetime
) -> str:
    response = await client.call(
        client.meter.QueryUsage, _usage_request(meter_id, customer, start, end)
    )
    [row] = response.rows
    return str(row.value)


async def _settled(
    client: Client, meter_id: str, customer: str, start: datetime, end: datetime, want: str
) -> str:
    """The usage once it reaches `want`, or whatever it is after the timeout."""

    async def probe() -> str:
        return await _usage(client, meter_id, customer, start, end)

    return await eventually(probe, lambda value: value == want)


async def _status(call: Any) -> tuple[grpc.StatusCode | None, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return status_of(exc), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_errors_carry_the_right_status_and_name_the_field(client: Client) -> None:
    meta = client.metadata
    meter = await _meter(client, name="calls", group_by=["region"])

    async def create(**fields: Any) -> tuple[grpc.StatusCode | None, str]:
        request = meter_pb2.CreateMeterRequest(
            name="x", event_name="e", aggregation=meter_pb2.AGGREGATION_COUNT
        )
        for key, value in fields.items():
            setattr(request, key, value)
        return await _status(client.meter.CreateMeter(request, metadata=meta))

    assert await create(name="calls") == (
        grpc.StatusCode.ALREADY_EXISTS,
        "name: a meter named 'calls' already exists",
    )
    code, message = await create(aggregation=meter_pb2.AGGREGATION_AVG)
    assert (code, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "property: required for AGGREGATION_AVG",
    )
    code, message = await create(name="")
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "name: required")
    bad_filter = meter_pb2.CreateMeterRequest(
        name="f", event_name="e", aggregation=meter_pb2.AGGREGATION_COUNT
    )
    bad_filter.filter.conditions.add(key="region", operator=meter_pb2.OPERATOR_IN)
    code, message = await _status(client.meter.CreateMeter(bad_filter, metadata=meta))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("filter.conditions[0].values: OPERATOR_IN needs at least one")

    code, _ = await _status(
        client.meter.GetMeter(meter_pb2.GetMeterRequest(id=str(uuid.uuid4())), metadata=meta)
    )
    assert code == grpc.StatusCode.NOT_FOUND

    now = _now()
    cases: list[tuple[meter_pb2.QueryUsageRequest, grpc.StatusCode, str]] = []
    no_start = meter_pb2.QueryUsageRequest(meter_id=meter.id)
    no_start.end_time.FromDatetime(now)
    cases.append((no_start, grpc.StatusCode.INVALID_ARGUMENT, "start_time: required"))
    reversed_range = _usage_request(meter.id, "c", now, now - timedelta(hours=1))
    cases.append((reversed_range, grpc.StatusCode.INVALID_ARGUMENT, "end_time: must be after"))
    far = _usage_request(meter.id, "c", now, now)
    far.end_time.FromDatetime(datetime(9999, 12, 31, tzinfo=UTC))
    far.window_size = meter_pb2.WINDOW_SIZE_MONTH
    cases.append((far, grpc.StatusCode.INVALID_ARGUMENT, "end_time: must be between"))
    broken = _usage_request(meter.id, "c", now, now + timedelta(hours=1))
    broken.start_time.nanos = -5
    cases.append((broken, grpc.StatusCode.INVALID_ARGUMENT, "start_time: not a valid timestamp"))
    bad_dimension = _usage_request(meter.id, "c", now, now + timedelta(hours=1))
    bad_dimension.group_filter["tier"] = "pro"
    cases.append((bad_dimension, grpc.StatusCode.INVALID_ARGUMENT, "group_filter: 'tier'"))
    bad_zone = _usage_request(meter.id, "c", now, now + timedelta(hours=1))
    bad_zone.time_zone = "Europe/Atlantis"
    cases.append((bad_zone, grpc.StatusCode.INVALID_ARGUMENT, "time_zone: unknown"))
    minutes = _usage_request(meter.id, "c", now - timedelta(days=400), now)
    minutes.window_size = meter_pb2.WINDOW_SIZE_MINUTE
    cases.append((minutes, grpc.StatusCode.RESOURCE_EXHAUSTED, "window_size: "))
    for request, want_code, want_message in cases:
        code, message = await _status(client.meter.QueryUsage(request, metadata=meta))
        assert (code, message[: len(want_message)]) == (want_code, want_message), request


async def test_events_count_once_and_skipped_ones_show_in_get_meter(client: Client) -> None:
    summed = await _meter(client, "SUM", property="tokens")
    counted = await _meter(client, "COUNT")
    when = _now() - timedelta(minutes=5)
    events = [event(f"ok-{i}", "cus", "api.call", when, tokens=0.1) for i in range(10)]
    events += [
        event("no-tokens", "cus", "api.call", when, model="x"),
        event("word", "cus", "api.call", when, tokens="many"),
        event("other-name", "cus", "api.called", when, tokens=1000),
    ]
    await _ingest(client, events)
    again = await _ingest(client, events[:5])  # a client retry: duplicates at ingest
    assert (again.accepted_count, again.duplicate_count) == (0, 5)
    start, end = when - timedelta(hours=1), when + timedelta(hours=1)
    assert await _settled(client, counted.id, "cus", start, end, "12") == "12"
    assert await _settled(client, summed.id, "cus", start, end, "1") == "1"
    fetched = await client.call(client.meter.GetMeter, meter_pb2.GetMeterRequest(id=summed.id))
    assert dict(fetched.skipped_events) == {"missing_property": 1, "not_a_number": 1}
    fetched = await client.call(client.meter.GetMeter, meter_pb2.GetMeterRequest(id=counted.id))
    assert dict(fetched.skipped_events) == {}


async def test_latest_is_the_newest_event_whatever_the_arrival_order(client: Client) -> None:
    meter = await _meter(client, "LATEST", property="seats")
    base = _now() - timedelta(hours=2)
    stamps = [base + timedelta(minutes=10 * i) for i in range(6)]
    # Sent newest first, one call each: arrival order is the reverse of time order.
    for i in reversed(range(6)):
        await _ingest(client, [event(f"s-{i}", "cus", "api.call", stamps[i], seats=i + 1)])
    # Then a tie with the newest: the greater event_id ("s-5" < "s-5b") wins.
    await _ingest(client, [event("s-5b", "cus", "api.call", stamps[5], seats=42)])
    start, end = base - timedelta(hours=1), base + timedelta(hours=2)
    assert await _settled(client, meter.id, "cus", start, end, "42") == "42"
    # Within the first half hour, the latest is the event at +20 minutes.
    assert await _usage(client, meter.id, "cus", base, base + timedelta(minutes=30)) == "3"


async def test_an_archived_meter_stops_counting_and_keeps_its_history(client: Client) -> None:
    archived = await _meter(client, "COUNT")
    witness = await _meter(client, "COUNT")
    when = _now() - timedelta(minutes=30)
    start, end = when - timedelta(hours=1), when + timedelta(hours=1)
    await _ingest(client, [event(f"a-{i}", "cus", "api.call", when) for i in range(3)])
    assert await _settled(client, archived.id, "cus", start, end, "3") == "3"
    answer = await client.call(
        client.meter.ArchiveMeter, meter_pb2.ArchiveMeterRequest(id=archived.id)
    )
    assert answer.archived
    await _ingest(client, [event(f"b-{i}", "cus", "api.call", when) for i in range(4)])
    # Once the witness has counted the new events, the consumer has seen them.
    assert await _settled(client, witness.id, "cus", start, end, "7") == "7"
    assert await _usage(client, archived.id, "cus", start, end) == "3"
    listed = await client.call(client.meter.ListMeters, meter_pb2.ListMetersRequest())
    assert {m.id: m.archived for m in listed.meters} == {archived.id: True, witness.id: False}


@pytest.mark.parametrize("zone", ["UTC", "Asia/Kolkata"])
async def test_hour_windows_over_the_wire(client: Client, zone: str) -> None:
    meter = await _meter(client, "SUM", property="n")
    base = _now().replace(minute=0, second=0) - timedelta(hours=3)
    await _ingest(
        client,
        [
            event("a", "cus", "api.call", base + timedelta(minutes=1), n=1),
            event("b", "cus", "api.call", base + timedelta(minutes=59, seconds=59), n=2),
            event("c", "cus", "api.call", base + timedelta(hours=1), n=4),
        ],
    )
    start, end = base, base + timedelta(hours=2)
    assert await _settled(client, meter.id, "cus", start, end, "7") == "7"
    request = _usage_request(meter.id, "cus", start, end)
    request.window_size = meter_pb2.WINDOW_SIZE_HOUR
    request.time_zone = zone
    response = await client.call(client.meter.QueryUsage, request)
    got = [
        (r.window_start.ToDatetime(tzinfo=UTC), r.window_end.ToDatetime(tzinfo=UTC), r.value)
        for r in response.rows
    ]
    if zone == "UTC":
        assert got == [
            (base, base + timedelta(hours=1), "3"),
            (base + timedelta(hours=1), end, "4"),
        ]
    else:  # Kolkata is +05:30: its hours start at half past, UTC
        half = timedelta(minutes=30)
        assert got == [
            (base, base + half, "1"),
            (base + half, base + 3 * half, "6"),
        ]
