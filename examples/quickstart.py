"""The README walkthrough: bill the first customer, against `make run`.

A COUNT meter on `api.call`; a USD monthly product at 0.02 per call with 1,000
calls free; customer cus_42, subscribed since a month ago; 2,500 calls in that
month, then 100 of them sent again; the billing cycle; the invoice.

Run `make run` in one terminal, then `.venv/bin/python examples/quickstart.py`.
It reads the addresses and the admin token from .run/env (or the environment).
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from usagebilling.billing.v1 import (
    customer_pb2,
    customer_pb2_grpc,
    invoice_pb2,
    invoice_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
)
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc


def settings() -> dict[str, str]:
    values = dict(os.environ)
    env_file = Path(__file__).resolve().parent.parent / ".run" / "env"
    if env_file.exists():
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            values.setdefault(key, value)
    return values


def main() -> None:
    env = settings()
    billing = grpc.insecure_channel(env.get("USAGEBILLING_BILLING_ADDR", "127.0.0.1:50053"))
    meter = grpc.insecure_channel(env.get("USAGEBILLING_METER_ADDR", "127.0.0.1:50052"))
    ingest = grpc.insecure_channel(env.get("USAGEBILLING_INGEST_ADDR", "127.0.0.1:50051"))

    # 1. A tenant and its API key (admin token), then every call with that key.
    admin = (("authorization", f"Bearer {env['USAGEBILLING_ADMIN_TOKEN']}"),)
    tenants = tenant_pb2_grpc.TenantServiceStub(billing)
    tenant = tenants.CreateTenant(
        tenant_pb2.CreateTenantRequest(name=f"quickstart-{uuid.uuid4().hex[:6]}"), metadata=admin
    )
    key = tenants.CreateApiKey(tenant_pb2.CreateApiKeyRequest(tenant_id=tenant.id), metadata=admin)
    auth = (("authorization", f"Bearer {key.secret}"),)
    print(f"tenant {tenant.id}, API key {key.secret}")

    # 2. A meter: count the api.call events.
    api_calls = meter_pb2_grpc.MeterServiceStub(meter).CreateMeter(
        meter_pb2.CreateMeterRequest(
            name="api-calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
        metadata=auth,
    )

    # 3. A product: 0.02 USD per call, the first 1,000 calls of each month free.
    product = product_pb2_grpc.ProductServiceStub(billing).CreateProduct(
        product_pb2.CreateProductRequest(
            name="API",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=api_calls.id,
                    model=product_pb2.PRICE_MODEL_PER_UNIT,
                    unit_price="0.02",
                    free_threshold="1000",
                )
            ],
        ),
        metadata=auth,
    )

    # 4. A customer, subscribed since 33 days ago: its first month has ended.
    customer = customer_pb2_grpc.CustomerServiceStub(billing).CreateCustomer(
        customer_pb2.CreateCustomerRequest(external_id="cus_42", name="Acme"), metadata=auth
    )
    request = subscription_pb2.CreateSubscriptionRequest(
        customer_id=customer.id, product_id=product.id
    )
    request.start_time.FromDatetime(datetime.now(UTC) - timedelta(days=33))
    subscription = subscription_pb2_grpc.SubscriptionServiceStub(billing).CreateSubscription(
        request, metadata=auth
    )
    period_end = subscription.current_period_start.ToDatetime(tzinfo=UTC)

    # 5. 2,500 calls in that month, sent in batches of 500; then 100 sent again.
    events = []
    for i in range(2500):
        event = ingest_pb2.Event(event_id=f"call-{i}", customer_id="cus_42", event_name="api.call")
        event.timestamp.FromDatetime(period_end - timedelta(days=1, seconds=i))
        event.metadata["endpoint"].string_value = "/v1/search"
        events.append(event)
    stub = ingest_pb2_grpc.IngestServiceStub(ingest)
    for first in range(0, 2500, 500):
        answer = stub.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=events[first : first + 500]), metadata=auth
        )
        print(f"batch {first // 500 + 1}: accepted {answer.accepted_count}")
    again = stub.IngestEvents(ingest_pb2.IngestEventsRequest(events=events[:100]), metadata=auth)
    print(f"resent 100: accepted {again.accepted_count}, duplicates {again.duplicate_count}")

    # 6. Usage is counted within moments of the acknowledgement.
    usage_request = meter_pb2.QueryUsageRequest(meter_id=api_calls.id, customer_id="cus_42")
    usage_request.start_time.CopyFrom(subscription.start_time)
    usage_request.end_time.CopyFrom(subscription.current_period_start)
    for _ in range(100):
        usage = meter_pb2_grpc.MeterServiceStub(meter).QueryUsage(usage_request, metadata=auth)
        if usage.rows[0].value == "2500":
            break
        time.sleep(0.1)
    print(f"usage of api-calls last month: {usage.rows[0].value}")

    # 7. The billing cycle builds and finalizes last month's invoice.
    invoices = invoice_pb2_grpc.InvoiceServiceStub(billing)
    run = invoices.RunBillingCycle(invoice_pb2.RunBillingCycleRequest(), metadata=auth)
    invoice = invoices.GetInvoice(invoice_pb2.GetInvoiceRequest(id=run.invoice_ids[0]), metadata=auth)
    status = invoice_pb2.InvoiceStatus.Name(invoice.status)
    print(f"\ninvoice {invoice.number} ({status}) for {invoice.currency}:")
    for line in invoice.lines:
        print(f"  {line.description:<60} {line.amount_minor:>8} minor units")
    print(f"  {'total':<60} {invoice.total_minor:>8} minor units")


if __name__ == "__main__":
    main()
