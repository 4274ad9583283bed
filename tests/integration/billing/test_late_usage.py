"""Late usage: a finalized period whose backdating window has closed is
re-priced once and the difference billed on the next invoice (or, for an
ended subscription, on an invoice of its own), against a real PostgreSQL.
Billing runs with a backdating window of two days (ingest's is its own)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.billing import convert
from services.billing.invoicing import Invoicing
from services.billing.open_periods import oldest_open_period
from services.billing.store import InvoiceRecord
from tests.integration.billing.builders import DAY, graduated, invoices_of, tenant_with
from tests.integration.billing.conftest import GRACE, Billing
from usagebilling.billing.v1 import invoice_pb2

pytestmark = pytest.mark.integration

MAY1 = datetime(2024, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
WINDOW = 2 * D
# 1.00 a call up to 10, then 0.50.
TIERS = graduated("calls", ("10", "1"), ("", "0.5"))


def _invoicing(billing: Billing) -> Invoicing:
    return Invoicing(billing.store, billing.meters, GRACE, backdate_window=WINDOW)


def _day(invoices: list[InvoiceRecord], start: datetime) -> InvoiceRecord:
    (found,) = [i for i in invoices if i.period_start == start and i.status != "VOID"]
    return found


def _late_lines(invoices: list[InvoiceRecord]) -> list[tuple[str, dict[str, Any]]]:
    return [(i.id, line) for i in invoices for line in i.lines if line["kind"] == "late_usage"]


async def _may1_billed_8_calls(billing: Billing, cycle: Invoicing) -> tuple[str, str, str]:
    """A tenant whose May 1 invoice billed 8 calls (8.00) and whose customer
    then sent 6 more calls of May 1: (tenant, subscription, May 1 invoice id)."""
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    (may1,) = await cycle.run_cycle(t, at, at)
    assert (await billing.store.get_invoice(t, may1)).total_minor == 800
    billing.meters.add(t, "calls", "c1", MAY1 + 5 * H, 6)  # late: May 1 is finalized
    return t, tenant.subscriptions[0].id, may1


async def test_late_usage_is_billed_once_on_the_next_invoice_priced_by_its_tiers(
    billing: Billing,
) -> None:
    cycle = _invoicing(billing)
    t, subscription_id, may1 = await _may1_billed_8_calls(billing, cycle)
    billing.meters.add(t, "calls", "c1", MAY1 + D + H, 1)  # May 2
    billing.meters.add(t, "calls", "c1", MAY1 + 2 * D + H, 2)  # May 3

    # May 3 02:00: May 2 is finalized; May 1's window (until May 4 01:00) is
    # still open, so it is not re-priced yet.
    at = MAY1 + 2 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    invoices = await invoices_of(billing, t)
    assert _day(invoices, MAY1 + D).lines[-1]["kind"] == "usage"
    assert _late_lines(invoices) == []
    assert await billing.store.late_checks(t, subscription_id) == []

    # May 4 02:00: May 1 is re-priced (14 calls: 10 × 1.00 + 4 × 0.50 = 12.00,
    # against 8.00 billed) and the 4.00 goes on May 3's invoice, finalized now.
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    invoices = await invoices_of(billing, t)
    may3 = _day(invoices, MAY1 + 2 * D)
    assert may3.status == "FINALIZED"
    usage, late = may3.lines
    assert (usage["amount_minor"], late["amount_minor"]) == (200, 400)  # not 6 × 0.50 or 6 × 1
    assert (may3.subtotal_minor, may3.total_minor) == (600, 600)
    first = await billing.store.get_invoice(t, may1)
    assert (first.status, first.total_minor) == ("FINALIZED", 800)  # never changed
    assert late["description"] == (
        f"Late usage, 2024-05-01 to 2024-05-02 (invoice {first.number}): calls-meter 8 → 14"
    )
    wire = convert.proto_invoice(may3).lines[1]
    assert wire.kind == invoice_pb2.INVOICE_LINE_KIND_LATE_USAGE
    assert wire.late_usage.period_start.ToDatetime(tzinfo=UTC) == MAY1
    assert wire.late_usage.period_end.ToDatetime(tzinfo=UTC) == MAY1 + D
    assert (wire.late_usage.invoice_id, wire.late_usage.invoice_number) == (may1, first.number)
    assert (wire.late_usage.billed_total_minor, wire.late_usage.repriced_total_minor) == (
        800,
        1200,
    )
    assert [(m.meter_id, m.billed_quantity, m.quantity) for m in wire.late_usage.meters] == [
        ("calls", "8", "14")
    ]
    (check,) = await billing.store.late_checks(t, subscription_id)
    assert (check["period_start"], str(check["billed_on_invoice_id"])) == (MAY1, may3.id)

    # Again at the same time, and a day later: billed once. May 2 had nothing
    # late: it is recorded checked, with no line.
    await cycle.run_cycle(t, at, at)
    at += D
    await cycle.run_cycle(t, at, at)
    invoices = await invoices_of(billing, t)
    assert [(i, line["amount_minor"]) for i, line in _late_lines(invoices)] == [(may3.id, 400)]
    checks = await billing.store.late_checks(t, subscription_id)
    assert [(c["period_start"], c["line"], c["billed_on_invoice_id"]) for c in checks[1:]] == [
        (MAY1 + D, None, None)
    ]
    assert _day(invoices, MAY1 + 3 * D).lines[-1]["kind"] == "usage"

    # May 3 is compared on its own usage, not the late line it carried.
    at += D
    await cycle.run_cycle(t, at, at)
    checks = await billing.store.late_checks(t, subscription_id)
    assert [(c["period_start"], c["line"]) for c in checks[2:]] == [(MAY1 + 2 * D, None)]
    assert len(_late_lines(await invoices_of(billing, t))) == 1


async def test_nothing_late_records_the_check_and_bills_nothing(billing: Billing) -> None:
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t, subscription_id = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 12)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)  # May 1 to 3 built and finalized
    at += D
    await cycle.run_cycle(t, at, at)  # May 1's and May 2's windows have closed
    checks = await billing.store.late_checks(t, subscription_id)
    invoices = await invoices_of(billing, t)
    assert [(c["period_start"], str(c["invoice_id"]), c["line"]) for c in checks] == [
        (MAY1, _day(invoices, MAY1).id, None),
        (MAY1 + D, _day(invoices, MAY1 + D).id, None),
    ]
    assert _late_lines(await invoices_of(billing, t)) == []


async def test_two_cycles_at_once_bill_the_late_usage_once(billing: Billing) -> None:
    first, second = _invoicing(billing), _invoicing(billing)
    t, subscription_id, _ = await _may1_billed_8_calls(billing, first)
    at = MAY1 + 4 * D + 2 * H
    await asyncio.gather(first.run_cycle(t, at, at), second.run_cycle(t, at, at))
    await asyncio.gather(first.run_cycle(t, at, at), second.run_cycle(t, at, at))
    invoices = await invoices_of(billing, t)
    assert [line["amount_minor"] for _, line in _late_lines(invoices)] == [400]
    assert len(await billing.store.late_checks(t, subscription_id)) >= 1
    numbers = sorted(i.number for i in invoices)
    assert numbers == [f"INV-{n:06d}" for n in range(1, len(invoices) + 1)]  # gapless


async def test_a_canceled_subscription_gets_its_late_usage_on_an_invoice_of_its_own(
    billing: Billing,
) -> None:
    cycle = _invoicing(billing)
    t, subscription_id, may1 = await _may1_billed_8_calls(billing, cycle)
    # Canceled at the end of May 1: no later period carries the late usage.
    await cycle.cancel(t, subscription_id, immediately=False, now=MAY1 + 3 * H)
    at = MAY1 + 2 * D + 2 * H  # window still open: nothing yet
    assert await cycle.run_cycle(t, at, at) == []
    at = MAY1 + 3 * D + 2 * H
    (own,) = await cycle.run_cycle(t, at, at)
    invoice = await billing.store.get_invoice(t, own)
    assert (invoice.status, invoice.number, invoice.subscription_id) == (
        "FINALIZED",
        "INV-000002",
        subscription_id,
    )
    assert (invoice.period_start, invoice.period_end, invoice.finalized_at) == (at, at, at)
    assert [(line["kind"], line["amount_minor"]) for line in invoice.lines] == [("late_usage", 400)]
    assert invoice.total_minor == 400
    assert invoice.lines[0]["late_usage"]["invoice_id"] == may1
    # Nothing more, however often the cycle runs.
    assert await cycle.run_cycle(t, at + D, at + D) == []
    assert len(await invoices_of(billing, t)) == 2


async def test_a_reissued_invoice_is_what_the_late_usage_is_compared_with(
    billing: Billing,
) -> None:
    cycle = _invoicing(billing)
    t, subscription_id, may1 = await _may1_billed_8_calls(billing, cycle)
    at = MAY1 + D + 3 * H
    voided = await cycle.void(t, may1, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)  # finalizes the reissued invoice: 14 calls, 12.00
    reissued = await billing.store.get_invoice(t, voided.replaced_by_id)
    assert (reissued.status, reissued.total_minor) == ("FINALIZED", 1200)
    at = MAY1 + 4 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    (check, *_) = await billing.store.late_checks(t, subscription_id)
    assert (check["period_start"], str(check["invoice_id"]), check["line"]) == (
        MAY1,
        reissued.id,
        None,
    )
    assert _late_lines(await invoices_of(billing, t)) == []


async def test_voiding_the_invoice_that_carried_late_usage_bills_it_again_once(
    billing: Billing,
) -> None:
    cycle = _invoicing(billing)
    t, _, _ = await _may1_billed_8_calls(billing, cycle)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, _),) = _late_lines(await invoices_of(billing, t))
    voided = await cycle.void(t, carrier, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)  # finalizes the reissue, which carries it now
    live = [i for i in await invoices_of(billing, t) if i.status != "VOID"]
    assert [(i, line["amount_minor"]) for i, line in _late_lines(live)] == [
        (voided.replaced_by_id, 400)
    ]


async def test_meter_keeps_the_usage_of_a_period_until_it_is_checked(billing: Billing) -> None:
    cycle = _invoicing(billing)
    t, _, _ = await _may1_billed_8_calls(billing, cycle)
    later = MAY1 + 30 * D
    # May 1 is invoiced, but its re-price will read its usage again.
    assert await oldest_open_period(billing.store.pool, t, later) == MAY1
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)  # May 1 checked; May 2 and 3 finalized, not yet
    assert await oldest_open_period(billing.store.pool, t, later) == MAY1 + D


async def test_a_period_finalized_after_its_window_closed_is_never_re_priced(
    billing: Billing,
) -> None:
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t, subscription_id = tenant.id, tenant.subscriptions[0].id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 12)
    at = MAY1 + 5 * D + 2 * H  # catching up: May 1 to 3 are past their window
    await cycle.run_cycle(t, at, at)
    checks = await billing.store.late_checks(t, subscription_id)
    assert [(c["period_start"], c["line"]) for c in checks] == [
        (MAY1 + n * D, None) for n in range(3)
    ]
    before = sum(billing.meters.calls.values())
    await cycle.run_cycle(t, at, at)
    assert sum(billing.meters.calls.values()) == before  # nothing was priced again


async def test_usage_that_went_down_is_credited_on_the_next_invoice(billing: Billing) -> None:
    cycle = _invoicing(billing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS])
    t = tenant.id
    billing.meters.add(t, "calls", "c1", MAY1 + H, 12)  # 10 × 1.00 + 2 × 0.50 = 11.00
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    billing.meters.add(t, "calls", "c1", MAY1 + 2 * H, -5)  # a late correction: 7 calls, 7.00
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, line),) = _late_lines(await invoices_of(billing, t))
    assert line["amount_minor"] == -400
    assert line["description"].endswith(": calls-meter 12 → 7")
    assert (await billing.store.get_invoice(t, carrier)).total_minor == -400  # May 2 had none


async def test_a_period_reissued_after_its_late_usage_was_billed_takes_it_back(
    billing: Billing,
) -> None:
    """May 1's late 4.00 is billed on May 3's invoice; then May 1 is voided and
    reissued, priced in full (14 calls: 12.00): the reissue takes the 4.00
    back, so May 1 costs 12.00 in all, not 16.00."""
    cycle = _invoicing(billing)
    t, subscription_id, may1 = await _may1_billed_8_calls(billing, cycle)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, _),) = _late_lines(await invoices_of(billing, t))
    voided = await cycle.void(t, may1, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)
    reissued = await billing.store.get_invoice(t, voided.replaced_by_id)
    assert reissued.status == "FINALIZED"
    usage, back = reissued.lines
    carrier_number = (await billing.store.get_invoice(t, carrier)).number
    assert (usage["amount_minor"], back["kind"], back["amount_minor"]) == (1200, "late_usage", -400)
    assert back["description"].startswith(
        f"Late usage of this period already billed on invoice {carrier_number}, taken back: "
    )
    assert reissued.total_minor == 800
    live = [i for i in await invoices_of(billing, t) if i.status != "VOID"]
    assert sum(line["amount_minor"] for _, line in _late_lines(live)) == 0
    # Reissued again: taken back again, once.
    again = await cycle.void(t, reissued.id, reissue=True, now=at)
    await cycle.run_cycle(t, at, at)
    assert (await billing.store.get_invoice(t, again.replaced_by_id)).total_minor == 800
    (check, *_) = await billing.store.late_checks(t, subscription_id)
    assert str(check["billed_on_invoice_id"]) == carrier


async def test_a_period_reissued_while_its_late_usage_waits_drops_it(billing: Billing) -> None:
    """The invoice that carried May 1's late 4.00 is voided (the line waits
    again), then May 1 itself is voided and reissued in full: the waiting
    line is dropped, so no later invoice bills the 4.00 again."""
    cycle = _invoicing(billing)
    t, subscription_id, may1 = await _may1_billed_8_calls(billing, cycle)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, _),) = _late_lines(await invoices_of(billing, t))
    await cycle.void(t, carrier, reissue=False, now=at)
    voided = await cycle.void(t, may1, reissue=True, now=at)
    for _ in range(3):
        await cycle.run_cycle(t, at, at)
        at += D
    reissued = await billing.store.get_invoice(t, voided.replaced_by_id)
    assert (reissued.status, reissued.total_minor) == ("FINALIZED", 1200)
    assert [line["kind"] for line in reissued.lines] == ["usage"]
    live = [i for i in await invoices_of(billing, t) if i.status != "VOID"]
    assert [line for _, line in _late_lines(live) if line["amount_minor"] == 400] == []
    (check, *_) = await billing.store.late_checks(t, subscription_id)
    assert (check["line"], check["billed_on_invoice_id"]) == (None, None)


async def test_many_customers_late_usage_is_read_a_page_at_a_time_and_billed_exactly(
    billing: Billing,
) -> None:
    """Twelve customers share May 1 (more than BULK_MIN_CUSTOMERS): the
    re-price reads their usage through the run's streams; each of the six
    with late calls gets its own exact line, the others none."""
    cycle = _invoicing(billing)
    customers = [f"c{i:02}" for i in range(12)]
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[TIERS], customers=customers
    )
    t = tenant.id
    for c in customers:
        billing.meters.add(t, "calls", c, MAY1 + H, 8)
    at = MAY1 + D + 2 * H
    await cycle.run_cycle(t, at, at)
    for n, c in enumerate(customers[:6]):
        billing.meters.add(t, "calls", c, MAY1 + 5 * H, n + 1)  # late: 9 to 14 calls
    at = MAY1 + 3 * D + 2 * H
    pages, singles = billing.meters.calls["consumed_page"], billing.meters.calls["consumed"]
    await cycle.run_cycle(t, at, at)
    # May 1 again in pages (and May 3 too); none of the twelve alone.
    assert billing.meters.calls["consumed_page"] > pages
    assert billing.meters.calls["consumed"] == singles, billing.meters.calls
    invoices = await invoices_of(billing, t)
    by_customer = {s.id: s.customer_external_id for s in tenant.subscriptions}
    found = {
        by_customer[i.subscription_id]: line["amount_minor"]
        for i in invoices
        for line in i.lines
        if line["kind"] == "late_usage"
    }
    # n + 1 late calls on 8: up to 10 at 1.00, beyond at 0.50.
    expected = {}
    for n, c in enumerate(customers[:6]):
        calls = 8 + n + 1
        charge = min(calls, 10) * 100 + max(calls - 10, 0) * 50
        expected[c] = charge - 800
    assert found == expected


async def test_a_period_voided_without_reissue_drops_its_waiting_late_usage(
    billing: Billing,
) -> None:
    """May 1's late 4.00 waits (its carrier was voided without reissue); then
    May 1 itself is voided without reissue: the period is not billed at all
    now, so no later invoice carries the 4.00."""
    cycle = _invoicing(billing)
    t, subscription_id, may1 = await _may1_billed_8_calls(billing, cycle)
    at = MAY1 + 3 * D + 2 * H
    await cycle.run_cycle(t, at, at)
    ((carrier, _),) = _late_lines(await invoices_of(billing, t))
    await cycle.void(t, carrier, reissue=False, now=at)
    await cycle.void(t, may1, reissue=False, now=at)
    for _ in range(3):
        at += D
        await cycle.run_cycle(t, at, at)
    live = [i for i in await invoices_of(billing, t) if i.status != "VOID"]
    assert _late_lines(live) == []
    (check, *_) = await billing.store.late_checks(t, subscription_id)
    assert (check["line"], check["billed_on_invoice_id"]) == (None, None)
