"""The billing cycle over more subscriptions than one page, against a real
PostgreSQL: pages of subscriptions in the bytewise order of the customers'
external ids, usage read as one forward pass over meter's pages per shared
period, every invoice exact and built once; a run out of budget goes on from
where it stopped; tenants' cycles run side by side in a scheduler tick."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.billing import invoicing as invoicing_module
from services.billing.invoicing import CycleReport, Invoicing
from services.billing.scheduler import Scheduler
from services.billing.usage import UsageReader
from tests.integration.billing.builders import DAY, invoices_of, per_unit, tenant_with
from tests.integration.billing.conftest import GRACE, Billing
from tests.unit.billing.fake_meters import FakeMeters

pytestmark = pytest.mark.integration

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
PAGE = 10  # subscriptions per page
USAGE_PAGE = 3  # customers per page of meter's answer

# Ids whose bytewise order is not a locale's: case, accents, digits, length.
CUSTOMERS = [
    *(f"cus_{i}" for i in range(30)),
    "B",
    "a",
    "Z9",
    "é",
    "e",
    "ß-1",
    "x" * 200,
]


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invoicing_module, "SUBSCRIPTION_PAGE", PAGE)


def _paged(billing: Billing, meters: FakeMeters, **kwargs: Any) -> Invoicing:
    reader = UsageReader(meters, page_customers=USAGE_PAGE)
    return Invoicing(billing.store, meters, GRACE, usage=reader, **kwargs)


async def _tenant(billing: Billing) -> tuple[Any, dict[str, int]]:
    """Two days ended and graced for every subscription; the first 12
    customers (and 5 customers with no subscription) have usage, some of it
    outside the periods; customers cus_3 and é have a second subscription
    (which may fall on the next page)."""
    start = NOW - 2 * D - 3 * H
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=start,
        now=NOW,
        customers=CUSTOMERS,
        fixed_price_minor=100,
        prices=[per_unit("calls", "1")],
    )
    for external in ("cus_3", "é"):
        sub = next(s for s in tenant.subscriptions if s.customer_external_id == external)
        tenant.subscriptions.append(
            await billing.catalog.create_subscription(
                tenant.id, sub.customer_id, tenant.product.id, start, NOW
            )
        )
    calls: dict[str, int] = {}
    for i, customer in enumerate(CUSTOMERS[:12] + [f"nobody-{k}" for k in range(5)]):
        billing.meters.add(tenant.id, "calls", customer, start + H, i + 1)  # day 1
        billing.meters.add(tenant.id, "calls", customer, start + D + H, 2 * i)  # day 2
        billing.meters.add(tenant.id, "calls", customer, start - H, 1000)  # before: not billed
        calls[customer] = i
    return tenant, calls


def _check(tenant: Any, invoices: list[Any], calls: dict[str, int]) -> None:
    subs = {s.id: s for s in tenant.subscriptions}
    assert len(invoices) == 2 * len(subs)
    assert len({(i.subscription_id, i.period_start) for i in invoices}) == len(invoices)
    assert {i.status for i in invoices} == {"FINALIZED"}
    numbers = sorted(int(i.number.removeprefix("INV-")) for i in invoices)
    assert numbers == list(range(1, len(invoices) + 1))
    first_day = min(i.period_start for i in invoices)
    for invoice in invoices:
        customer = subs[invoice.subscription_id].customer_external_id
        used = calls.get(customer)
        day2 = invoice.period_start > first_day
        usage = 0 if used is None else (2 * used if day2 else used + 1)
        assert invoice.total_minor == 100 + 100 * usage, (customer, invoice.period_start)


async def test_a_cycle_over_many_pages_bills_each_period_once_and_exactly(
    billing: Billing, small_pages: None
) -> None:
    tenant, calls = await _tenant(billing)
    meters = billing.meters
    invoicing = _paged(billing, meters)
    report = await invoicing.cycle(tenant.id, NOW, NOW)
    assert (report.failures, report.more_pending) == ([], False)
    invoices = await invoices_of(billing, tenant.id)
    _check(tenant, invoices, calls)
    assert sorted(report.invoice_ids) == sorted(i.id for i in invoices)
    # Each day's usage in one pass over meter's pages of 3 customers (17 with
    # usage: 6 pages, and the last may be empty; 4 a day for the 12 billed),
    # not a call per customer, nor the whole tenant again for every page of
    # subscriptions.
    assert meters.calls["consumed_page"] <= 2 * 7
    assert meters.calls["consumed"] == 0
    # Nothing is left; a second run builds nothing.
    assert await invoicing.cycle(tenant.id, NOW, NOW) == CycleReport([], [], False)
    assert len(await invoices_of(billing, tenant.id)) == len(invoices)


async def test_runs_out_of_budget_go_on_where_they_stopped(
    billing: Billing, small_pages: None
) -> None:
    tenant, calls = await _tenant(billing)
    budgeted = _paged(billing, billing.meters, run_budget=timedelta(0))
    runs: list[CycleReport] = []
    while True:
        runs.append(await budgeted.cycle(tenant.id, NOW, NOW))
        if not runs[-1].more_pending:
            break
        assert len(runs) < 50
    # A page a run: each run until the last page bills its page; then one
    # pass over the pages finds nothing left.
    pages = -(-len(tenant.subscriptions) // PAGE)
    assert all(run.invoice_ids for run in runs[:pages])
    assert len(runs) <= 2 * pages + 1
    invoices = await invoices_of(billing, tenant.id)
    _check(tenant, invoices, calls)
    every = [i for run in runs for i in run.invoice_ids]
    assert sorted(every) == sorted(i.id for i in invoices)  # each invoice in one run


async def test_concurrent_paged_runs_build_each_invoice_once(
    billing: Billing, small_pages: None
) -> None:
    tenant, calls = await _tenant(billing)
    slow = FakeMeters(delay=0.002)
    slow.names, slow.events = billing.meters.names, billing.meters.events
    replicas = [_paged(billing, slow) for _ in range(3)]
    await asyncio.gather(*(r.cycle(tenant.id, NOW, NOW) for r in replicas))
    _check(tenant, await invoices_of(billing, tenant.id), calls)


class Timed(Invoicing):
    """Invoicing that notes when each tenant's run ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.finished: dict[str, float] = {}
        self.reports: dict[str, CycleReport] = {}

    async def cycle(self, tenant_id: str, as_of: datetime, now: datetime, **kw: Any) -> CycleReport:
        report = await super().cycle(tenant_id, as_of, now, **kw)
        self.finished[tenant_id] = time.monotonic()
        self.reports[tenant_id] = report
        return report


