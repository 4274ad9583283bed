"""Attacks on late usage (billing's LATE_USAGE lines) as a demanding billing
user: exact amounts through fixed fees, prorating, commitments, voids and
reissues in several orders, ended subscriptions, and a period that cannot be
re-priced. Billing runs with a backdating window of two days."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.billing import invoicing as invoicing_module
from services.billing.invoicing import Invoicing
from services.billing.store import InvoiceRecord
from services.billing.usage import UsageReader
from tests.integration.billing.builders import DAY, graduated, invoices_of, per_unit, tenant_with
from tests.integration.billing.conftest import GRACE, Billing
from usagebilling.billing.v1 import product_pb2

pytestmark = pytest.mark.integration

MAY1 = datetime(2024, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
WINDOW = 2 * D
# 1.00 a call up to 10, then 0.50.
TIERS = graduated("calls", ("10", "1"), ("", "0.5"))


def _invoicing(billing: Billing, catchup: int = 12) -> Invoicing:
    return Invoicing(
        billing.store, billing.meters, GRACE, backdate_window=WINDOW, catchup_periods=catchup
    )


def _live(invoices: list[InvoiceRecord]) -> list[InvoiceRecord]:
    return [i for i in invoices if i.status != "VOID"]


def _late_lines(invoices: list[InvoiceRecord]) -> list[tuple[str, dict[str, Any]]]:
    return [(i.id, line) for i in invoices for line in i.lines if line["kind"] == "late_usage"]


def _consistent(invoice: InvoiceRecord) -> None:
    """An invoice's total is the sum of its lines."""
    assert invoice.total_minor == sum(int(line["amount_minor"]) for line in invoice.lines)


def _gapless(invoices: list[InvoiceRecord]) -> None:
    numbers = sorted(i.number for i in invoices if i.number)
    assert numbers == [f"INV-{n:06d}" for n in range(1, len(numbers) + 1)]


async def test_prorated_last_period_with_a_fixed_fee_bills_only_the_late_usage(
    billing: Billing,
) -> None:
    """10.00 a day and 1.00 a call; canceled at May 2 12:00, so May 2 is half
    a day (5.00 fee) with 3 calls: 8.00. 4 calls of May 2 come late: the
    ended subscription's own invoice bills 4.00, not the fee again."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        prices=[per_unit("calls", "1")],
        fixed_price_minor=1000,
    )
    t, sub = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + D + H, 3)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)  # May 1: 10.00
    await cycle.cancel(t, sub, immediately=True, now=MAY1 + D + 12 * H)
    at = MAY1 + D + 14 * H
    await cycle.run_cycle(t, at, at)
    may2 = next(i for i in await invoices_of(billing, t) if i.period_start == MAY1 + D)
    assert (may2.status, may2.period_end, may2.total_minor) == ("FINALIZED", MAY1 + D + 12 * H, 800)
    billing.meters.add(t, "calls", "c1", MAY1 + D + 5 * H, 4)  # late
    at = MAY1 + 4 * D + 2 * H
    issued = await cycle.run_cycle(t, at, at)
    assert len(issued) == 1
    own = await billing.store.get_invoice(t, issued[0])
    assert [(line["kind"], line["amount_minor"]) for line in own.lines] == [("late_usage", 400)]
    _consistent(own)
    assert own.lines[0]["late_usage"]["billed_total_minor"] == 800
    assert own.lines[0]["late_usage"]["repriced_total_minor"] == 1200
    assert await cycle.run_cycle(t, at + D, at + D) == []
    _gapless(await invoices_of(billing, t))


async def test_late_usage_that_fills_a_minimum_spend_bills_only_beyond_it(
    billing: Billing,
) -> None:
    """Minimum spend 10.00: May 1 billed 8 calls + 2.00 minimum = 10.00. Six
    calls come late (14: 12.00): the late line is 2.00, not 4.00. It goes on
    May 2 (no usage: 10.00 minimum), outside May 2's own commitment."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    # The product has no commitment: give the subscription one.
    await billing.store.pool.execute(
        "UPDATE billing.subscriptions SET commitment = $2 WHERE id = $1",
        tenant.subscriptions[0].id,
        {"minimum_spend_minor": 1000, "maximum_spend_minor": 0},
    )
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    first = await billing.store.get_invoice(t, may1)
    assert first.total_minor == 1000, first.lines
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, line),) = _late_lines(await invoices_of(billing, t))
    assert line["amount_minor"] == 200
    may2 = await billing.store.get_invoice(t, carrier)
    assert may2.period_start == MAY1 + D
    assert [(x["kind"], x["amount_minor"]) for x in may2.lines] == [
        ("usage", 0),
        ("minimum_spend", 1000),
        ("late_usage", 200),
    ]
    assert may2.total_minor == 1200
    _consistent(may2)


