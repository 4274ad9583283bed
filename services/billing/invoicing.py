"""Invoices: the billing cycle (build each ended period's invoice once, finalize
it after the grace period), previews, current usage, cancellation with a final
invoice, voiding with an optional correction, publishing."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from services.billing import convert
from services.billing.domain.invoice import InvoiceDraft, build_invoice
from services.billing.domain.periods import (
    Interval,
    cancellation_end,
    period_containing,
    period_share,
    periods_ended,
)
from services.billing.domain.pricing import UsagePrice
from services.billing.meter_client import Meters
from services.billing.store import BillingStore, InvoiceRecord, ProductRecord, SubscriptionRecord
from services.billing.usage import CustomerUsageKey, UsageKey, UsageReader
from services.common import metrics
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.jetstream import BILLING_SUBJECT_PREFIX
from services.common.logs import get_logger
from usagebilling.billing.v1 import invoice_pb2

log = get_logger(__name__)

FINALIZED_SUBJECT: Final = f"{BILLING_SUBJECT_PREFIX}.invoice.finalized"
VOIDED_SUBJECT: Final = f"{BILLING_SUBJECT_PREFIX}.invoice.voided"
# Per subject: the payload's message type, the Nats-Msg-Id's suffix to the
# invoice id, and the metrics action.
_MESSAGES: Final = {
    FINALIZED_SUBJECT: (invoice_pb2.InvoiceFinalized, "", "published"),
    VOIDED_SUBJECT: (invoice_pb2.InvoiceVoided, ".voided", "void_published"),
}
# How far ahead of the server's clock a client's as_of may be (clock skew).
AS_OF_SKEW: Final = timedelta(seconds=5)
# Invoices inserted or finalized per transaction.
BATCH: Final = 1000
# invoice messages read and published at once, and how long JetStream has to
# acknowledge them.
PUBLISH_BATCH: Final = 1000
PUBLISH_TIMEOUT: Final = 10.0


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


@dataclass(frozen=True)
class BillablePeriod:
    """One period of one subscription that an invoice bills."""

    subscription: SubscriptionRecord
    product: ProductRecord
    start: datetime
    end: datetime

    @property
    def key(self) -> tuple[str, datetime]:
        return self.subscription.id, self.start


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Invoicing:
    def __init__(
        self,
        store: BillingStore,
        meters: Meters,
        grace: timedelta,
        js: Any = None,
        *,
        usage: UsageReader | None = None,
    ) -> None:
        self._store = store
        self._grace = grace
        self._js = js
        self._usage = usage or UsageReader(meters)

    # Pricing periods.

    async def _price(
        self, tenant_id: str, periods: Sequence[BillablePeriod], *, strict: bool = False
    ) -> dict[tuple[str, datetime], InvoiceDraft]:
        """Reads the usage of every period (few meter calls for many periods) and
        prices each. A period that cannot be priced (an amount beyond int64)
        is logged and left out, so that it does not hold up the others, unless
        `strict`, when its error is raised."""
        wanted: dict[UsageKey, set[str]] = defaultdict(set)
        for period in periods:
            for price in period.product.usage_prices:
                key = (price["meter_id"], period.start, period.end)
                wanted[key].add(period.subscription.customer_external_id)
        usage = await self._usage.read(tenant_id, wanted)
        prices: dict[str, list[tuple[UsagePrice, str]]] = {}
        drafts: dict[tuple[str, datetime], InvoiceDraft] = {}
        for period in periods:
            product = period.product
            if product.id not in prices:
                prices[product.id] = [
                    (convert.price_from_json(p), p["meter_name"]) for p in product.usage_prices
                ]
            try:
                drafts[period.key] = _build(period, prices[product.id], usage)
            except InvalidArgument as exc:
                if strict:
                    raise
                log.error(
                    "invoice_not_priced",
                    subscription_id=period.subscription.id,
                    period_start=period.start.isoformat(),
                    error=str(exc),
                )
        return drafts

    # The billing cycle.

    async def run_cycle(
        self, tenant_id: str, as_of: datetime, now: datetime, *, subscription_id: str = ""
    ) -> list[str]:
        """Builds the invoice of every period that ended at or before as_of, and
        finalizes the drafts whose grace period has passed by then (reading
        usage again, so that late events inside the grace count). Idempotent:
        one invoice per subscription and period, whoever runs it, however
        often, concurrently too; a finalized invoice never changes. Returns the
        ids of the invoices this run built or finalized."""
        if as_of > now + AS_OF_SKEW:
            raise InvalidArgument("as_of: must not be in the future")
        as_of = min(as_of, now)  # a period that ends within the skew has not ended
        state = await self._store.billing_state(tenant_id, subscription_id)
        products = {p.id: p for p in await self._store.products_of(tenant_id)}
        subscriptions = {s.id: s for s, _ in state}

        new: list[BillablePeriod] = []
        for subscription, billed_until in state:
            product = products[subscription.product_id]
            new.extend(
                BillablePeriod(subscription, product, start, end)
                for start, end in periods_ended(
                    subscription.start_time,
                    Interval[product.billing_interval],
                    as_of,
                    until=subscription.end_time,
                    since=billed_until,
                )
            )
        ended_by = as_of - self._grace
        due = {p.key: p for p in new if p.end <= ended_by}
        ids: dict[tuple[str, datetime], str] = {}
        for draft in await self._store.due_drafts(tenant_id, ended_by, subscription_id):
            subscription = subscriptions[draft.subscription_id]
            period = BillablePeriod(
                subscription,
                products[subscription.product_id],
                draft.period_start,
                draft.period_end,
            )
            due.setdefault(period.key, period)
            ids[period.key] = draft.id

        # Both need usage: read it once. A period built and finalized in this
        # run is priced on usage read after its grace period passed.
        new_keys = {p.key for p in new}
        drafts = await self._price(
            tenant_id, [*new, *(p for p in due.values() if p.key not in new_keys)]
        )
        contents = {key: convert.draft_json(draft) for key, draft in drafts.items()}
        touched: list[str] = []
        for chunk in _chunks([p for p in new if p.key in contents], BATCH):
            inserted = await self._store.insert_drafts(
                tenant_id, [(p.subscription, contents[p.key]) for p in chunk]
            )
            ids.update(inserted)
            touched += inserted.values()
            metrics.INVOICES.labels(action="built").inc(len(inserted))
        finalizing = sorted(
            (p for p in due.values() if p.key in contents), key=lambda p: (p.end, p.start)
        )
        if missing := [p.key for p in finalizing if p.key not in ids]:
            # Built by a concurrent run just now: finalize them all the same.
            ids.update(await self._store.draft_ids(tenant_id, missing))
        for chunk in _chunks([p for p in finalizing if p.key in ids], BATCH):
            finalized = await self._store.finalize_drafts(
                tenant_id, [(ids[p.key], contents[p.key]) for p in chunk], now
            )
            touched += [invoice_id for invoice_id, _ in finalized]
            metrics.INVOICES.labels(action="finalized").inc(len(finalized))
        if touched:
            log.info("billing_cycle", invoices=len(set(touched)), as_of=as_of.isoformat())
        await self.publish_pending(tenant_id)
        return list(dict.fromkeys(touched))

    async def publish_pending(self, tenant_id: str | None = None) -> int:
        """Publishes invoice.finalized for finalized invoices (of one tenant, or
        all) not yet published, then invoice.voided for voided ones whose
        invoice.finalized is out. Nats-Msg-Id is derived from the invoice id, so
        that a repeat (after a crash, or by two replicas) is absorbed by
        JetStream; invoices are marked only after the ack. Returns how many
        messages went out."""
        if self._js is None:
            return 0
        published = 0
        for subject, message in ((FINALIZED_SUBJECT, "finalized"), (VOIDED_SUBJECT, "voided")):
            while batch := await self._store.unpublished(tenant_id, PUBLISH_BATCH, message):
                acked = await self._publish(subject, batch)
                await self._store.mark_published(acked, message)
                published += len(acked)
                metrics.INVOICES.labels(action=_MESSAGES[subject][2]).inc(len(acked))
                if len(acked) < len(batch):
                    return published  # JetStream is unwell: a later run retries the rest
        return published

    async def _publish(self, subject: str, invoices: Sequence[InvoiceRecord]) -> list[str]:
        """Publishes without waiting for each ack in turn; returns the ids acked."""
        message_type, msg_id_suffix, _ = _MESSAGES[subject]
        payloads = [
            (
                invoice.id,
                message_type(
                    tenant_id=invoice.tenant_id, invoice=convert.proto_invoice(invoice)
                ).SerializeToString(),
            )
            for invoice in invoices
        ]
        pending: dict[asyncio.Future[Any], str] = {}
        for invoice_id, payload in payloads:  # back to back, so that they go out together
            try:
                # No wait_stall: it would yield on every message, and the client
                # would then write each message on its own. A batch (1000) stays
                # well below the client's limit of pending acks (4000).
                future = await self._js.publish_async(
                    subject, payload, headers={"Nats-Msg-Id": invoice_id + msg_id_suffix}
                )
            except Exception as exc:
                log.warning("invoice_publish_failed", invoice_id=invoice_id, error=repr(exc))
                break
            pending[future] = invoice_id
        if not pending:
            return []
        done, late = await asyncio.wait(pending, timeout=PUBLISH_TIMEOUT)
        for future in late:
            future.cancel()
        acked = []
        for future, invoice_id in pending.items():
            if future in done and not future.cancelled() and future.exception() is None:
                acked.append(invoice_id)
            else:
                failed = future in done and not future.cancelled()
                error = repr(future.exception()) if failed else "no ack in time"
                log.warning("invoice_publish_failed", invoice_id=invoice_id, error=error)
        return acked

    # The current period.

    async def _current(
        self, tenant_id: str, subscription: SubscriptionRecord, now: datetime
    ) -> BillablePeriod:
        if subscription.end_time is not None and subscription.end_time <= now:
            raise FailedPrecondition(f"subscription_id: subscription {subscription.id!r} has ended")
        product = await self._store.get_product(tenant_id, subscription.product_id)
        start, end, _ = period_containing(
            subscription.start_time,
            Interval[product.billing_interval],
            max(now, subscription.start_time),
        )
        if subscription.end_time is not None:
            end = min(end, subscription.end_time)
        return BillablePeriod(subscription, product, start, end)

    async def preview(
        self, tenant_id: str, subscription_id: str, now: datetime
    ) -> tuple[SubscriptionRecord, InvoiceDraft]:
        if not subscription_id:
            raise InvalidArgument("subscription_id: required")
        subscription = await self._store.get_subscription(tenant_id, subscription_id)
        period = await self._current(tenant_id, subscription, now)
        drafts = await self._price(tenant_id, [period], strict=True)
        return subscription, drafts[period.key]

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
        period = await self._current(tenant_id, active[-1], now)
        draft = (await self._price(tenant_id, [period], strict=True))[period.key]
        usages = [
            MeterUsage(
                meter_id=line.meter_id,
                meter_name=line.meter_name,
                consumed=line.quantity,
                free=line.free_quantity,
                chargeable=line.billable_quantity,
                amount_minor=line.amount_minor,
            )
            for line in draft.lines
            if line.meter_id  # not the fixed fee
        ]
        return CustomerUsage(
            period.subscription, period.start, period.end, period.product.currency, usages
        )

    # Cancellation and correction.

    async def cancel(
        self, tenant_id: str, subscription_id: str, *, immediately: bool, now: datetime
    ) -> SubscriptionRecord:
        """Ends the subscription at the end of its current period (no later
        period is billed), or at once: then the part of the period served is
        invoiced now (its fixed fee prorated), and finalized after the grace."""
        if not subscription_id:
            raise InvalidArgument("id: required")
        subscription = await self._store.get_subscription(tenant_id, subscription_id)
        if subscription.end_time is not None and subscription.end_time <= now:
            raise FailedPrecondition(f"id: subscription {subscription_id!r} already ended")
        product = await self._store.get_product(tenant_id, subscription.product_id)
        end = cancellation_end(
            subscription.start_time,
            Interval[product.billing_interval],
            now,
            immediately=immediately,
            current_end=subscription.end_time,
        )
        record = await self._store.cancel_subscription(tenant_id, subscription.id, end, now)
        if immediately:
            await self.run_cycle(tenant_id, now, now, subscription_id=record.id)
        return record

    async def void(
        self, tenant_id: str, invoice_id: str, *, reissue: bool, now: datetime
    ) -> InvoiceRecord:
        """Voids a finalized invoice; with `reissue`, also issues the corrected
        invoice of its period (a draft priced on today's usage, which the next
        cycle finalizes with a new number). Repeating the call changes nothing."""
        if not invoice_id:
            raise InvalidArgument("id: required")
        invoice = await self._store.get_invoice(tenant_id, invoice_id)
        if invoice.status == "DRAFT":
            raise FailedPrecondition(
                f"id: invoice {invoice_id!r} is a draft; only a finalized invoice can be voided"
            )
        replacement = None
        if reissue and not invoice.replaced_by_id:
            subscription = await self._store.get_subscription(tenant_id, invoice.subscription_id)
            product = await self._store.get_product(tenant_id, subscription.product_id)
            period = BillablePeriod(subscription, product, invoice.period_start, invoice.period_end)
            drafts = await self._price(tenant_id, [period], strict=True)
            replacement = convert.draft_json(drafts[period.key])
        if await self._store.void_invoice(tenant_id, invoice.id, replacement, now) == "FINALIZED":
            metrics.INVOICES.labels(action="voided").inc()
            # Announced now; if JetStream is down, by the scheduler's next pass.
            try:
                await self.publish_pending(tenant_id)
            except Exception as exc:  # the void is committed: it must not fail now
                log.warning("invoice_publish_failed", invoice_id=invoice.id, error=repr(exc))
        return await self._store.get_invoice(tenant_id, invoice.id)


def _build(
    period: BillablePeriod,
    prices: Sequence[tuple[UsagePrice, str]],
    usage: dict[CustomerUsageKey, Decimal],
) -> InvoiceDraft:
    customer = period.subscription.customer_external_id
    product = period.product
    return build_invoice(
        product.currency,
        product.fixed_price_minor,
        product.name,
        [
            (price, name, usage[(price.meter_id, period.start, period.end, customer)])
            for price, name in prices
        ],
        period.start,
        period.end,
        # A period cut short by a cancellation pays its share of the fixed fee.
        period_share(
            period.subscription.start_time,
            Interval[product.billing_interval],
            period.start,
            period.end,
        ),
    )