async def test_a_tenant_of_many_pages_holds_up_another_for_one_budget_at_most(
    billing: Billing, small_pages: None
) -> None:
    """A tenant of many pages whose every run has a slow meter, and a small
    tenant: in each tick the big tenant's run stops at its budget (a page
    past it at most) and the small tenant is billed right after; over the
    ticks the big one is billed whole, each period once."""
    now = datetime.now(UTC)
    big = await tenant_with(
        billing,
        interval=DAY,
        start=now - 2 * D - 3 * H,
        now=now,
        customers=[f"big-{i:03d}" for i in range(60)],
        fixed_price_minor=100,
        prices=[per_unit("calls", "1")],
    )
    small = await tenant_with(
        billing, interval=DAY, start=now - D - 3 * H, now=now, fixed_price_minor=700
    )
    meters = FakeMeters(delay=0.05)  # every page of meter's answer takes 50 ms
    meters.names, meters.events = billing.meters.names, billing.meters.events
    for i in range(60):
        meters.add(big.id, "calls", f"big-{i:03d}", now - D - 2 * H, i)
    budget = timedelta(milliseconds=200)
    reader = UsageReader(meters, page_customers=USAGE_PAGE)
    invoicing = Timed(billing.store, meters, GRACE, usage=reader, run_budget=budget)
    scheduler = Scheduler(billing.store, invoicing, timedelta(minutes=1))
    ticks = 0
    while True:
        scheduler._turn = sorted([big.id, small.id]).index(big.id)  # the big one first
        started = time.monotonic()
        await scheduler.tick()
        ticks += 1
        if ticks == 1:
            big_took = invoicing.finished[big.id] - started
            small_done = invoicing.finished[small.id] - started
            print(
                f"\ntick 1: big tenant's run {big_took:.2f} s,"
                f" small tenant done at {small_done:.2f} s"
            )
            assert invoicing.reports[big.id].more_pending
            # Its budget, a page over it (a few meter calls of 50 ms) and slack for a busy machine.
            assert big_took <= budget.total_seconds() + 2.0
            [invoice] = await invoices_of(billing, small.id)
            assert (invoice.status, invoice.total_minor) == ("FINALIZED", 700)
        if not invoicing.reports[big.id].more_pending:
            break
        assert ticks < 60
    assert ticks > 2
    invoices = await invoices_of(billing, big.id)
    assert len(invoices) == 2 * 60
    assert len({(i.subscription_id, i.period_start) for i in invoices}) == 2 * 60
    assert {i.status for i in invoices} == {"FINALIZED"}
    assert sum(i.total_minor for i in invoices) == 120 * 100 + 100 * sum(range(60))


async def test_pages_of_usage_hold_a_bounded_share_of_the_customers(
    billing: Billing, small_pages: None
) -> None:
    """Spies on the reader's passes: per page of subscriptions it holds the
    values of at most that page's customers, plus at most one page of
    meter's answer ahead."""
    tenant, calls = await _tenant(billing)
    held: list[int] = []
    reader = UsageReader(billing.meters, page_customers=USAGE_PAGE)
    make = reader.streams

    def spying(tenant_id: str) -> Any:
        streams = make(tenant_id)
        prepare = streams.prepare

        async def spy(wanted: Any) -> None:
            await prepare(wanted)
            held.append(
                len(streams.values)
                + sum(len(s._ahead) + len(s._last) for s in streams._streams.values())
            )

        streams.prepare = spy  # type: ignore[method-assign]
        return streams

    reader.streams = spying  # type: ignore[method-assign]
    invoicing = Invoicing(billing.store, billing.meters, GRACE, usage=reader)
    await invoicing.cycle(tenant.id, NOW, NOW)
    _check(tenant, await invoices_of(billing, tenant.id), calls)
    assert len(held) >= len(tenant.subscriptions) // PAGE
    # Two days: each page's customers twice over (values and the last call's), and a page ahead.
    assert max(held) <= 2 * (2 * PAGE + USAGE_PAGE)
