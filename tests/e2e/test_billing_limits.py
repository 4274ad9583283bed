"""Billing's limits over gRPC, with the real meter: a usage that no int64 of
minor units can bill (one event with tokens = "9e30" at 0.01 a token) is
reported by RunBillingCycle, once in billing's log and in its metric, while
the other subscriptions are billed; client timestamps at the ends of their
range and too many usage prices are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import re
import urllib.request
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.client import Client, event, eventually
from tools.suite import Suite
from usagebilling.billing.v1 import customer_pb2, invoice_pb2, product_pb2, subscription_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e

H = timedelta(hours=1)
D = timedelta(days=1)


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def failures_counted(suite: Suite) -> float:
    """billing's usagebilling_billing_failures_total{reason="amount_out_of_range"}."""
    url = f"http://127.0.0.1:{suite.metrics_ports['billing']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(
        r'^usagebilling_billing_failures_total\{reason="amount_out_of_range"\} (\S+)$',
        text,
        re.MULTILINE,
    )
    return float(found.group(1)) if found else 0.0


async def test_a_period_beyond_int64_is_reported_once_and_the_rest_is_billed(
    client: Client, suite: Suite
) -> None:
    now = datetime.now(UTC)
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="tokens", event_name="llm.call", aggregation=meter_pb2.AGGREGATION_SUM,
            property="tokens",
        ),
    )  # fmt: skip
    plan = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="LLM",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            fixed_price_minor=500,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter.id, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="0.01"
                )
            ],
        ),
    )
    subscriptions = {}
    for external_id in ("ok", "huge"):
        customer = await client.call(
            client.customers.CreateCustomer,
            customer_pb2.CreateCustomerRequest(external_id=external_id),
        )
        subscriptions[external_id] = await client.call(
            client.subscriptions.CreateSubscription,
            subscription_pb2.CreateSubscriptionRequest(
                customer_id=customer.id, product_id=plan.id, start_time=ts(now - 2 * D - 3 * H)
            ),
        )
    day1 = now - 2 * D - 3 * H
    answer = await client.call(
        client.ingest.IngestEvents,
        ingest_pb2.IngestEventsRequest(
            events=[
                event("e-huge", "huge", "llm.call", day1 + 2 * H, tokens="9e30"),
                event("e-ok", "ok", "llm.call", day1 + 2 * H, tokens=250),
            ]
        ),
    )
    assert answer.accepted_count == 2, answer

    async def usage() -> Decimal:
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter.id,
            customer_id="huge",
            start_time=ts(day1),
            end_time=ts(day1 + D),
            window_size=meter_pb2.WINDOW_SIZE_NONE,
        )
        rows = (await client.call(client.meter.QueryUsage, request)).rows
        return Decimal(rows[0].value) if rows else Decimal(0)

    assert await eventually(usage, lambda v: v == Decimal("9e30")) == Decimal("9e30")
    counted = failures_counted(suite)

    runs = [
        await client.call(
            client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest(as_of=ts(now))
        )
        for _ in range(3)
    ]
    assert len(runs[0].invoice_ids) == 3  # ok: days 1 and 2; huge: day 2
    for run in runs:
        (failure,) = run.failures
        assert failure.subscription_id == subscriptions["huge"].id
        assert failure.period_start.ToDatetime(tzinfo=UTC) == day1
        assert failure.period_end.ToDatetime(tzinfo=UTC) == day1 + D
        assert failure.reason.startswith(
            f"invoice held: usage_prices[0] (meter 'tokens', {meter.id}): "
            "9000000000000000000000000000000 billable units come to 9.000e+30 minor units"
        )
        assert "fixed fee and the other lines of this period are held" in failure.reason
        assert not run.more_pending
    assert [list(r.invoice_ids) for r in runs[1:]] == [[], []]

    async def totals(external_id: str) -> list[int]:
        listed = await client.call(
            client.invoices.ListInvoices,
            invoice_pb2.ListInvoicesRequest(subscription_id=subscriptions[external_id].id),
        )
        return [i.total_minor for i in reversed(listed.invoices)]

    assert await totals("ok") == [750, 500]
    assert await totals("huge") == [500]  # day 1 held, day 2 billed
    log = (suite.log_dir / "billing.log").read_text()
    lines = [
        line
        for line in log.splitlines()
        if "billing_period_failed" in line and subscriptions["huge"].id in line
    ]
    assert len(lines) == 1, lines
    assert failures_counted(suite) == counted + 1


async def test_client_timestamps_and_sizes_out_of_range_are_invalid_argument(
    client: Client,
) -> None:
    year_1 = Timestamp(seconds=-62135596800)  # 0001-01-01T00:00:00Z
    year_9999 = Timestamp(seconds=253402300799)  # 9999-12-31T23:59:59Z
    plan = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="Seat", currency="USD", billing_interval=product_pb2.BILLING_INTERVAL_DAY
        ),
    )
    customer = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="c")
    )
    too_many = [
        product_pb2.UsagePrice(
            meter_id=f"m{i}", model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="1"
        )
        for i in range(51)
    ]
    cases = [
        (
            client.invoices.RunBillingCycle,
            invoice_pb2.RunBillingCycleRequest(as_of=year_1),
            "as_of: must not be before 1970-01-01",
        ),
        (
            client.invoices.RunBillingCycle,
            invoice_pb2.RunBillingCycleRequest(as_of=year_9999),
            "as_of: must not be in the future",
        ),
        *(
            (
                client.subscriptions.CreateSubscription,
                subscription_pb2.CreateSubscriptionRequest(
                    customer_id=customer.id, product_id=plan.id, start_time=when
                ),
                "start_time: must be within 1827 days of now",
            )
            for when in (year_1, year_9999)
        ),
        (
            client.products.CreateProduct,
            product_pb2.CreateProductRequest(
                name="Big",
                currency="USD",
                billing_interval=product_pb2.BILLING_INTERVAL_DAY,
                usage_prices=too_many,
            ),
            "usage_prices: at most 50 per product, got 51",
        ),
    ]
    for method, request, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.call(method, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, caught.value)
        assert (caught.value.details() or "").startswith(message), caught.value.details()
    # The earliest as_of allowed is answered (nothing to bill then).
    answer = await client.call(
        client.invoices.RunBillingCycle,
        invoice_pb2.RunBillingCycleRequest(as_of=Timestamp(seconds=0)),
    )
    assert (list(answer.invoice_ids), list(answer.failures), answer.more_pending) == ([], [], False)
