"""Fair share: one tenant flooding ingest far over its rate cannot hold up
another tenant's events. The services run with a low per-tenant limit (their
own stack, so that the limit touches no other test)."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest

from tests.client import Client, event, eventually
from tests.load import total as usage_total
from tests.private_suite import private_suite
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(600)

# Row units per second per tenant; each tenant here has one plain meter on
# its event name, so one unit is one event.
RATE = 400
BURST = 1000  # the smallest burst allowed: the largest call
FLOODERS = 6
FLOOD_BATCH = 200
PROBES = 20


@pytest.fixture(scope="module")
def limited_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    env = {
        "USAGEBILLING_INGEST_RATE_LIMIT": str(RATE),
        "USAGEBILLING_INGEST_RATE_BURST": str(BURST),
    }
    with private_suite(tmp_path_factory, "rate", env) as suite:
        yield suite


async def _tenant(suite: Suite, meter_event: str) -> tuple[Client, str]:
    _, secret = create_tenant(suite, f"rate-{uuid.uuid4().hex[:8]}")
    client = Client({s: suite.address(s) for s in SERVICES}, secret)
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="n", event_name=meter_event, aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    return client, str(meter.id)


@dataclass
class Flood:
    client: Client
    accepted: int = 0
    refused: int = 0
    retry_hints: list[float] = field(default_factory=list)
    other_errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def sender(self, lane: int) -> None:
        n = 0
        while not self.stop.is_set():
            now = datetime.now(UTC)
            request = ingest_pb2.IngestEventsRequest(
                events=[
                    event(f"a-{lane}-{n + i}", "cus_a", "flood", now) for i in range(FLOOD_BATCH)
                ]
            )
            n += FLOOD_BATCH
            try:
                answer = await self.client.call(self.client.ingest.IngestEvents, request)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.other_errors.append(f"{error.code()}: {error.details()}")
                    continue
                self.refused += 1
                assert "retry after" in (error.details() or "")
                trailers: Any = error.trailing_metadata() or ()
                # The retry hint travels as trailing metadata (services.common.grpc_server).
                self.retry_hints += [float(v) for k, v in trailers if k == "retry-after"]
                # An abusive client: it does not wait the hint, barely pauses.
                await asyncio.sleep(0.001)
                continue
            self.accepted += answer.accepted_count


async def test_a_flooding_tenant_cannot_delay_another(limited_suite: Suite) -> None:
    flooder, flood_meter = await _tenant(limited_suite, "flood")
    quiet, probe_meter = await _tenant(limited_suite, "probe")
    flood = Flood(flooder)
    senders = [asyncio.create_task(flood.sender(lane)) for lane in range(FLOODERS)]
    delays: list[float] = []

    async def probe_count() -> int:
        return await usage_total(quiet, probe_meter)

    try:
        await asyncio.sleep(2)  # the flood is on, the bucket long empty
        for i in range(PROBES):
            sent = time.monotonic()
            answer = await quiet.call(
                quiet.ingest.IngestEvents,
                ingest_pb2.IngestEventsRequest(
                    events=[event(f"b-{i}", "cus_b", "probe", datetime.now(UTC))]
                ),
            )
            assert answer.accepted_count == 1  # never refused: B is far under its rate
            counted = await eventually(probe_count, lambda c: c > i, timeout=60)  # noqa: B023
            assert counted == i + 1
            delays.append(time.monotonic() - sent)
            await asyncio.sleep(0.2)
        flood_seconds = time.monotonic() - sent + 2
    finally:
        flood.stop.set()
        await asyncio.gather(*senders)

    print(
        f"\nB's delay from send to counted, {PROBES} events during A's flood:"
        f" median {statistics.median(delays):.3f} s, max {max(delays):.3f} s (target 2 s);"
        f" A: {flood.accepted} events accepted, {flood.refused} calls refused"
    )
    assert not flood.other_errors, flood.other_errors[:3]
    # A was well over its limit and refused, with a hint it could act on.
    assert flood.refused > 10 * FLOODERS
    assert flood.retry_hints and len(flood.retry_hints) == flood.refused
    # At most one call's worth of refill (a server may round up to whole seconds).
    assert all(0 < hint <= math.ceil(FLOOD_BATCH / RATE) for hint in flood.retry_hints)
    # Roughly its rate got through (the burst once, then RATE per second).
    assert flood.accepted <= BURST + RATE * (flood_seconds + 60)
    # Generous for a loaded 2-core machine; the figure printed above is the measure.
    assert max(delays) < 10
    assert statistics.median(delays) < 5
    # Nothing A had been told was accepted is lost.
    assert (
        await eventually(
            lambda: usage_total(flooder, flood_meter), lambda c: c >= flood.accepted, timeout=90
        )
        == flood.accepted
    )
    await flooder.close()
    await quiet.close()
