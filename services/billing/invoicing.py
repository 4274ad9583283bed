"""Invoices: the billing cycle (build each ended period's invoice once, finalize
it after the grace period), previews, current usage, cancellation with a final
invoice, voiding with an optional correction, publishing.

One run of the cycle is bounded: per subscription it builds at most
`catchup_periods` new periods (oldest first), retries at most as many failed
ones and finalizes at most as many drafts; it works in batches and, given a
`run_budget`, stops at the first batch boundary past it. What is left is
reported (`more_pending`) and the next run continues (on this replica, from the
page where it stopped). Memory is bounded whatever the tenant's size: a run
holds one page of subscriptions (SUBSCRIPTION_PAGE, in the bytewise order of
the customers' external ids) and their usage (usage.UsageStreams). Invoice
numbers follow the periods within a page; across pages, the customers' order.
A period that cannot be priced is held (no invoice), recorded once in
billing.period_failures, reported in the run's answer, and retried on every run.

Late usage (domain/late.py): per page, the finalized periods whose backdating
window has closed by as_of are re-priced once (by `_price`, as any invoice)
and recorded checked, with their LATE_USAGE line when the total differs; the
line goes on the subscription's next invoice finalized (in that transaction),
or, for a subscription that has ended with nothing left to finalize, on an
invoice of its own."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

from services.billing import convert
from services.billing.domain import commitments, late
from services.billing.domain.invoice import InvoiceDraft, Unpriceable, Usage, build_invoice
from services.billing.domain.periods import (
    Interval,
    cancellation_end,
    check_as_of,
    period_containing,
    period_share,
    periods_ended,
)
from services.billing.domain.pricing import UsagePrice
from services.billing.meter_client import PricingMeters
from services.billing.store import (
    BillingStore,
    InvoiceRecord,
    LateCheck,
    PeriodFailure,
    ProductRecord,
    SubscriptionRecord,
)
from services.billing.usage import (
    BULK_MIN_CUSTOMERS,
    CustomerUsageKey,
    UsageKey,
    UsageReader,
    UsageStreams,
)
from services.common import metrics
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
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
# Invoices inserted or finalized per transaction, and periods priced per batch.
BATCH: Final = 1000
# Subscriptions one run holds at once (a keyset page, see BillingStore.billing_state).
SUBSCRIPTION_PAGE: Final = 2000
# Periods priced (or drafts encoded) between two yields to the event loop: a
# batch is seconds of CPU on a busy machine, and billing must go on answering
# meanwhile (meter's tenant checks, WhoAmI, time out after 5 s).
YIELD_EVERY: Final = 50
# Meter calls (estimated) that one batch of a run may need; between batches a
# run checks its time budget.
BATCH_CALLS: Final = 400
# Ended periods one run builds per subscription at most, unless configured
# (USAGEBILLING_BILLING_CATCHUP_PERIODS): a month of a daily product.
CATCHUP_PERIODS: Final = 31
# invoice messages read and published at once, and how long JetStream has to
# acknowledge them.
PUBLISH_BATCH: Final = 1000
PUBLISH_TIMEOUT: Final = 10.0
# Products remembered for previews and current usage (Invoicing._product);
# when full, forgotten all at once.
MAX_REMEMBERED_PRODUCTS: Final = 10_000
# (subscription id, period start)
PeriodKey = tuple[str, datetime]


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


@dataclass(frozen=True)
class CycleReport:
    """What one run of the billing cycle did for one tenant."""

    invoice_ids: list[str]  # built or finalized by this run
    failures: list[PeriodFailure]  # periods this run tried and could not invoice
    more_pending: bool  # work left for the next run (catch-up bound or time budget)


@dataclass(frozen=True)
class _Resume:
    """Where a run stopped for lack of budget: the cursor of the page the next
    run starts at (None: the first), whether the pass found work so far, its
    passes over meter's pages, and the run's as_of - grace (the periods
    whose usage it read after their grace had ended), and the as_of of the
    run that began the passes (what they read may predate later runs)."""

    after: tuple[str, str] | None
    worked: bool
    streams: UsageStreams
    ended_by: datetime
    began: datetime


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Invoicing:
    def __init__(
        self,
        store: BillingStore,
        meters: PricingMeters,
        grace: timedelta,
        js: Any = None,
        *,
        usage: UsageReader | None = None,
        catchup_periods: int = CATCHUP_PERIODS,
        run_budget: timedelta | None = None,
        credits: Any = None,
        backdate_window: timedelta = late.BACKDATE_WINDOW,
    ) -> None:
        if catchup_periods < 1:
            raise ValueError("catchup_periods must be at least 1")
        self._store = store
        self._meters = meters
        self._grace = grace
        self._js = js
        self._usage = usage or UsageReader(meters)
        # Per tenant, where its last run here stopped for lack of budget.
        self._resume: dict[str, _Resume] = {}
        self._catchup = catchup_periods
        self._budget = run_budget
        # Credits (services/billing/credits.py): usage they covered is not billed again.
        self._credits = credits
        self._products: dict[tuple[str, str], ProductRecord] = {}
        # No event older than this reaches meter: a period this far (and the
        # grace) behind as_of is complete, and checked for late usage.
        self._backdate = backdate_window

    # Pricing periods.

    async def _price(
        self,
        tenant_id: str,
        periods: Sequence[BillablePeriod],
        *,
        strict: bool = False,
        streams: UsageStreams | None = None,
    ) -> tuple[dict[tuple[str, datetime], InvoiceDraft], dict[tuple[str, datetime], PeriodFailure]]:
        """Reads the usage of every period (few meter calls for many periods) and
        prices each: (drafts, failures) by period key. A period that cannot be
        priced (an amount beyond int64, or any other error its data causes) is
        a failure, so that it does not hold up the others, unless `strict`,
        when its error is raised (Unpriceable is a FailedPrecondition)."""
        wanted: dict[UsageKey, set[str]] = defaultdict(set)
        for period in periods:
            for price in period.product.usage_prices:
                if price.get("transaction_key"):
                    continue  # read per transaction below
                key = (price["meter_id"], period.start, period.end)
                wanted[key].add(period.subscription.customer_external_id)
        usage = await self._usage.read(tenant_id, wanted, streams)
        uses: dict[Any, Any] = {}
        if self._credits is not None:
            uses = await self._credits.apply_to_usage(tenant_id, periods, usage)
        transactions, too_many = await self._transactions(tenant_id, periods)
        prices: dict[str, list[tuple[UsagePrice, str]]] = {}
        drafts: dict[tuple[str, datetime], InvoiceDraft] = {}
        failures: dict[tuple[str, datetime], PeriodFailure] = {}
        for n, period in enumerate(periods):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # see YIELD_EVERY
            product = period.product
            try:
                if period.key in too_many:
                    raise too_many[period.key]
                if product.id not in prices:
                    prices[product.id] = [
                        (convert.price_from_json(p), p["meter_name"]) for p in product.usage_prices
                    ]
                drafts[period.key] = _build(period, prices[product.id], usage, transactions, uses)
            except Unpriceable as exc:
                if strict:
                    raise
                failures[period.key] = _held(period, str(exc), exc.cause)
            except Exception as exc:
                # Whatever else pricing one period raises stays with that
                # period: shown, counted and retried like the rest, never
                # stopping the tenant's other periods.
                if strict:
                    raise
                failures[period.key] = _held(period, f"pricing error: {exc!r}", "pricing_error")
        if uses:
            self._credits.annotate(drafts, uses)
        return drafts, failures

    async def _transactions(
        self, tenant_id: str, periods: Sequence[BillablePeriod]
    ) -> tuple[dict[CustomerUsageKey, tuple[Decimal, ...]], dict[PeriodKey, Exception]]:
        """Each transaction's amount for the prices that bill per transaction
        (PERCENTAGE with transaction_key): one meter call per price, period and
        customer. A period with more transactions than meter answers (or whose
        read fails or times out) gets its error, which holds that period (or
        fails a preview), not the others: one customer with very many
        transactions must not stop the tenant's billing."""
        found: dict[CustomerUsageKey, tuple[Decimal, ...]] = {}
        failed: dict[PeriodKey, Exception] = {}
        limit = asyncio.Semaphore(16)

        async def read(period: BillablePeriod, index: int, price: dict[str, Any]) -> None:
            customer = period.subscription.customer_external_id
            key = (price["meter_id"], period.start, period.end, customer)
            if key in found:
                return
            try:
                async with limit:
                    values = await self._meters.consumed_by_group(
                        tenant_id,
                        key[0],
                        customer,
                        period.start,
                        period.end,
                        price["transaction_key"],
                    )
            except ResourceExhausted as exc:
                failed[period.key] = Unpriceable(
                    f"usage_prices[{index}] (meter {price['meter_name']!r}, {key[0]}): too many "
                    f"transactions ({price['transaction_key']!r} values) to read from meter: {exc}",
                    cause="too_many_transactions",
                    meter_id=key[0],
                )
                return
            except Unavailable as exc:
                failed[period.key] = exc
                return
            found[key] = tuple(values)

        await asyncio.gather(
            *(
                read(period, i, price)
                for period in periods
                for i, price in enumerate(period.product.usage_prices)
                if price.get("transaction_key")
            )
        )
        return found, failed

    # The billing cycle.

    async def run_cycle(
        self, tenant_id: str, as_of: datetime, now: datetime, *, subscription_id: str = ""
    ) -> list[str]:
        """`cycle`, answering only the ids of the invoices built or finalized."""
        report = await self.cycle(tenant_id, as_of, now, subscription_id=subscription_id)
        return report.invoice_ids

    async def cycle(
        self, tenant_id: str, as_of: datetime, now: datetime, *, subscription_id: str = ""
    ) -> CycleReport:
        """Builds the invoice of every period that ended at or before as_of, and
        finalizes the drafts whose grace period has passed by then (reading
        usage again, so that late events inside the grace count). Idempotent:
        one invoice per subscription and period, whoever runs it, however
        often, concurrently too; a finalized invoice never changes.

        Bounded (see the module's docstring): `more_pending` says that the next
        run has more to do. A period that cannot be priced gets no invoice (its
        fixed fee and other lines are held with it: an invoice without the
        line would underbill) and is listed in `failures`; the other periods
        are billed. InvalidArgument (naming as_of) when as_of is before 1970 or
        in the future."""
        check_as_of(as_of, now, AS_OF_SKEW)
        as_of = min(as_of, now)  # a period that ends within the skew has not ended
        loop = asyncio.get_running_loop()
        deadline = None if self._budget is None else loop.time() + self._budget.total_seconds()
        products = {p.id: p for p in await self._store.products_of(tenant_id)}
        touched: list[str] = []
        failures: list[PeriodFailure] = []
        more = False
        # Pages of subscriptions, from where this replica's last run of the
        # tenant ran out of budget: a pass over the tenant may take several
        # runs; `worked` says whether this pass has found work so far.
        ended_by = as_of - self._grace
        resume = None if subscription_id else self._resume.pop(tenant_id, None)
        if resume is None:
            after, worked, streams = None, False, self._usage.streams(tenant_id)
            began = as_of
        else:
            after, worked, streams = resume.after, resume.worked, resume.streams
            began = resume.began
            # Values read before a period's grace ended must not finalize it.
            streams.retain(lambda key: key[2] <= resume.ended_by)
        while True:
            state = await self._store.billing_state(
                tenant_id, subscription_id, after=after, limit=SUBSCRIPTION_PAGE
            )
            report, stopped = await self._cycle_page(
                tenant_id, state, products, streams, as_of, now, deadline, began
            )
            touched += report.invoice_ids
            failures += report.failures
            more = more or report.more_pending
            worked = worked or bool(report.invoice_ids or report.failures or report.more_pending)
            if not stopped and len(state) < SUBSCRIPTION_PAGE:
                # The pass is over. If it began in an earlier run and found work,
                # periods may have ended meanwhile before where this run began.
                more = more or (resume is not None and worked)
                break
            if not stopped:
                last, _ = state[-1]
                after = (last.customer_external_id, last.id)
            if stopped or (deadline is not None and loop.time() >= deadline):
                more = True  # the budget is spent: the next run goes on from here
                if not subscription_id:
                    self._resume[tenant_id] = _Resume(after, worked, streams, ended_by, began)
                break
        if touched or failures or more:
            log.info(
                "billing_cycle",
                invoices=len(set(touched)),
                failures=len(failures),
                more_pending=more,
                as_of=as_of.isoformat(),
                usage_pages=streams.pages,
            )
        await self.publish_pending(tenant_id)
        return CycleReport(list(dict.fromkeys(touched)), failures, more)

    async def _cycle_page(
        self,
        tenant_id: str,
        state: Sequence[tuple[SubscriptionRecord, datetime | None]],
        products: dict[str, ProductRecord],
        streams: UsageStreams,
        as_of: datetime,
        now: datetime,
        deadline: float | None,
        began: datetime,
    ) -> tuple[CycleReport, bool]:
        """`cycle` for one page of subscriptions (with the end of what each
        has billed); also says whether the budget stopped it before its end.
        `streams` may hold usage read by runs since `began` (a pass resumed):
        only the periods whose backdating window had closed by then are
        complete on what they read."""
        loop = asyncio.get_running_loop()
        limit = self._catchup
        more = False
        subscriptions = {s.id: s for s, _ in state}
        among = list(subscriptions)
        if not among:
            return CycleReport([], [], False), False

        def period_of(subscription_id: str, start: datetime, end: datetime) -> BillablePeriod:
            subscription = subscriptions[subscription_id]
            return BillablePeriod(subscription, products[subscription.product_id], start, end)

        # First the late usage of periods whose window has closed, so that
        # the drafts finalized below carry it.
        settled_by = late.closed_by(began, self._backdate, self._grace)
        more = await self._check_late(tenant_id, among, period_of, as_of, now, streams, settled_by)

        # To build: the oldest `limit` new periods of each subscription, and
        # up to `limit` of its failed periods again. Asking for one more tells
        # whether any is left.
        build: list[BillablePeriod] = []
        for subscription, billed_until in state:
            product = products[subscription.product_id]
            ended = periods_ended(
                subscription.start_time,
                Interval[product.billing_interval],
                as_of,
                until=subscription.end_time,
                since=billed_until,
                limit=limit + 1,
            )
            more = more or len(ended) > limit
            build.extend(BillablePeriod(subscription, product, s, e) for s, e in ended[:limit])
        failed = await self._store.open_failures(tenant_id, per_subscription=limit + 1, among=among)
        seen: Counter[str] = Counter()
        retried: set[tuple[str, datetime]] = set()
        for record in failed:
            f = record.failure
            seen[f.subscription_id] += 1
            if seen[f.subscription_id] > limit:
                more = True
            elif f.period_end <= as_of:  # an as_of earlier than the last run's
                period = period_of(f.subscription_id, f.period_start, f.period_end)
                build.append(period)
                retried.add(period.key)

        # To finalize: the periods above whose grace has passed, and up to
        # `limit` drafts of each subscription.
        ended_by = as_of - self._grace
        due = {p.key: p for p in build if p.end <= ended_by}
        ids: dict[tuple[str, datetime], str] = {}
        seen.clear()
        for draft in await self._store.due_drafts(
            tenant_id, ended_by, per_subscription=limit + 1, among=among
        ):
            seen[draft.subscription_id] += 1
            if seen[draft.subscription_id] > limit:
                more = True
                continue
            period = period_of(draft.subscription_id, draft.period_start, draft.period_end)
            due.setdefault(period.key, period)
            ids[period.key] = draft.id
            retried.add(period.key)  # a draft may have failed to finalize before

        # Both need usage: read it once. A period built and finalized in this
        # run is priced on usage read after its grace period passed.
        to_build = {p.key for p in build}
        work = {p.key: p for p in build} | due
        ordered = sorted(work.values(), key=lambda p: (p.end, p.start, p.subscription.id))
        touched: list[str] = []
        failures: list[PeriodFailure] = []
        # The page's customers' usage of the periods many of them share, in one
        # forward pass over meter's pages per period (see usage.UsageStreams).
        await streams.prepare(_wanted(ordered))
        batches = _batches(ordered, calls=BATCH_CALLS, size=BATCH)
        stopped = False
        for number, batch in enumerate(batches):
            built, held = await self._bill_batch(
                tenant_id,
                batch,
                to_build,
                due,
                ids,
                retried,
                now,
                streams,
                settled_by,
            )
            touched += built
            failures += held
            if deadline is not None and loop.time() >= deadline and number + 1 < len(batches):
                more = stopped = True  # the budget is spent: the next run goes on from here
                break
        if not stopped:
            touched += await self._issue_late(tenant_id, state, products, as_of, now)
        return CycleReport(touched, failures, more), stopped

    async def _check_late(
        self,
        tenant_id: str,
        among: list[str],
        period_of: Callable[[str, datetime, datetime], BillablePeriod],
        as_of: datetime,
        now: datetime,
        streams: UsageStreams,
        settled_by: datetime,
    ) -> bool:
        """Re-prices, once, the finalized periods of these subscriptions whose
        backdating window has closed by as_of (at most `catchup_periods` of
        each per run), and records each checked with its LATE_USAGE line, if
        the total differs from what its invoice billed. Returns whether more
        are left beyond that bound. When meter cannot be read, the periods are
        left unchecked and tried again on the next run; a period whose data
        cannot be priced is recorded checked with no line and logged
        (late_usage_unpriceable), so that it never holds up the later ones.
        Neither stops the page's billing."""
        limit = self._catchup
        closed_by = late.closed_by(as_of, self._backdate, self._grace)
        invoices = await self._store.late_candidates(
            tenant_id, closed_by, among=among, per_subscription=limit + 1
        )
        seen: Counter[str] = Counter()
        billed: dict[PeriodKey, InvoiceRecord] = {}
        more = False
        for invoice in invoices:
            seen[invoice.subscription_id] += 1
            if seen[invoice.subscription_id] > limit:
                more = True
            else:
                billed[(invoice.subscription_id, invoice.period_start)] = invoice
        periods = sorted(
            (period_of(i.subscription_id, i.period_start, i.period_end) for i in billed.values()),
            key=lambda p: (p.end, p.start, p.subscription.id),
        )
        if not periods:
            return more
        # Through the run's streams: a period many of the page's customers
        # share is read in one forward pass over meter's pages, as the page's
        # own periods are (prepared after this). But a resumed pass's streams
        # may hold usage read before a period's window closed (read ahead for
        # later customers): such a period is read afresh.
        shared = [p for p in periods if p.end <= settled_by]
        fresh = [p for p in periods if p.end > settled_by]
        try:
            await streams.prepare(_wanted(shared))
        except Exception as exc:  # meter unavailable, say: the next run tries again
            log.warning("late_usage_not_checked", periods=len(periods), error=repr(exc))
            return more
        work: list[tuple[list[BillablePeriod], UsageStreams | None]] = [
            (b, streams) for b in _batches(shared, calls=BATCH_CALLS, size=BATCH)
        ]
        work += [(b, None) for b in _batches(fresh, calls=BATCH_CALLS, size=BATCH)]
        for batch, through in work:
            try:
                drafts, held = await self._price(tenant_id, batch, streams=through)
            except Exception as exc:  # meter unavailable, say: the next run tries again
                log.warning("late_usage_not_checked", periods=len(batch), error=repr(exc))
                return more
            checks = []
            for period in batch:
                invoice = billed[period.key]
                if period.key in held:
                    # Its data cannot be priced (an amount past int64, say):
                    # trying again each run would only hold up the periods
                    # after it, so it is checked with no line, and logged.
                    log.error(
                        "late_usage_unpriceable",
                        subscription_id=period.subscription.id,
                        period_start=period.start.isoformat(),
                        invoice_id=invoice.id,
                        reason=held[period.key].reason,
                    )
                    line = None
                else:
                    line = late.late_usage_line(convert.billed(invoice), drafts[period.key])
                checks.append(
                    LateCheck(
                        period.subscription.id,
                        period.start,
                        period.end,
                        invoice.id,
                        None if line is None else convert.line_json(line),
                    )
                )
            recorded = await self._store.record_late_checks(tenant_id, checks, now)
            found = [c for c in checks if c.line is not None and c.key in recorded]
            for check in found:
                assert check.line is not None
                log.info(
                    "late_usage_found",
                    subscription_id=check.subscription_id,
                    period_start=check.period_start.isoformat(),
                    invoice_id=check.invoice_id,
                    amount_minor=check.line["amount_minor"],
                )
        return more

    async def _issue_late(
        self,
        tenant_id: str,
        state: Sequence[tuple[SubscriptionRecord, datetime | None]],
        products: dict[str, ProductRecord],
        as_of: datetime,
        now: datetime,
    ) -> list[str]:
        """The late usage of the page's subscriptions that have ended, with
        every period built (none later to carry it), on invoices of their own."""
        ended = [
            (s, products[s.product_id].currency)
            for s, billed_until in state
            if s.end_time is not None
            and s.end_time <= as_of
            and billed_until is not None
            and billed_until >= s.end_time
        ]
        issued = await self._store.issue_late_invoices(tenant_id, ended, now, _with_late_lines)
        metrics.INVOICES.labels(action="finalized").inc(len(issued))
        return issued

    async def _bill_batch(
        self,
        tenant_id: str,
        batch: Sequence[BillablePeriod],
        to_build: set[tuple[str, datetime]],
        due: dict[tuple[str, datetime], BillablePeriod],
        ids: dict[tuple[str, datetime], str],
        retried: set[tuple[str, datetime]],
        now: datetime,
        streams: UsageStreams,
        closed_by: datetime,
    ) -> tuple[list[str], list[PeriodFailure]]:
        """Prices one batch (in period order), inserts the drafts it builds,
        finalizes the due ones, records the failures and forgets those that
        succeeded now. A period that ended by `closed_by` is finalized on
        usage no event can change any more: it is recorded checked for late
        usage as it is finalized, never re-priced. Returns (invoice ids
        touched, failures)."""
        drafts, held = await self._price(tenant_id, batch, streams=streams)
        contents: dict[tuple[str, datetime], dict[str, Any]] = {}
        for n, (key, draft) in enumerate(drafts.items()):
            if n % YIELD_EVERY == YIELD_EVERY - 1:
                await asyncio.sleep(0)  # see YIELD_EVERY
            contents[key] = convert.draft_json(draft)
        touched: list[str] = []
        inserted = await self._store.insert_drafts(
            tenant_id,
            [
                (p.subscription, contents[p.key])
                for p in batch
                if p.key in to_build and p.key in contents
            ],
        )
        ids.update(inserted)
        touched += inserted.values()
        metrics.INVOICES.labels(action="built").inc(len(inserted))
        finalizing = [p for p in batch if p.key in due and p.key in contents]
        if missing := [p.key for p in finalizing if p.key not in ids]:
            # Built by a concurrent run just now: finalize them all the same.
            ids.update(await self._store.draft_ids(tenant_id, missing))
        finalized = await self._store.finalize_drafts(
            tenant_id,
            [(ids[p.key], contents[p.key]) for p in finalizing if p.key in ids],
            now,
            _with_late_lines,
            complete=[ids[p.key] for p in finalizing if p.key in ids and p.end <= closed_by],
        )
        touched += [invoice_id for invoice_id, _ in finalized]
        metrics.INVOICES.labels(action="finalized").inc(len(finalized))
        await self._record(tenant_id, list(held.values()), now)
        cleared = await self._store.clear_failures(
            tenant_id, [key for key in contents if key in retried]
        )
        for record in cleared:
            f = record.failure
            log.info(
                "billing_period_failure_cleared",
                subscription_id=f.subscription_id,
                period_start=f.period_start.isoformat(),
                attempts=record.attempts,
            )
        return touched, list(held.values())

    async def _record(self, tenant_id: str, held: list[PeriodFailure], now: datetime) -> None:
        """Records failed periods; logs and counts each once (when it is new,
        or fails for a new reason), not on every run that retries it."""
        news = await self._store.record_failures(tenant_id, held, now)
        for f in held:
            if (f.subscription_id, f.period_start) in news:
                metrics.BILLING_FAILURES.labels(reason=f.cause).inc()
                log.warning(
                    "billing_period_failed",
                    subscription_id=f.subscription_id,
                    period_start=f.period_start.isoformat(),
                    period_end=f.period_end.isoformat(),
                    cause=f.cause,
                    reason=f.reason,
                )

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
        product = await self._product(tenant_id, subscription.product_id)
        start, end, _ = period_containing(
            subscription.start_time,
            Interval[product.billing_interval],
            max(now, subscription.start_time),
        )
        if subscription.end_time is not None:
            end = min(end, subscription.end_time)
        return BillablePeriod(subscription, product, start, end)

    async def _product(self, tenant_id: str, product_id: str) -> ProductRecord:
        """A subscription's product, for a preview or current usage. What a
        ProductRecord holds never changes once created (only a product's credits
        do, and they are read apart), so a product found is remembered: the
        read on the request path is one PostgreSQL round trip shorter."""
        key = (tenant_id, product_id)
        product = self._products.get(key)
        if product is None:
            product = await self._store.get_product(tenant_id, product_id)
            if len(self._products) >= MAX_REMEMBERED_PRODUCTS:
                self._products.clear()
            self._products[key] = product
        return product

    async def preview(
        self, tenant_id: str, subscription_id: str, now: datetime
    ) -> tuple[SubscriptionRecord, InvoiceDraft]:
        if not subscription_id:
            raise InvalidArgument("subscription_id: required")
        subscription = await self._store.get_subscription(tenant_id, subscription_id)
        period = await self._current(tenant_id, subscription, now)
        drafts, _ = await self._price(tenant_id, [period], strict=True)
        return subscription, drafts[period.key]

    async def customer_usage(
        self, tenant_id: str, customer_id: str, now: datetime
    ) -> CustomerUsage:
        if not customer_id:
            raise InvalidArgument("customer_id: required")
        # Read while the customer is checked: one round trip's wait, not two.
        reading = asyncio.ensure_future(self._store.subscriptions(tenant_id, customer_id))
        try:
            await self._store.get_customer(tenant_id, customer_id)
        except BaseException:
            # No such customer (or not an id): its error is the answer; the
            # read ends on its own, its outcome unused.
            await asyncio.gather(reading, return_exceptions=True)
            raise
        active = [s for s in await reading if s.end_time is None or s.end_time > now]
        if not active:
            raise NotFound(f"customer_id: customer {customer_id!r} has no active subscription")
        period = await self._current(tenant_id, active[-1], now)
        drafts, _ = await self._price(tenant_id, [period], strict=True)
        draft = drafts[period.key]
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
        # An invoice of late-usage lines only (an empty period) is not
        # re-priced: once void, its lines wait for the next invoice again.
        if reissue and not invoice.replaced_by_id and invoice.period_end > invoice.period_start:
            subscription = await self._store.get_subscription(tenant_id, invoice.subscription_id)
            product = await self._store.get_product(tenant_id, subscription.product_id)
            period = BillablePeriod(subscription, product, invoice.period_start, invoice.period_end)
            drafts, _ = await self._price(tenant_id, [period], strict=True)
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
    transactions: dict[CustomerUsageKey, tuple[Decimal, ...]],
    uses: Mapping[tuple[str, datetime, str], Any],
) -> InvoiceDraft:
    """One period's draft. A usage line whose price draws credits prices
    the part billed beyond them (`uses`: CreditUse by subscription, period
    start and meter), not the usage read: that stays as read, for another
    subscription's line on the same meter and period."""
    customer = period.subscription.customer_external_id
    product = period.product
    lines: list[Usage] = []
    for price, name in prices:
        key = (price.meter_id, period.start, period.end, customer)
        use = uses.get((period.subscription.id, period.start, price.meter_id))
        if price.per_transaction:
            lines.append((price, name, transactions[key]))
        else:
            lines.append((price, name, use.billable if use is not None else usage[key]))
    return build_invoice(
        product.currency,
        product.fixed_price_minor,
        product.name,
        lines,
        period.start,
        period.end,
        # A period cut short by a cancellation pays its share of the fixed fee.
        period_share(
            period.subscription.start_time,
            Interval[product.billing_interval],
            period.start,
            period.end,
        ),
        commitments.effective(
            convert.commitment_from_json(product.commitment),
            convert.commitment_from_json(period.subscription.commitment),
        ),
    )


