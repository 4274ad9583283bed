"""Short ways to set up a tenant's catalog through billing's own use cases."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from services.billing.store import InvoiceRecord, ProductRecord, SubscriptionRecord
from tests.integration.billing.conftest import Billing
from usagebilling.billing.v1 import product_pb2

DAY = product_pb2.BILLING_INTERVAL_DAY
WEEK = product_pb2.BILLING_INTERVAL_WEEK
MONTH = product_pb2.BILLING_INTERVAL_MONTH


def per_unit(meter_id: str, unit_price: str, free: str = "") -> product_pb2.UsagePrice:
    return product_pb2.UsagePrice(
        meter_id=meter_id,
        model=product_pb2.PRICE_MODEL_PER_UNIT,
        unit_price=unit_price,
        free_threshold=free,
    )


def graduated(meter_id: str, *tiers: tuple[str, str]) -> product_pb2.UsagePrice:
    return product_pb2.UsagePrice(
        meter_id=meter_id,
        model=product_pb2.PRICE_MODEL_GRADUATED,
        tiers=[product_pb2.PriceTier(up_to=u, unit_price=p) for u, p in tiers],
    )


def package(meter_id: str, size: str, price: str) -> product_pb2.UsagePrice:
    return product_pb2.UsagePrice(
        meter_id=meter_id,
        model=product_pb2.PRICE_MODEL_PACKAGE,
        package_size=size,
        package_price=price,
    )


@dataclass
class Tenant:
    id: str
    product: ProductRecord
    subscriptions: list[SubscriptionRecord]


async def tenant_with(
    billing: Billing,
    *,
    interval: product_pb2.BillingInterval.ValueType,
    start: datetime | Sequence[datetime],
    now: datetime,
    customers: Sequence[str] = ("c1",),
    prices: Sequence[product_pb2.UsagePrice] = (),
    fixed_price_minor: int = 0,
    currency: str = "USD",
    meters: Sequence[str] = ("calls",),
    tenant_id: str = "",
) -> Tenant:
    """A tenant (new unless given), its meters (in the fake), one product, and
    one subscription per customer (starting at `start`, or at start[i])."""
    tenant_id = tenant_id or await billing.accounts.create_tenant(f"t-{uuid.uuid4().hex[:6]}")
    for meter in meters:
        billing.meters.add_meter(tenant_id, meter, f"{meter}-meter")
    product = await billing.catalog.create_product(
        tenant_id,
        product_pb2.CreateProductRequest(
            name="Plan",
            currency=currency,
            billing_interval=interval,
            fixed_price_minor=fixed_price_minor,
            usage_prices=list(prices),
        ),
    )
    subscriptions = []
    for i, external_id in enumerate(customers):
        customer = await billing.accounts.create_customer(tenant_id, external_id, "", "")
        began = start if isinstance(start, datetime) else start[i]
        subscriptions.append(
            await billing.catalog.create_subscription(
                tenant_id, customer.id, product.id, began, now
            )
        )
    return Tenant(tenant_id, product, subscriptions)


async def invoices_of(billing: Billing, tenant_id: str) -> list[InvoiceRecord]:
    """Every invoice of the tenant, oldest period first."""
    found = await billing.store.list_invoices(
        tenant_id, customer_id="", subscription_id="", after=None, limit=10_000
    )
    return sorted(found, key=lambda i: (i.period_start, i.subscription_id, i.revision))
