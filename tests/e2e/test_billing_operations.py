"""Billing over gRPC: concurrent billing cycles, cancellation, and validation
messages that name the field."""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from tests.client import Client, status_of
from usagebilling.billing.v1 import customer_pb2, invoice_pb2, product_pb2, subscription_pb2

pytestmark = pytest.mark.e2e


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def subscribe(
    client: Client, product_id: str, external_id: str, start: datetime
) -> subscription_pb2.Subscription:
    customer = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id=external_id)
    )
    created: subscription_pb2.Subscription = await client.call(
        client.subscriptions.CreateSubscription,
        subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer.id, product_id=product_id, start_time=ts(start)
        ),
    )
    return created


async def product(
    client: Client, interval: product_pb2.BillingInterval.ValueType, fixed: int
) -> product_pb2.Product:
    created: product_pb2.Product = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="Seat", currency="USD", billing_interval=interval, fixed_price_minor=fixed
        ),
    )
    return created


async def test_concurrent_billing_cycles_build_each_invoice_once(client: Client) -> None:
    now = datetime.now(UTC)
    plan = await product(client, product_pb2.BILLING_INTERVAL_DAY, 700)
    for i in range(15):
        await subscribe(client, plan.id, f"cus_{i}", now - timedelta(days=3, hours=2))

    async def run() -> list[str]:
        answer = await client.call(
            client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest()
        )
        return list(answer.invoice_ids)

    answers = await asyncio.gather(*(run() for _ in range(8)))
    listed = await client.call(
        client.invoices.ListInvoices, invoice_pb2.ListInvoicesRequest(page_size=100)
    )
    invoices = list(listed.invoices)
    assert len(invoices) == 45  # 15 subscriptions × 3 ended days
    assert len({(i.subscription_id, i.period_start.seconds) for i in invoices}) == 45
    assert {i.status for i in invoices} == {invoice_pb2.INVOICE_STATUS_FINALIZED}
    assert sorted(i.number for i in invoices) == [f"INV-{n:06d}" for n in range(1, 46)]
    assert set().union(*map(set, answers)) == {i.id for i in invoices}
    assert {i.total_minor for i in invoices} == {700}
    assert await run() == []