async def test_a_canceled_subscription_with_late_usage_in_two_periods(billing: Billing) -> None:
    """Canceled at the end of May 2: May 1 gets 2 late calls, May 2 gets 3.
    Its own invoices bill exactly 2.00 and 3.00 in all, once."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[per_unit("calls", "1")]
    )
    t, sub = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 5)
    billing.meters.add(t, "calls", "c1", MAY1 + D + H, 5)
    await cycle.cancel(t, sub, immediately=False, now=MAY1 + D + H)
    at = MAY1 + 2 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 3 * H, 2)
    billing.meters.add(t, "calls", "c1", MAY1 + D + 3 * H, 3)
    for n in range(4):
        at = MAY1 + (3 + n) * D + 2 * H
        await cycle.run_cycle(t, at, at)
    invoices = await invoices_of(billing, t)
    assert sorted(line["amount_minor"] for _, line in _late_lines(invoices)) == [200, 300]
    for i in invoices:
        _consistent(i)
    _gapless(invoices)
    assert sum(i.total_minor for i in _live(invoices)) == 1500


async def test_reissue_the_period_then_reissue_its_carrier_bills_the_period_once(
    billing: Billing,
) -> None:
    """May 1 billed 8.00; 6 calls late: +4.00 on May 3 (the carrier). May 1 is
    voided and reissued (12.00, 4.00 taken back), then the carrier is voided
    and reissued: it carries the 4.00 again. May 1 costs 12.00 in all."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, _),) = _late_lines(await invoices_of(billing, t))
    r1 = await cycle.void(t, may1, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)
    c2 = await cycle.void(t, carrier, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)
    r2 = await cycle.void(t, r1.replaced_by_id, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)
    invoices = await invoices_of(billing, t)
    live = _live(invoices)
    for i in invoices:
        _consistent(i)
    _gapless(invoices)
    may1_live = [i for i in live if i.period_start == MAY1]
    assert [i.id for i in may1_live] == [r2.replaced_by_id]
    carried = [(i, line["amount_minor"]) for i, line in _late_lines(live)]
    # The carrier's reissue carries 4.00; the May 1 reissue takes it back.
    assert sorted(carried) == sorted([(c2.replaced_by_id, 400), (r2.replaced_by_id, -400)])
    assert may1_live[0].total_minor + 400 == 1200


@pytest.mark.parametrize("catchup", [12, 1])
async def test_a_period_that_cannot_be_re_priced_does_not_block_later_periods(
    billing: Billing, catchup: int
) -> None:
    """One catch-up period per run. May 1's late usage makes it unpriceable
    (beyond int64): it is checked with no line. May 2's 6 late calls
    (+6.00) must still be billed, however many runs pass."""
    cycle = _invoicing(billing, catchup=catchup)
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[per_unit("calls", "1")]
    )
    t, sub = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 1)
    billing.meters.add(t, "calls", "c1", MAY1 + D + H, 1)
    for n in range(2):
        at = MAY1 + (n + 1) * D + 2 * H
        await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 3 * H, 10**18)  # 10^20 cents
    billing.meters.add(t, "calls", "c1", MAY1 + D + 3 * H, 6)
    for n in range(6):
        at = MAY1 + (3 + n) * D + 2 * H
        await cycle.run_cycle(t, at, at)
    checks = await billing.store.late_checks(t, sub)
    # Checked with no line (logged as late_usage_unpriceable), not retried.
    assert [(c["period_start"], c["line"]) for c in checks[:1]] == [(MAY1, None)]
    lines = [line["amount_minor"] for _, line in _late_lines(await invoices_of(billing, t))]
    assert lines == [600]


