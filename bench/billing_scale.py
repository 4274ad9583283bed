"""Benchmark: a billing cycle over 1,000,000 subscriptions of one tenant, with
the billing process's peak memory.

Setup: a daily product with two usage prices (per unit with a free threshold
on a COUNT meter, graduated on a SUM meter), created over gRPC; then the
customers and subscriptions are written straight into billing's tables with
one INSERT ... SELECT generate_series each (direct SQL, not the API: a million
CreateCustomer and CreateSubscription calls would take longer than the cycle),
all started so that exactly one period has ended and its grace has passed.
One customer in ten has usage: one event each, sent through ingest and
counted by meter (both meters).

Then RunBillingCycle is called until it answers more_pending = false (each
run stops at the run budget, USAGEBILLING_BILLING_RUN_BUDGET, 10 s by default,
and the next goes on from there): the cycle reads usage from meter a page at a
time, prices, inserts and finalizes every invoice (gapless numbers) and
publishes invoice.finalized for each on JetStream. Reported: invoices per
second over all the runs, and the billing process's peak RSS (VmHWM of
/proc/<pid>/status; target at most 500 MB) next to its RSS before the cycle.
The totals are checked in SQL against what the usage comes to.

    BENCH_SUBSCRIPTIONS=100000 python -m bench.billing_scale   # a quick run
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tools.devstack import DEFAULT_BASE_DIR, DevStack
from tools.suite import Suite, create_tenant
from usagebilling.billing.v1 import invoice_pb2, invoice_pb2_grpc, product_pb2, product_pb2_grpc
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

SUBSCRIPTIONS = int(os.environ.get("BENCH_SUBSCRIPTIONS", "1000000"))
USAGE_EVERY = 10  # one customer in ten has usage
EVENT_BATCH = 1000
T = TypeVar("T")


def _log(message: str) -> None:
    print(f"billing_scale: {message}", file=sys.stderr, flush=True)


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def _external_id(n: int) -> str:
    return f"cus_{n:07d}"


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak since the process started), in MB."""
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024  # kB
    return found


async def _bounded(jobs: Iterable[Awaitable[T]], limit: int) -> list[T]:
    semaphore = asyncio.Semaphore(limit)

    async def one(job: Awaitable[T]) -> T:
        async with semaphore:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


async def run(suite: Suite, subscriptions: int = SUBSCRIPTIONS) -> dict[str, float]:
    tenant_id, secret = await asyncio.to_thread(
        create_tenant, suite, f"scale-{uuid.uuid4().hex[:8]}"
    )
    md = (("authorization", f"Bearer {secret}"),)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    channels = {
        s: grpc.aio.insecure_channel(suite.address(s), options=options) for s in suite.ports
    }
    try:
        return await _run(suite, channels, md, tenant_id, subscriptions)
    finally:
        for channel in channels.values():
            await channel.close(None)


