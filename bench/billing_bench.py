"""Benchmark: how fast one billing cycle builds and finalizes invoices.

10,000 subscriptions on a daily product with two usage prices (per unit with a
free threshold on a COUNT meter, graduated on a SUM meter), started so that
exactly one period has ended and its grace period (the default hour) has passed;
2,000 of the customers have usage (10 events each, counted by both meters).
Then one RunBillingCycle is timed: it reads usage from meter, prices, inserts
and finalizes 10,000 invoices (gapless numbers) and publishes invoice.finalized
for each on JetStream.

`run(suite)` needs the suite started with its billing scheduler off
(USAGEBILLING_SCHEDULER_ENABLED=false): a scheduler would bill the periods
while they are being set up, and there would be nothing left to time.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from tools.suite import Suite, create_tenant
from usagebilling.billing.v1 import (
    customer_pb2,
    customer_pb2_grpc,
    invoice_pb2,
    invoice_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
)
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

SUBSCRIPTIONS = 10_000
CUSTOMERS_WITH_USAGE = 2_000
EVENTS_PER_CUSTOMER = 10
SETUP_CONCURRENCY = 64
T = TypeVar("T")


def _log(message: str) -> None:
    print(f"billing_bench: {message}", file=sys.stderr, flush=True)


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def _bounded(jobs: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """Awaits the jobs, at most `limit` at a time."""
    semaphore = asyncio.Semaphore(limit)

    async def one(job: Awaitable[T]) -> T:
        async with semaphore:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


async def run(suite: Suite) -> dict[str, float]:
    _, secret = await asyncio.to_thread(create_tenant, suite, f"bench-{uuid.uuid4().hex[:8]}")
    md = (("authorization", f"Bearer {secret}"),)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    channels = {
        s: grpc.aio.insecure_channel(suite.address(s), options=options) for s in suite.ports
    }
    try:
        return await _run(channels, md)
    finally:
        for channel in channels.values():
            await channel.close(None)


async def _run(channels: dict[str, grpc.aio.Channel], md: Any) -> dict[str, float]:
    meters = meter_pb2_grpc.MeterServiceStub(channels["meter"])
    ingest = ingest_pb2_grpc.IngestServiceStub(channels["ingest"])
    products = product_pb2_grpc.ProductServiceStub(channels["billing"])
    customers = customer_pb2_grpc.CustomerServiceStub(channels["billing"])
    subscriptions = subscription_pb2_grpc.SubscriptionServiceStub(channels["billing"])
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

    async def subscribe(i: int) -> None:
        customer = await customers.CreateCustomer(
            customer_pb2.CreateCustomerRequest(external_id=f"cus_{i:05d}"), metadata=md
        )
        await subscriptions.CreateSubscription(
            subscription_pb2.CreateSubscriptionRequest(
                customer_id=customer.id, product_id=product.id, start_time=_ts(start)
            ),
            metadata=md,
        )

    await _bounded((subscribe(i) for i in range(SUBSCRIPTIONS)), SETUP_CONCURRENCY)
    _log(f"{SUBSCRIPTIONS} customers and subscriptions in {time.monotonic() - began:.1f} s")

    began = time.monotonic()
    events = [
        ingest_pb2.Event(
            event_id=f"e-{c}-{k}",
            customer_id=f"cus_{c:05d}",
            event_name="api.call",
            timestamp=_ts(start + timedelta(hours=1, seconds=c + k)),
            metadata={"mb": value_pb2.Value(int_value=5 + c % 50)},
        )
        for c in range(CUSTOMERS_WITH_USAGE)
        for k in range(EVENTS_PER_CUSTOMER)
    ]
    batches = [events[i : i + 1000] for i in range(0, len(events), 1000)]
    answers: list[ingest_pb2.IngestEventsResponse] = await _bounded(
        (
            ingest.IngestEvents(ingest_pb2.IngestEventsRequest(events=b), metadata=md)
            for b in batches
        ),
        8,
    )
    accepted = sum(a.accepted_count for a in answers)
    if accepted != len(events):
        raise RuntimeError(f"ingest accepted {accepted} of {len(events)} events")
    usage = meter_pb2.QueryUsageRequest(
        meter_id=calls.id,
        start_time=_ts(start),
        end_time=_ts(period_end),
        window_size=meter_pb2.WINDOW_SIZE_NONE,
    )
    while True:  # until meter has folded every event
        rows = (await meters.QueryUsage(usage, metadata=md)).rows
        if sum(Decimal(r.value) for r in rows) == len(events):
            break
        if time.monotonic() - began > 300:
            raise RuntimeError("meter did not count the events within 5 minutes")
        await asyncio.sleep(0.5)
    _log(f"{len(events)} events ingested and metered in {time.monotonic() - began:.1f} s")

    began = time.monotonic()
    answer = await invoices.RunBillingCycle(
        invoice_pb2.RunBillingCycleRequest(), metadata=md, timeout=1800
    )
    elapsed = time.monotonic() - began
    built = len(answer.invoice_ids)
    if built != SUBSCRIPTIONS:
        raise RuntimeError(
            f"the cycle built {built} invoices, not {SUBSCRIPTIONS}: is the billing scheduler off?"
        )
    sample = await invoices.GetInvoice(
        invoice_pb2.GetInvoiceRequest(id=answer.invoice_ids[-1]), metadata=md
    )
    if sample.status != invoice_pb2.INVOICE_STATUS_FINALIZED:
        raise RuntimeError(f"invoice {sample.id} is not finalized")
    _log(f"RunBillingCycle: {built} invoices built and finalized in {elapsed:.2f} s")
    return {"invoice_run_per_s": built / elapsed, "invoices": float(built)}