async def test_voided_late_only_invoice_is_issued_again_in_a_run_at_the_same_instant(
    billing: Billing,
) -> None:
    """An ended subscription's invoice of late usage only is voided (its line
    waits again); a cycle at the same instant issues it again, once."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[per_unit("calls", "1")]
    )
    t, sub = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 5)
    await cycle.cancel(t, sub, immediately=False, now=MAY1 + H)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 3 * H, 2)
    at = MAY1 + 3 * D + 2 * H
    (own,) = await cycle.run_cycle(t, at, at)
    await cycle.void(t, own, reissue=True, now=at)
    (again,) = await cycle.run_cycle(t, at, at)
    assert again != own
    invoices = await invoices_of(billing, t)
    assert [line["amount_minor"] for _, line in _late_lines(_live(invoices))] == [200]
    _gapless(invoices)


async def test_late_usage_going_down_past_zero_on_an_ended_subscription(
    billing: Billing,
) -> None:
    """Canceled after May 1 (12 calls, 11.00 by tiers); a late correction of
    -12 calls: the ended subscription's own invoice credits 11.00 exactly."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t, sub = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 12)
    await cycle.cancel(t, sub, immediately=False, now=MAY1 + H)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 3 * H, -12)
    at = MAY1 + 3 * D + 2 * H
    (own,) = await cycle.run_cycle(t, at, at)
    invoice = await billing.store.get_invoice(t, own)
    assert invoice.total_minor == -1100
    _consistent(invoice)
    assert invoice.lines[0]["description"].endswith(": calls-meter 12 → 0")


@pytest.mark.parametrize("other_days", [4, 2])
async def test_a_reissue_finalized_while_the_period_is_re_priced_is_not_billed_twice(
    billing: Billing, other_days: int
) -> None:
    """The scheduler (as of May 5) re-prices May 1 (8.00 billed, 14 calls
    now). While it reads May 1's usage, the invoice is voided and reissued
    and a second cycle finalizes the reissue (12.00, the whole period): one
    as of the same instant (May 5 02:00), or an operator's RunBillingCycle as
    of May 3 02:00, before May 1's window closed. The scheduler then records its check against
    the void invoice: its +4.00 must not be billed on top of the 12.00."""
    cycle, other = _invoicing(billing), _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    at = MAY1 + 4 * D + 2 * H
    fired: list[str] = []
    consumed = billing.meters.consumed

    async def meanwhile(
        tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> Any:
        value = await consumed(tenant_id, meter_id, customer, start, end)
        if not fired and start == MAY1 and end == MAY1 + D:
            fired.append("void")
            voided = await other.void(t, may1, reissue=True, now=at)
            fired.append(voided.replaced_by_id)
            await other.run_cycle(t, MAY1 + other_days * D + 2 * H, at)  # finalizes it
        return value

    billing.meters.consumed = meanwhile  # type: ignore[method-assign]
    await cycle.run_cycle(t, at, at)
    billing.meters.consumed = consumed  # type: ignore[method-assign]
    assert len(fired) == 2
    reissued = await billing.store.get_invoice(t, fired[1])
    assert (reissued.status, reissued.total_minor) == ("FINALIZED", 1200)
    for _ in range(2):
        at += D
        await cycle.run_cycle(t, at, at)
    live = _live(await invoices_of(billing, t))
    may1_late = [
        line["amount_minor"]
        for _, line in _late_lines(live)
        if line["late_usage"]["period_start"] == MAY1.isoformat()
    ]
    assert sum(may1_late) == 0, may1_late


async def _commit(billing: Billing, subscription_id: str, minimum: int, maximum: int) -> None:
    await billing.store.pool.execute(
        "UPDATE billing.subscriptions SET commitment = $2 WHERE id = $1",
        subscription_id,
        {"minimum_spend_minor": minimum, "maximum_spend_minor": maximum},
    )


async def test_late_usage_that_passes_a_maximum_spend_bills_up_to_it(billing: Billing) -> None:
    """Maximum spend 10.00 at 1.00 a call: May 1 billed 8.00; 6 late calls
    (14.00, capped at 10.00): the late line is 2.00."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[per_unit("calls", "1")]
    )
    t = tenant.id
    await _commit(billing, tenant.subscriptions[0].id, 0, 1000)
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, line),) = _late_lines(await invoices_of(billing, t))
    assert line["amount_minor"] == 200
    assert line["late_usage"]["repriced_total_minor"] == 1000
    _consistent(await billing.store.get_invoice(t, carrier))


async def test_two_meters_one_up_one_down_bill_the_net_difference(billing: Billing) -> None:
    """calls at 1.00 and gb at 2.00: May 1 billed 8 calls and 5 gb (18.00);
    late, 6 more calls and a -2 gb correction (14 + 6 = 20.00): +2.00, both
    meters named."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        prices=[per_unit("calls", "1"), per_unit("gb", "2")],
        meters=("calls", "gb"),
    )
    t = tenant.id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    billing.meters.add(t, "gb", "c1", MAY1 + H, 5)
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    assert (await billing.store.get_invoice(t, may1)).total_minor == 1800
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    billing.meters.add(t, "gb", "c1", MAY1 + 5 * H, -2)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((_, line),) = _late_lines(await invoices_of(billing, t))
    assert line["amount_minor"] == 200
    assert line["description"].endswith(": calls-meter 8 → 14; gb-meter 5 → 3")


