"""Storage billed by the GB-hour, seats billed per seat, and a minimum spend
commitment, end to end through ingest, meter and billing. Every amount is
worked out by hand in the comments.

Time line (now = when the test starts, to the minute; grace = 1 h):
    period 1 = [now-2d-2h, now-1d-2h), period 2 = [now-1d-2h, now-2h)
    run A  as_of = period 1's end + 1 h 1 min: period 1 built and finalized
    run B  as_of = now: period 2 built and finalized, with no new event
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.client import Client, event
from tests.e2e.test_billing_scenario import ingest, run_cycle, settled, ts
from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
)
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e

H = timedelta(hours=1)
KIND = invoice_pb2.InvoiceLineKind


async def test_storage_seats_and_a_minimum_commitment(client: Client) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    p1 = (now - timedelta(days=2, hours=2), now - timedelta(days=1, hours=2))
    p2 = (p1[1], now - 2 * H)

    async def meter(
        name: str,
        event_name: str,
        aggregation: meter_pb2.Aggregation.ValueType,
        prop: str,
        op: str = "",
    ) -> str:
        request = meter_pb2.CreateMeterRequest(
            name=name,
            event_name=event_name,
            aggregation=aggregation,
            property=prop,
            operation_property=op,
        )
        return str((await client.call(client.meter.CreateMeter, request)).id)

    storage = await meter(
        "storage-gb-hours", "storage.level", meter_pb2.AGGREGATION_TIME_WEIGHTED_SUM, "gb"
    )
    seats = await meter(
        "seats", "member.changed", meter_pb2.AGGREGATION_SEATS_MAX, "user_id",
        "action",
    )  # fmt: skip
    product = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="Workspace",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[
                # 0.01 USD per GB-hour.
                product_pb2.UsagePrice(
                    meter_id=storage, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="0.01"
                ),
                # 4 USD per seat (the most seats at once in the period).
                product_pb2.UsagePrice(
                    meter_id=seats, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="4"
                ),
            ],
            # At least 100 USD a period.
            commitment=product_pb2.Commitment(minimum_spend_minor=10000),
        ),
    )
    customer = await client.call(
        client.customers.CreateCustomer,
        customer_pb2.CreateCustomerRequest(external_id="cus_ws", name="Workspace customer"),
    )
    subscription = await client.call(
        client.subscriptions.CreateSubscription,
        subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer.id, product_id=product.id, start_time=ts(p1[0])
        ),
    )

    start = p1[0]
    events = [
        # Storage, sent out of order: 171 GB from 22 h into period 1, 100 GB held
        # since two days before it, 5 GB from exactly period 1's end.
        event("s2", "cus_ws", "storage.level", start + 22 * H, gb=171),
        event("s1", "cus_ws", "storage.level", start - 48 * H, gb=100),
        event("s3", "cus_ws", "storage.level", p1[1], gb=5),
        # Seats: ann and bob since three days before; cy for 30 s of one minute;
        # bob leaves at 10 h, dee comes at 12 h; "join" is not an operation.
        event("m1", "cus_ws", "member.changed", start - 72 * H, user_id="ann", action="add"),
        event("m2", "cus_ws", "member.changed", start - 72 * H, user_id="bob", action="add"),
        event("m3", "cus_ws", "member.changed", start + H + timedelta(seconds=10),
              user_id="cy", action="add"),
        event("m4", "cus_ws", "member.changed", start + H + timedelta(seconds=40),
              user_id="cy", action="remove"),
        event("m5", "cus_ws", "member.changed", start + 10 * H, user_id="bob", action="remove"),
        event("m6", "cus_ws", "member.changed", start + 12 * H, user_id="dee", action="add"),
        event("m7", "cus_ws", "member.changed", start + 13 * H, user_id="eve", action="join"),
        event("m8", "cus_ws", "member.changed", start + 14 * H, user_id="ann", action="add"),
    ]  # fmt: skip
    assert await ingest(client, events) == (len(events), 0)
    # 100 GB x 22 h + 171 GB x 2 h = 2,542 GB-hours in period 1; 5 GB x 24 h in period 2.
    await settled(client, storage, "cus_ws", *p1, "2542")
    await settled(client, storage, "cus_ws", *p2, "120")
    # ann, bob and cy at 1 h; ann, dee from 12 h: at most 3; then 2 with no event.
    await settled(client, seats, "cus_ws", *p1, "3")
    await settled(client, seats, "cus_ws", *p2, "2")

    async def invoices() -> list[invoice_pb2.Invoice]:
        answer = await client.call(
            client.invoices.ListInvoices,
            invoice_pb2.ListInvoicesRequest(subscription_id=subscription.id),
        )
        return sorted(answer.invoices, key=lambda i: i.period_start.ToDatetime())

    def lines(invoice: invoice_pb2.Invoice) -> list[tuple[int, str, int]]:
        return sorted((line.kind, line.meter_id, line.amount_minor) for line in invoice.lines)

    # --- run A: period 1 ----------------------------------------------------------------
    assert len(await run_cycle(client, p1[1] + H + timedelta(minutes=1))) == 1
    [first] = await invoices()
    assert first.status == invoice_pb2.INVOICE_STATUS_FINALIZED
    # 2,542 GB-hours x 0.01 = 25.42; 3 seats x 4 = 12.00; usage 37.42 USD, below the
    # 100.00 minimum: a true-up of 62.58.
    assert lines(first) == sorted(
        [
            (KIND.INVOICE_LINE_KIND_USAGE, storage, 2542),
            (KIND.INVOICE_LINE_KIND_USAGE, seats, 1200),
            (KIND.INVOICE_LINE_KIND_MINIMUM_SPEND, "", 6258),
        ]
    ), first.lines
    assert first.total_minor == 10000

    # --- run B: period 2, no event in it ------------------------------------------------
    assert len(await run_cycle(client, now)) == 1
    [_, second] = await invoices()
    assert second.status == invoice_pb2.INVOICE_STATUS_FINALIZED
    # 5 GB x 24 h = 120 GB-hours: 1.20; ann and dee carried over: 2 x 4 = 8.00;
    # 9.20 USD of usage, a true-up of 90.80.
    assert lines(second) == sorted(
        [
            (KIND.INVOICE_LINE_KIND_USAGE, storage, 120),
            (KIND.INVOICE_LINE_KIND_USAGE, seats, 800),
            (KIND.INVOICE_LINE_KIND_MINIMUM_SPEND, "", 9080),
        ]
    ), second.lines
    assert second.total_minor == 10000

    # --- the current period's preview: the levels now, held to the period's end ----------
    preview = await client.call(
        client.invoices.PreviewInvoice,
        invoice_pb2.PreviewInvoiceRequest(subscription_id=subscription.id),
    )
    assert preview.period_start.ToDatetime(tzinfo=UTC) == p2[1]
    # As period 2: 5 GB x 24 h and 2 seats, if nothing changes.
    assert lines(preview) == lines(second), preview.lines