async def _run(
    suite: Suite,
    channels: dict[str, grpc.aio.Channel],
    md: Any,
    tenant_id: str,
    count: int,
) -> dict[str, float]:
    meters = meter_pb2_grpc.MeterServiceStub(channels["meter"])
    ingest = ingest_pb2_grpc.IngestServiceStub(channels["ingest"])
    products = product_pb2_grpc.ProductServiceStub(channels["billing"])
    invoices = invoice_pb2_grpc.InvoiceServiceStub(channels["billing"])

    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=1, hours=2)  # period 1 ended 2 h ago: its grace has passed
    period_end = start + timedelta(days=1)
    calls = await meters.CreateMeter(
        meter_pb2.CreateMeterRequest(
            name="api-calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
        metadata=md,
    )
    traffic = await meters.CreateMeter(
        meter_pb2.CreateMeterRequest(
            name="egress-mb",
            event_name="api.call",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="mb",
        ),
        metadata=md,
    )
    product = await products.CreateProduct(
        product_pb2.CreateProductRequest(
            name="API",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            fixed_price_minor=100,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=calls.id,
                    model=product_pb2.PRICE_MODEL_PER_UNIT,
                    unit_price="0.02",
                    free_threshold="3",
                ),
                product_pb2.UsagePrice(
                    meter_id=traffic.id,
                    model=product_pb2.PRICE_MODEL_GRADUATED,
                    tiers=[
                        product_pb2.PriceTier(up_to="100", unit_price="0.01"),
                        product_pb2.PriceTier(up_to="", unit_price="0.005", flat_price="1"),
                    ],
                ),
            ],
        ),
        metadata=md,
    )

    began = time.monotonic()
    db = await asyncpg.connect(suite.database_url)
    try:
        await db.execute(
            "INSERT INTO billing.customers (tenant_id, external_id)"
            " SELECT $1, 'cus_' || lpad(g::text, 7, '0') FROM generate_series(0, $2 - 1) g",
            tenant_id,
            count,
        )
        await db.execute(
            "INSERT INTO billing.subscriptions (tenant_id, customer_id, product_id, start_time)"
            " SELECT $1, c.id, $2::uuid, $3 FROM billing.customers c WHERE c.tenant_id = $1",
            tenant_id,
            product.id,
            start,
        )
        await db.execute("ANALYZE billing.customers; ANALYZE billing.subscriptions")
    finally:
        await db.close()
    _log(
        f"{count:,} customers and subscriptions written by direct SQL (INSERT ... SELECT"
        f" generate_series, not the API) in {time.monotonic() - began:.1f} s"
    )

    began = time.monotonic()
    users = range(0, count, USAGE_EVERY)

    def mb(n: int) -> int:
        return 5 + n % 50

    def batch(numbers: range) -> ingest_pb2.IngestEventsRequest:
        return ingest_pb2.IngestEventsRequest(
            events=[
                ingest_pb2.Event(
                    event_id=f"e-{n}",
                    customer_id=_external_id(n),
                    event_name="api.call",
                    timestamp=_ts(start + timedelta(hours=1, seconds=n % 3600)),
                    metadata={"mb": value_pb2.Value(int_value=mb(n))},
                )
                for n in numbers
            ]
        )

    step = EVENT_BATCH * USAGE_EVERY
    answers: list[ingest_pb2.IngestEventsResponse] = await _bounded(
        (
            ingest.IngestEvents(batch(range(i, min(i + step, count), USAGE_EVERY)), metadata=md)
            for i in range(0, count, step)
        ),
        8,
    )
    accepted = sum(a.accepted_count for a in answers)
    if accepted != len(users):
        raise RuntimeError(f"ingest accepted {accepted} of {len(users)} events")
    while True:  # until meter has counted every event (read a page at a time)
        counted, token = Decimal(0), ""
        while True:
            request = meter_pb2.QueryUsageRequest(
                meter_id=calls.id,
                start_time=_ts(start),
                end_time=_ts(period_end),
                window_size=meter_pb2.WINDOW_SIZE_NONE,
                page_size=10_000,
                page_token=token,
            )
            page = await meters.QueryUsage(request, metadata=md)
            counted += sum(Decimal(r.value) for r in page.rows)
            token = page.next_page_token
            if not token:
                break
        if counted == len(users):
            break
        if time.monotonic() - began > 600:
            raise RuntimeError(f"meter counted {counted} of {len(users)} events in 10 minutes")
        await asyncio.sleep(1.0)
    _log(f"{len(users):,} events ingested and metered in {time.monotonic() - began:.1f} s")

    pid = suite.processes["billing"].pid
    before = memory_mb(pid)
    peak_rss = before["VmRSS"]
    sampling = True

    async def sample() -> None:
        nonlocal peak_rss
        while sampling:
            peak_rss = max(peak_rss, memory_mb(pid)["VmRSS"])
            await asyncio.sleep(0.5)

    sampler = asyncio.ensure_future(sample())
    began = time.monotonic()
    built: set[str] = set()
    runs = retried = 0
    try:
        while True:
            try:
                answer = await invoices.RunBillingCycle(
                    invoice_pb2.RunBillingCycleRequest(), metadata=md, timeout=3600
                )
            except grpc.aio.AioRpcError as exc:
                # A run that meter failed (as a scheduler's would be, next tick): again.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or retried >= 5:
                    raise
                retried += 1
                _log(f"a run failed ({exc.details()}); running again")
                continue
            runs += 1
            built.update(answer.invoice_ids)
            if answer.failures:
                raise RuntimeError(f"the cycle held {len(answer.failures)} periods")
            if not answer.more_pending:
                break
            if runs % 10 == 0:
                _log(f"{runs} runs, {len(built):,} invoices, {time.monotonic() - began:.0f} s")
    finally:
        sampling = False
        await sampler
    elapsed = time.monotonic() - began
    after = memory_mb(pid)

    db = await asyncpg.connect(suite.database_url)
    try:
        row = await db.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT (subscription_id, period_start)) AS periods,"
            " count(*) FILTER (WHERE status = 'FINALIZED') AS finalized,"
            " count(*) FILTER (WHERE published_at IS NOT NULL) AS published,"
            " sum(total_minor) AS total, count(DISTINCT number) AS numbers"
            " FROM billing.invoices WHERE tenant_id = $1",
            tenant_id,
        )
    finally:
        await db.close()
    assert row is not None
    # 100 (fixed) each; a user: 1 call (under the 3 free) and mb MB at 0.01 USD.
    expected = 100 * count + sum(mb(n) for n in users)
    got = (row["n"], row["periods"], row["finalized"], row["numbers"], row["total"])
    if got != (count, count, count, count, expected) or len(built) != count:
        raise RuntimeError(f"expected {count} invoices totalling {expected}, found {got}")
    _log(
        f"{count:,} invoices built, finalized and published ({row['published']:,} published)"
        f" in {runs} RunBillingCycle runs ({retried} failed and rerun), {elapsed:.1f} s:"
        f" {count / elapsed:,.0f} invoices/s;"
        f" totals exact ({expected:,} minor units)"
    )
    _log(
        f"billing process (pid {pid}): RSS {before['VmRSS']:.0f} MB before the cycle,"
        f" {after['VmRSS']:.0f} MB after, peak sampled {peak_rss:.0f} MB,"
        f" VmHWM {after['VmHWM']:.0f} MB (target <= 500 MB)"
    )
    return {
        "billing_scale_subscriptions": float(count),
        "billing_scale_invoices_per_s": count / elapsed,
        "billing_scale_peak_rss_mb": after["VmHWM"],
    }


async def standalone() -> dict[str, float]:
    """The figures on a private stack and suite of their own (make bench runs
    this once, after its runs)."""
    base = DEFAULT_BASE_DIR / "bench-billing-scale"
    shutil.rmtree(base, ignore_errors=True)
    stack = DevStack(base)
    database_url, nats_url = stack.start()
    suite = Suite(
        database_url,
        nats_url,
        base / "logs",
        extra_env={
            "USAGEBILLING_SCHEDULER_ENABLED": "false",
            "USAGEBILLING_LOG_LEVEL": "warning",
            "USAGEBILLING_INGEST_RATE_LIMIT": "0",
        },
    )
    try:
        suite.start()
        return await run(suite)
    finally:
        suite.stop()
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


async def _main() -> None:
    for name, value in (await standalone()).items():
        print(f"{name:<32}{value:>14,.1f}")


if __name__ == "__main__":
    asyncio.run(_main())
