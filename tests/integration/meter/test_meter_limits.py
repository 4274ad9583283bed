"""meter's limits against a real PostgreSQL: the meter quotas hold under concurrent
creates, and what the largest allowed usage query costs meter's event loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.common.context import set_tenant
from services.common.errors import AlreadyExists, ResourceExhausted
from services.meter.domain.query import MAX_WINDOWS
from tests.integration.meter.harness import Cond, Flt, Meters, ev
from usagebilling.meter.v1 import meter_pb2

START = datetime(2024, 5, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


async def _try_create(meters: Meters, tenant: str, event_name: str) -> str:
    try:
        await meters.create(tenant, event_name=event_name, name=f"m-{uuid.uuid4().hex}")
    except ResourceExhausted as exc:
        return str(exc)
    return "created"


async def test_the_last_slot_on_an_event_name_goes_to_one_create(meters: Meters) -> None:
    tenant = meters.new_tenant()
    for _ in range(19):
        await meters.create(tenant, event_name="api.call")
    outcomes = await asyncio.gather(*(_try_create(meters, tenant, "api.call") for _ in range(12)))
    assert outcomes.count("created") == 1, outcomes
    refused = [o for o in outcomes if o != "created"]
    assert all(o.startswith("event_name: 20 active meters already count") for o in refused)
    assert all("USAGEBILLING_MAX_METERS_PER_EVENT = 20" in o for o in refused)
    # Archived meters do not count: archiving one frees its slot.
    set_tenant(tenant)
    listed = await meters.servicer.ListMeters(meter_pb2.ListMetersRequest(page_size=100), None)
    await meters.archive(tenant, listed.meters[0].id)
    assert await _try_create(meters, tenant, "api.call") == "created"
    assert (await _try_create(meters, tenant, "api.call")).startswith("event_name: ")


async def test_the_last_slot_of_a_tenant_goes_to_one_create(meters: Meters) -> None:
    tenant = meters.new_tenant()
    for i in range(99):
        await meters.create(tenant, event_name=f"event-{i % 10}")
    outcomes = await asyncio.gather(*(_try_create(meters, tenant, f"other-{i}") for i in range(12)))
    assert outcomes.count("created") == 1, outcomes
    assert all(
        o.startswith("meters: the tenant has 100 active meters") and "PER_TENANT = 100" in o
        for o in outcomes
        if o != "created"
    )
    # Another tenant's quota is its own.
    assert await _try_create(meters, meters.new_tenant(), "event-0") == "created"


async def test_filter_conditions_per_event_name_are_a_quota(meters: Meters) -> None:
    tenant = meters.new_tenant()
    wide = Flt("OR", tuple(Cond(f"k{i}", "EXISTS") for i in range(100)))
    await meters.create(tenant, event_name="api.call", filter=wide)
    await meters.create(tenant, event_name="api.call", filter=wide)
    with pytest.raises(ResourceExhausted, match=r"^filter: the active meters on 'api.call'"):
        await meters.create(
            tenant, event_name="api.call", filter=Flt(conditions=(Cond("x", "EXISTS"),))
        )
    await meters.create(tenant, event_name="api.call")  # no filter: no condition to check
    await meters.create(tenant, event_name="other", filter=wide)


async def test_a_taken_name_is_still_already_exists(meters: Meters) -> None:
    tenant = meters.new_tenant()
    await meters.create(tenant, name="calls")
    with pytest.raises(AlreadyExists, match=r"^name: "):
        await meters.create(tenant, name="calls")


async def test_what_the_largest_allowed_query_costs(meters: Meters) -> None:
    """100,000 MINUTE windows, an event in every one: windows built, bucketed by
    PostgreSQL, 100,000 rows answered. Prints the CPU this process spent (meter's
    event loop: window building, row decoding, the response) and the wall time."""
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="SUM", property="n")
    events = [
        ev(f"e{i}", "c", START + i * MINUTE + timedelta(seconds=7), n=i) for i in range(MAX_WINDOWS)
    ]
    for i in range(0, len(events), 5_000):
        await meters.send(tenant, events[i : i + 5_000])
    request = meter_pb2.QueryUsageRequest(
        meter_id=meter.id, customer_id="c", window_size=meter_pb2.WINDOW_SIZE_MINUTE
    )
    request.start_time.FromDatetime(START)
    request.end_time.FromDatetime(START + MAX_WINDOWS * MINUTE)
    set_tenant(tenant)
    for attempt in range(2):  # the second one warm
        cpu, wall = time.process_time(), time.perf_counter()
        response = await meters.servicer.QueryUsage(request, None)
        size = len(response.SerializeToString())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(
            f"largest allowed query (attempt {attempt + 1}): {len(response.rows):,} rows,"
            f" {size / 1e6:.1f} MB, {cpu * 1000:.0f} ms CPU in meter's process,"
            f" {wall * 1000:.0f} ms wall"
        )
    assert len(response.rows) == MAX_WINDOWS
    assert response.rows[-1].value == str(MAX_WINDOWS - 1)
    assert cpu < 10  # generous for a loaded machine; see the printed figure
