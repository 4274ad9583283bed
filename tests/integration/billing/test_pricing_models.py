"""Percentage fees and spend commitments through billing's use cases, against
a real PostgreSQL (meter is the FakeMeters stand-in): what CreateProduct and
CreateSubscription store, and the lines of the preview and of the finalized
invoice, worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.billing import convert
from services.billing.store import InvoiceRecord
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from tests.integration.billing.builders import DAY, invoices_of, per_unit
from tests.integration.billing.conftest import Billing
from usagebilling.billing.v1 import product_pb2

START = datetime(2024, 5, 1, tzinfo=UTC)
NOW = datetime(2024, 5, 3, 12, tzinfo=UTC)  # period 1 [May 1, May 2) ended long ago


def fees() -> product_pb2.UsagePrice:
    # 2.9% + 0.30 per payment, at least 0.50.
    return product_pb2.UsagePrice(
        meter_id="payments",
        model=product_pb2.PRICE_MODEL_PERCENTAGE,
        rate="2.9",
        fixed_fee="0.30",
        min_fee="0.50",
        transaction_key="payment_id",
    )


async def setup(
    billing: Billing,
    price: product_pb2.UsagePrice,
    commitment: product_pb2.Commitment | None = None,
    own: product_pb2.Commitment | None = None,
) -> tuple[str, str]:
    tenant = await billing.accounts.create_tenant("t")
    billing.meters.add_meter(tenant, "payments", "payments", group_by=("payment_id",))
    billing.meters.add_meter(tenant, "calls", "api-calls")
    request = product_pb2.CreateProductRequest(
        name="Pay", currency="USD", billing_interval=DAY, usage_prices=[price]
    )
    if commitment is not None:
        request.commitment.CopyFrom(commitment)
    product = await billing.catalog.create_product(tenant, request)
    customer = await billing.accounts.create_customer(tenant, "c1", "", "")
    subscription = await billing.catalog.create_subscription(
        tenant,
        customer.id,
        product.id,
        START,
        NOW,
        None if own is None else convert.commitment(own),
    )
    return tenant, subscription.id


def pay(billing: Billing, tenant: str, payment: str, amount: str, hour: int = 1) -> None:
    billing.meters.add(
        tenant, "payments", "c1", START + timedelta(hours=hour), amount, {"payment_id": payment}
    )


def lines(invoice: InvoiceRecord) -> list[tuple[str, int]]:
    return [(line["kind"], line["amount_minor"]) for line in invoice.lines]


async def test_percentage_fees_with_a_minimum_commitment(billing: Billing) -> None:
    tenant, _ = await setup(billing, fees(), product_pb2.Commitment(minimum_spend_minor=1000))
    # 100 -> 3.20; 5 -> 0.445 raised to 0.50; "p3" twice (a capture in two
    # events) is one payment of 20 -> 0.88: 4.58 in all, under the minimum of 10.
    pay(billing, tenant, "p1", "100")
    pay(billing, tenant, "p2", "5")
    pay(billing, tenant, "p3", "12.5")
    pay(billing, tenant, "p3", "7.5", hour=2)
    await billing.invoicing.run_cycle(tenant, NOW, NOW)
    first = (await invoices_of(billing, tenant))[0]
    assert first.status == "FINALIZED"
    assert lines(first) == [("usage", 458), ("minimum_spend", 542)]
    assert first.lines[0]["description"] == (
        "payments: 125 consumed, 0 free, 125 billable × 2.9% + 0.3 × 3 transactions, "
        "1 raised to the 0.5 minimum"
    )
    assert first.lines[1]["description"] == (
        "Minimum spend: 10.00 USD per period, 4.58 USD spent; true-up"
    )
    assert first.total_minor == 1000


async def test_a_subscription_maximum_replaces_the_products_minimum(billing: Billing) -> None:
    tenant, subscription = await setup(
        billing,
        per_unit("calls", "1"),
        product_pb2.Commitment(minimum_spend_minor=100000),
        own=product_pb2.Commitment(maximum_spend_minor=2500),
    )
    for i in range(40):  # 40 calls × 1 USD, capped at 25
        billing.meters.add(tenant, "calls", "c1", NOW.replace(hour=0) + timedelta(minutes=i))
    _, draft = await billing.invoicing.preview(tenant, subscription, NOW)
    assert [(line.kind, line.amount_minor) for line in draft.lines] == [
        ("usage", 4000),
        ("maximum_spend", -1500),
    ]
    assert draft.total_minor == 2500
    stored = await billing.store.get_subscription(tenant, subscription)
    assert stored.commitment == {"minimum_spend_minor": 0, "maximum_spend_minor": 2500}


async def test_a_transaction_key_must_be_one_of_the_meters_group_by_keys(
    billing: Billing,
) -> None:
    tenant = await billing.accounts.create_tenant("t")
    billing.meters.add_meter(tenant, "payments", "payments", group_by=("order_id",))
    request = product_pb2.CreateProductRequest(
        name="Pay", currency="USD", billing_interval=DAY, usage_prices=[fees()]
    )
    with pytest.raises(InvalidArgument, match=r"^usage_prices\[0\]\.transaction_key: 'payment_id'"):
        await billing.catalog.create_product(tenant, request)


async def test_a_bad_commitment_is_refused_naming_the_field(billing: Billing) -> None:
    tenant = await billing.accounts.create_tenant("t")
    request = product_pb2.CreateProductRequest(
        name="Pay",
        currency="USD",
        billing_interval=DAY,
        commitment=product_pb2.Commitment(minimum_spend_minor=500, maximum_spend_minor=100),
    )
    with pytest.raises(
        InvalidArgument, match=r"^commitment\.maximum_spend_minor: must not be less"
    ):
        await billing.catalog.create_product(tenant, request)


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (ResourceExhausted("meter service: 500001 rows"), "too_many_transactions"),
        (Unavailable("meter service: DEADLINE_EXCEEDED"), "pricing_error"),
    ],
)
async def test_a_customer_whose_transactions_cannot_be_read_holds_only_its_period(
    billing: Billing, error: Exception, cause: str
) -> None:
    tenant, _ = await setup(billing, fees())
    other = await billing.accounts.create_customer(tenant, "c2", "", "")
    product = (await billing.store.products_of(tenant))[0]
    await billing.catalog.create_subscription(tenant, other.id, product.id, START, NOW)
    pay(billing, tenant, "p1", "100")
    billing.meters.add(
        tenant, "payments", "c2", START + timedelta(hours=1), "100", {"payment_id": "x"}
    )
    billing.meters.group_errors["c1"] = error
    # Two ended days: c1's are held, c2's billed (3.20, then nothing).
    report = await billing.invoicing.cycle(tenant, NOW, NOW)
    assert [f.cause for f in report.failures] == [cause, cause]
    assert sorted(i.total_minor for i in await invoices_of(billing, tenant)) == [0, 320]
    # The next run, with meter answering, bills c1's periods too.
    del billing.meters.group_errors["c1"]
    report = await billing.invoicing.cycle(tenant, NOW, NOW)
    assert report.failures == []
    assert sorted(i.total_minor for i in await invoices_of(billing, tenant)) == [0, 0, 320, 320]
