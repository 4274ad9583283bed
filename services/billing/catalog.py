"""Products (what things cost) and subscriptions (who pays for what)."""

from __future__ import annotations

from datetime import datetime

from services.billing import convert
from services.billing.domain.commitments import Commitment, validate_commitment
from services.billing.domain.fields import check_name
from services.billing.domain.money import minor_units
from services.billing.domain.periods import Interval, check_start, period_containing
from services.billing.domain.pricing import check_limits, validate_usage_price
from services.billing.meter_client import PricingMeters
from services.billing.store import BillingStore, ProductRecord, SubscriptionRecord
from services.common.errors import InvalidArgument
from usagebilling.billing.v1 import product_pb2


class Catalog:
    def __init__(self, store: BillingStore, meters: PricingMeters) -> None:
        self._store = store
        self._meters = meters

    async def create_product(
        self, tenant_id: str, request: product_pb2.CreateProductRequest
    ) -> ProductRecord:
        check_name("name", request.name)
        minor_units(request.currency)
        if request.billing_interval not in convert.INTERVALS:
            raise InvalidArgument("billing_interval: a BILLING_INTERVAL_* value is required")
        if request.fixed_price_minor < 0:
            raise InvalidArgument("fixed_price_minor: must not be negative")
        check_limits(len(request.usage_prices), [len(p.tiers) for p in request.usage_prices])
        commitment = None
        if request.HasField("commitment"):
            commitment = convert.commitment(request.commitment)
            validate_commitment(commitment)
        prices = [convert.usage_price(p, i) for i, p in enumerate(request.usage_prices)]
        seen: set[str] = set()
        for i, price in enumerate(prices):
            validate_usage_price(price, i)
            if price.meter_id in seen:
                raise InvalidArgument(f"usage_prices[{i}].meter_id: meter priced twice")
            seen.add(price.meter_id)
        names = [
            await self._meters.meter_name(tenant_id, p.meter_id, f"usage_prices[{i}].meter_id")
            for i, p in enumerate(prices)
        ]
        for i, p in enumerate(prices):
            if p.transaction_key:
                keys = await self._meters.group_by(
                    tenant_id, p.meter_id, f"usage_prices[{i}].meter_id"
                )
                if p.transaction_key not in keys:
                    raise InvalidArgument(
                        f"usage_prices[{i}].transaction_key: {p.transaction_key[:100]!r} is not "
                        f"one of meter {p.meter_id!r}'s group_by keys {list(keys)}"
                    )
        return await self._store.create_product(
            tenant_id,
            name=request.name,
            currency=request.currency,
            billing_interval=convert.INTERVALS[request.billing_interval].name,
            fixed_price_minor=request.fixed_price_minor,
            usage_prices=[
                convert.price_json(p, name) for p, name in zip(prices, names, strict=True)
            ],
            commitment=None if commitment is None else convert.commitment_json(commitment),
        )

    async def create_subscription(
        self,
        tenant_id: str,
        customer_id: str,
        product_id: str,
        start_time: datetime,
        now: datetime,
        commitment: Commitment | None = None,
    ) -> SubscriptionRecord:
        """`commitment`, when given, replaces the product's for this subscription."""
        check_start(start_time, now)
        if commitment is not None:
            validate_commitment(commitment)
        if not customer_id:
            raise InvalidArgument("customer_id: required")
        if not product_id:
            raise InvalidArgument("product_id: required")
        customer = await self._store.get_customer(tenant_id, customer_id)
        product = await self._store.get_product(tenant_id, product_id)
        return await self._store.create_subscription(
            tenant_id,
            customer.id,
            product.id,
            start_time,
            None if commitment is None else convert.commitment_json(commitment),
        )

    async def current_period(
        self, tenant_id: str, subscription: SubscriptionRecord, now: datetime
    ) -> tuple[datetime, datetime]:
        product = await self._store.get_product(tenant_id, subscription.product_id)
        at = max(now, subscription.start_time)
        start, end, _ = period_containing(
            subscription.start_time, Interval[product.billing_interval], at
        )
        if subscription.end_time is not None:
            end = min(end, subscription.end_time)
        return start, end
