"""Invoices: the billing cycle (build each ended period's invoice once, finalize
it after the grace period), previews, current usage, voiding, publishing."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from typing import Any

from services.billing import convert
from services.billing.domain.invoice import InvoiceDraft, build_invoice
from services.billing.domain.money import to_minor
from services.billing.domain.periods import Interval, period_containing, periods_ended, proration
from services.billing.domain.pricing import price_usage
from services.billing.meter_client import MeterClient
from services.billing.store import BillingStore, InvoiceRecord, ProductRecord, SubscriptionRecord
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jetstream import BILLING_SUBJECT_PREFIX
from services.common.logs import get_logger
from usagebilling.billing.v1 import invoice_pb2

log = get_logger(__name__)

FINALIZED_SUBJECT = f"{BILLING_SUBJECT_PREFIX}.invoice.finalized"
# How far ahead of the server's clock a client's as_of may be (clock skew).
AS_OF_SKEW = timedelta(seconds=5)


@dataclass(frozen=True)
class MeterUsage:
    meter_id: str
    meter_name: str
    consumed: Decimal
    free: Decimal
    chargeable: Decimal
    amount_minor: int


@dataclass(frozen=True)
class CustomerUsage:
    subscription: SubscriptionRecord
    period_start: datetime
    period_end: datetime
    currency: str
    usages: list[MeterUsage]


class Invoicing:
    def __init__(
        self, store: BillingStore, meters: MeterClient, grace: timedelta, js: Any = None
    ) -> None:
        self._store = store
        self._meters = meters
        self._grace = grace
        self._js = js

    async def _draft(
        self,
        tenant_id: str,
        subscription: SubscriptionRecord,
        product: ProductRecord,
        start: datetime,
        end: datetime,
    ) -> InvoiceDraft:
        usage = []
        for price in product.usage_prices:
            consumed = await self._meters.consumed(
                tenant_id, price["meter_id"], subscription.customer_external_id, start, end
            )
            usage.append((convert.price_from_json(price), price["meter_name"], consumed))
        # A period cut short by a cancellation pays its share of the fixed fee.
        full_start, full_end, _ = period_containing(
            subscription.start_time, Interval[product.billing_interval], start
        )
        share = proration(full_start, full_end, end) if end < full_end else Fraction(1)
        return build_invoice(
            product.currency,
            product.fixed_price_minor,
            product.name,
            usage,
            start,
            end,
            share,
        )

    async def run_cycle(self, tenant_id: str, as_of: datetime, now: datetime) -> list[str]:
        """Builds the invoice of every period that ended at or before as_of, and
        finalizes the drafts whose grace period has passed by then. Idempotent:
        one invoice per subscription and period; a finalized one never changes."""
        if as_of > now + AS_OF_SKEW:
            raise InvalidArgument("as_of: must not be in the future")
        touched: list[str] = []
        products: dict[str, ProductRecord] = {}
        for subscription in await self._store.subscriptions(tenant_id):
            if subscription.product_id not in products:
                products[subscription.product_id] = await self._store.get_product(
                    tenant_id, subscription.product_id
                )
            product = products[subscription.product_id]
            since = await self._store.last_period_end(subscription.id)
            for start, end in periods_ended(
                subscription.start_time,
                Interval[product.billing_interval],
                as_of,
                until=subscription.end_time,
                since=since,
            ):
                draft = await self._draft(tenant_id, subscription, product, start, end)
                invoice_id = await self._store.insert_invoice(
                    tenant_id, subscription, convert.draft_json(draft)
                )
                if invoice_id:
                    touched.append(invoice_id)
        for invoice in await self._store.drafts(tenant_id):
            if invoice.period_end + self._grace <= as_of:
                subscription = await self._store.get_subscription(
                    tenant_id, invoice.subscription_id
                )
                product = products.get(subscription.product_id) or await self._store.get_product(
                    tenant_id, subscription.product_id
                )
                if await self._finalize(tenant_id, invoice, subscription, product, now):
                    touched.append(invoice.id)
        if touched:
            log.info("billing_cycle", invoices=len(touched), as_of=as_of.isoformat())
        return list(dict.fromkeys(touched))

    async def _finalize(
        self,
        tenant_id: str,
        invoice: InvoiceRecord,
        subscription: SubscriptionRecord,
        product: ProductRecord,
        now: datetime,
    ) -> bool:
        # Usage is read again, so that late events inside the grace period count.
        draft = await self._draft(
            tenant_id, subscription, product, invoice.period_start, invoice.period_end
        )
        async with self._store.locked_draft(invoice.id) as (conn, still_draft):
            if not still_draft:
                return False  # another run finalized it meanwhile
            await self._store.update_draft(conn, invoice.id, convert.draft_json(draft))
            number = await self._store.finalize(conn, tenant_id, invoice.id, now)
        log.info("invoice_finalized", invoice_id=invoice.id, number=number)
        await self.publish_pending()
        return True

    async def publish_pending(self) -> int:
        """Publishes finalized invoices not yet published (Nats-Msg-Id = invoice
        id, so a repeat after a crash is absorbed); marks them after the ack."""
        if self._js is None:
            return 0
        published = 0
        for invoice in await self._store.unpublished():
            message = invoice_pb2.InvoiceFinalized(
                tenant_id=invoice.tenant_id, invoice=convert.proto_invoice(invoice)
            )
            try:
                await self._js.publish(
                    FINALIZED_SUBJECT,
                    message.SerializeToString(),
                    headers={"Nats-Msg-Id": invoice.id},
                    timeout=5,
                )
            except Exception as exc:
                log.warning("invoice_publish_failed", invoice_id=invoice.id, error=repr(exc))
                return published
            await self._store.mark_published(invoice.id)
            published += 1
        return published

    async def preview(self, tenant_id: str, subscription_id: str, now: datetime) -> InvoiceDraft:
        if not subscription_id:
            raise InvalidArgument("subscription_id: required")
        subscription = await self._store.get_subscription(tenant_id, subscription_id)
        product = await self._store.get_product(tenant_id, subscription.product_id)
        start, end = await self._period(subscription, product, now)
        return await self._draft(tenant_id, subscription, product, start, end)

    async def _period(
        self, subscription: SubscriptionRecord, product: ProductRecord, now: datetime
    ) -> tuple[datetime, datetime]:
        if subscription.end_time is not None and subscription.end_time <= now:
            raise FailedPrecondition(f"subscription {subscription.id!r} has ended")
        start, end, _ = period_containing(
            subscription.start_time,
            Interval[product.billing_interval],
            max(now, subscription.start_time),
        )
        if subscription.end_time is not None:
            end = min(end, subscription.end_time)
        return start, end

    async def customer_usage(
        self, tenant_id: str, customer_id: str, now: datetime
    ) -> CustomerUsage:
        if not customer_id:
            raise InvalidArgument("customer_id: required")
        await self._store.get_customer(tenant_id, customer_id)
        active = [
            s
            for s in await self._store.subscriptions(tenant_id, customer_id)
            if s.end_time is None or s.end_time > now
        ]
        if not active:
            raise NotFound(f"customer_id: customer {customer_id!r} has no active subscription")
        subscription = active[-1]
        product = await self._store.get_product(tenant_id, subscription.product_id)
        start, end = await self._period(subscription, product, now)
        usages = []
        for price_data in product.usage_prices:
            price = convert.price_from_json(price_data)
            consumed = await self._meters.consumed(
                tenant_id, price.meter_id, subscription.customer_external_id, start, end
            )
            charge = price_usage(consumed, price)
            usages.append(
                MeterUsage(
                    meter_id=price.meter_id,
                    meter_name=price_data["meter_name"],
                    consumed=charge.consumed,
                    free=charge.free,
                    chargeable=charge.billable,
                    amount_minor=to_minor(charge.amount, product.currency),
                )
            )
        return CustomerUsage(subscription, start, end, product.currency, usages)

    async def void(self, tenant_id: str, invoice_id: str) -> InvoiceRecord:
        if not invoice_id:
            raise InvalidArgument("id: required")
        previous = await self._store.void_invoice(tenant_id, invoice_id)
        if previous == "DRAFT":
            raise FailedPrecondition(
                f"id: invoice {invoice_id!r} is a draft; only a finalized invoice can be voided"
            )
        return await self._store.get_invoice(tenant_id, invoice_id)
