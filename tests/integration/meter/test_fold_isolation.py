"""meter's consumer never jams: what cannot be folded is skipped or quarantined
and everything else is counted (issue 10).

The consumer runs in process against a JetStream stream of its own (so that no
other meter process consumes these messages), with EventBatch messages
published straight to it, bypassing ingest (which rejects such values itself).
Database failures are real: a trigger on meter.meter_events raises for one
event id. The QuarantineService is served over gRPC with the real auth."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import nats
import pytest
from nats.js.api import StreamConfig

from services.common.auth import Authenticator, Principal, hash_secret
from services.common.grpc_server import GrpcServer
from services.common.quarantine import registration
from services.meter.backfill import Backfiller
from services.meter.consumer import EventConsumer
from services.meter.quarantine import FoldQuarantine
from services.meter.store import QuarantineStore
from tests.client import eventually, status_of
from tests.integration.meter.harness import Meters, ev
from usagebilling.common.v1 import quarantine_pb2, quarantine_pb2_grpc
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(240)

ADMIN = "fold-isolation-admin-token"
SERVICE = "fold-isolation-service-token"
TENANT_KEY = "ubk_fold-isolation-tenant-key"
MAX_DELIVERIES = 3
WHEN = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
RANGE = (WHEN - timedelta(days=1), WHEN + timedelta(days=1))


class _Keys:
    """One tenant key, to show that a tenant cannot call the admin RPCs."""

    async def resolve(self, secret: str) -> Principal | None:
        return Principal(str(uuid.uuid4())) if secret == TENANT_KEY else None

    async def tenant_exists(self, tenant_id: str) -> bool:
        return False


@dataclass
class Rig:
    meters: Meters
    js: Any
    stream: str
    prefix: str
    durable: str
    quarantine: FoldQuarantine
    admin: quarantine_pb2_grpc.QuarantineServiceStub

    async def publish(self, tenant: str, events: Sequence[ingest_pb2.Event]) -> None:
        batch = ingest_pb2.EventBatch(tenant_id=tenant, events=events)
        await self.publish_raw(tenant, batch.SerializeToString())

    async def publish_raw(self, tenant: str, data: bytes) -> None:
        await self.js.publish(f"{self.prefix}.{tenant}", data, stream=self.stream)

    async def drained(self) -> bool:
        info = await self.js.consumer_info(self.stream, self.durable)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    async def call(self, method: str, request: Any, token: str = ADMIN) -> Any:
        stub_method = getattr(self.admin, method)
        return await stub_method(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=30
        )

    async def listed(self, tenant: str) -> list[quarantine_pb2.QuarantinedMessage]:
        response = await self.call(
            "ListQuarantined", quarantine_pb2.ListQuarantinedRequest(tenant_id=tenant)
        )
        return list(response.messages)


@pytest.fixture(scope="module")
async def rig(meters: Meters, stack_urls: tuple[str, str]) -> AsyncIterator[Rig]:
    tag = uuid.uuid4().hex[:12]
    stream, prefix, durable = f"FOLDISO_{tag}", f"foldiso{tag}.events", "fold-isolation"
    nc = await nats.connect(stack_urls[1])
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{prefix}.>"]))
    quarantine = FoldQuarantine(QuarantineStore(meters.store.pool), meters.service)
    consumer = EventConsumer(
        js,
        meters.service,
        quarantine,
        durable=durable,
        batch=16,
        max_deliveries=MAX_DELIVERIES,
        stream=stream,
        subject_prefix=prefix,
    )
    running = asyncio.create_task(consumer.run())
    # The quarantine RPCs need the admin token; no service calls this rig.
    auth = Authenticator(hash_secret(ADMIN), {}, _Keys())
    server = GrpcServer("127.0.0.1", 0, [registration(quarantine)], auth)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield Rig(
            meters,
            js,
            stream,
            prefix,
            durable,
            quarantine,
            quarantine_pb2_grpc.QuarantineServiceStub(channel),
        )
    finally:
        await consumer.stop()
        await asyncio.wait_for(running, 30)
        await channel.close(None)
        await server.stop(0)
        await js.delete_stream(stream)
        await nc.close()


async def _poison(rig: Rig, event_id: str, errcode: str = "P0001") -> str:
    """A trigger that makes PostgreSQL refuse every row of `event_id`; returns
    its name (drop it with _cure)."""
    name = f"fi_poison_{uuid.uuid4().hex[:12]}"
    await rig.meters.store.pool.execute(
        f"CREATE FUNCTION meter.{name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        f" BEGIN IF NEW.event_id = '{event_id}' THEN"
        f" RAISE EXCEPTION 'poisoned event %', NEW.event_id USING ERRCODE = '{errcode}';"
        " END IF; RETURN NEW; END $$;"
        f" CREATE TRIGGER {name} BEFORE INSERT ON meter.meter_events"
        f" FOR EACH ROW EXECUTE FUNCTION meter.{name}()"
    )
    return name


async def _cure(rig: Rig, name: str) -> None:
    await rig.meters.store.pool.execute(
        f"DROP TRIGGER IF EXISTS {name} ON meter.meter_events;"
        f" DROP FUNCTION IF EXISTS meter.{name}()"
    )


async def _total(rig: Rig, tenant: str, meter_id: str, customer: str = "c") -> str:
    return await rig.meters.total(tenant, meter_id, *RANGE, customer)


async def _skipped(rig: Rig, tenant: str, meter_id: str) -> dict[str, int]:
    return dict((await rig.meters.get(tenant, meter_id)).skipped_events)


async def test_zero_with_a_huge_scale_is_skipped_and_others_are_counted_meanwhile(
    rig: Rig,
) -> None:
    """Measured on 358e815: n = "0e-20000" passed meter's number check, the
    driver refused to encode it, and the fetched batch was retried forever."""
    abuser, other = str(uuid.uuid4()), str(uuid.uuid4())
    bad_meter = await rig.meters.create(abuser, aggregation="SUM", property="n")
    good_meter = await rig.meters.create(other, aggregation="SUM", property="n")
    flood = 3000
    for start in range(0, flood, 250):
        await asyncio.gather(
            *(
                rig.publish(abuser, [ev(f"z-{i}", "c", WHEN, n="0e-20000").proto])
                for i in range(start, start + 250)
            )
        )
    published = time.monotonic()
    await rig.publish(other, [ev("other-1", "c", WHEN, n=5).proto])
    total = await eventually(lambda: _total(rig, other, good_meter.id), lambda t: t == "5", 60)
    delay = time.monotonic() - published
    print(f"\nanother tenant's event, published after {flood} bad ones: counted in {delay:.2f} s")
    assert total == "5"
    assert delay < 60

    skipped = await eventually(
        lambda: _skipped(rig, abuser, bad_meter.id), lambda s: s == {"not_a_number": flood}, 60
    )
    assert skipped == {"not_a_number": flood}
    assert await _total(rig, abuser, bad_meter.id) == "0"
    assert await eventually(rig.drained, bool, 30)
    assert await rig.listed(abuser) == []  # skipped, not quarantined


async def test_an_event_the_database_refuses_is_quarantined_and_counted_once_on_replay(
    rig: Rig,
) -> None:
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    count = await rig.meters.create(tenant)
    total = await rig.meters.create(tenant, aggregation="SUM", property="n")
    others = await rig.meters.create(other)
    poison_id = f"poison-{uuid.uuid4().hex}"
    trigger = await _poison(rig, poison_id)
    try:
        # Beside it in one message, behind it in the next, and another tenant's.
        await rig.publish(
            tenant,
            [
                ev("g-1", "c", WHEN, n=1).proto,
                ev(poison_id, "c", WHEN, n=100).proto,
                ev("g-2", "c", WHEN, n=2).proto,
            ],
        )
        await rig.publish(tenant, [ev("g-3", "c", WHEN, n=4).proto])
        await rig.publish_raw(tenant, b"\xff\xff\xff not an EventBatch")
        await rig.publish(other, [ev("o-1", "c", WHEN).proto])

        assert await eventually(lambda: _total(rig, tenant, count.id), lambda t: t == "3") == "3"
        assert await _total(rig, tenant, total.id) == "7"
        assert await eventually(lambda: _total(rig, other, others.id), lambda t: t == "1") == "1"
        assert await eventually(rig.drained, bool, 30)
        listed = await eventually(lambda: rig.listed(tenant), lambda rows: len(rows) == 2)
    finally:
        await _cure(rig, trigger)

    [raw] = [m for m in listed if not m.event_ids]
    [refused] = [m for m in listed if m.event_ids]
    assert list(refused.event_ids) == [poison_id]
    assert refused.stage == "fold"
    assert "P0001" in refused.reason and "poisoned event" in refused.reason
    assert refused.attempts >= 1
    assert raw.tenant_id == tenant and "undecodable" in raw.reason
    assert raw.size_bytes == len(b"\xff\xff\xff not an EventBatch")

    # A tenant's key may not replay.
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await rig.call(
            "ReplayQuarantined",
            quarantine_pb2.ReplayQuarantinedRequest(ids=[refused.id]),
            token=TENANT_KEY,
        )
    assert status_of(denied.value) == grpc.StatusCode.PERMISSION_DENIED

    replay = quarantine_pb2.ReplayQuarantinedRequest(ids=[refused.id])
    response = await rig.call("ReplayQuarantined", replay)
    assert list(response.replayed_ids) == [refused.id] and not response.failed
    assert await _total(rig, tenant, count.id) == "4"
    assert await _total(rig, tenant, total.id) == "107"

    # Again: nothing is left to replay, and nothing counts twice, even when the
    # events come once more (a redelivery, or ingest replaying them).
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await rig.call("ReplayQuarantined", replay)
    assert status_of(again.value) == grpc.StatusCode.NOT_FOUND
    await rig.publish(tenant, [ev(poison_id, "c", WHEN, n=100).proto])
    assert await eventually(rig.drained, bool, 30)
    assert await _total(rig, tenant, count.id) == "4"
    assert await _total(rig, tenant, total.id) == "107"

    # Raw bytes still do not decode: the row stays, one attempt more.
    response = await rig.call(
        "ReplayQuarantined", quarantine_pb2.ReplayQuarantinedRequest(ids=[raw.id])
    )
    [kept] = response.failed
    assert not response.replayed_ids
    assert kept.id == raw.id and kept.attempts == raw.attempts + 1
    assert "undecodable" in kept.reason
    discarded = await rig.call(
        "DiscardQuarantined", quarantine_pb2.DiscardQuarantinedRequest(ids=[raw.id])
    )
    assert discarded.discarded_count == 1
    assert await rig.listed(tenant) == []


async def test_a_message_failing_transiently_is_retried_then_its_culprit_set_aside(
    rig: Rig,
) -> None:
    """A serialization failure for one event every time: its message is retried
    (nak with a delay) until delivered MAX_DELIVERIES times, then its other
    events are counted and the culprit is quarantined; the messages around it
    are counted at once."""
    tenant = str(uuid.uuid4())
    count = await rig.meters.create(tenant)
    poison_id = f"flaky-{uuid.uuid4().hex}"
    trigger = await _poison(rig, poison_id, errcode="40001")
    try:
        started = time.monotonic()
        await rig.publish(tenant, [ev("a-1", "c", WHEN).proto, ev(poison_id, "c", WHEN).proto])
        await rig.publish(tenant, [ev("b-1", "other", WHEN).proto])
        assert (
            await eventually(lambda: _total(rig, tenant, count.id, "other"), lambda t: t == "1")
            == "1"
        )
        beside = time.monotonic() - started
        listed = await eventually(lambda: rig.listed(tenant), lambda rows: len(rows) == 1, 60)
        set_aside = time.monotonic() - started
    finally:
        await _cure(rig, trigger)
    print(
        f"\nthe message behind: counted in {beside:.2f} s; culprit set aside in {set_aside:.2f} s"
    )
    [row] = listed
    assert list(row.event_ids) == [poison_id]
    assert "40001" in row.reason
    assert row.attempts >= MAX_DELIVERIES
    assert await _total(rig, tenant, count.id, "c") == "1"  # a-1, beside it
    response = await rig.call(
        "ReplayQuarantined", quarantine_pb2.ReplayQuarantinedRequest(ids=[row.id])
    )
    assert list(response.replayed_ids) == [row.id]
    assert await _total(rig, tenant, count.id, "c") == "2"


class _Replayer(ingest_pb2_grpc.IngestServiceServicer):
    """ingest's ReplayEvents, streaming `events` to any caller."""

    def __init__(self, events: list[ingest_pb2.Event]) -> None:
        self.events = events

    async def ReplayEvents(
        self, request: ingest_pb2.ReplayEventsRequest, context: Any
    ) -> AsyncIterator[ingest_pb2.Event]:
        for event in self.events:
            yield event


