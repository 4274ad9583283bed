"""A steady event load and the exactly-once check, for the process-level tests
(crashes, outages, graceful shutdown)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import grpc
import nats

from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
from tests.client import Client, event, eventually
from tools.suite import Suite
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2


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


async def count(client: Client, meter_id: str) -> int:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id="cus_1")
    now = datetime.now(UTC)
    request.start_time.FromDatetime(now - timedelta(hours=1))
    request.end_time.FromDatetime(now + timedelta(hours=1))
    answer = await client.call(client.meter.QueryUsage, request)
    return int(answer.rows[0].value)


async def total(client: Client, meter_id: str) -> int:
    """The meter's count over every customer in the hour around now."""
    now = datetime.now(UTC)
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id)
    request.start_time.FromDatetime(now - timedelta(hours=1))
    request.end_time.FromDatetime(now + timedelta(hours=1))
    rows = (await client.call(client.meter.QueryUsage, request)).rows
    return sum(int(r.value) for r in rows)


async def stream_event_ids(nats_url: str, tenant_id: str) -> dict[str, set[str]]:
    """Every event id published for the tenant, with the Nats-Msg-Ids it came in."""
    seen: dict[str, set[str]] = defaultdict(set)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        subscription = await js.pull_subscribe(
            f"{EVENTS_SUBJECT_PREFIX}.{tenant_id}", stream=EVENTS_STREAM
        )
        # Until the consumer has nothing left to deliver: a short wait for the
        # next message as the end marker missed messages on a loaded machine.
        while (pending := (await subscription.consumer_info()).num_pending or 0) > 0:
            try:
                messages = await subscription.fetch(min(pending, 500), timeout=30)
            except nats.errors.TimeoutError:
                continue
            for message in messages:
                batch = ingest_pb2.EventBatch.FromString(message.data)
                assert message.headers is not None
                for item in batch.events:
                    seen[item.event_id].add(message.headers["Nats-Msg-Id"])
                await message.ack()
        await subscription.unsubscribe()
    finally:
        await nc.close()
    return seen


async def count_meter(client: Client) -> str:
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="load", event_name="load", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    return str(meter.id)


async def check_exactly_once(
    suite: Suite, tenant_id: str, client: Client, meter_id: str, load: Load
) -> None:
    expected = len(load.acked)
    assert expected > 0
    counted = await eventually(lambda: count(client, meter_id), lambda n: n >= expected, 90)
    assert counted == expected  # none missing, none counted twice
    published = await stream_event_ids(suite.nats_url, tenant_id)
    assert load.acked <= published.keys()
    # An event went out in one outbox row: any repeat carried the same Nats-Msg-Id.
    assert all(len(msg_ids) == 1 for msg_ids in published.values())
