"""ListProducts pages in bytes, as ListMeters does: products within today's
limits (50 usage prices of 100 tiers, decimals of up to 100 characters) pass 1
MB each, so a page of four passed the 4 MiB a gRPC client takes by default
(RESOURCE_EXHAUSTED at the client). Each page now stays under
MAX_LIST_PRODUCTS_BYTES (one product at least), and paging returns every
product once, in order."""

from __future__ import annotations

from services.billing.api import MAX_LIST_PRODUCTS_BYTES
from tests.client import Client
from usagebilling.billing.v1 import product_pb2
from usagebilling.meter.v1 import meter_pb2

PRICES, TIERS = 50, 100


def _digits(n: int) -> str:
    return ("123456789" * 12)[:n]


async def test_list_products_pages_by_bytes_and_paging_returns_every_product(
    client: Client,
) -> None:
    meter_ids = []
    for i in range(PRICES):
        made = await client.call(
            client.meter.CreateMeter,
            meter_pb2.CreateMeterRequest(
                name=f"m{i}",
                event_name=f"e{i}",
                aggregation=meter_pb2.AGGREGATION_SUM,
                property="n",
            ),
        )
        meter_ids.append(made.id)
    tiers = [
        product_pb2.PriceTier(
            up_to=f"{k + 1}.{_digits(90)}" if k < TIERS - 1 else "",
            unit_price=f"0.{_digits(97)}",
            flat_price=f"1.{_digits(97)}",
        )
        for k in range(TIERS)
    ]
    created, total = [], 0
    for p in range(4):
        product = await client.call(
            client.products.CreateProduct,
            product_pb2.CreateProductRequest(
                name=f"big {p}",
                currency="USD",
                billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
                usage_prices=[
                    product_pb2.UsagePrice(
                        meter_id=m, model=product_pb2.PRICE_MODEL_GRADUATED, tiers=tiers
                    )
                    for m in meter_ids
                ],
            ),
        )
        assert product.ByteSize() > MAX_LIST_PRODUCTS_BYTES  # each alone fills a page
        created.append(product.id)
        total += product.ByteSize()
    assert total > 4 * 1024 * 1024  # one page of them all: over the client's limit

    listed, token, pages = [], "", 0
    while True:
        page = await client.call(
            client.products.ListProducts,
            product_pb2.ListProductsRequest(page_size=100, page_token=token),
        )
        pages += 1
        assert page.products  # at least one a page
        assert page.ByteSize() < 4 * 1024 * 1024
        listed += [p.id for p in page.products]
        token = page.next_page_token
        if not token:
            break
    assert listed == created
    assert pages == 4
