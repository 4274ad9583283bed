"""ingest's cache of fold weights, against an in-process MeterService that
answers ListMeters (paged) or fails on demand; and the Ingestor pricing a call
with them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import grpc
import pytest

from services.common.errors import ResourceExhausted
from services.ingest import meter_weights
from services.ingest.domain.rate_limit import RateLimiter
from services.ingest.meter_weights import CHANNEL_OPTIONS, UNKNOWN_WEIGHT, MeterWeights
from services.ingest.service import Ingestor
from services.ingest.store import IngestStore
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

TOKEN = "s" * 20


class FakeMeter(meter_pb2_grpc.MeterServiceServicer):
    def __init__(self) -> None:
        self.meters: dict[str, list[meter_pb2.Meter]] = {}
        self.calls: list[tuple[str, str]] = []  # (tenant header, page token)
        self.down = False
        self.delay = 0.0

    async def ListMeters(self, request: meter_pb2.ListMetersRequest, context: Any) -> Any:
        metadata = dict(context.invocation_metadata())
        assert metadata["authorization"] == f"Bearer {TOKEN}"
        tenant = metadata["x-usagebilling-tenant"]
        self.calls.append((tenant, request.page_token))
        await asyncio.sleep(self.delay)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        meters = self.meters.get(tenant, [])
        start = int(request.page_token or 0)
        # Pages of 2, whatever was asked: the client must follow the tokens.
        page = meters[start : start + 2]
        token = str(start + 2) if start + 2 < len(meters) else ""
        return meter_pb2.ListMetersResponse(meters=page, next_page_token=token)


@pytest.fixture
async def meter() -> AsyncIterator[tuple[FakeMeter, grpc.aio.Channel]]:
    fake = FakeMeter()  # type: ignore[abstract]  # only ListMeters is served
    server = grpc.aio.server()
    meter_pb2_grpc.add_MeterServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield fake, channel
    await channel.close(None)
    await server.stop(None)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _settle(weights: MeterWeights) -> None:
    for _ in range(200):
        if not weights._inflight:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("refresh did not end")


async def test_weights_are_learnt_in_the_background_and_refreshed_when_due(
    meter: tuple[FakeMeter, grpc.aio.Channel],
) -> None:
    fake, channel = meter
    fake.meters["t1"] = [
        meter_pb2.Meter(event_name="f"),
        meter_pb2.Meter(event_name="f", group_by=["a", "b"]),
        meter_pb2.Meter(event_name="f", archived=True),  # counts nothing
        meter_pb2.Meter(
            event_name="g",
            filter=meter_pb2.Filter(conditions=[meter_pb2.Condition(key="k")] * 4),
        ),
        meter_pb2.Meter(event_name="f"),
    ]
    fake.delay = 0.2
    clock = Clock()
    weights = MeterWeights(channel, TOKEN, refresh_every=5, clock=clock)
    # The first ask answers at once, with nothing known yet.
    assert weights.weights("t1") == {}
    assert weights.weights("t1") == {}  # one refresh in flight, not two
    await _settle(weights)
    # Three pages followed; the archived meter left out.
    assert [c for c in fake.calls if c[0] == "t1"] == [("t1", ""), ("t1", "2"), ("t1", "4")]
    assert weights.weights("t1") == {"f": pytest.approx(4.0), "g": pytest.approx(1.6)}
    calls = len(fake.calls)
    clock.now += 4.9
    weights.weights("t1")
    await _settle(weights)
    assert len(fake.calls) == calls  # not due yet
    fake.meters["t1"].append(meter_pb2.Meter(event_name="h"))
    clock.now += 0.2
    weights.weights("t1")
    await _settle(weights)
    assert weights.weights("t1")["h"] == 1.0
    await weights.close()


async def test_when_meter_is_down_the_last_weights_stay_and_no_call_waits(
    meter: tuple[FakeMeter, grpc.aio.Channel],
) -> None:
    fake, channel = meter
    fake.meters["t1"] = [meter_pb2.Meter(event_name="f")] * 3
    clock = Clock()
    weights = MeterWeights(channel, TOKEN, refresh_every=5, timeout=1, clock=clock)
    weights.weights("t1")
    await _settle(weights)
    assert weights.weights("t1") == {"f": 3.0}
    fake.down = True
    fake.delay = 0.5
    clock.now += 10
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert weights.weights("t1") == {"f": 3.0}  # stale, answered at once
    assert weights.weights("t2") == {}  # not asked yet: one unit per event
    assert loop.time() - began < 0.1
    await _settle(weights)
    assert weights.weights("t1") == {"f": 3.0}  # the failure kept them
    # Never known and the ask failed: every event name costs UNKNOWN_WEIGHT.
    unknown = weights.weights("t2")
    assert unknown != {}
    assert unknown.get("anything", 0.0) == UNKNOWN_WEIGHT == 20.0
    failed_calls = len(fake.calls)
    weights.weights("t1")
    await _settle(weights)
    # A failed ask waits a refresh interval before the next one.
    assert len(fake.calls) == failed_calls
    fake.down = False
    clock.now += 5
    weights.weights("t1")
    await _settle(weights)
    fake.meters["t1"].append(meter_pb2.Meter(event_name="f"))
    clock.now += 5
    weights.weights("t1")
    await _settle(weights)
    assert weights.weights("t1") == {"f": 4.0}
    await weights.close()


async def test_idle_tenants_are_forgotten(meter: tuple[FakeMeter, grpc.aio.Channel]) -> None:
    _, channel = meter
    clock = Clock()
    weights = MeterWeights(channel, TOKEN, refresh_every=5, forget_after=60, clock=clock)
    weights.weights("idle")
    await _settle(weights)
    assert "idle" in weights._entries
    clock.now += 61
    weights.weights("busy")
    await _settle(weights)
    assert set(weights._entries) == {"busy"}
    await weights.close()


class Static:
    def __init__(self, weights: Mapping[str, float]) -> None:
        self._weights = weights

    def weights(self, tenant_id: str) -> Mapping[str, float]:
        return self._weights


async def test_a_call_is_priced_by_its_events_weights() -> None:
    # The limit is taken before the store is touched: a refused call never
    # reaches it (an object without methods would fail loudly if it did).
    store = cast(IngestStore, object())
    ingestor = Ingestor(
        store,
        lambda: None,
        timedelta(days=35),
        RateLimiter(rate=100, burst=1000),
        clock=lambda: 0.0,
        weights=Static({"f": 20.0}),
    )
    events = [ingest_pb2.Event(event_id=f"e{i}", event_name="f") for i in range(60)]
    # 60 events x 20 units: 1200 > the burst of 1000, and the bucket is full:
    # it passes the limit and then fails on the fake store (AttributeError).
    with pytest.raises(AttributeError):
        await ingestor.ingest("t", events, datetime.now(UTC))
    # The bucket now owes 200 units: one more event of `f` (20 units) waits
    # (200 + 20) / 100 s.
    with pytest.raises(ResourceExhausted) as refused:
        await ingestor.ingest("t", events[:1], datetime.now(UTC))
    assert refused.value.retry_after == pytest.approx(2.2)
    assert "20 row units" in str(refused.value)
    # Another tenant's bucket is its own; unknown names cost one each.
    unknown = [ingest_pb2.Event(event_id=f"x{i}", event_name="x") for i in range(1000)]
    with pytest.raises(AttributeError):
        await ingestor.ingest("u", unknown[:900], datetime.now(UTC))
    with pytest.raises(ResourceExhausted) as other:
        await ingestor.ingest("u", unknown[:200], datetime.now(UTC))
    assert "(200 row units" in str(other.value)
    assert other.value.retry_after == pytest.approx(1.0)


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.records.append((event, fields))


async def test_failures_are_logged_per_tenant_once_per_outage_and_priced_cautiously(
    meter: tuple[FakeMeter, grpc.aio.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, channel = meter
    log = Log()
    monkeypatch.setattr(meter_weights, "log", log)
    fake.down = True
    clock = Clock()
    weights = MeterWeights(channel, TOKEN, refresh_every=5, timeout=1, clock=clock)
    for _ in range(3):  # three asks each, one outage
        for tenant in ("a", "b"):
            weights.weights(tenant)
        await _settle(weights)
        clock.now += 5
    failures = [f["tenant_id"] for e, f in log.records if e == "fold_weights_unavailable"]
    assert sorted(failures) == ["a", "b"]
    # Meter entirely unreachable: ingest still prices (and so accepts) events.
    ingestor = Ingestor(
        cast(IngestStore, object()),
        lambda: None,
        timedelta(days=35),
        RateLimiter(rate=100, burst=1000),
        clock=lambda: 0.0,
        weights=weights,
    )
    events = [ingest_pb2.Event(event_id=f"e{i}", event_name="any") for i in range(50)]
    with pytest.raises(AttributeError):  # priced 50 x 20 = 1000: within the burst
        await ingestor.ingest("a", events, datetime.now(UTC))
    with pytest.raises(ResourceExhausted) as refused:
        await ingestor.ingest("a", events[:1], datetime.now(UTC))
    assert "20 row units" in str(refused.value)
    fake.down = False
    fake.meters["a"] = [meter_pb2.Meter(event_name="f")]
    weights.weights("a")
    await _settle(weights)
    assert weights.weights("a") == {"f": 1.0}
    assert ("fold_weights_available", {"tenant_id": "a"}) in log.records
    fake.down = True
    clock.now += 5
    weights.weights("a")
    await _settle(weights)
    failures = [f["tenant_id"] for e, f in log.records if e == "fold_weights_unavailable"]
    assert sorted(failures) == ["a", "a", "b"]  # a new outage of a: logged again
    assert weights.weights("a") == {"f": 1.0}  # known before: kept
    await weights.close()


async def test_a_list_larger_than_the_grpc_default_is_received(
    meter: tuple[FakeMeter, grpc.aio.Channel],
) -> None:
    fake, plain = meter
    # Two meters of some 3 MB each (made before filters were bounded in bytes):
    # a page of 2 is over gRPC's default 4 MiB receive limit.
    big = meter_pb2.Filter()
    for i in range(60):
        big.conditions.add(
            key=f"k{i}",
            operator=meter_pb2.OPERATOR_IN,
            values=[value_pb2.Value(string_value="v" * 500)] * 100,
        )
    fake.meters["t"] = [meter_pb2.Meter(event_name="f", filter=big)] * 2
    assert fake.meters["t"][0].ByteSize() * 2 > 4 * 1024 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as default:
        await MeterWeights(plain, TOKEN).fetch("t")
    assert default.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    target = plain._channel.target.decode()  # type: ignore[attr-defined]
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    try:
        fetched = await MeterWeights(channel, TOKEN).fetch("t")
    finally:
        await channel.close(None)
    assert fetched == {"f": pytest.approx(2 * (1 + 0.15 * 60))}
