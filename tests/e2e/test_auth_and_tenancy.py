"""Who may call, and that tenants never see or count each other's data."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from tests.client import Client, event, eventually, status_of
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
    tenant_pb2,
)
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2


async def _status(call: asyncio.Future[object] | object) -> grpc.StatusCode | None:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return status_of(error)
    return grpc.StatusCode.OK


def _clients(suite: Suite, token: str) -> Client:
    return Client({s: suite.address(s) for s in SERVICES}, token)


@pytest.mark.parametrize("token", [None, "ubk_not-a-real-key", "Basic abc"])
async def test_every_service_refuses_calls_without_a_valid_key(
    suite: Suite, token: str | None
) -> None:
    client = _clients(suite, "x")
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    if token == "Basic abc":
        metadata = (("authorization", token),)
    calls = [
        client.ingest.IngestEvents(ingest_pb2.IngestEventsRequest(), metadata=metadata),
        client.meter.ListMeters(meter_pb2.ListMetersRequest(), metadata=metadata),
        client.customers.ListCustomers(customer_pb2.ListCustomersRequest(), metadata=metadata),
        client.invoices.ListInvoices(invoice_pb2.ListInvoicesRequest(), metadata=metadata),
    ]
    assert [await _status(c) for c in calls] == [grpc.StatusCode.UNAUTHENTICATED] * 4
    await client.close()


async def test_tenant_admin_needs_the_admin_token(suite: Suite, client: Client) -> None:
    assert (
        await _status(
            client.tenants.CreateTenant(
                tenant_pb2.CreateTenantRequest(name="x"), metadata=client.metadata
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )


async def test_a_revoked_key_stops_working(suite: Suite) -> None:
    admin = (("authorization", f"Bearer {suite.admin_token}"),)
    client = _clients(suite, "x")
    tenant = await client.tenants.CreateTenant(
        tenant_pb2.CreateTenantRequest(name="r"), metadata=admin
    )
    key = await client.tenants.CreateApiKey(
        tenant_pb2.CreateApiKeyRequest(tenant_id=tenant.id), metadata=admin
    )
    assert key.secret.startswith("ubk_") and len(key.secret) > 40
    keyed = (("authorization", f"Bearer {key.secret}"),)
    request = meter_pb2.ListMetersRequest()
    assert await _status(client.meter.ListMeters(request, metadata=keyed)) == grpc.StatusCode.OK

    await client.tenants.RevokeApiKey(tenant_pb2.RevokeApiKeyRequest(id=key.id), metadata=admin)
    # billing owns the keys: at once there; meter and ingest within their cache TTL (1 s here).
    assert (
        await _status(
            client.customers.ListCustomers(customer_pb2.ListCustomersRequest(), metadata=keyed)
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )

    async def meter_status() -> grpc.StatusCode | None:
        return await _status(client.meter.ListMeters(request, metadata=keyed))

    assert await eventually(meter_status, lambda s: s != grpc.StatusCode.OK, timeout=30) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    await client.close()


async def test_tenants_are_isolated(
    suite: Suite, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    a, b = _clients(suite, new_tenant()[1]), _clients(suite, new_tenant()[1])
    when = datetime.now(UTC) - timedelta(minutes=1)
    meters = {}
    for client in (a, b):
        meters[client] = await client.call(
            client.meter.CreateMeter,
            meter_pb2.CreateMeterRequest(
                name="calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
            ),
        )
    # The same event_id and customer_id in two tenants are two events.
    same = event("evt-1", "cus_1", "api.call", when, plan="a")
    for client in (a, b):
        answer = await client.call(
            client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=[same])
        )
        assert (answer.accepted_count, answer.duplicate_count) == (1, 0)
    extra = [event(f"b-{i}", "cus_1", "api.call", when) for i in range(4)]
    await b.call(b.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=extra))

    async def usage(client: Client) -> str:
        request = meter_pb2.QueryUsageRequest(meter_id=meters[client].id, customer_id="cus_1")
        request.start_time.FromDatetime(when - timedelta(hours=1))
        request.end_time.FromDatetime(when + timedelta(hours=1))
        return str((await client.call(client.meter.QueryUsage, request)).rows[0].value)

    assert await eventually(lambda: usage(b), lambda v: v == "5") == "5"
    assert await usage(a) == "1"

    # Neither sees the other's meters, customers, events or invoices.
    customer_a = await a.call(
        a.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="cus_1")
    )
    customer_b = await b.call(
        b.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="cus_1")
    )
    assert customer_a.id != customer_b.id
    for call in (
        b.meter.GetMeter(meter_pb2.GetMeterRequest(id=meters[a].id), metadata=b.metadata),
        b.meter.QueryUsage(
            meter_pb2.QueryUsageRequest(
                meter_id=meters[a].id, start_time=same.timestamp, end_time=same.timestamp
            ),
            metadata=b.metadata,
        ),
        b.customers.GetCustomer(
            customer_pb2.GetCustomerRequest(id=customer_a.id), metadata=b.metadata
        ),
        a.ingest.GetEvent(ingest_pb2.GetEventRequest(event_id="b-0"), metadata=a.metadata),
    ):
        assert await _status(call) == grpc.StatusCode.NOT_FOUND
    listed = await b.call(b.meter.ListMeters, meter_pb2.ListMetersRequest())
    assert [m.id for m in listed.meters] == [meters[b].id]
    listed_events = await a.call(a.ingest.ListEvents, ingest_pb2.ListEventsRequest())
    assert [e.event_id for e in listed_events.events] == ["evt-1"]
    listed_customers = await b.call(b.customers.ListCustomers, customer_pb2.ListCustomersRequest())
    assert [c.id for c in listed_customers.customers] == [customer_b.id]
    # Nor each other's invoices.
    product = await a.call(
        a.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="Base",
            currency="EUR",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            fixed_price_minor=100,
        ),
    )
    subscribe = subscription_pb2.CreateSubscriptionRequest(
        customer_id=customer_a.id, product_id=product.id
    )
    subscribe.start_time.FromDatetime(datetime.now(UTC) - timedelta(days=2, hours=2))
    await a.call(a.subscriptions.CreateSubscription, subscribe)
    run = await a.call(a.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest())
    assert len(run.invoice_ids) == 2
    assert (
        await _status(
            b.invoices.GetInvoice(
                invoice_pb2.GetInvoiceRequest(id=run.invoice_ids[0]), metadata=b.metadata
            )
        )
        == grpc.StatusCode.NOT_FOUND
    )
    assert not (await b.call(b.invoices.ListInvoices, invoice_pb2.ListInvoicesRequest())).invoices
    assert not (
        await b.call(b.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest())
    ).invoice_ids
    for client in (a, b):
        await client.close()
