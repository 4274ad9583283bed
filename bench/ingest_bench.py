"""The ingest → meter pipeline under load, driven from this process:

- e2e_events_per_s: events per second from the first IngestEvents call until
  all of them are counted in the meters' usage (three meters match each event;
  totals verified exactly at the end);
- ingest_ack_p50_ms / p99: per IngestEvents call of `batch` events;
- freshness_p50_ms / p99: a probe event's acknowledgement until QueryUsage
  shows it, under a steady load at the e2e target rate (20,000 events/s);
  freshness_burst_*: the same during the unpaced burst, where any backlog
  between ingest and meter shows;
- query_usage_p99_ms: one customer's month in DAY windows;
- pg_copy_rows_per_s: the same events COPYed into a plain table: what
  PostgreSQL alone takes on this machine.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import nats

from bench.stats import percentile
from services.common.jetstream import EVENTS_STREAM
from tools.suite import Suite, create_tenant
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

CUSTOMERS = 100
# A probe event not counted by then fails the run (the pipeline lost it). Far
# above the burst's backlog: beside other work (make test, load 8) meter took
# over 120 s to fold the burst, and a slow drain is a figure, not a loss (the
# run's totals check catches a lost event).
PROBE_TIMEOUT = 900
REGIONS = ("eu", "us", "apac")


def _events(count: int, start: datetime, span: timedelta) -> list[ingest_pb2.Event]:
    rng = random.Random(42)
    step = span / count
    events = []
    for i in range(count):
        event = ingest_pb2.Event(
            event_id=f"e{i}", customer_id=f"cus_{i % CUSTOMERS}", event_name="api.call"
        )
        event.timestamp.FromDatetime(start + step * i)
        event.metadata["tokens"].int_value = rng.randint(1, 2000)
        event.metadata["region"].string_value = REGIONS[i % 3]
        event.metadata["model"].string_value = "gpt-x"
        events.append(event)
    return events


async def _create_meters(stub: Any, auth: Any) -> dict[str, str]:
    any_region = meter_pb2.Filter(
        conjunction=meter_pb2.CONJUNCTION_OR,
        conditions=[
            meter_pb2.Condition(
                key="region",
                operator=meter_pb2.OPERATOR_IN,
                values=[value_pb2.Value(string_value=r) for r in REGIONS],
            )
        ],
    )
    specs = {
        "calls": meter_pb2.CreateMeterRequest(
            name="calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
        "tokens": meter_pb2.CreateMeterRequest(
            name="tokens",
            event_name="api.call",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="tokens",
            group_by=["region"],
        ),
        "tokens_any_region": meter_pb2.CreateMeterRequest(
            name="tokens-any-region",
            event_name="api.call",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="tokens",
            filter=any_region,
        ),
    }
    return {key: (await stub.CreateMeter(spec, metadata=auth)).id for key, spec in specs.items()}


async def _total(stub: Any, auth: Any, meter_id: str, start: datetime, end: datetime) -> Decimal:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    answer = await stub.QueryUsage(request, metadata=auth, timeout=60)
    return sum((Decimal(row.value) for row in answer.rows), Decimal(0))


async def _probe_freshness(
    ingest: Any, meter: Any, auth: Any, meter_id: str, stop: asyncio.Event, phase: str
) -> list[float]:
    """Every 100 ms, one new event for a customer of its own (ids unique to
    the phase); time until it counts."""
    samples: list[float] = []
    n = 0
    while not stop.is_set():
        n += 1
        probe = f"probe-{phase}-{n}"
        now = datetime.now(UTC)
        event = ingest_pb2.Event(event_id=probe, customer_id=probe, event_name="api.call")
        event.timestamp.FromDatetime(now)
        event.metadata["tokens"].int_value = 1
        event.metadata["region"].string_value = "eu"
        answer = await ingest.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=[event]), metadata=auth
        )
        acked = time.perf_counter()
        # A repeat would be counted already (or never): no freshness to measure.
        if answer.accepted_count != 1:
            raise RuntimeError(f"probe {probe} was not accepted as new: {answer}")
        request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id=probe)
        request.start_time.FromDatetime(now - timedelta(minutes=1))
        request.end_time.FromDatetime(now + timedelta(minutes=1))
        while True:
            usage = await meter.QueryUsage(request, metadata=auth)
            if usage.rows and usage.rows[0].value == "1":
                samples.append((time.perf_counter() - acked) * 1000)
                break
            if time.perf_counter() - acked > PROBE_TIMEOUT:
                raise RuntimeError(f"probe {probe} not counted {PROBE_TIMEOUT} s after its ack")
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
    return samples


async def _paced(send: Any, auth: Any, rate: int, seconds: float, batch: int) -> None:
    """Sends `rate` events per second for `seconds`, stamped now, whatever the
    answers' latency (each batch leaves on its own schedule)."""
    calls = []
    began = time.perf_counter()
    for n in range(int(rate * seconds / batch)):
        await asyncio.sleep(max(0.0, began + n * batch / rate - time.perf_counter()))
        now = datetime.now(UTC)
        request = ingest_pb2.IngestEventsRequest()
        for i in range(batch):
            item = request.events.add(
                event_id=f"paced-{n}-{i}", customer_id=f"cus_{i % CUSTOMERS}", event_name="api.call"
            )
            item.timestamp.FromDatetime(now)
            item.metadata["tokens"].int_value = 1
            item.metadata["region"].string_value = REGIONS[i % 3]
        calls.append(
            asyncio.ensure_future(send(request.SerializeToString(), metadata=auth, timeout=60))
        )
    await asyncio.gather(*calls)


