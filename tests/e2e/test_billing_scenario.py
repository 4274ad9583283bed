"""Billing end to end: five customers on five products (per unit with a free
threshold, graduated, volume, package with a fixed fee in JPY, per unit with a
fixed fee in KWD) over two periods, with duplicates, a late event inside the
grace period (counted) and one after finalization (the finalized invoice does
not change; a void with reissue corrects it). Every amount is worked out by
hand in the comments; the services only have to agree.

Time line (now = when the test starts; grace = 1 h, the suite's default):
    DAY products:  period 1 = [now-2d-2h, now-1d-2h),  period 2 = [now-1d-2h, now-2h)
    WEEK product:  period 1 = [now-14d-2h, now-7d-2h), period 2 = [now-7d-2h, now-2h)
    run A  as_of = now-1d-59m  every period 1 ended over an hour ago: built and finalized
    run B  as_of = now-1h50m   every period 2 ended 10 min ago: built, still a draft
    run C  as_of = now-1h      period 2's grace is over: finalized
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import nats
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from nats.errors import TimeoutError as NatsTimeout

from tests.client import Client, event, eventually
from tools.suite import Suite
from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
    tenant_pb2,
)
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e

FINALIZED_SUBJECT = "usagebilling.billing.v1.invoice.finalized"
FINALIZED = invoice_pb2.INVOICE_STATUS_FINALIZED


def ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def ingest(client: Client, events: Sequence[ingest_pb2.Event]) -> tuple[int, int]:
    """Sends the events in batches; returns (accepted, duplicates)."""
    accepted = duplicates = 0
    for first in range(0, len(events), 500):
        answer = await client.call(
            client.ingest.IngestEvents,
            ingest_pb2.IngestEventsRequest(events=events[first : first + 500]),
        )
        assert not answer.rejections, answer.rejections
        accepted += answer.accepted_count
        duplicates += answer.duplicate_count
    return accepted, duplicates


async def settled(
    client: Client, meter_id: str, customer: str, start: datetime, end: datetime, value: str
) -> None:
    """Waits until meter has folded the events: usage over [start, end) is `value`."""
    request = meter_pb2.QueryUsageRequest(
        meter_id=meter_id,
        customer_id=customer,
        start_time=ts(start),
        end_time=ts(end),
        window_size=meter_pb2.WINDOW_SIZE_NONE,
    )

    async def usage() -> Decimal:
        return Decimal((await client.call(client.meter.QueryUsage, request)).rows[0].value)

    assert await eventually(usage, lambda v: v == Decimal(value)) == Decimal(value)


async def run_cycle(client: Client, as_of: datetime) -> list[str]:
    answer = await client.call(
        client.invoices.RunBillingCycle, invoice_pb2.RunBillingCycleRequest(as_of=ts(as_of))
    )
    return list(answer.invoice_ids)


async def finalized_messages(nats_url: str, tenant_id: str) -> list[invoice_pb2.InvoiceFinalized]:
    """Every invoice.finalized message of this tenant on the (shared) BILLING stream."""
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        subscription = await js.pull_subscribe(FINALIZED_SUBJECT, stream="BILLING")
        found = []
        # Until the consumer has nothing left to deliver: a short fetch timeout
        # as the end marker missed messages on a loaded machine.
        while (pending := (await subscription.consumer_info()).num_pending or 0) > 0:
            try:
                batch = await subscription.fetch(min(pending, 500), timeout=30)
            except NatsTimeout:
                continue
            for message in batch:
                payload = invoice_pb2.InvoiceFinalized.FromString(message.data)
                if payload.tenant_id == tenant_id:
                    found.append(payload)
                    assert message.headers is not None
                    assert message.headers["Nats-Msg-Id"] == payload.invoice.id
                await message.ack()
        await subscription.unsubscribe()
        return found
    finally:
        await connection.close()


async def test_billing_scenario(suite: Suite, client: Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    day_start, week_start = now - timedelta(days=2, hours=2), now - timedelta(days=14, hours=2)
    day_p1 = (day_start, day_start + timedelta(days=1))
    day_p2 = (day_p1[1], now - timedelta(hours=2))
    week_p1 = (week_start, week_start + timedelta(days=7))
    week_p2 = (week_p1[1], now - timedelta(hours=2))
    tenant_id = (await client.call(client.auth.WhoAmI, tenant_pb2.WhoAmIRequest())).tenant_id

    # --- meters, products, customers, subscriptions ----------------------------------
    async def meter(name: str, event_name: str, aggregation: Any, prop: str = "") -> str:
        request = meter_pb2.CreateMeterRequest(
            name=name, event_name=event_name, aggregation=aggregation, property=prop
        )
        return str((await client.call(client.meter.CreateMeter, request)).id)

    calls = await meter("api-calls", "api.call", meter_pb2.AGGREGATION_COUNT)
    storage = await meter("storage-gb", "storage.used", meter_pb2.AGGREGATION_SUM, "gb")
    cpu = await meter("cpu-seconds", "compute.run", meter_pb2.AGGREGATION_SUM, "seconds")
    sms = await meter("sms", "sms.sent", meter_pb2.AGGREGATION_COUNT)

    def tiers(*rows: tuple[str, str, str]) -> list[product_pb2.PriceTier]:
        return [product_pb2.PriceTier(up_to=u, unit_price=p, flat_price=f) for u, p, f in rows]

    day, week = product_pb2.BILLING_INTERVAL_DAY, product_pb2.BILLING_INTERVAL_WEEK
    products = {
        # 0.002 USD a call beyond 100 free calls a day.
        "cus_a": ("API", "USD", day, 0, product_pb2.UsagePrice(
            meter_id=calls, model=product_pb2.PRICE_MODEL_PER_UNIT,
            unit_price="0.002", free_threshold="100")),
        # Graduated: (0,10] GB at 0.50; (10,50] at 0.30 + 1.00 flat; beyond at 0.10.
        "cus_b": ("Storage", "USD", day, 0, product_pb2.UsagePrice(
            meter_id=storage, model=product_pb2.PRICE_MODEL_GRADUATED,
            tiers=tiers(("10", "0.5", ""), ("50", "0.3", "1"), ("", "0.1", "")))),
        # Volume: up to 1000 s all at 0.01 EUR; up to 10000 all at 0.008 + 2.00 flat.
        "cus_c": ("Compute", "EUR", week, 0, product_pb2.UsagePrice(
            meter_id=cpu, model=product_pb2.PRICE_MODEL_VOLUME,
            tiers=tiers(("1000", "0.01", ""), ("10000", "0.008", "2"), ("", "0.005", "")))),
        # ¥1000 a day, and ¥500 per started package of 100 SMS.
        "cus_d": ("SMS", "JPY", day, 1000, product_pb2.UsagePrice(
            meter_id=sms, model=product_pb2.PRICE_MODEL_PACKAGE,
            package_size="100", package_price="500")),
        # 1.500 KWD a day, and 0.0125 KWD a call (KWD has three decimals).
        "cus_e": ("Gulf API", "KWD", day, 1500, product_pb2.UsagePrice(
            meter_id=calls, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="0.0125")),
    }  # fmt: skip
    subscriptions: dict[str, subscription_pb2.Subscription] = {}
    customer_ids: dict[str, str] = {}
    for external_id, (name, currency, interval, fixed, price) in products.items():
        product = await client.call(
            client.products.CreateProduct,
            product_pb2.CreateProductRequest(
                name=name,
                currency=currency,
                billing_interval=interval,
                fixed_price_minor=fixed,
                usage_prices=[price],
            ),
        )
        customer = await client.call(
            client.customers.CreateCustomer,
            customer_pb2.CreateCustomerRequest(external_id=external_id, name=name),
        )
        customer_ids[external_id] = customer.id
        subscriptions[external_id] = await client.call(
            client.subscriptions.CreateSubscription,
            subscription_pb2.CreateSubscriptionRequest(
                customer_id=customer.id,
                product_id=product.id,
                start_time=ts(week_start if interval == week else day_start),
            ),
        )
    assert subscriptions["cus_a"].current_period_start.ToDatetime(tzinfo=UTC) == day_p2[1]
    assert subscriptions["cus_c"].current_period_start.ToDatetime(tzinfo=UTC) == week_p2[1]

    # --- usage of both periods ---------------------------------------------------------
    h = timedelta(hours=1)

    def at(period: tuple[datetime, datetime], seconds: float) -> datetime:
        return period[0] + h + timedelta(seconds=seconds)

    events = [
        *(event(f"a1-{i}", "cus_a", "api.call", at(day_p1, i)) for i in range(350)),
        *(event(f"a2-{i}", "cus_a", "api.call", at(day_p2, i)) for i in range(100)),
        event("b1-0", "cus_b", "storage.used", at(day_p1, 0), gb=12.5),
        event("b1-1", "cus_b", "storage.used", at(day_p1, 1), gb=20),
        event("b1-2", "cus_b", "storage.used", at(day_p1, 2), gb=30),
        event("b2-0", "cus_b", "storage.used", at(day_p2, 0), gb=4),
        event("b2-1", "cus_b", "storage.used", at(day_p2, 1), gb=6),
        event("c1-0", "cus_c", "compute.run", at(week_p1, 0), seconds=400),
        event("c1-1", "cus_c", "compute.run", at(week_p1, 1), seconds=600),
        event("c2-0", "cus_c", "compute.run", at(week_p2, 0), seconds=600),
        event("c2-1", "cus_c", "compute.run", at(week_p2, 1), seconds=400.5),
        *(event(f"d1-{i}", "cus_d", "sms.sent", at(day_p1, i)) for i in range(250)),
        *(event(f"e1-{i}", "cus_e", "api.call", at(day_p1, i)) for i in range(333)),
        *(event(f"e2-{i}", "cus_e", "api.call", at(day_p2, i)) for i in range(41)),
    ]
    assert await ingest(client, events) == (len(events), 0)
    # Duplicates, sent again: a retried batch, and the 30 GB event twice in one batch.
    again = [*events[:100], events[452], events[452]]
    assert (again[-1].event_id, again[-1].metadata["gb"].int_value) == ("b1-2", 30)
    assert await ingest(client, again) == (0, 102)

    for meter_id, customer, period, value in [
        (calls, "cus_a", day_p1, "350"),
        (calls, "cus_a", day_p2, "100"),
        (storage, "cus_b", day_p1, "62.5"),
        (storage, "cus_b", day_p2, "10"),
        (cpu, "cus_c", week_p1, "1000"),
        (cpu, "cus_c", week_p2, "1000.5"),
        (sms, "cus_d", day_p1, "250"),
        (calls, "cus_e", day_p1, "333"),
        (calls, "cus_e", day_p2, "41"),
    ]:
        await settled(client, meter_id, customer, *period, value)

    async def invoices(external_id: str) -> list[invoice_pb2.Invoice]:
        """The subscription's invoices, oldest period first."""
        answer = await client.call(
            client.invoices.ListInvoices,
            invoice_pb2.ListInvoicesRequest(subscription_id=subscriptions[external_id].id),
        )
        return list(reversed(answer.invoices))

    # --- run A: every first period is built and finalized --------------------------------
    first_ids = await run_cycle(client, day_p1[1] + timedelta(hours=1, minutes=1))
    assert len(first_ids) == 5
    first = {c: (await invoices(c))[0] for c in products}
    assert {i.id for i in first.values()} == set(first_ids)
    assert {i.status for i in first.values()} == {FINALIZED}
    assert sorted(i.number for i in first.values()) == [f"INV-{n:06d}" for n in range(1, 6)]
    # The week's period 1 ended six days before the days' period 1: it has the first number.
    assert first["cus_c"].number == "INV-000001"

    expected_first = {
        # 350 calls, 100 free, 250 × 0.002 = 0.50 USD.
        "cus_a": ("USD", [50], "api-calls: 350 consumed, 100 free, 250 billable × 0.002"),
        # 62.5 GB (the resent 30 GB counted once): 10 × 0.5 + (40 × 0.3 + 1) + 12.5 × 0.1
        # = 5 + 13 + 1.25 = 19.25 USD.
        "cus_b": ("USD", [1925], "storage-gb: 62.5 consumed, 0 free, 62.5 billable"
                  " (10 × 0.5; 40 × 0.3 + 1 flat; 12.5 × 0.1)"),
        # Exactly 1000 s is in the first tier (up_to is inclusive): 1000 × 0.01 = 10.00 EUR.
        "cus_c": ("EUR", [1000], "cpu-seconds: 1000 consumed, 0 free, 1000 billable × 0.01"),
        # ¥1000 + ceil(250 / 100) = 3 packages × ¥500 = ¥2500.
        "cus_d": ("JPY", [1000, 1500], "sms: 250 consumed, 0 free, 250 billable,"
                  " 3 packages of 100 × 500"),
        # 1.500 + 333 × 0.0125 = 1.500 + 4.1625 -> 4.163 (half-up to 3 decimals) = 5.663 KWD.
        "cus_e": ("KWD", [1500, 4163], "api-calls: 333 consumed, 0 free, 333 billable × 0.0125"),
    }  # fmt: skip
    for customer, (currency, amounts, description) in expected_first.items():
        invoice = first[customer]
        assert (invoice.currency, [line.amount_minor for line in invoice.lines]) == (
            currency,
            amounts,
        ), customer
        assert invoice.total_minor == invoice.subtotal_minor == sum(amounts), customer
        assert invoice.lines[-1].description == description, customer
        assert invoice.customer_id == customer_ids[customer]
    assert (first["cus_d"].lines[0].description, first["cus_d"].lines[0].meter_id) == (
        "SMS: fixed fee",
        "",
    )

    # An event for period 1 after its invoice was finalized: 20 GB more for cus_b.
    after_final = event("b1-late", "cus_b", "storage.used", day_p1[1] - timedelta(minutes=1), gb=20)
    assert await ingest(client, [after_final]) == (1, 0)
    await settled(client, storage, "cus_b", *day_p1, "82.5")

    # --- run B: the second periods ended 10 minutes ago: drafts --------------------------
    second_ids = await run_cycle(client, day_p2[1] + timedelta(minutes=10))
    assert len(second_ids) == 5
    drafts = {c: (await invoices(c))[1] for c in products}
    assert {i.status for i in drafts.values()} == {invoice_pb2.INVOICE_STATUS_DRAFT}
    assert {i.number for i in drafts.values()} == {""}
    assert drafts["cus_b"].total_minor == 500  # 10 GB, so far

    # A late event for period 2, inside the grace: 2.5 GB more for cus_b.
    in_grace = event("b2-late", "cus_b", "storage.used", day_p2[1] - timedelta(minutes=1), gb=2.5)
    assert await ingest(client, [in_grace]) == (1, 0)
    await settled(client, storage, "cus_b", *day_p2, "12.5")

    # --- run C: the grace is over: finalized, with the late event --------------------------
    finalized_ids = await run_cycle(client, day_p2[1] + timedelta(hours=1))
    assert sorted(finalized_ids) == sorted(second_ids)
    second = {c: (await invoices(c))[1] for c in products}
    assert {i.status for i in second.values()} == {FINALIZED}
    assert sorted(i.number for i in second.values()) == [f"INV-{n:06d}" for n in range(6, 11)]
    expected_second = {
        # Exactly the 100 free calls: nothing to pay, and the line still shows.
        "cus_a": [0],
        # 10 + 2.5 (late, in the grace) = 12.5 GB: 10 × 0.5 + (2.5 × 0.3 + 1) = 6.75 USD.
        "cus_b": [675],
        # 1000.5 s passes 1000: every second at 0.008, + 2.00 flat = 10.004 -> 10.00 EUR.
        "cus_c": [1000],
        # No SMS: the fixed fee only.
        "cus_d": [1000, 0],
        # 41 × 0.0125 = 0.5125 -> 0.513 KWD (half-up).
        "cus_e": [1500, 513],
    }
    for customer, amounts in expected_second.items():
        assert [line.amount_minor for line in second[customer].lines] == amounts, customer
        assert second[customer].total_minor == sum(amounts), customer
    assert second["cus_b"].lines[0].description == (
        "storage-gb: 12.5 consumed, 0 free, 12.5 billable (10 × 0.5; 2.5 × 0.3 + 1 flat)"
    )
    assert [(t.up_to, t.quantity, t.amount) for t in second["cus_b"].lines[0].tiers] == [
        ("10", "10", "5"),  # normalised: 10 × 0.5 is "5", not "5.0"
        ("50", "2.5", "1.75"),
    ]
    assert second["cus_c"].lines[0].unit_price == "0.008"

    # The first period's invoice ignored the 20 GB that came after it was final.
    assert (await invoices("cus_b"))[0] == first["cus_b"]
    assert first["cus_b"].total_minor == 1925
    # Nothing more is due: the current periods have not ended.
    assert await run_cycle(client, now) == []

    # --- the current period: preview and usage so far ------------------------------------
    assert await ingest(client, [event("d3-0", "cus_d", "sms.sent", now - h)]) == (1, 0)
    await settled(client, sms, "cus_d", day_p2[1], now + h, "1")
    preview = await client.call(
        client.invoices.PreviewInvoice,
        invoice_pb2.PreviewInvoiceRequest(subscription_id=subscriptions["cus_d"].id),
    )
    assert (preview.status, preview.id, preview.number) == (
        invoice_pb2.INVOICE_STATUS_DRAFT,
        "",
        "",
    )
    assert preview.period_start.ToDatetime(tzinfo=UTC) == day_p2[1]
    assert [line.amount_minor for line in preview.lines] == [1000, 500]  # ¥1000 + 1 package
    usage = await client.call(
        client.invoices.GetCustomerUsage,
        invoice_pb2.GetCustomerUsageRequest(customer_id=customer_ids["cus_d"]),
    )
    (meter_usage,) = usage.usages
    assert (meter_usage.meter_name, meter_usage.consumed, meter_usage.chargeable) == (
        "sms",
        "1",
        "1",
    )
    assert (meter_usage.amount_minor, usage.currency) == (500, "JPY")

    # --- a correction: void cus_b's first invoice and reissue it ---------------------------
    voided = await client.call(
        client.invoices.VoidInvoice,
        invoice_pb2.VoidInvoiceRequest(id=first["cus_b"].id, reissue=True),
    )
    # The void invoice keeps its number and what it billed.
    assert (voided.status, voided.number, voided.total_minor) == (
        invoice_pb2.INVOICE_STATUS_VOID,
        first["cus_b"].number,
        1925,
    )
    assert voided.HasField("void_time")
    assert voided.replaced_by_invoice_id
    # The correction is a draft until the next cycle finalizes it.
    assert await run_cycle(client, now) == [voided.replaced_by_invoice_id]
    corrected = await client.call(
        client.invoices.GetInvoice, invoice_pb2.GetInvoiceRequest(id=voided.replaced_by_invoice_id)
    )
    # 82.5 GB: 5 + 13 + 32.5 × 0.1 = 21.25 USD, numbered after all the others.
    assert (corrected.status, corrected.number, corrected.total_minor) == (
        FINALIZED,
        "INV-000011",
        2125,
    )
    assert corrected.replaces_invoice_id == first["cus_b"].id
    assert sorted(
        (i.period_start.ToDatetime(tzinfo=UTC), i.status) for i in await invoices("cus_b")
    ) == [
        (day_p1[0], FINALIZED),
        (day_p1[0], invoice_pb2.INVOICE_STATUS_VOID),
        (day_p2[0], FINALIZED),
    ]
    assert await run_cycle(client, now) == []

    # --- one invoice.finalized message per finalized invoice, on JetStream ------------------
    finalized = [*first.values(), *second.values(), corrected]

    async def messages() -> list[invoice_pb2.InvoiceFinalized]:
        return await finalized_messages(suite.nats_url, tenant_id)

    published = await eventually(messages, lambda found: len(found) >= len(finalized), timeout=60)
    assert sorted(m.invoice.id for m in published) == sorted(i.id for i in finalized)
    by_id = {m.invoice.id: m.invoice for m in published}
    for invoice in finalized:
        assert by_id[invoice.id].number == invoice.number
        assert by_id[invoice.id].total_minor == invoice.total_minor
        assert by_id[invoice.id].status == FINALIZED
