"""The seed's example end to end: a COUNT meter on api.call, 0.02 USD per call
with 1,000 calls free, 2,500 calls in one period (plus 100 sent again):
one finalized invoice of 3000 minor units."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.client import Client, event, eventually
from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
)
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2


async def test_canonical_example(client: Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="api-calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    product = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="API",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter.id,
                    model=product_pb2.PRICE_MODEL_PER_UNIT,
                    unit_price="0.02",
                    free_threshold="1000",
                )
            ],
        ),
    )
    customer = await client.call(
        client.customers.CreateCustomer,
        customer_pb2.CreateCustomerRequest(external_id="cus_42", name="Acme"),
    )
    # A monthly period that ended two days ago, inside the backdating window.
    start = now - timedelta(days=33)
    subscription_request = subscription_pb2.CreateSubscriptionRequest(
        customer_id=customer.id, product_id=product.id
    )
    subscription_request.start_time.FromDatetime(start)
    subscription = await client.call(client.subscriptions.CreateSubscription, subscription_request)
    period_end = subscription.current_period_start.ToDatetime(tzinfo=UTC)
    assert period_end < now - timedelta(days=1)

    events = [
        event(f"evt-{i}", "cus_42", "api.call", period_end - timedelta(days=1, seconds=i))
        for i in range(2500)
    ]
    accepted = 0
    for first in range(0, 2500, 500):
        answer = await client.call(
            client.ingest.IngestEvents,
            ingest_pb2.IngestEventsRequest(events=events[first : first + 500]),
        )
        assert not answer.rejections
        accepted += answer.accepted_count
    assert accepted == 2500

    resent = await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events[:100])
    )
    assert (resent.accepted_count, resent.duplicate_count) == (0, 100)

    usage_request = meter_pb2.QueryUsageRequest(
        meter_id=meter.id, customer_id="cus_42", window_size=meter_pb2.WINDOW_SIZE_NONE
    )
    usage_request.start_time.FromDatetime(start)
    usage_request.end_time.FromDatetime(period_end)

    async def usage() -> str:
        answer = await client.call(client.meter.QueryUsage, usage_request)
        return str(answer.rows[0].value)

    assert await eventually(usage, lambda v: v == "2500") == "2500"

    run = await client.call(client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest())
    assert len(run.invoice_ids) == 1
    invoice = await client.call(
        client.invoices.GetInvoice, invoice_pb2.GetInvoiceRequest(id=run.invoice_ids[0])
    )
    assert invoice.status == invoice_pb2.INVOICE_STATUS_FINALIZED
    assert invoice.number == "INV-000001"
    assert (invoice.currency, invoice.total_minor, invoice.subtotal_minor) == ("USD", 3000, 3000)
    (line,) = [line for line in invoice.lines if line.meter_id == meter.id]
    assert (line.quantity, line.free_quantity, line.billable_quantity) == ("2500", "1000", "1500")
    assert (line.unit_price, line.amount_minor, line.meter_name) == ("0.02", 3000, "api-calls")

    # Running the cycle again changes nothing; the resent events changed nothing.
    again = await client.call(client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest())
    assert list(again.invoice_ids) == []
    listed = await client.call(
        client.invoices.ListInvoices,
        invoice_pb2.ListInvoicesRequest(subscription_id=subscription.id),
    )
    assert [i.id for i in listed.invoices] == [invoice.id]
    assert listed.invoices[0] == invoice