def _wanted(periods: Sequence[BillablePeriod]) -> dict[UsageKey, set[str]]:
    """The customers of each (meter, period) these periods price."""
    wanted: dict[UsageKey, set[str]] = defaultdict(set)
    for p in periods:
        customer = p.subscription.customer_external_id
        for price in p.product.usage_prices:
            if not price.get("transaction_key"):  # those are read per transaction
                wanted[(price["meter_id"], p.start, p.end)].add(customer)
    return wanted


def _with_late_lines(content: dict[str, Any], lines: list[dict[str, Any]]) -> dict[str, Any]:
    """A draft's content (JSON) with LATE_USAGE lines (JSON) after its own:
    the totals add their amounts (they are in the same currency: the same
    subscription's product)."""
    amount = sum(int(line["amount_minor"]) for line in lines)
    return content | {
        "lines": [*content["lines"], *lines],
        "subtotal_minor": content["subtotal_minor"] + amount,
        "total_minor": content["total_minor"] + amount,
    }


def _held(period: BillablePeriod, why: str, cause: str) -> PeriodFailure:
    return PeriodFailure(
        period.subscription.id,
        period.start,
        period.end,
        f"invoice held: {why}. The fixed fee and the other lines of this period are held "
        f"with it (an invoice without the line would underbill); the period is tried "
        f"again on every run",
        cause,
    )


