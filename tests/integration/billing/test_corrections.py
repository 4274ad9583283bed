"""Voiding and corrected invoices, cancellation's final invoice, and the
constraints of migration 0002, against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.common.errors import FailedPrecondition, InvalidArgument
from tests.integration.billing.builders import DAY, MONTH, invoices_of, per_unit, tenant_with
from tests.integration.billing.conftest import Billing

pytestmark = pytest.mark.integration

MAY1 = datetime(2024, 5, 1, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


async def _finalized_may1(billing: Billing) -> tuple[str, str]:
    """A tenant whose May 1 invoice (3 calls at 1.00) is finalized: (tenant, invoice id)."""
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, prices=[per_unit("calls", "1")]
    )
    billing.meters.add(tenant.id, "calls", "c1", MAY1 + H, 3)
    at = MAY1 + D + 2 * H
    (invoice_id,) = await billing.invoicing.run_cycle(tenant.id, at, at)
    return tenant.id, invoice_id


async def test_void_with_reissue_issues_one_corrected_invoice(billing: Billing) -> None:
    t, first_id = await _finalized_may1(billing)
    first = await billing.store.get_invoice(t, first_id)
    assert (first.number, first.total_minor) == ("INV-000001", 300)
    billing.meters.add(t, "calls", "c1", MAY1 + 2 * H, 2)  # found after finalization
    at = MAY1 + D + 3 * H  # May 2 has not ended

    voided = await billing.invoicing.void(t, first_id, reissue=True, now=at)
    assert (voided.status, voided.voided_at, voided.number) == ("VOID", at, "INV-000001")
    # What it billed stays as it was.
    assert (voided.lines, voided.total_minor) == (first.lines, 300)
    corrected = await billing.store.get_invoice(t, voided.replaced_by_id)
    assert (corrected.status, corrected.revision, corrected.replaces_id) == ("DRAFT", 1, first_id)
    assert (corrected.period_start, corrected.period_end) == (MAY1, MAY1 + D)
    assert corrected.total_minor == 500

    # The next cycle finalizes the correction with the next number, and nothing else.
    assert await billing.invoicing.run_cycle(t, at, at) == [corrected.id]
    corrected = await billing.store.get_invoice(t, corrected.id)
    assert (corrected.status, corrected.number, corrected.total_minor) == (
        "FINALIZED",
        "INV-000002",
        500,
    )
    assert len(await billing.invoicing.run_cycle(t, at + D, at + D)) == 1  # May 2
    may1 = [i for i in await invoices_of(billing, t) if i.period_start == MAY1]
    assert [(i.id, i.status) for i in may1] == [(first_id, "VOID"), (corrected.id, "FINALIZED")]

    # Voiding the void invoice again changes nothing and issues nothing more.
    again = await billing.invoicing.void(t, first_id, reissue=True, now=at + D)
    assert again == voided
    assert len([i for i in await invoices_of(billing, t) if i.period_start == MAY1]) == 2


async def test_concurrent_reissues_issue_one_correction(billing: Billing) -> None:
    t, first_id = await _finalized_may1(billing)
    at = MAY1 + 3 * D
    answers = await asyncio.gather(
        *(billing.invoicing.void(t, first_id, reissue=True, now=at) for _ in range(6))
    )
    assert len({a.replaced_by_id for a in answers}) == 1
    may1 = [i for i in await invoices_of(billing, t) if i.period_start == MAY1]
    assert [(i.status, i.revision) for i in may1] == [("VOID", 0), ("DRAFT", 1)]


async def test_a_void_period_is_not_rebuilt_until_a_correction_is_asked_for(
    billing: Billing,
) -> None:
    t, first_id = await _finalized_may1(billing)
    at = MAY1 + D + 3 * H
    voided = await billing.invoicing.void(t, first_id, reissue=False, now=at)
    assert (voided.status, voided.replaced_by_id) == ("VOID", "")
    # The cycle never builds a period twice: May 1 had its invoice.
    assert await billing.invoicing.run_cycle(t, at, at) == []
    assert [i.status for i in await invoices_of(billing, t)] == ["VOID"]
    # A correction can still be asked for later.
    voided = await billing.invoicing.void(t, first_id, reissue=True, now=at)
    assert voided.replaced_by_id
    assert await billing.invoicing.run_cycle(t, at, at) == [voided.replaced_by_id]


async def test_a_draft_cannot_be_voided(billing: Billing) -> None:
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, fixed_price_minor=1)
    at = MAY1 + D + timedelta(minutes=5)  # built, grace not passed
    (draft_id,) = await billing.invoicing.run_cycle(tenant.id, at, at)
    with pytest.raises(FailedPrecondition, match=r"^id: invoice .* is a draft"):
        await billing.invoicing.void(tenant.id, draft_id, reissue=True, now=at)
    with pytest.raises(InvalidArgument, match=r"^id: required"):
        await billing.invoicing.void(tenant.id, "", reissue=False, now=at)
    assert (await billing.store.get_invoice(tenant.id, draft_id)).status == "DRAFT"


async def test_the_database_keeps_one_live_invoice_and_one_revision_per_period(
    billing: Billing,
) -> None:
    t, first_id = await _finalized_may1(billing)
    copy = (
        "INSERT INTO billing.invoices (tenant_id, customer_id, subscription_id, period_start,"
        " period_end, currency, status, lines, subtotal_minor, total_minor, revision)"
        " SELECT tenant_id, customer_id, subscription_id, period_start, period_end, currency,"
        " $2, lines, 0, 0, $3 FROM billing.invoices WHERE id = $1"
    )
    pool = billing.store.pool
    with pytest.raises(asyncpg.UniqueViolationError, match="invoices_live_period"):
        await pool.execute(copy, first_id, "DRAFT", 1)  # a second live invoice
    with pytest.raises(asyncpg.UniqueViolationError, match="invoices_period_revision_key"):
        await pool.execute(copy, first_id, "VOID", 0)  # revision 0 again
    await billing.invoicing.void(t, first_id, reissue=False, now=MAY1 + 2 * D)
    await pool.execute(copy, first_id, "DRAFT", 1)  # after the void, a correction fits
    with pytest.raises(asyncpg.UniqueViolationError, match="invoices_live_period"):
        await pool.execute(copy, first_id, "DRAFT", 2)


# --- cancellation -----------------------------------------------------------------


async def test_cancel_immediately_invoices_the_part_served_at_once(billing: Billing) -> None:
    # 31.00 a month and 0.10 a call; May has 31 days.
    tenant = await tenant_with(
        billing,
        interval=MONTH,
        start=MAY1,
        now=MAY1,
        fixed_price_minor=3100,
        prices=[per_unit("calls", "0.1")],
    )
    t, subscription = tenant.id, tenant.subscriptions[0]
    billing.meters.add(t, "calls", "c1", MAY1 + 9 * D, 7)
    billing.meters.add(t, "calls", "c1", MAY1 + 10 * D + H, 100)  # after the cancellation
    now = MAY1 + 10 * D  # May 11 00:00: 10 of 31 days served
    ended = await billing.invoicing.cancel(t, subscription.id, immediately=True, now=now)
    assert (ended.end_time, ended.canceled_at) == (now, now)

    (final,) = await invoices_of(billing, t)
    assert (final.period_start, final.period_end, final.status) == (MAY1, now, "DRAFT")
    # Fixed fee 3100 × 10/31 = 1000; 7 calls × 0.10 = 70.
    assert [line["amount_minor"] for line in final.lines] == [1000, 70]
    assert final.lines[0]["description"] == "Plan: fixed fee, prorated × ≈0.3226"

    # It is finalized after the grace, and no later period is ever billed.
    assert await billing.invoicing.run_cycle(t, now + 2 * H, now + 2 * H) == [final.id]
    far = MAY1 + 90 * D
    assert await billing.invoicing.run_cycle(t, far, far) == []
    assert [(i.id, i.status, i.total_minor) for i in await invoices_of(billing, t)] == [
        (final.id, "FINALIZED", 1070)
    ]
    with pytest.raises(FailedPrecondition, match=r"^id: subscription .* already ended"):
        await billing.invoicing.cancel(t, subscription.id, immediately=True, now=now + H)


async def test_cancel_at_period_end_bills_that_period_whole_and_no_later_one(
    billing: Billing,
) -> None:
    tenant = await tenant_with(
        billing, interval=MONTH, start=MAY1, now=MAY1, fixed_price_minor=3100
    )
    t, subscription = tenant.id, tenant.subscriptions[0]
    june1 = datetime(2024, 6, 1, tzinfo=UTC)
    ending = await billing.invoicing.cancel(t, subscription.id, immediately=False, now=MAY1 + D)
    assert ending.end_time == june1
    assert await invoices_of(billing, t) == []  # nothing to bill yet

    far = datetime(2024, 9, 1, tzinfo=UTC)
    await billing.invoicing.run_cycle(t, far, far)
    assert [
        (i.period_start, i.period_end, i.total_minor) for i in await invoices_of(billing, t)
    ] == [(MAY1, june1, 3100)]


async def test_cancelling_at_once_after_cancelling_at_period_end_ends_sooner(
    billing: Billing,
) -> None:
    tenant = await tenant_with(
        billing, interval=MONTH, start=MAY1, now=MAY1, fixed_price_minor=3100
    )
    t, subscription = tenant.id, tenant.subscriptions[0]
    await billing.invoicing.cancel(t, subscription.id, immediately=False, now=MAY1 + D)
    now = MAY1 + 20 * D + 12 * H  # 20.5 days of 31
    ended = await billing.invoicing.cancel(t, subscription.id, immediately=True, now=now)
    assert ended.end_time == now
    (final,) = await invoices_of(billing, t)
    assert (final.period_end, final.total_minor) == (now, 2050)  # 3100 × 20.5/31