async def test_two_subscriptions_of_one_customer_each_bill_their_late_usage_once(
    billing: Billing,
) -> None:
    """One customer, two subscriptions of the product (each prices the
    customer's calls): 6 late calls of May 1 are +4.00 on each, once."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    first = tenant.subscriptions[0]
    second = await billing.catalog.create_subscription(
        t, first.customer_id, tenant.product.id, MAY1, MAY1
    )
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    for n in range(3):
        at = MAY1 + (3 + n) * D + 2 * H
        await cycle.run_cycle(t, at, at)
    invoices = await invoices_of(billing, t)
    found = sorted(
        (i.subscription_id, line["amount_minor"])
        for i in invoices
        for line in i.lines
        if line["kind"] == "late_usage"
    )
    assert found == sorted([(first.id, 400), (second.id, 400)])
    _gapless(invoices)


async def test_a_product_without_usage_prices_records_its_periods_checked(
    billing: Billing,
) -> None:
    """A fixed fee only (10.00 a day): nothing is ever late; each period is
    checked once and no line appears."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, fixed_price_minor=1000)
    t, sub = tenant.id, tenant.subscriptions[0].id
    for n in range(5):
        at = MAY1 + (n + 1) * D + 2 * H
        await cycle.run_cycle(t, at, at)
    checks = await billing.store.late_checks(t, sub)
    assert [(c["period_start"], c["line"]) for c in checks] == [
        (MAY1 + n * D, None) for n in range(3)
    ]
    invoices = await invoices_of(billing, t)
    assert _late_lines(invoices) == []
    assert all(i.total_minor == 1000 for i in invoices if i.status == "FINALIZED")


async def test_an_ended_subscriptions_carrier_voided_without_reissue_bills_it_on_its_own(
    billing: Billing,
) -> None:
    """Canceled at the end of May 2. May 1's late 2.00 goes on May 2's
    invoice; May 2 is voided without a reissue: the 2.00 waits again, and
    with no invoice left to finalize it gets an invoice of its own, once."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[per_unit("calls", "1")]
    )
    t, sub = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 5)
    await cycle.cancel(t, sub, immediately=False, now=MAY1 + D + H)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)  # May 1
    billing.meters.add(t, "calls", "c1", MAY1 + 3 * H, 2)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)  # May 2, carrying May 1's 2.00
    ((carrier, _),) = _late_lines(await invoices_of(billing, t))
    assert (await billing.store.get_invoice(t, carrier)).period_start == MAY1 + D
    await cycle.void(t, carrier, reissue=False, now=at)
    at += D
    (own,) = await cycle.run_cycle(t, at, at)
    assert await cycle.run_cycle(t, at + D, at + D) == []
    invoices = await invoices_of(billing, t)
    assert [(i, x["amount_minor"]) for i, x in _late_lines(_live(invoices))] == [(own, 200)]
    _gapless(invoices)


async def test_two_cycles_at_once_issue_an_ended_subscriptions_late_invoice_once(
    billing: Billing,
) -> None:
    cycle, other = _invoicing(billing), _invoicing(billing)
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        prices=[per_unit("calls", "1")],
        customers=["c1", "c2"],
    )
    t = tenant.id
    for s in tenant.subscriptions:
        await cycle.cancel(t, s.id, immediately=False, now=MAY1 + H)
    billing.meters.add(t, "calls", "c1", MAY1 + H, 5)
    billing.meters.add(t, "calls", "c2", MAY1 + H, 5)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 3 * H, 2)
    billing.meters.add(t, "calls", "c2", MAY1 + 3 * H, 3)
    at = MAY1 + 3 * D + 2 * H
    await asyncio.gather(cycle.run_cycle(t, at, at), other.run_cycle(t, at, at))
    await asyncio.gather(cycle.run_cycle(t, at, at), other.run_cycle(t, at, at))
    invoices = await invoices_of(billing, t)
    assert sorted(x["amount_minor"] for _, x in _late_lines(invoices)) == [200, 300]
    assert len(invoices) == 4
    _gapless(invoices)


async def test_a_run_resumed_after_the_window_closed_reads_the_usage_again(
    billing: Billing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty customers, ten subscriptions a page, a run budget of zero (a page
    a run). The run as of May 2 02:00 finalizes May 1 for the first page; its
    pass over meter's pages has read c10's May 1 usage ahead (5 calls). Three
    more calls of c10's May 1 arrive. The next run, as of May 4 02:00 (May 1's
    window closed), resumes on the second page: c10's May 1 must bill 8 calls
    in all (on its invoice or as late usage), not 5."""
    monkeypatch.setattr(invoicing_module, "SUBSCRIPTION_PAGE", 10)
    reader = UsageReader(billing.meters, page_customers=3)
    cycle = Invoicing(
        billing.store,
        billing.meters,
        GRACE,
        usage=reader,
        run_budget=timedelta(0),
        backdate_window=WINDOW,
    )
    customers = [f"c{i:02}" for i in range(20)]
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=MAY1,
        now=MAY1,
        prices=[per_unit("calls", "1")],
        customers=customers,
    )
    t = tenant.id
    for c in customers:
        billing.meters.add(t, "calls", c, MAY1 + H, 5)
    at = MAY1 + D + 2 * H
    report = await cycle.cycle(t, at, at)
    assert report.more_pending
    billing.meters.add(t, "calls", "c10", MAY1 + 3 * H, 3)
    at = MAY1 + 3 * D + 2 * H
    for _ in range(10):
        if not (await cycle.cycle(t, at, at)).more_pending:
            break
    for _ in range(3):
        at += D
        await cycle.run_cycle(t, at, at)
    c10 = next(s.id for s in tenant.subscriptions if s.customer_external_id == "c10")
    mine = [i for i in _live(await invoices_of(billing, t)) if i.subscription_id == c10]
    assert sum(i.total_minor for i in mine) == 800, [(i.period_start, i.lines) for i in mine]


