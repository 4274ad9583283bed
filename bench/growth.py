"""Benchmark: usage reads as a customer's month grows (issue 16).

One customer per size, each on a monthly subscription whose period started 25
days ago (to the second, at second 30 of a minute), has 100,000, 1,000,000 or
10,000,000 events in its period, counted by two meters (COUNT and SUM), so 2
rows each. For each size, over real gRPC: QueryUsage for the period with no
windows, DAY and HOUR windows, GetCustomerUsage and PreviewInvoice (billing
asks meter for both meters), each timed REPEAT times; p50 and p99 in ms. The
sizes take turns, BLOCK calls each, so that the machine's noise (shared, 2
cores) falls on all sizes alike and the ratio between them is the reads' own.

Loading: rows are generated in PostgreSQL and go in through the fold's own
rollup statement (MeterStore.insert_and_roll_up: the statement the fold runs
over INSERT ... RETURNING), LOAD_CHUNK rows a statement: what the consumer
would have written, without pushing 22 million rows through NATS first. Event
i sits at frac(i * (sqrt(5) - 1) / 2) of the period (a Weyl sequence), so every
size covers the whole period evenly: each answers the same windows (26 DAY
rows, 601 HOUR rows), and only the events behind them grow. After the load
the tables are vacuumed, analyzed and checkpointed, so the reads meet a
settled month (as a month written over weeks is), not the autovacuum and
checkpoint a bulk load of minutes sets off.

    BENCH_GROWTH_SIZES=100000,1000000 python -m bench.run   (trims the sizes)
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from bench.stats import cpu_seconds, percentile
from services.common import db
from services.meter.store import MeterStore
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
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

SIZES = (100_000, 1_000_000, 10_000_000)
# Samples per read and size: p99 is then the third slowest, not the second
# (one scheduling hiccup on the shared machine decided it).
REPEAT = 300
WARM = 20
# Calls a size takes in a row before the next size's turn (see _timed).
BLOCK = 25
LOAD_CHUNK = 500_000
CUSTOMER = "growth-customer"
# The period: started this long before the current minute, at second 30: its
# first partial minute then costs a read the most rows it can (half a minute's:
# domain.rollup.COMPLEMENT_FROM), whatever the second the run starts on.
AGE = timedelta(days=25, seconds=-30)

# p99 targets (ms) at every size; and the largest size at most 1.5x the smallest.
TARGETS = {"query_none": 10, "query_day": 10, "preview_invoice": 25}
GROWTH_LIMIT = 1.5


def _log(message: str) -> None:
    print(f"growth: {message}", file=sys.stderr, flush=True)


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def sizes() -> list[int]:
    raw = os.environ.get("BENCH_GROWTH_SIZES", "")
    return [int(s) for s in raw.split(",") if s.strip()] if raw else list(SIZES)


def _label(n: int) -> str:
    return f"{n // 1_000_000}m" if n >= 1_000_000 else f"{n // 1000}k"


# CPU seconds so far of each process a read runs in (meter, billing, postgres
# with its backends, this client): `{}` when not measured.
Cpu = Callable[[], dict[str, float]]


async def _timed(
    calls: dict[int, Callable[[], Awaitable[Any]]], repeat: int, cpu: Cpu
) -> dict[int, tuple[float, float, dict[str, float]]]:
    """Per size: p50 and p99 ms of `repeat` calls, and each process's CPU ms per
    call: steadier than latency on the shared machine (a busy neighbour queues
    a call, it does not make it cost more), so compare code by it.

    The sizes take turns, BLOCK calls each, so that whatever else the machine
    does in those seconds falls on every size alike: the ratio between sizes
    is then the read's own growth, not the minute each size was read in."""
    # Warm: the services' pooled connections each prepare the read and fill their
    # catalog caches on first use (a pool of 10 takes 10 calls to warm).
    for call in calls.values():
        for _ in range(WARM):
            await call()
    samples: dict[int, list[float]] = {size: [] for size in calls}
    spent: dict[int, dict[str, float]] = {size: {} for size in calls}
    for _ in range(0, repeat, BLOCK):
        for size, call in calls.items():
            before = cpu()
            for _ in range(BLOCK):
                began = time.perf_counter()
                await call()
                samples[size].append((time.perf_counter() - began) * 1000)
            after = cpu()
            for name in before:
                spent[size][name] = spent[size].get(name, 0.0) + after[name] - before[name]
    return {
        size: (
            percentile(samples[size], 50),
            percentile(samples[size], 99),
            {name: seconds * 1000 / len(samples[size]) for name, seconds in spent[size].items()},
        )
        for size in calls
    }


