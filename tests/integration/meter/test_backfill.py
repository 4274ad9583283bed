"""The backfill against a stand-in for ingest's ReplayEvents (an in-process gRPC
server) and meter's real store: what it asks for, that a replay broken off midway
is retried and still counts each event once, and that it gives up in the end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from services.common.auth import TENANT_HEADER
from services.meter.backfill import ATTEMPTS, Backfiller
from tests.integration.meter.harness import Meters, ev
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2

TOKEN = "service-token"
WINDOW = timedelta(days=35)


class FakeIngest(ingest_pb2_grpc.IngestServiceServicer):
    """Streams `events` to the tenant it holds them for; the first `failures`
    replays break off with UNAVAILABLE after `break_after` events."""

    def __init__(self) -> None:
        self.tenant = ""
        self.events: list[ingest_pb2.Event] = []
        self.failures = 0
        self.break_after = 0
        self.requests: list[tuple[ingest_pb2.ReplayEventsRequest, dict[str, str]]] = []

    async def ReplayEvents(
        self, request: ingest_pb2.ReplayEventsRequest, context: Any
    ) -> AsyncIterator[ingest_pb2.Event]:
        metadata = {k: v for k, v in context.invocation_metadata()}
        self.requests.append((request, metadata))
        if metadata.get(TENANT_HEADER) != self.tenant:
            return
        for i, event in enumerate(self.events):
            if self.failures and i == self.break_after:
                self.failures -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "ingest is restarting")
            yield event


@pytest.fixture(scope="module")
async def fake_ingest() -> AsyncIterator[tuple[FakeIngest, grpc.aio.Channel]]:
    server = grpc.aio.server()
    fake = FakeIngest()  # type: ignore[abstract]
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield fake, channel
    finally:
        await channel.close(None)
        await server.stop(None)


async def _state(meters: Meters, tenant: str, meter_id: str) -> int:
    return int((await meters.get(tenant, meter_id)).backfill_state)


async def test_a_replay_broken_off_midway_is_retried_and_counts_each_event_once(
    meters: Meters, fake_ingest: tuple[FakeIngest, grpc.aio.Channel]
) -> None:
    fake, channel = fake_ingest
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="SUM", property="n", event_name="api.call")
    assert await _state(meters, tenant, meter.id) == meter_pb2.BACKFILL_STATE_RUNNING
    when = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
    events = [ev(f"e-{i}", "c", when + timedelta(seconds=i), n=i) for i in range(2500)]
    # The consumer already folded some of them.
    await meters.send(tenant, events[2000:2100])
    fake.tenant, fake.events = tenant, [e.proto for e in events]
    fake.failures, fake.break_after, fake.requests = 2, 1500, []  # after one chunk of 1000
    backfiller = Backfiller(meters.store, meters.service, channel, TOKEN, WINDOW, retry_delay=0.01)

    record = await meters.store.get_meter(tenant, meter.id)
    before = datetime.now(UTC)
    await backfiller.backfill(record)
    after = datetime.now(UTC)

    assert await _state(meters, tenant, meter.id) == meter_pb2.BACKFILL_STATE_DONE
    start, end = when - timedelta(days=1), when + timedelta(days=1)
    assert await meters.total(tenant, meter.id, start, end, "c") == str(sum(range(2500)))
    assert len(fake.requests) == 3
    request, metadata = fake.requests[-1]
    assert list(request.event_names) == ["api.call"]
    replay_start = request.start_time.ToDatetime(tzinfo=UTC)
    assert before - WINDOW <= replay_start <= after - WINDOW
    assert request.end_time.ToDatetime(tzinfo=UTC) > after
    assert metadata["authorization"] == f"Bearer {TOKEN}"
    assert metadata[TENANT_HEADER] == tenant


async def test_a_replay_that_keeps_failing_marks_the_meter_failed(
    meters: Meters, fake_ingest: tuple[FakeIngest, grpc.aio.Channel]
) -> None:
    fake, channel = fake_ingest
    tenant = meters.new_tenant()
    meter = await meters.create(tenant)
    when = datetime.now(UTC) - timedelta(hours=1)
    fake.tenant, fake.events = tenant, [ev(f"e-{i}", "c", when).proto for i in range(10)]
    fake.failures, fake.break_after, fake.requests = ATTEMPTS, 5, []
    backfiller = Backfiller(meters.store, meters.service, channel, TOKEN, WINDOW, retry_delay=0.01)

    await backfiller.backfill(await meters.store.get_meter(tenant, meter.id))

    assert len(fake.requests) == ATTEMPTS
    assert await _state(meters, tenant, meter.id) == meter_pb2.BACKFILL_STATE_FAILED
