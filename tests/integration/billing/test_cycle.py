"""The billing cycle against a real PostgreSQL: each ended period built once,
finalized after the grace period with late usage included, never changed after;
idempotent under repetition and under concurrent runs (two replicas)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.billing.scheduler import Scheduler
from services.common import db
from services.common.errors import InvalidArgument
from tests.integration.billing.builders import DAY, invoices_of, per_unit, tenant_with
from tests.integration.billing.conftest import Billing, wire
from tests.unit.billing.fake_meters import FakeMeters

pytestmark = pytest.mark.integration

MAY1 = datetime(2024, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


async def test_each_ended_period_is_built_once_and_finalized_after_the_grace(
    billing: Billing,
) -> None:
    # 10.00 a day, plus 0.50 a call beyond 2 free calls a day.
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        fixed_price_minor=1000,
        prices=[per_unit("calls", "0.5", free="2")],
    )
    t = tenant.id
    for minute in range(5):  # May 1: 5 calls -> 3 billable -> 1.50
        billing.meters.add(t, "calls", "c1", MAY1 + timedelta(hours=20, minutes=minute))
    billing.meters.add(t, "calls", "c1", MAY1 + D + 2 * H)  # May 2: 1 call, free

    # May 3 00:30: May 1 ended 24.5 h ago (grace passed), May 2 30 min ago (not yet).
    at = MAY1 + 2 * D + 30 * timedelta(minutes=1)
    ids = await billing.invoicing.run_cycle(t, at, at)
    may1, may2 = await invoices_of(billing, t)
    assert set(ids) == {may1.id, may2.id}
    assert (may1.period_start, may1.period_end) == (MAY1, MAY1 + D)
    assert (may1.status, may1.number, may1.total_minor) == ("FINALIZED", "INV-000001", 1150)
    assert [line["amount_minor"] for line in may1.lines] == [1000, 150]
    assert may1.lines[1]["description"] == ("calls-meter: 5 consumed, 2 free, 3 billable × 0.5")
    assert (may2.status, may2.number, may2.total_minor) == ("DRAFT", "", 1000)

    # A late May 2 event, inside the grace: it counts (4 calls -> 2 billable -> 1.00).
    for second in range(3):
        billing.meters.add(t, "calls", "c1", MAY1 + 2 * D - timedelta(seconds=1 + second))
    at = MAY1 + 2 * D + H
    assert await billing.invoicing.run_cycle(t, at, at) == [may2.id]
    may2 = await billing.store.get_invoice(t, may2.id)
    assert (may2.status, may2.number, may2.total_minor) == ("FINALIZED", "INV-000002", 1100)
    assert may2.finalized_at == at

    # An event for May 1 after it was finalized: the invoice does not change.
    billing.meters.add(t, "calls", "c1", MAY1 + 23 * H)
    later = MAY1 + 2 * D + 2 * H
    assert await billing.invoicing.run_cycle(t, later, later) == []
    assert await billing.store.get_invoice(t, may1.id) == may1
    assert await invoices_of(billing, t) == [may1, may2]


async def test_as_of_must_not_be_in_the_future_and_a_period_that_ends_later_is_not_built(
    billing: Billing,
) -> None:
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, fixed_price_minor=1)
    now = MAY1 + D - timedelta(seconds=3)
    with pytest.raises(InvalidArgument, match=r"^as_of: must not be in the future"):
        await billing.invoicing.run_cycle(tenant.id, now + timedelta(seconds=6), now)
    # Within the clock skew allowed, as_of is taken as now: May 1 has not ended.
    assert await billing.invoicing.run_cycle(tenant.id, MAY1 + D, now) == []
    assert await invoices_of(billing, tenant.id) == []


async def test_concurrent_runs_build_one_invoice_per_period_with_gapless_numbers(
    database_url: str, billing: Billing
) -> None:
    """Six runs at once, through three pools, as three replicas answering
    RunBillingCycle and their schedulers would."""
    customers = [f"c{i:02d}" for i in range(30)]
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        customers=customers,
        fixed_price_minor=100,
        prices=[per_unit("calls", "1")],
    )
    for i, customer in enumerate(customers):
        for day in range(3):
            billing.meters.add(tenant.id, "calls", customer, MAY1 + day * D + H, i)
    meters = FakeMeters(delay=0.005)  # the same usage, answered slowly enough to overlap
    meters.names, meters.events = billing.meters.names, billing.meters.events
    pools = [await db.create_pool(database_url, min_size=1, max_size=4) for _ in range(3)]
    try:
        replicas = [wire(pool, meters) for pool in pools]
        at = MAY1 + 3 * D + 2 * H  # three days ended and graced
        answers = await asyncio.gather(
            *(r.invoicing.run_cycle(tenant.id, at, at) for r in replicas * 2)
        )
    finally:
        for pool in pools:
            await pool.close()

    invoices = await invoices_of(billing, tenant.id)
    assert len(invoices) == 90  # 30 subscriptions × 3 days
    assert len({(i.subscription_id, i.period_start) for i in invoices}) == 90
    assert {i.status for i in invoices} == {"FINALIZED"}
    assert sorted(i.number for i in invoices) == [f"INV-{n:06d}" for n in range(1, 91)]
    # Numbers follow the periods: all of May 1 before any of May 2.
    by_number = sorted(invoices, key=lambda i: i.number)
    assert [i.period_start for i in by_number] == sorted(i.period_start for i in invoices)
    assert set().union(*map(set, answers)) == {i.id for i in invoices}
    for invoice in invoices:
        owner = next(s for s in tenant.subscriptions if s.id == invoice.subscription_id)
        assert invoice.total_minor == 100 + 100 * customers.index(owner.customer_external_id)
    # And nothing is left to do.
    assert await billing.invoicing.run_cycle(tenant.id, at, at) == []


async def test_two_scheduler_replicas_take_turns(database_url: str, billing: Billing) -> None:
    now = datetime.now(UTC)
    start = now - 3 * D - 2 * H
    tenant = await tenant_with(
        billing, interval=DAY, start=start, now=now, customers=["a", "b"], fixed_price_minor=500
    )
    slow = FakeMeters(delay=0.2)  # the first tick is still running when the second starts
    slow.names = billing.meters.names
    pools = [await db.create_pool(database_url, min_size=1, max_size=4) for _ in range(2)]
    try:
        schedulers = []
        for pool in pools:
            replica = wire(pool, slow)
            schedulers.append(Scheduler(replica.store, replica.invoicing, timedelta(minutes=1)))
        ticks = await asyncio.gather(*(s.tick() for s in schedulers))
        # One held the lock and built and finalized 2 × 3 invoices; the other skipped.
        assert sorted(ticks) == [0, 6]
        assert [await s.tick() for s in schedulers] == [0, 0]
    finally:
        for pool in pools:
            await pool.close()
    invoices = await invoices_of(billing, tenant.id)
    assert [i.number for i in sorted(invoices, key=lambda i: i.number)] == [
        f"INV-{n:06d}" for n in range(1, 7)
    ]


async def test_a_period_that_cannot_be_priced_does_not_hold_up_the_others(
    billing: Billing,
) -> None:
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        customers=["ok", "huge"],
        prices=[per_unit("calls", "1000000")],
    )
    billing.meters.add(tenant.id, "calls", "ok", MAY1 + H, 2)
    billing.meters.add(tenant.id, "calls", "huge", MAY1 + H, "1e20")  # beyond int64 minor units
    at = MAY1 + D + 2 * H
    assert len(await billing.invoicing.run_cycle(tenant.id, at, at)) == 1
    (invoice,) = await invoices_of(billing, tenant.id)
    assert (invoice.total_minor, invoice.status) == (200_000_000, "FINALIZED")
