"""Crash and outage tests with real processes: nothing acknowledged is lost or
counted twice when ingest is killed with SIGKILL mid-load, or when NATS is down
for a while (ingest keeps accepting; the outbox drains when NATS is back)."""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import nats
import pytest

from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
from tests.client import Client, event, eventually
from tools.devstack import DevStack
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[DevStack]:
    own = DevStack(tmp_path / "stack")
    own.start()
    yield own
    own.stop()


@pytest.fixture
def suite(stack: DevStack, tmp_path: Path) -> Iterator[Suite]:
    running = Suite(stack.database_url, stack.nats_url, tmp_path / "logs")
    running.start()
    yield running
    running.stop()


@pytest.fixture
async def client(suite: Suite) -> AsyncIterator[tuple[str, Client]]:
    tenant_id, secret = create_tenant(suite, "crash")
    tenant_client = Client({s: suite.address(s) for s in SERVICES}, secret)
    yield tenant_id, tenant_client
    await tenant_client.close()


class Load:
    """Steady batches of new events; a failed call is retried until it is
    answered, as a client would. `acked` holds every acknowledged event id."""

    def __init__(self, client: Client, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.acked: set[str] = set()
        self.failures = 0
        self.stopping = asyncio.Event()

    async def sender(self, lane: int) -> None:
        n = 0
        while not self.stopping.is_set():
            now = datetime.now(UTC)
            ids = [f"{self.prefix}-{lane}-{n + i}" for i in range(100)]
            request = ingest_pb2.IngestEventsRequest(
                events=[event(i, "cus_1", "load", now) for i in ids]
            )
            n += 100
            while True:
                try:
                    answer = await self.client.ingest.IngestEvents(
                        request, metadata=self.client.metadata, timeout=10
                    )
                except grpc.aio.AioRpcError:
                    self.failures += 1
                    await asyncio.sleep(0.2)
                    continue
                assert not answer.rejections
                self.acked.update(ids)
                break
            await asyncio.sleep(0.01)


async def _count(client: Client, meter_id: str) -> int:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id="cus_1")
    now = datetime.now(UTC)
    request.start_time.FromDatetime(now - timedelta(hours=1))
    request.end_time.FromDatetime(now + timedelta(hours=1))
    answer = await client.call(client.meter.QueryUsage, request)
    return int(answer.rows[0].value)


async def _stream_event_ids(nats_url: str, tenant_id: str) -> dict[str, set[str]]:
    """Every event id published for the tenant, with the Nats-Msg-Ids it came in."""
    seen: dict[str, set[str]] = defaultdict(set)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        subscription = await js.subscribe(
            f"{EVENTS_SUBJECT_PREFIX}.{tenant_id}", stream=EVENTS_STREAM, ordered_consumer=True
        )
        while True:
            try:
                message = await subscription.next_msg(timeout=2)
            except nats.errors.TimeoutError:
                break
            batch = ingest_pb2.EventBatch.FromString(message.data)
            for item in batch.events:
                seen[item.event_id].add(message.headers["Nats-Msg-Id"])
        await subscription.unsubscribe()
    finally:
        await nc.close()
    return seen


async def _meter(client: Client) -> str:
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="load", event_name="load", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    return str(meter.id)


async def _check_exactly_once(
    suite: Suite, tenant_id: str, client: Client, meter_id: str, load: Load
) -> None:
    expected = len(load.acked)
    assert expected > 0
    counted = await eventually(lambda: _count(client, meter_id), lambda n: n >= expected, 90)
    assert counted == expected  # none missing, none counted twice
    published = await _stream_event_ids(suite.nats_url, tenant_id)
    assert load.acked <= published.keys()
    # An event went out in one outbox row: any repeat carried the same Nats-Msg-Id.
    assert all(len(msg_ids) == 1 for msg_ids in published.values())


async def test_kill_9_ingest_under_load_loses_and_doubles_nothing(
    suite: Suite, client: tuple[str, Client]
) -> None:
    tenant_id, tenant_client = client
    meter_id = await _meter(tenant_client)
    load = Load(tenant_client, "k")
    senders = [asyncio.create_task(load.sender(lane)) for lane in range(2)]
    await asyncio.sleep(2)
    before = len(load.acked)
    await asyncio.to_thread(suite.stop_service, "ingest", signal.SIGKILL)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(suite.start_service, "ingest")
    await asyncio.to_thread(suite.wait_healthy, "ingest")
    await asyncio.sleep(2)
    load.stopping.set()
    await asyncio.gather(*senders)
    assert before > 0 and len(load.acked) > before
    assert load.failures > 0  # the kill really interrupted calls
    await _check_exactly_once(suite, tenant_id, tenant_client, meter_id, load)


async def test_nats_outage_keeps_ingest_accepting_and_loses_nothing(
    stack: DevStack, suite: Suite, client: tuple[str, Client]
) -> None:
    tenant_id, tenant_client = client
    meter_id = await _meter(tenant_client)
    load = Load(tenant_client, "n")
    senders = [asyncio.create_task(load.sender(lane)) for lane in range(2)]
    await asyncio.sleep(1)
    await asyncio.to_thread(stack.stop_nats)
    during = len(load.acked)
    await asyncio.sleep(3)
    accepted_while_down = len(load.acked) - during
    await asyncio.to_thread(stack.restart_nats)
    await asyncio.sleep(2)
    load.stopping.set()
    await asyncio.gather(*senders)
    assert accepted_while_down > 0
    assert load.failures == 0  # ingest never refused a call while NATS was away
    await _check_exactly_once(suite, tenant_id, tenant_client, meter_id, load)