async def test_a_backfill_over_unfoldable_events_counts_the_rest_and_does_not_fail(
    rig: Rig,
) -> None:
    tenant = str(uuid.uuid4())
    meter = await rig.meters.create(tenant, aggregation="SUM", property="n")
    poison_id = f"poison-{uuid.uuid4().hex}"
    events = [ev(f"e-{i}", "c", WHEN + timedelta(seconds=i), n=i).proto for i in range(2500)]
    events[10] = ev("huge-scale", "c", WHEN, n="0e-20000").proto
    events[1500] = ev(poison_id, "c", WHEN, n=1_000_000).proto
    good = sum(range(2500)) - 10 - 1500
    server = grpc.aio.server()
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(_Replayer(events), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    trigger = await _poison(rig, poison_id)
    try:
        backfiller = Backfiller(
            rig.meters.store,
            rig.meters.service,
            channel,
            SERVICE,
            timedelta(days=35),
            retry_delay=0.01,
            quarantine=rig.quarantine,
        )
        await backfiller.backfill(await rig.meters.store.get_meter(tenant, meter.id))
    finally:
        await _cure(rig, trigger)
        await channel.close(None)
        await server.stop(0)

    got = await rig.meters.get(tenant, meter.id)
    assert got.backfill_state == meter_pb2.BACKFILL_STATE_DONE
    assert dict(got.skipped_events) == {"not_a_number": 1}
    assert await _total(rig, tenant, meter.id) == str(good)
    [row] = await rig.listed(tenant)
    assert list(row.event_ids) == [poison_id] and "P0001" in row.reason
    response = await rig.call(
        "ReplayQuarantined", quarantine_pb2.ReplayQuarantinedRequest(ids=[row.id])
    )
    assert list(response.replayed_ids) == [row.id]
    assert await _total(rig, tenant, meter.id) == str(good + 1_000_000)
