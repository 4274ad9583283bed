"""Setting up credits over the real services, shared by the end-to-end tests
(tests/e2e/test_credits.py) and the credits benchmark (bench/credits.py):
a product whose one usage price draws a credit type, and its subscriptions."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from usagebilling.billing.v1 import (
    product_pb2,
    product_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
)


async def credit_product(
    channel: Any,
    metadata: Sequence[tuple[str, str]],
    *,
    name: str,
    meter_id: str,
    type_id: str,
    overage_rule: Any,
    unit_price: str = "0.001",
    credit_rate: str = "1",
    included: str = "",
    customer_ids: Sequence[str] = (),
    start: datetime | None = None,
    timeout: float | None = None,
) -> product_pb2.Product:
    """A USD daily product (on billing's `channel`) whose one usage price, per
    unit at `unit_price` on `meter_id`, draws `credit_rate` of `type_id` per unit under
    `overage_rule` (a credit_pb2.OverageRule), with `included` credits of
    that type each period when given; each of `customer_ids` (billing ids)
    is subscribed to it from `start`."""
    product: product_pb2.Product = await product_pb2_grpc.ProductServiceStub(channel).CreateProduct(
        product_pb2.CreateProductRequest(
            name=name,
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter_id,
                    model=product_pb2.PRICE_MODEL_PER_UNIT,
                    unit_price=unit_price,
                    credit_type_id=type_id,
                    credit_rate=credit_rate,
                    overage_rule=overage_rule,
                )
            ],
            included_credits=(
                [product_pb2.IncludedCredits(credit_type_id=type_id, amount=included)]
                if included
                else []
            ),
        ),
        metadata=metadata,
        timeout=timeout,
    )
    subscriptions = subscription_pb2_grpc.SubscriptionServiceStub(channel)
    for customer_id in customer_ids:
        request = subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer_id, product_id=product.id
        )
        if start is not None:
            request.start_time.FromDatetime(start)
        await subscriptions.CreateSubscription(request, metadata=metadata, timeout=timeout)
    return product
