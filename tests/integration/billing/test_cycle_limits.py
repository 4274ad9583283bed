"""The billing cycle's limits against a real PostgreSQL: a backdated
subscription is caught up a bounded number of periods per run, one tenant's
catch-up does not hold up another tenant's cycle, a run stops at its time
budget, a period that cannot be priced is held and reported (once in the log,
once in the metric) while the rest is billed, and as_of is checked."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from services.billing.invoicing import CycleReport, Invoicing
from services.billing.scheduler import Scheduler
from services.billing.store import BillingStore
from services.common.errors import InvalidArgument
from services.common.metrics import REGISTRY
from tests.integration.billing.builders import DAY, invoices_of, per_unit, tenant_with
from tests.integration.billing.conftest import GRACE, Billing
from tests.unit.billing.fake_meters import FakeMeters

pytestmark = pytest.mark.integration

NOW = datetime(2024, 6, 1, 12, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)
TEN_METERS = [f"m{i}" for i in range(10)]


def failures_metric(reason: str) -> float:
    return REGISTRY.get_sample_value("usagebilling_billing_failures_total", {"reason": reason}) or 0


async def backdated(
    billing: Billing, now: datetime, *, customers: tuple[str, ...] = ("c1",)
) -> Any:
    """The measured case: a daily product with ten usage prices, subscribed
    five years (1,826 days) ago, 3 h past the day's boundary."""
    return await tenant_with(
        billing,
        interval=DAY,
        start=now - 1826 * D - 3 * H,
        now=now,
        customers=customers,
        fixed_price_minor=100,
        meters=TEN_METERS,
        prices=[per_unit(m, "0.01") for m in TEN_METERS],
    )