async def _drained(suite: Suite) -> bool:
    conn = await asyncpg.connect(suite.database_url)
    try:
        if await conn.fetchval("SELECT count(*) FROM ingest.outbox"):
            return False
    finally:
        await conn.close()
    nc = await nats.connect(suite.nats_url)
    try:
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, "meter")
    finally:
        await nc.close()
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def _copy_reference(database_url: str, events: list[ingest_pb2.Event]) -> float:
    records = [
        (
            "bench",
            e.event_id,
            e.customer_id,
            e.event_name,
            e.timestamp.ToDatetime(tzinfo=UTC),
            json.dumps(
                {
                    "tokens": e.metadata["tokens"].int_value,
                    "region": e.metadata["region"].string_value,
                }
            ),
        )
        for e in events
    ]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS public.bench_copy (tenant_id text, event_id text,"
            " customer_id text, event_name text, event_time timestamptz, metadata jsonb)"
        )
        await conn.execute("TRUNCATE public.bench_copy")
        started = time.perf_counter()
        await conn.copy_records_to_table("bench_copy", records=records, schema_name="public")
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE public.bench_copy")
    finally:
        await conn.close()
    return len(records) / elapsed


async def run(
    suite: Suite,
    *,
    events: int = 500_000,
    batch: int = 500,
    concurrency: int = 2,
    paced_rate: int = 20_000,
    paced_seconds: float = 10,
    cpu: Callable[[], dict[str, float]] = dict,
) -> dict[str, float]:
    _, secret = create_tenant(suite, "bench")
    auth = (("authorization", f"Bearer {secret}"),)
    ingest_channel = grpc.aio.insecure_channel(suite.address("ingest"))
    meter_channel = grpc.aio.insecure_channel(suite.address("meter"))
    meter = meter_pb2_grpc.MeterServiceStub(meter_channel)
    meters = await _create_meters(meter, auth)

    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now - timedelta(days=30), now - timedelta(minutes=1)
    load = _events(events, start, end - start)
    expected = {
        "calls": Decimal(events),
        "tokens": sum((Decimal(e.metadata["tokens"].int_value) for e in load), Decimal(0)),
    }
    expected["tokens_any_region"] = expected["tokens"]
    # Requests are serialized up front, so the client's own protobuf work does
    # not compete with the services for the two cores during the run.
    payloads = [
        ingest_pb2.IngestEventsRequest(events=load[i : i + batch]).SerializeToString()
        for i in range(0, events, batch)
    ]
    # The prepared events stay alive all run: keep the client's garbage
    # collector from walking them on every full collection, which would stall
    # the client and show up as (false) ack latency.
    gc.collect()
    gc.freeze()
    send = ingest_channel.unary_unary(
        "/usagebilling.ingest.v1.IngestService/IngestEvents",
        request_serializer=lambda b: b,
        response_deserializer=ingest_pb2.IngestEventsResponse.FromString,
    )
    ack_ms: list[float] = []
    accepted = 0
    queue = list(reversed(payloads))

    async def sender() -> None:
        nonlocal accepted
        while queue:
            payload = queue.pop()
            t0 = time.perf_counter()
            answer = await send(payload, metadata=auth, timeout=60)
            ack_ms.append((time.perf_counter() - t0) * 1000)
            accepted += answer.accepted_count

    stop_probe = asyncio.Event()
    ingest_stub = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    probe = asyncio.create_task(
        _probe_freshness(ingest_stub, meter, auth, meters["calls"], stop_probe, "burst")
    )
    cpu_before = cpu()
    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    acked_at = time.perf_counter() - started
    # Done when nothing waits in ingest's outbox or for meter's consumer (cheap
    # to ask, unlike summing every row); then the totals are checked exactly.
    totals: dict[str, Decimal] = {}
    while time.perf_counter() - started < 900:
        if await _drained(suite):
            totals = {
                k: await _total(meter, auth, meters[k], start, end + timedelta(seconds=1))
                for k in meters
            }
            if all(totals[k] >= expected[k] for k in meters):
                break
        await asyncio.sleep(0.05)
    counted_at = time.perf_counter() - started
    cpu_used = {k: v - cpu_before[k] for k, v in cpu().items()}
    stop_probe.set()
    burst_freshness = await probe
    exact = all(totals[k] == expected[k] for k in meters) and accepted == events

    # Freshness in steady state: a load paced at the target rate, as
    # production runs (in the burst above, whatever backlog builds up between
    # ingest and meter adds to it).
    stop_probe = asyncio.Event()
    probe = asyncio.create_task(
        _probe_freshness(ingest_stub, meter, auth, meters["calls"], stop_probe, "paced")
    )
    await _paced(send, auth, paced_rate, paced_seconds, batch)
    stop_probe.set()
    freshness = await probe

    # One customer's month in DAY windows, over the meters' rows.
    query_ms: list[float] = []
    for i in range(200):
        request = meter_pb2.QueryUsageRequest(
            meter_id=meters["tokens"],
            customer_id=f"cus_{i % CUSTOMERS}",
            window_size=meter_pb2.WINDOW_SIZE_DAY,
            time_zone="Europe/Berlin",
        )
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)
        t0 = time.perf_counter()
        await meter.QueryUsage(request, metadata=auth)
        query_ms.append((time.perf_counter() - t0) * 1000)

    copy_rate = await _copy_reference(suite.database_url, load)
    gc.unfreeze()
    await ingest_channel.close(None)
    await meter_channel.close(None)
    return {
        "events": events,
        "batch": batch,
        "exact": 1.0 if exact else 0.0,
        "ingest_events_per_s": events / acked_at,
        "e2e_events_per_s": events / counted_at,
        "ingest_ack_p50_ms": percentile(ack_ms, 50),
        "ingest_ack_p99_ms": percentile(ack_ms, 99),
        "freshness_p50_ms": percentile(freshness, 50),
        "freshness_p99_ms": percentile(freshness, 99),
        "freshness_samples": len(freshness),
        "paced_events_per_s": paced_rate,
        "freshness_burst_p50_ms": percentile(burst_freshness, 50),
        "freshness_burst_p99_ms": percentile(burst_freshness, 99),
        "query_usage_p99_ms": percentile(query_ms, 99),
        "pg_copy_rows_per_s": copy_rate,
        # Where the machine's CPU went, per 100,000 events (steadier than rates
        # on a noisy machine): services, PostgreSQL, NATS.
        **{f"cpu_s_per_100k_{k}": v * 100_000 / events for k, v in cpu_used.items()},
    }