async def test_late_transactions_of_a_percentage_price_are_priced_per_transaction(
    billing: Billing,
) -> None:
    """2.9 % + 0.30 a payment, at least 0.50. May 1 billed payment p1 of 100
    (3.20). Late: p1 captured again for 100 (one payment of 200: 6.10) and a
    payment p2 of 5 (0.50): 6.60, so the late line is 3.40."""
    cycle = _invoicing(billing)
    t = await billing.accounts.create_tenant("t")
    billing.meters.add_meter(t, "payments", "payments", group_by=("payment_id",))
    fees = product_pb2.UsagePrice(
        meter_id="payments",
        model=product_pb2.PRICE_MODEL_PERCENTAGE,
        rate="2.9",
        fixed_fee="0.30",
        min_fee="0.50",
        transaction_key="payment_id",
    )
    product = await billing.catalog.create_product(
        t,
        product_pb2.CreateProductRequest(
            name="Pay", currency="USD", billing_interval=DAY, usage_prices=[fees]
        ),
    )
    customer = await billing.accounts.create_customer(t, "c1", "", "")
    await billing.catalog.create_subscription(t, customer.id, product.id, MAY1, MAY1)

    def pay(payment: str, amount: str) -> None:
        billing.meters.add(t, "payments", "c1", MAY1 + H, amount, {"payment_id": payment})

    pay("p1", "100")
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    assert (await billing.store.get_invoice(t, may1)).total_minor == 320
    pay("p1", "100")
    pay("p2", "5")
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, line),) = _late_lines(await invoices_of(billing, t))
    assert line["amount_minor"] == 340
    assert line["late_usage"]["repriced_total_minor"] == 660
    _consistent(await billing.store.get_invoice(t, carrier))


async def test_every_late_line_keeps_the_protos_amount_contract(billing: Billing) -> None:
    """invoice.proto: a LATE_USAGE line's amount_minor is repriced_total_minor
    - billed_total_minor, and the negation of it on the line a reissue of the
    period takes it back with (its description says "taken back")."""
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    await cycle.void(t, may1, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)
    lines = [line for _, line in _late_lines(_live(await invoices_of(billing, t)))]
    assert sorted(line["amount_minor"] for line in lines) == [-400, 400]
    for line in lines:
        late = line["late_usage"]
        sign = -1 if "taken back" in line["description"] else 1
        difference = late["repriced_total_minor"] - late["billed_total_minor"]
        assert line["amount_minor"] == sign * difference
    assert sum("taken back" in line["description"] for line in lines) == 1