async def test_a_five_year_backdated_subscription_is_caught_up_in_bounded_runs(
    billing: Billing,
) -> None:
    tenant = await backdated(billing, NOW)
    t = tenant.id
    first_start = tenant.subscriptions[0].start_time
    # 2 calls of m3 on the first day, 5 of m7 on the last one.
    billing.meters.add(t, "m3", "c1", first_start + H, 2)
    billing.meters.add(t, "m7", "c1", NOW - 5 * H, 5)
    limit = 31

    runs = 0
    calls_per_run = []
    started = time.monotonic()
    while True:
        before = sum(billing.meters.calls.values())
        report = await billing.invoicing.cycle(t, NOW, NOW)
        calls_per_run.append(sum(billing.meters.calls.values()) - before)
        runs += 1
        # Each period is built and finalized in the same run (its grace is long over).
        assert len(report.invoice_ids) <= limit
        assert report.failures == []
        if not report.more_pending:
            break
        assert len(report.invoice_ids) == limit
        assert runs < 100
    elapsed = time.monotonic() - started
    print(
        f"\n1,826 periods caught up in {runs} runs of at most {limit} ({elapsed:.1f} s in all, "
        f"{elapsed / runs * 1000:.0f} ms a run); meter calls per run: at most {max(calls_per_run)}"
    )
    assert runs == -(-1826 // limit)  # 59
    assert max(calls_per_run) <= limit * 10  # ten prices, one customer: one call each

    invoices = await invoices_of(billing, t)
    assert len(invoices) == 1826
    assert len({i.period_start for i in invoices}) == 1826
    assert {i.status for i in invoices} == {"FINALIZED"}
    assert [i.period_start for i in invoices] == [first_start + n * D for n in range(1826)]
    # Numbered without a gap, in period order across the runs.
    assert [i.number for i in invoices] == [f"INV-{n:06d}" for n in range(1, 1827)]
    assert invoices[0].total_minor == 102 and invoices[-1].total_minor == 105
    assert {i.total_minor for i in invoices[1:-1]} == {100}
    # Nothing is left to do.
    assert await billing.invoicing.cycle(t, NOW, NOW) == CycleReport([], [], False)


@dataclass
class Turn:
    tenant_id: str
    started: float
    finished: float
    report: CycleReport


class Timed(Invoicing):
    """Invoicing that notes when each tenant's run starts and ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.turns: list[Turn] = []

    async def cycle(self, tenant_id: str, as_of: datetime, now: datetime, **kw: Any) -> CycleReport:
        started = time.monotonic()
        report = await super().cycle(tenant_id, as_of, now, **kw)
        self.turns.append(Turn(tenant_id, started, time.monotonic(), report))
        return report


async def test_one_tenant_catching_up_does_not_hold_up_another(pool: Any, billing: Billing) -> None:
    now = datetime.now(UTC)
    big = await backdated(billing, now)
    small = await tenant_with(
        billing,
        interval=DAY,
        start=now - 2 * D - 3 * H,
        now=now,
        fixed_price_minor=700,
        prices=[per_unit("calls", "1")],
    )
    billing.meters.add(small.id, "calls", "c1", now - 5 * H, 3)  # day 2
    # Meter answers in 5 ms, so that the big tenant's run takes a while.
    meters = FakeMeters(delay=0.005)
    meters.names, meters.events = billing.meters.names, billing.meters.events
    store = BillingStore(pool)

    def replica() -> tuple[Timed, Scheduler]:
        invoicing = Timed(store, meters, GRACE)
        return invoicing, Scheduler(store, invoicing, timedelta(minutes=1))

    # One scheduler: in its first tick, the small tenant waits at most for one
    # bounded run of the big one.
    invoicing, scheduler = replica()
    tick_started = time.monotonic()
    await scheduler.tick()
    turns = {turn.tenant_id: turn for turn in invoicing.turns}
    big_run = turns[big.id].finished - turns[big.id].started
    small_run = turns[small.id].finished - turns[small.id].started
    small_waited = turns[small.id].finished - tick_started
    print(
        f"\ntick 1: big tenant's bounded run {big_run * 1000:.0f} ms "
        f"({len(turns[big.id].report.invoice_ids)} invoices), small tenant's run "
        f"{small_run * 1000:.0f} ms, small tenant done {small_waited * 1000:.0f} ms into the tick"
    )
    assert turns[big.id].report.more_pending and len(turns[big.id].report.invoice_ids) == 31
    assert [i.total_minor for i in await invoices_of(billing, small.id)] == [700, 1000]
    assert small_waited <= big_run + small_run + 1.0  # generous: a loaded machine

    # Next tick: the tenant still catching up goes last.
    invoicing.turns.clear()
    tick_started = time.monotonic()
    await scheduler.tick()
    assert [turn.tenant_id for turn in invoicing.turns] == [small.id, big.id]
    small_turn = invoicing.turns[0]
    print(
        f"tick 2: small tenant done {(small_turn.finished - tick_started) * 1000:.0f} ms into "
        f"the tick, before the big tenant's run of "
        f"{(invoicing.turns[1].finished - invoicing.turns[1].started) * 1000:.0f} ms"
    )

    # Two replicas at once, both putting the big tenant first: per-tenant
    # locks let one take it while the other bills the small tenant.
    replicas = [replica(), replica()]
    for _, each in replicas:
        each._behind.add(small.id)
    tick_started = time.monotonic()
    await asyncio.gather(*(s.tick() for _, s in replicas))
    turns = [turn for inv, _ in replicas for turn in inv.turns]
    # One replica had the big tenant, the other the small one; the big one ran
    # once. (The replica that had the big one looks at the small one after.)
    assert sorted(inv.turns[0].tenant_id == big.id for inv, _ in replicas) == [False, True]
    (big_turn,) = [turn for turn in turns if turn.tenant_id == big.id]
    small_turn = min((t for t in turns if t.tenant_id == small.id), key=lambda t: t.finished)
    print(
        f"two replicas: small tenant done {(small_turn.finished - tick_started) * 1000:.0f} ms, "
        f"big tenant {(big_turn.finished - tick_started) * 1000:.0f} ms into the tick"
    )
    assert small_turn.finished < big_turn.finished  # in parallel, not behind it
    assert len(await invoices_of(billing, big.id)) == 3 * 31


async def test_a_run_stops_at_its_time_budget_and_the_next_goes_on(billing: Billing) -> None:
    # 12 subscriptions, each anchored an hour apart (no two share a period),
    # 40 days back, ten prices: 12 × 31 periods in a first run without a budget.
    starts = [NOW - 40 * D - (i + 1) * H for i in range(12)]
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=starts,
        now=NOW,
        customers=[f"c{i}" for i in range(12)],
        fixed_price_minor=1,
        meters=TEN_METERS,
        prices=[per_unit(m, "1") for m in TEN_METERS],
    )
    budgeted = Invoicing(billing.store, billing.meters, GRACE, run_budget=timedelta(0))
    first = await budgeted.cycle(tenant.id, NOW, NOW)
    # A spent budget stops the run after its first batch (about 400 meter calls).
    assert first.more_pending
    assert 0 < len(first.invoice_ids) <= 40
    runs = 1
    while (await budgeted.cycle(tenant.id, NOW, NOW)).more_pending:
        runs += 1
        assert runs < 50
    invoices = await invoices_of(billing, tenant.id)
    assert len(invoices) == 12 * 40
    assert len({(i.subscription_id, i.period_start) for i in invoices}) == 12 * 40
    assert {i.status for i in invoices} == {"FINALIZED"}
    print(f"\nbudget 0: {len(first.invoice_ids)} invoices a run, {runs + 1} runs for 480")


async def test_a_period_that_cannot_be_priced_is_held_reported_once_and_retried(
    billing: Billing,
) -> None:
    """One event with tokens = 9e30 at 0.01 a token: its period is held and
    reported, the other periods and subscriptions are billed, the log and the
    metric say it once over several runs; when the usage is corrected, the
    next run bills the period."""
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=NOW - 3 * D,
        now=NOW - 3 * D,
        customers=["ok", "huge"],
        fixed_price_minor=500,
        meters=("tokens", "calls"),
        prices=[per_unit("tokens", "0.01"), per_unit("calls", "1")],
    )
    t = tenant.id
    ok, huge = tenant.subscriptions
    day1 = NOW - 3 * D
    billing.meters.add(t, "tokens", "huge", day1 + H, "9e30")  # day 1: beyond int64 minor units
    billing.meters.add(t, "tokens", "huge", day1 + D + H, 300)  # day 2: 3.00
    billing.meters.add(t, "calls", "ok", day1 + H, 2)
    counted = failures_metric("amount_out_of_range")
    at = NOW + 2 * H  # day 3 ended and graced too

    with capture_logs() as logs:
        reports = [await billing.invoicing.cycle(t, at, at) for _ in range(3)]
    first = reports[0]
    assert len(first.invoice_ids) == 5  # 3 days of "ok", days 2 and 3 of "huge"
    (failure,) = first.failures
    assert (failure.subscription_id, failure.period_start, failure.period_end) == (
        huge.id,
        day1,
        day1 + D,
    )
    assert failure.cause == "amount_out_of_range"
    assert failure.reason.startswith(
        "invoice held: usage_prices[0] (meter 'tokens-meter', tokens): "
        "9000000000000000000000000000000 billable units come to 9.000e+30 minor units of "
        "USD, beyond the int64 range of amount_minor. The fixed fee and the other lines of "
        "this period are held with it"
    )
    # Every run answers it again (it is retried), but builds nothing more.
    assert [(r.invoice_ids, r.failures, r.more_pending) for r in reports[1:]] == [
        ([], [failure], False)
    ] * 2
    failed_lines = [e for e in logs if e["event"] == "billing_period_failed"]
    assert len(failed_lines) == 1, failed_lines
    assert failed_lines[0]["reason"] == failure.reason
    assert failures_metric("amount_out_of_range") == counted + 1

    by_subscription: dict[str, list[Any]] = {ok.id: [], huge.id: []}
    for invoice in await invoices_of(billing, t):
        by_subscription[invoice.subscription_id].append(invoice)
    assert [i.total_minor for i in by_subscription[ok.id]] == [700, 500, 500]
    assert [(i.period_start, i.total_minor) for i in by_subscription[huge.id]] == [
        (day1 + D, 800),
        (day1 + 2 * D, 500),
    ]
    assert {i.status for i in await invoices_of(billing, t)} == {"FINALIZED"}

    # The usage is corrected (meter no longer counts the event): the next run
    # bills the held period, and the failure is gone.
    events = billing.meters.events[(t, "tokens")]
    events[:] = [e for e in events if e[2] != 9 * 10**30]
    with capture_logs() as logs:
        fixed = await billing.invoicing.cycle(t, at, at)
        again = await billing.invoicing.cycle(t, at, at)
    assert (len(fixed.invoice_ids), fixed.failures, fixed.more_pending) == (1, [], False)
    assert again == CycleReport([], [], False)
    assert [e["event"] for e in logs if "failure" in e["event"]] == [
        "billing_period_failure_cleared"
    ]
    held = await billing.store.get_invoice(t, fixed.invoice_ids[0])
    assert (held.period_start, held.status, held.total_minor) == (day1, "FINALIZED", 500)
    numbers = sorted(i.number for i in await invoices_of(billing, t))
    assert numbers == [f"INV-{n:06d}" for n in range(1, 7)]
    assert await billing.store.open_failures(t, per_subscription=10) == []


async def test_the_scheduler_logs_and_counts_a_held_period_once(
    pool: Any, billing: Billing
) -> None:
    now = datetime.now(UTC)
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=now - 2 * D - 3 * H,
        now=now,
        customers=["ok", "huge"],
        fixed_price_minor=500,
        meters=("tokens",),
        prices=[per_unit("tokens", "0.01")],
    )
    billing.meters.add(tenant.id, "tokens", "huge", now - 2 * D - H, "9e30")
    other = await tenant_with(
        billing, interval=DAY, start=now - D - 3 * H, now=now, fixed_price_minor=9
    )
    scheduler = Scheduler(billing.store, billing.invoicing, timedelta(minutes=1))
    counted = failures_metric("amount_out_of_range")
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        touched = [await scheduler.tick() for _ in range(4)]
    assert touched == [4, 0, 0, 0]  # ok: 2 days, huge: day 2, the other tenant: 1 day
    failed_lines = [e for e in logs if e["event"] == "billing_period_failed"]
    assert len(failed_lines) == 1, failed_lines
    assert failed_lines[0]["tenant_id"] == tenant.id
    assert "usage_prices[0] (meter 'tokens-meter', tokens)" in failed_lines[0]["reason"]
    assert not [e for e in logs if e["log_level"] == "error"]
    assert failures_metric("amount_out_of_range") == counted + 1
    assert [i.total_minor for i in await invoices_of(billing, other.id)] == [9]
    (open_failure,) = await billing.store.open_failures(tenant.id, per_subscription=10)
    assert open_failure.attempts == 4


@pytest.mark.parametrize(
    "as_of",
    [
        datetime(1, 1, 1, tzinfo=UTC),  # the measured case: was INTERNAL
        datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
)
async def test_as_of_before_1970_is_invalid(billing: Billing, as_of: datetime) -> None:
    tenant = await tenant_with(
        billing, interval=DAY, start=NOW - 3 * D, now=NOW, fixed_price_minor=1
    )
    with pytest.raises(InvalidArgument, match=r"^as_of: must not be before 1970-01-01T00:00:00"):
        await billing.invoicing.cycle(tenant.id, as_of, NOW)
    # The earliest allowed instant bills nothing (the subscription starts later).
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert await billing.invoicing.cycle(tenant.id, epoch, NOW) == CycleReport([], [], False)