async def test_cancel_immediately_bills_the_part_served(client: Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    plan = await product(client, product_pb2.BILLING_INTERVAL_MONTH, 3000)
    subscription = await subscribe(client, plan.id, "cus_leaving", now - timedelta(days=10))
    period_start = subscription.current_period_start.ToDatetime(tzinfo=UTC)
    period_end = subscription.current_period_end.ToDatetime(tzinfo=UTC)

    canceled = await client.call(
        client.subscriptions.CancelSubscription,
        subscription_pb2.CancelSubscriptionRequest(id=subscription.id, immediately=True),
    )
    assert canceled.status == subscription_pb2.SUBSCRIPTION_STATUS_CANCELED
    ended = canceled.end_time.ToDatetime(tzinfo=UTC)
    assert now <= ended <= datetime.now(UTC)

    # The final invoice exists at once: the served share of 30.00, rounded half-up once.
    listed = await client.call(
        client.invoices.ListInvoices,
        invoice_pb2.ListInvoicesRequest(subscription_id=subscription.id),
    )
    (final,) = listed.invoices
    assert final.status == invoice_pb2.INVOICE_STATUS_DRAFT  # until the grace has passed
    assert (final.period_start.ToDatetime(tzinfo=UTC), final.period_end.ToDatetime(tzinfo=UTC)) == (
        period_start,
        ended,
    )
    share = Fraction(
        (ended - period_start) // timedelta(microseconds=1),
        (period_end - period_start) // timedelta(microseconds=1),
    )
    assert Fraction(9, 31) < share < Fraction(11, 28)  # about 10 days of a month
    assert final.total_minor == math.floor(3000 * share + Fraction(1, 2))
    # A readable ratio (4 decimals, "≈" when rounded), not 28 digits.
    assert re.fullmatch(r"Seat: fixed fee, prorated × ≈?0\.\d{1,4}", final.lines[0].description), (
        final.lines[0].description
    )

    # It stays the only invoice; the subscription cannot be canceled again.
    run = await client.call(client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest())
    assert list(run.invoice_ids) == []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.call(
            client.subscriptions.CancelSubscription,
            subscription_pb2.CancelSubscriptionRequest(id=subscription.id, immediately=True),
        )
    assert status_of(error.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert (error.value.details() or "").startswith("id: subscription")


async def test_cancel_at_period_end(client: Client) -> None:
    now = datetime.now(UTC)
    plan = await product(client, product_pb2.BILLING_INTERVAL_WEEK, 100)
    subscription = await subscribe(client, plan.id, "cus_later", now - timedelta(days=9))
    canceling = await client.call(
        client.subscriptions.CancelSubscription,
        subscription_pb2.CancelSubscriptionRequest(id=subscription.id),
    )
    assert canceling.status == subscription_pb2.SUBSCRIPTION_STATUS_CANCELING
    assert canceling.end_time == subscription.current_period_end
    assert canceling.current_period_end == subscription.current_period_end
    # The first week ended and is billed; nothing is built for the current one yet.
    run = await client.call(client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest())
    (invoice_id,) = run.invoice_ids
    invoice = await client.call(
        client.invoices.GetInvoice, invoice_pb2.GetInvoiceRequest(id=invoice_id)
    )
    assert invoice.period_end == subscription.current_period_start
    assert invoice.total_minor == 100


async def _error(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded")


async def test_bad_arguments_name_their_field(client: Client) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    md = client.metadata

    def create(
        usage_prices: Sequence[product_pb2.UsagePrice] = (), **fields: object
    ) -> Awaitable[object]:
        request = product_pb2.CreateProductRequest(
            name="P",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
            usage_prices=usage_prices,
        )
        for key, value in fields.items():
            setattr(request, key, value)
        return client.products.CreateProduct(request, metadata=md)

    per_unit = product_pb2.PRICE_MODEL_PER_UNIT
    graduated = product_pb2.PRICE_MODEL_GRADUATED
    cases = [
        (create(currency="usd"), "currency: 'usd' must be uppercase, as ISO 4217 writes it"),
        (create(currency="XYZ"), "currency: 'XYZ' is not a supported ISO 4217 code"),
        (create(name=""), "name: required"),
        (create(billing_interval=0), "billing_interval: a BILLING_INTERVAL_* value is required"),
        (create(fixed_price_minor=-1), "fixed_price_minor: must not be negative"),
        (
            create(usage_prices=[product_pb2.UsagePrice(meter_id="nope", model=per_unit)]),
            "usage_prices[0].unit_price: required for PRICE_MODEL_PER_UNIT",
        ),
        (
            create(
                usage_prices=[
                    product_pb2.UsagePrice(meter_id="nope", model=per_unit, unit_price="1")
                ]
            ),
            "usage_prices[0].meter_id: no meter 'nope'",
        ),
        (
            create(
                usage_prices=[
                    product_pb2.UsagePrice(meter_id="m", model=per_unit, unit_price="0,02")
                ]
            ),
            "usage_prices[0].unit_price: '0,02' is not a decimal number",
        ),
        (
            create(
                usage_prices=[
                    product_pb2.UsagePrice(
                        meter_id="m",
                        model=graduated,
                        tiers=[
                            product_pb2.PriceTier(up_to="100", unit_price="1"),
                            product_pb2.PriceTier(up_to="50", unit_price="1"),
                            product_pb2.PriceTier(unit_price="1"),
                        ],
                    )
                ]
            ),
            "usage_prices[0].tiers[1].up_to: must be greater than the previous tier's up_to",
        ),
        (
            client.subscriptions.CreateSubscription(
                subscription_pb2.CreateSubscriptionRequest(
                    customer_id="c",
                    product_id="p",
                    start_time=ts(datetime(1990, 1, 1, tzinfo=UTC)),
                ),
                metadata=md,
            ),
            "start_time: must be within 1827 days of now",
        ),
        (
            client.subscriptions.CreateSubscription(
                subscription_pb2.CreateSubscriptionRequest(
                    customer_id="c", product_id="p", start_time=Timestamp(seconds=-(2**40))
                ),
                metadata=md,
            ),
            "start_time: not a valid timestamp",
        ),
        (
            client.invoices.RunBillingCycle(
                invoice_pb2.RunBillingCycleRequest(
                    as_of=ts(datetime.now(UTC) + timedelta(hours=1))
                ),
                metadata=md,
            ),
            "as_of: must not be in the future",
        ),
        (
            client.invoices.VoidInvoice(invoice_pb2.VoidInvoiceRequest(), metadata=md),
            "id: required",
        ),
        (
            client.invoices.PreviewInvoice(invoice_pb2.PreviewInvoiceRequest(), metadata=md),
            "subscription_id: required",
        ),
    ]
    for call, message in cases:
        code, details = await _error(call)
        assert code == invalid, (message, code, details)
        assert details.startswith(message), (message, details)
