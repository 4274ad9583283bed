"""Percentage fees and spend commitments end to end: events through ingest,
folded by meter (a SUM of payment amounts grouped by payment_id), priced by
billing over gRPC, in PreviewInvoice and in the finalized invoice. Amounts
worked out by hand in the comments; bad requests are INVALID_ARGUMENT naming
the field.

Time line (now = when the test starts; DAY products anchored at now-1d-2h):
    period 1 = [now-1d-2h, now-2h): ended 2 h ago, past the 1 h grace: the cycle
    at now builds and finalizes it. period 2 = [now-2h, now+22h): previewed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.client import Client, event, eventually
from usagebilling.billing.v1 import customer_pb2, invoice_pb2, product_pb2, subscription_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e

FINALIZED = invoice_pb2.INVOICE_STATUS_FINALIZED
USAGE = invoice_pb2.INVOICE_LINE_KIND_USAGE
MINIMUM = invoice_pb2.INVOICE_LINE_KIND_MINIMUM_SPEND
MAXIMUM = invoice_pb2.INVOICE_LINE_KIND_MAXIMUM_SPEND


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def lines(invoice: invoice_pb2.Invoice) -> list[tuple[int, int]]:
    return [(line.kind, line.amount_minor) for line in invoice.lines]


async def test_percentage_fees_and_commitments(client: Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(days=1, hours=2)
    p1 = (start, start + timedelta(days=1))
    payments = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="payments",
            event_name="payment.captured",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="amount",
            group_by=["payment_id"],
        ),
    )
    fee = product_pb2.UsagePrice(
        meter_id=payments.id,
        model=product_pb2.PRICE_MODEL_PERCENTAGE,
        rate="2.90",
        fixed_fee="0.30",
        min_fee="0.50",
        transaction_key="payment_id",
    )
    # A minimum spend of 10.00 USD a day.
    product = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="Payments",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[fee],
            commitment=product_pb2.Commitment(minimum_spend_minor=1000),
        ),
    )
    # Stored and answered normalised: "2.9", "0.3".
    assert (product.usage_prices[0].rate, product.usage_prices[0].fixed_fee) == ("2.9", "0.3")
    assert product.commitment.minimum_spend_minor == 1000

    subscriptions = {}
    for external_id, own in [
        ("cus_p", None),
        # Its own commitment replaces the product's: at most 3.00 USD a day.
        ("cus_q", product_pb2.Commitment(maximum_spend_minor=300)),
    ]:
        customer = await client.call(
            client.customers.CreateCustomer,
            customer_pb2.CreateCustomerRequest(external_id=external_id),
        )
        request = subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer.id, product_id=product.id, start_time=ts(start)
        )
        if own is not None:
            request.commitment.CopyFrom(own)
        subscriptions[external_id] = await client.call(
            client.subscriptions.CreateSubscription, request
        )
    assert subscriptions["cus_q"].commitment.maximum_spend_minor == 300
    assert not subscriptions["cus_p"].HasField("commitment")

    def paid(event_id: str, customer: str, when: datetime, payment: str, amount: float) -> Any:
        return event(
            event_id, customer, "payment.captured", when, payment_id=payment, amount=amount
        )

    at = p1[0] + timedelta(hours=1)
    events = [
        paid("e1", "cus_p", at, "p1", 100),  # 2.90 + 0.30 = 3.20
        paid("e2", "cus_p", at, "p2", 5),  # 0.145 + 0.30 = 0.445 -> 0.50 minimum
        paid("e3", "cus_p", at, "p3", 12.5),  # p3 is one payment of 20:
        paid("e4", "cus_p", at, "p3", 7.5),  # 0.58 + 0.30 = 0.88
        paid("e5", "cus_q", at, "q1", 100),  # 3.20
        paid("e6", "cus_q", at, "q2", 100),  # 3.20
        paid("e7", "cus_p", now - timedelta(hours=1), "p4", 50),  # period 2: 1.45 + 0.30 = 1.75
    ]
    answer = await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events)
    )
    assert answer.accepted_count == len(events), answer

    async def folded() -> Decimal:
        request = meter_pb2.QueryUsageRequest(
            meter_id=payments.id,
            start_time=ts(p1[0]),
            end_time=ts(now + timedelta(hours=1)),
            window_size=meter_pb2.WINDOW_SIZE_NONE,
        )
        rows = (await client.call(client.meter.QueryUsage, request)).rows
        return sum((Decimal(r.value) for r in rows), Decimal(0))

    assert await eventually(folded, lambda v: v == Decimal(375)) == Decimal(375)

    await client.call(
        client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest(as_of=ts(now))
    )

    async def invoice_of(external_id: str) -> invoice_pb2.Invoice:
        answer = await client.call(
            client.invoices.ListInvoices,
            invoice_pb2.ListInvoicesRequest(subscription_id=subscriptions[external_id].id),
        )
        (invoice,) = answer.invoices
        assert isinstance(invoice, invoice_pb2.Invoice)
        return invoice

    p = await invoice_of("cus_p")
    assert p.status == FINALIZED
    # 3.20 + 0.50 + 0.88 = 4.58 of fees; the minimum of 10.00 adds 5.42.
    assert lines(p) == [(USAGE, 458), (MINIMUM, 542)]
    assert p.lines[0].description == (
        "payments: 125 consumed, 0 free, 125 billable × 2.9% + 0.3 × 3 transactions, "
        "1 raised to the 0.5 minimum"
    )
    assert p.lines[1].description == "Minimum spend: 10.00 USD per period, 4.58 USD spent; true-up"
    assert p.total_minor == 1000

    q = await invoice_of("cus_q")
    # 6.40 of fees, capped at 3.00: -3.40; no minimum (the subscription's own commitment has none).
    assert lines(q) == [(USAGE, 640), (MAXIMUM, -340)]
    assert q.lines[1].description == (
        "Maximum spend: usage of 6.40 USD capped at 3.00 USD per period"
    )
    assert q.total_minor == 300

    # Period 2 so far: one payment of 50 -> 1.75, and a true-up of 8.25.
    preview = await client.call(
        client.invoices.PreviewInvoice,
        invoice_pb2.PreviewInvoiceRequest(subscription_id=subscriptions["cus_p"].id),
    )
    assert lines(preview) == [(USAGE, 175), (MINIMUM, 825)]
    assert preview.total_minor == 1000

    # Bad input is INVALID_ARGUMENT naming the field.
    def product_with(
        price: product_pb2.UsagePrice, commitment: product_pb2.Commitment | None = None
    ) -> product_pb2.CreateProductRequest:
        request = product_pb2.CreateProductRequest(
            name="Bad",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[price],
        )
        if commitment is not None:
            request.commitment.CopyFrom(commitment)
        return request

    def changed(**fields: Any) -> product_pb2.UsagePrice:
        price = product_pb2.UsagePrice()
        price.CopyFrom(fee)
        for name, value in fields.items():
            setattr(price, name, value)
        return price

    cases = [
        (product_with(changed(rate="abc")), "usage_prices[0].rate: 'abc' is not a decimal"),
        (product_with(changed(rate="150")), "usage_prices[0].rate: a percentage, at most 100"),
        (
            product_with(changed(transaction_key="order_id")),
            "usage_prices[0].transaction_key: 'order_id' is not one of meter",
        ),
        (
            product_with(changed(free_threshold="10")),
            "usage_prices[0].min_fee: cannot be combined with free_threshold",
        ),
        (
            product_with(fee, product_pb2.Commitment(minimum_spend_minor=-1)),
            "commitment.minimum_spend_minor: must not be negative",
        ),
    ]
    for bad, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.call(client.products.CreateProduct, bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, caught.value)
        assert (caught.value.details() or "").startswith(message), caught.value.details()