def suite_cpu(suite: Suite, postgres_pid: int | None) -> Cpu:
    """The CPU seconds of meter, billing, PostgreSQL and this process."""
    pids = {
        "meter": suite.processes["meter"].pid,
        "billing": suite.processes["billing"].pid,
        "postgres": postgres_pid,
    }

    def cpu() -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in pids.items()} | {
            "client": time.process_time()
        }

    return cpu


async def run(
    suite: Suite, growth_sizes: list[int] | None = None, cpu: Cpu = dict
) -> dict[str, float]:
    _, secret = await asyncio.to_thread(create_tenant, suite, f"growth-{uuid.uuid4().hex[:8]}")
    md = (("authorization", f"Bearer {secret}"),)
    channels = {s: grpc.aio.insecure_channel(suite.address(s)) for s in ("meter", "billing")}
    pool = await db.create_pool(suite.database_url, min_size=1, max_size=2)
    try:
        return await _run(channels, md, MeterStore(pool), growth_sizes or sizes(), cpu)
    finally:
        await pool.close()
        for channel in channels.values():
            await channel.close(None)


async def _run(
    channels: dict[str, grpc.aio.Channel],
    md: Any,
    store: MeterStore,
    growth_sizes: list[int],
    cpu: Cpu,
) -> dict[str, float]:
    meters = meter_pb2_grpc.MeterServiceStub(channels["meter"])
    products = product_pb2_grpc.ProductServiceStub(channels["billing"])
    customers = customer_pb2_grpc.CustomerServiceStub(channels["billing"])
    subscriptions = subscription_pb2_grpc.SubscriptionServiceStub(channels["billing"])
    invoices = invoice_pb2_grpc.InvoiceServiceStub(channels["billing"])

    now = datetime.now(UTC).replace(microsecond=0)
    start = now.replace(second=0) - AGE
    span = now - timedelta(minutes=1) - start  # events up to a minute ago

    calls = await meters.CreateMeter(
        meter_pb2.CreateMeterRequest(
            name="calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
        metadata=md,
    )
    tokens = await meters.CreateMeter(
        meter_pb2.CreateMeterRequest(
            name="tokens",
            event_name="api.call",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="tokens",
        ),
        metadata=md,
    )
    product = await products.CreateProduct(
        product_pb2.CreateProductRequest(
            name="API",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
            fixed_price_minor=1000,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=calls.id,
                    model=product_pb2.PRICE_MODEL_PER_UNIT,
                    unit_price="0.0001",
                    free_threshold="1000",
                ),
                product_pb2.UsagePrice(
                    meter_id=tokens.id,
                    model=product_pb2.PRICE_MODEL_GRADUATED,
                    tiers=[
                        product_pb2.PriceTier(up_to="1000000", unit_price="0.00001"),
                        product_pb2.PriceTier(up_to="", unit_price="0.000005", flat_price="1"),
                    ],
                ),
            ],
        ),
        metadata=md,
    )
    # (meter key, whether its rows hold the tokens or 1, as a COUNT's do)
    keys = [
        (await store.pool.fetchval("SELECT key FROM meter.meters WHERE id = $1", m.id), m == tokens)
        for m in (calls, tokens)
    ]
    reads: dict[int, dict[str, Callable[[], Awaitable[Any]]]] = {}
    for size in growth_sizes:
        external_id = f"{CUSTOMER}-{_label(size)}"
        customer = await customers.CreateCustomer(
            customer_pb2.CreateCustomerRequest(external_id=external_id), metadata=md
        )
        subscription = await subscriptions.CreateSubscription(
            subscription_pb2.CreateSubscriptionRequest(
                customer_id=customer.id, product_id=product.id, start_time=_ts(start)
            ),
            metadata=md,
        )
        reads[size] = _reads(meters, md, tokens.id, external_id, start)
        reads[size] |= {
            "customer_usage": _bind(
                invoices.GetCustomerUsage,
                invoice_pb2.GetCustomerUsageRequest(customer_id=customer.id),
                md,
            ),
            "preview_invoice": _bind(
                invoices.PreviewInvoice,
                invoice_pb2.PreviewInvoiceRequest(subscription_id=subscription.id),
                md,
            ),
        }

    span_us = span // timedelta(microseconds=1)
    # Event i at frac(i * GOLDEN) of the span: spread evenly at every size.
    golden = Decimal(5).sqrt() / 2 - Decimal("0.5")
    for size in sorted(growth_sizes):
        began = time.monotonic()
        for low in range(0, size, LOAD_CHUNK):
            high = min(size, low + LOAD_CHUNK)
            for meter_key, valued in keys:
                # Event i at frac(i * golden) of the period (see the module's
                # docstring), value 1..2000.
                await store.insert_and_roll_up(
                    "SELECT $1::integer, $2::text,"
                    " $3::timestamptz + floor((i * $8::numeric) % 1 * $6)"
                    " * interval '1 microsecond',"
                    " 'g' || i, CASE WHEN $7 THEN i % 2000 + 1 ELSE 1 END::numeric,"
                    " NULL::text, NULL::jsonb, NULL::text"
                    " FROM generate_series($4::bigint, $5::bigint - 1) AS i",
                    meter_key,
                    f"{CUSTOMER}-{_label(size)}",
                    start,
                    low,
                    high,
                    span_us,
                    valued,
                    golden,
                )
        seconds = time.monotonic() - began
        _log(
            f"{size:,} events ({2 * size:,} rows) loaded in {seconds:.0f} s"
            " through the fold's rollup statement (INSERT ... RETURNING, generated rows)"
        )
    began = time.monotonic()
    # Settled before the reads (see the module's docstring): otherwise
    # autovacuum's pass over the rows just loaded (20,000,000 at the largest
    # size) and the checkpoint of their WAL may share the 2 cores with them.
    await store.pool.execute(
        "VACUUM (ANALYZE) meter.meter_events, meter.usage_rollups, meter.usage_gates"
    )
    await store.pool.execute("CHECKPOINT")
    _log(f"vacuumed, analyzed and checkpointed in {time.monotonic() - began:.0f} s")
    for size in growth_sizes:
        answer = await reads[size]["query_none"]()
        # sum of i % 2000 + 1 over i < size
        whole, rest = divmod(size, 2000)
        expected = whole * 2000 * 2001 // 2 + rest * (rest + 1) // 2
        if answer.rows[0].value != str(expected):
            raise RuntimeError(f"tokens: {answer.rows[0].value} at {size:,} events")
        day, hour = await reads[size]["query_day"](), await reads[size]["query_hour"]()
        if (len(day.rows), len(hour.rows)) != (26, 601):
            raise RuntimeError(f"{len(day.rows)} DAY, {len(hour.rows)} HOUR rows at {size:,}")
    _log("answers: 26 DAY rows and 601 HOUR rows at every size")

    figures: dict[str, float] = {"growth_load_avg": os.getloadavg()[0]}
    for name in reads[growth_sizes[0]]:
        timed = await _timed({size: reads[size][name] for size in growth_sizes}, REPEAT, cpu)
        for size, (p50, p99, per_call) in sorted(timed.items()):
            label = _label(size)
            figures[f"growth_{label}_{name}_p50_ms"] = p50
            figures[f"growth_{label}_{name}_p99_ms"] = p99
            spent = ""
            if per_call:
                # Server: meter, billing and PostgreSQL; the client apart.
                client = per_call.pop("client")
                figures[f"growth_{label}_{name}_server_cpu_ms"] = sum(per_call.values())
                figures[f"growth_{label}_{name}_client_cpu_ms"] = client
                parts = ", ".join(f"{n} {per_call[n]:.2f}" for n in sorted(per_call))
                spent = f"  CPU ms a call: {parts}, client {client:.2f}"
            _log(f"{size:>12,} events  {name:<16} p50 {p50:7.2f} ms  p99 {p99:7.2f} ms{spent}")
    figures["growth_load_avg"] = max(figures["growth_load_avg"], os.getloadavg()[0])
    return figures


