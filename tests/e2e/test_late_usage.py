"""Late usage end to end: the three services as processes, billing with a
backdating window of two days (ingest keeps its 35), so that a finalized
period's window closes within the test's time line. Events of a finalized day
sent late are billed once, on the next invoice finalized after that day's
window closed, for exactly the graduated price's difference.

Time line (S = the subscription's start, now - 6 d - 2 h; daily periods; the
grace is the default 1 h, so a day's window closes 2 d 1 h after its end):
    run 1  as_of = S+1d+2h   day 1 finalized: 8 calls, 8.00
    (then 6 more calls of day 1, 1 of day 2, 2 of day 3)
    run 2  as_of = S+2d+2h   day 2 finalized; day 1's window is open: no line
    run 3  as_of = S+3d+2h   day 1 re-priced, day 3 finalized with its line
    run 3 again, run 4 as_of = now: nothing more is billed
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.client import Client, event, eventually
from tests.private_suite import private_suite
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
)
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

LATE = invoice_pb2.INVOICE_LINE_KIND_LATE_USAGE


@pytest.fixture(scope="module")
def late_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    with private_suite(tmp_path_factory, "late") as suite:
        # Billing alone gets the short window: each service reads its own.
        suite.stop_service("billing")
        suite.extra_env = {**suite.extra_env, "USAGEBILLING_BACKDATE_WINDOW": "2d"}
        suite.start_service("billing")
        suite.wait_healthy("billing")
        yield suite


@pytest.fixture
def key(late_suite: Suite) -> str:
    return create_tenant(late_suite, f"late-{uuid.uuid4().hex[:8]}")[1]


@pytest.fixture
async def client(late_suite: Suite, key: str) -> AsyncIterator[Client]:
    tenant_client = Client({s: late_suite.address(s) for s in SERVICES}, key)
    yield tenant_client
    await tenant_client.close()


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def _cycle(client: Client, as_of: datetime) -> list[str]:
    answer = await client.call(
        client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest(as_of=ts(as_of))
    )
    assert not answer.failures
    return list(answer.invoice_ids)


async def _invoices(client: Client, subscription_id: str) -> list[invoice_pb2.Invoice]:
    answer = await client.call(
        client.invoices.ListInvoices,
        invoice_pb2.ListInvoicesRequest(subscription_id=subscription_id, page_size=1000),
    )
    return sorted(answer.invoices, key=lambda i: i.period_start.ToDatetime())


async def test_late_events_of_a_finalized_day_are_billed_once_on_the_next_invoice(
    late_suite: Suite, client: Client, key: str
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=6, hours=2)
    day = [(start + timedelta(days=n), start + timedelta(days=n + 1)) for n in range(6)]
    h = timedelta(hours=1)
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="api calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    # Graduated: the first 10 calls at 1.00, the rest at 0.50.
    product = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="API",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter.id,
                    model=product_pb2.PRICE_MODEL_GRADUATED,
                    tiers=[
                        product_pb2.PriceTier(up_to="10", unit_price="1"),
                        product_pb2.PriceTier(unit_price="0.5"),
                    ],
                )
            ],
        ),
    )
    customer = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="acme")
    )
    subscription = await client.call(
        client.subscriptions.CreateSubscription,
        subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer.id, product_id=product.id, start_time=ts(start)
        ),
    )

    async def send(prefix: str, when: datetime, count: int) -> None:
        events = [event(f"{prefix}-{i}", "acme", "api.call", when + timedelta(seconds=i))
                  for i in range(count)]  # fmt: skip
        answer = await client.call(
            client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events)
        )
        assert (answer.accepted_count, list(answer.rejections)) == (count, [])

    async def settled(period: tuple[datetime, datetime], value: str) -> None:
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter.id,
            customer_id="acme",
            start_time=ts(period[0]),
            end_time=ts(period[1]),
            window_size=meter_pb2.WINDOW_SIZE_NONE,
        )

        async def usage() -> str:
            rows = (await client.call(client.meter.QueryUsage, request)).rows
            return rows[0].value if rows else "0"

        assert await eventually(usage, lambda v: v == value) == value

    await send("d1", day[0][0] + h, 8)
    await settled(day[0], "8")
    (first_id,) = await _cycle(client, day[0][1] + 2 * h)
    (first,) = await _invoices(client, subscription.id)
    assert (first.id, first.total_minor) == (first_id, 800)

    await send("late", day[0][0] + 5 * h, 6)  # day 1 is finalized: these are late
    await send("d2", day[1][0] + h, 1)
    await send("d3", day[2][0] + h, 2)
    await settled(day[0], "14")
    await settled(day[1], "1")
    await settled(day[2], "2")

    await _cycle(client, day[1][1] + 2 * h)
    invoices = await _invoices(client, subscription.id)
    assert [line.kind for i in invoices for line in i.lines if line.kind == LATE] == []

    await _cycle(client, day[2][1] + 2 * h)
    invoices = await _invoices(client, subscription.id)
    third = invoices[2]
    assert (third.period_start.ToDatetime(tzinfo=UTC), third.status) == (
        day[2][0],
        invoice_pb2.INVOICE_STATUS_FINALIZED,
    )
    usage, late = third.lines
    # 14 calls: 10 × 1.00 + 4 × 0.50 = 12.00, against 8.00 billed.
    assert (usage.amount_minor, late.kind, late.amount_minor, third.total_minor) == (
        200,
        LATE,
        400,
        600,
    )
    assert late.description == (
        f"Late usage, {day[0][0].isoformat()} to {day[0][1].isoformat()} "
        f"(invoice {first.number}): api calls 8 → 14"
    )
    assert late.late_usage.invoice_id == first.id
    assert late.late_usage.period_start.ToDatetime(tzinfo=UTC) == day[0][0]
    assert (late.late_usage.billed_total_minor, late.late_usage.repriced_total_minor) == (
        800,
        1200,
    )
    assert invoices[0].total_minor == 800  # the finalized invoice never changes
    # The HTTP/JSON gateway shows the new kind and field as they are.
    async with aiohttp.ClientSession() as session:
        url = late_suite.http_url("billing") + "/usagebilling.billing.v1.InvoiceService/GetInvoice"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        async with session.post(url, data=json.dumps({"id": third.id}), headers=headers) as answer:
            assert answer.status == 200
            document = json.loads(await answer.read())
    shown = document["lines"][1]
    assert (shown["kind"], shown["amountMinor"]) == ("INVOICE_LINE_KIND_LATE_USAGE", "400")
    assert shown["lateUsage"]["invoiceId"] == first.id
    assert shown["lateUsage"]["meters"] == [
        {"meterId": meter.id, "meterName": "api calls", "billedQuantity": "8", "quantity": "14"}
    ]

    await _cycle(client, day[2][1] + 2 * h)
    await _cycle(client, now)
    invoices = await _invoices(client, subscription.id)
    assert len(invoices) == 6
    assert [
        (i.id, line.amount_minor) for i in invoices for line in i.lines if line.kind == LATE
    ] == [(third.id, 400)]
    # Days 1 to 3 are checked; day 3 with nothing late (its invoice's late line
    # is not its own usage). Day 4 was finalized by run 4 after its window had
    # closed: checked as it was finalized. Days 5 and 6 are still open.
    connection = await asyncpg.connect(late_suite.database_url)
    try:
        checked = await connection.fetch(
            "SELECT period_start, line IS NOT NULL AS late FROM billing.late_usage_checks"
            " WHERE subscription_id = $1 ORDER BY period_start",
            uuid.UUID(subscription.id),
        )
    finally:
        await connection.close()
    assert [(r["period_start"], r["late"]) for r in checked] == [
        (day[0][0], True),
        (day[1][0], False),
        (day[2][0], False),
        (day[3][0], False),
    ]