def _meter_calls(periods: Sequence[BillablePeriod]) -> int:
    """About how many meter calls reading the usage of these periods (which
    share one start and end) takes: one per meter when enough customers share
    the period (see UsageReader), else one per price and customer; and one per
    customer for each price billed per transaction (read one by one)."""
    per_transaction = sum(
        1 for p in periods for price in p.product.usage_prices if price.get("transaction_key")
    )
    if len(periods) >= BULK_MIN_CUSTOMERS:
        meters = {
            price["meter_id"]
            for p in periods
            for price in p.product.usage_prices
            if not price.get("transaction_key")
        }
        return max(1, len(meters) + per_transaction)
    return max(1, sum(len(p.product.usage_prices) for p in periods))


def _batches(
    periods: Sequence[BillablePeriod], *, calls: int, size: int
) -> list[list[BillablePeriod]]:
    """Cuts `periods` (in period order) into batches of at most `size` periods
    that need about `calls` meter calls at most (a batch has at least one
    group), keeping the periods that share a start and end together where they
    fit, since one meter call can read them all."""
    batches: list[list[BillablePeriod]] = []
    batch: list[BillablePeriod] = []
    cost = 0
    for _, group in itertools.groupby(periods, key=lambda p: (p.end, p.start)):
        for piece in _chunks(list(group), size):
            piece_cost = _meter_calls(piece)
            if batch and (cost + piece_cost > calls or len(batch) + len(piece) > size):
                batches.append(batch)
                batch, cost = [], 0
            batch.extend(piece)
            cost += piece_cost
    if batch:
        batches.append(batch)
    return batches