def _bind(method: Any, request: Any, md: Any) -> Callable[[], Awaitable[Any]]:
    return lambda: method(request, metadata=md, timeout=60)


def _reads(
    meters: meter_pb2_grpc.MeterServiceStub,
    md: Any,
    meter_id: str,
    customer: str,
    start: datetime,
) -> dict[str, Callable[[], Awaitable[Any]]]:
    """QueryUsage of the tokens meter over the customer's period, by window."""
    out = {}
    for name, window in (
        ("query_none", meter_pb2.WINDOW_SIZE_NONE),
        ("query_day", meter_pb2.WINDOW_SIZE_DAY),
        ("query_hour", meter_pb2.WINDOW_SIZE_HOUR),
    ):
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter_id,
            customer_id=customer,
            start_time=_ts(start),
            end_time=_ts(start + timedelta(days=30)),
            window_size=window,
        )
        out[name] = _bind(meters.QueryUsage, request, md)
    return out


def targets(growth_sizes: list[int]) -> dict[str, tuple[str, int]]:
    """bench.run's TARGETS for the growth figures."""
    out: dict[str, tuple[str, int]] = {}
    for size in growth_sizes:
        for name, limit in TARGETS.items():
            out[f"growth_{_label(size)}_{name}_p99_ms"] = ("<=", limit)
    return out


