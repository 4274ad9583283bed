"""meter's limits over gRPC, with the measured cases of issue 10: a 200,000-window
query, a 20,000-condition filter, 500 meters. Each is refused before any work, with
the status the contract gives; and while a tenant runs the largest requests allowed,
another tenant's event is still counted promptly (the delay is printed)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from tests.client import Client, event, status_of
from tools.suite import SERVICES, Suite
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

MINUTE = timedelta(minutes=1)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


async def _create(client: Client, event_name: str = "api.call", **fields: Any) -> meter_pb2.Meter:
    meter: meter_pb2.Meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=f"m-{uuid.uuid4().hex[:12]}",
            event_name=event_name,
            aggregation=meter_pb2.AGGREGATION_COUNT,
            **fields,
        ),
    )
    return meter


async def _status(call: Any) -> tuple[grpc.StatusCode | None, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return status_of(exc), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _query(meter_id: str, start: datetime, end: datetime, size: int) -> meter_pb2.QueryUsageRequest:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id, window_size=size)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    return request


async def _counted_after(client: Client, meter_id: str, label: str) -> float:
    """Sends one event and returns the seconds until QueryUsage counts it."""
    customer = f"c-{uuid.uuid4().hex[:8]}"
    sent_at = _now()
    request = _query(meter_id, sent_at - timedelta(hours=1), sent_at + timedelta(hours=1), 1)
    request.customer_id = customer
    begin = time.perf_counter()
    answer = await client.call(
        client.ingest.IngestEvents,
        ingest_pb2.IngestEventsRequest(events=[event(label, customer, "other.call", sent_at)]),
    )
    assert answer.accepted_count == 1, answer
    while time.perf_counter() - begin < 60:
        response = await client.call(client.meter.QueryUsage, request)
        if response.rows and response.rows[0].value == "1":
            return time.perf_counter() - begin
        await asyncio.sleep(0.05)
    raise AssertionError(f"{label}: not counted within 60 s")


async def _done_backfilling(client: Client, meter_id: str) -> None:
    for _ in range(600):
        meter = await client.call(client.meter.GetMeter, meter_pb2.GetMeterRequest(id=meter_id))
        if meter.backfill_state == meter_pb2.BACKFILL_STATE_DONE:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("backfill not done")


async def _other_tenant(suite: Suite, new_tenant: Callable[[], tuple[str, str]]) -> Client:
    _, secret = new_tenant()
    return Client({s: suite.address(s) for s in SERVICES}, secret)


# --- refused before work ----------------------------------------------------------------


async def test_the_200000_window_minute_query_is_refused_at_once(client: Client) -> None:
    meter = await _create(client)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    request = _query(meter.id, start, start + 200_000 * MINUTE, meter_pb2.WINDOW_SIZE_MINUTE)
    begin = time.perf_counter()
    code, message = await _status(client.meter.QueryUsage(request, metadata=client.metadata))
    took = time.perf_counter() - begin
    print(f"200,000-window MINUTE query refused in {took * 1000:.0f} ms (was 12.2 s of CPU)")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert message == (
        "window_size: the range holds 200,000 WINDOW_SIZE_MINUTE windows; at most 100,000 per query"
    )
    assert took < 5  # a loaded machine; milliseconds on an idle one


async def test_the_20000_condition_filter_is_invalid_argument(client: Client) -> None:
    request = meter_pb2.CreateMeterRequest(
        name="wide", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
    )
    request.filter.conjunction = meter_pb2.CONJUNCTION_OR
    for i in range(20_000):
        request.filter.conditions.add(
            key="region",
            operator=meter_pb2.OPERATOR_EQUALS,
            value=value_pb2.Value(string_value=f"r{i}"),
        )
    code, message = await _status(client.meter.CreateMeter(request, metadata=client.metadata))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message == (
        "filter.conditions: at most 100 conditions in a filter, nested filters included"
    )
    long_list = meter_pb2.CreateMeterRequest(
        name="long", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
    )
    long_list.filter.conditions.add(key="region", operator=meter_pb2.OPERATOR_IN).values.extend(
        value_pb2.Value(int_value=i) for i in range(101)
    )
    code, message = await _status(client.meter.CreateMeter(long_list, metadata=client.metadata))
    assert (code, message) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "filter.conditions[0].values: at most 100 values",
    )
    meter = await _create(client)
    many_keys = meter_pb2.QueryUsageRequest(meter_id=meter.id)
    many_keys.group_by.extend(f"k{i}" for i in range(11))
    code, message = await _status(client.meter.QueryUsage(many_keys, metadata=client.metadata))
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "group_by: at most 10 keys")


async def test_500_meters_stop_at_the_quotas(client: Client) -> None:
    outcomes: Counter[tuple[str, str]] = Counter()
    for i in range(500):
        event_name = "api.call" if i < 30 else f"event-{i % 25}"
        code, message = await _status(
            client.meter.CreateMeter(
                meter_pb2.CreateMeterRequest(
                    name=f"m-{i}", event_name=event_name, aggregation=meter_pb2.AGGREGATION_COUNT
                ),
                metadata=client.metadata,
            )
        )
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, message)
        outcomes[(code.name if code else "", message.split(" ")[0])] += 1
    # 20 on api.call (10 refused), then 80 more in all; the other 400 refused.
    assert outcomes == Counter(
        {
            ("OK", ""): 100,
            ("RESOURCE_EXHAUSTED", "event_name:"): 10,
            ("RESOURCE_EXHAUSTED", "meters:"): 390,
        }
    )
    code, message = await _status(
        client.meter.CreateMeter(
            meter_pb2.CreateMeterRequest(
                name="one-more", event_name="new", aggregation=meter_pb2.AGGREGATION_COUNT
            ),
            metadata=client.metadata,
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "USAGEBILLING_MAX_METERS_PER_TENANT = 100" in message


# --- others are not held up -------------------------------------------------------------


async def test_the_largest_allowed_queries_do_not_hold_up_other_tenants(
    client: Client, suite: Suite, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    # Tenant A: an event in each of 20,000 minutes, then four loops of the largest
    # query allowed (100,000 MINUTE windows) in parallel.
    meter = await _create(client)
    now = _now()
    first = now - 30 * timedelta(days=1)
    for batch in range(20):
        events = [
            event(f"a-{batch}-{i}", "cus", "api.call", first + (batch * 1000 + i) * MINUTE)
            for i in range(1000)
        ]
        await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events))
    end = now.replace(second=0) + 2 * MINUTE  # whole minutes: exactly 100,000 windows
    largest = _query(meter.id, end - 100_000 * MINUTE, end, meter_pb2.WINDOW_SIZE_MINUTE)
    for _ in range(600):
        answer = await client.call(client.meter.QueryUsage, largest)
        if len(answer.rows) == 20_000:
            break
        await asyncio.sleep(0.2)
    assert len(answer.rows) == 20_000

    other = await _other_tenant(suite, new_tenant)
    try:
        other_meter = await _create(other, event_name="other.call")
        await _done_backfilling(other, other_meter.id)
        quiet = await _counted_after(other, other_meter.id, "quiet")
        stop = asyncio.Event()
        answered = 0

        async def abuse() -> None:
            nonlocal answered
            while not stop.is_set():
                await client.call(client.meter.QueryUsage, largest)
                answered += 1

        loops = [asyncio.create_task(abuse()) for _ in range(4)]
        await asyncio.sleep(1)
        delays = [await _counted_after(other, other_meter.id, f"busy-{i}") for i in range(3)]
        stop.set()
        await asyncio.gather(*loops)
    finally:
        await other.close()
    print(
        f"other tenant counted in {quiet:.2f} s when idle, in"
        f" {', '.join(f'{d:.2f}' for d in delays)} s during 4 parallel 100,000-window"
        f" queries ({answered} answered; before the fix: 67 s); target 2 s"
    )
    assert answered >= 1
    assert max(delays) < 20  # generous for a loaded 2-core machine; see the print


async def test_the_largest_allowed_meters_do_not_hold_up_other_tenants(
    client: Client, suite: Suite, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    # Tenant A: 20 meters (the quota) on one event name whose filters hold 200
    # conditions together (the quota): 9 IN lists of 100 numbers that every event
    # fails, then the condition it passes. So each of 2,000 events is checked in
    # full by every meter and counts in all 20 (40,000 rows; 500 meters made
    # 1,000,000 before the quotas).
    def wide(conditions: int) -> meter_pb2.Filter:
        message = meter_pb2.Filter(conjunction=meter_pb2.CONJUNCTION_OR)
        for i in range(conditions - 1):
            message.conditions.add(key=f"k{i}", operator=meter_pb2.OPERATOR_IN).values.extend(
                value_pb2.Value(number_value=j + 0.5) for j in range(100)
            )
        message.conditions.add(key="hit", operator=meter_pb2.OPERATOR_EXISTS)
        return message

    meters = [await _create(client, filter=wide(10)) for _ in range(19)]
    code, message = await _status(
        client.meter.CreateMeter(
            meter_pb2.CreateMeterRequest(
                name="eleven", event_name="api.call", aggregation=1, filter=wide(11)
            ),
            metadata=client.metadata,
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "would check 201 filter conditions per event" in message
    assert "USAGEBILLING_MAX_FILTER_CONDITIONS_PER_EVENT = 200" in message
    meters.append(await _create(client, filter=wide(10)))
    for meter in meters:
        await _done_backfilling(client, meter.id)
    other = await _other_tenant(suite, new_tenant)
    try:
        other_meter = await _create(other, event_name="other.call")
        await _done_backfilling(other, other_meter.id)
        when = _now() - MINUTE
        for batch in range(2):
            events = [
                event(
                    f"f-{batch}-{i}",
                    "cus",
                    "api.call",
                    when,
                    hit=True,
                    **{f"k{j}": f"{i}.25" for j in range(9)},
                )
                for i in range(1000)
            ]
            await client.call(
                client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events)
            )
        # Sent behind tenant A's 2,000 events: counted once they are folded too.
        delay = await _counted_after(other, other_meter.id, "behind-filters")
        request = _query(meters[-1].id, when - MINUTE, when + MINUTE, meter_pb2.WINDOW_SIZE_NONE)
        request.customer_id = "cus"
        for _ in range(600):
            answer = await client.call(client.meter.QueryUsage, request)
            if answer.rows[0].value == "2000":
                break
            await asyncio.sleep(0.1)
        assert answer.rows[0].value == "2000"
    finally:
        await other.close()
    print(
        f"other tenant counted in {delay:.2f} s behind 2,000 events through 20 meters"
        " whose filters hold 200 conditions (before the fix: 28 s for one 20,000-condition meter,"
        " 10 s for 500 meters); target 2 s"
    )
    assert delay < 20  # generous for a loaded 2-core machine; see the print