def growth_ratios(figures: dict[str, float], growth_sizes: list[int]) -> dict[str, float]:
    """The largest size's p99 over the smallest's, per read (target <= 1.5)."""
    low, high = _label(min(growth_sizes)), _label(max(growth_sizes))
    out = {}
    for name in TARGETS:
        base = figures.get(f"growth_{low}_{name}_p99_ms")
        top = figures.get(f"growth_{high}_{name}_p99_ms")
        if base and top is not None and low != high:
            out[f"growth_{name}_p99_ratio_{high}_{low}"] = top / base
    return out


async def standalone() -> dict[str, float]:
    """The growth figures (and ratios), on a private stack and suite of their own."""
    import shutil

    from tools.devstack import DEFAULT_BASE_DIR, DevStack

    base = DEFAULT_BASE_DIR / "bench-growth"
    shutil.rmtree(base, ignore_errors=True)
    stack = DevStack(base)
    database_url, nats_url = stack.start()
    suite = Suite(
        database_url,
        nats_url,
        base / "logs",
        extra_env={"USAGEBILLING_SCHEDULER_ENABLED": "false", "USAGEBILLING_LOG_LEVEL": "warning"},
    )
    try:
        suite.start()
        chosen = sizes()
        figures = await run(suite, chosen, suite_cpu(suite, stack.postgres_pid))
        return figures | growth_ratios(figures, chosen)
    finally:
        suite.stop()
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    for figure, value in asyncio.run(standalone()).items():
        print(f"{figure:<44}{value:>10.2f}")
