"""How a run of the billing cycle cuts its work into batches, and the order
in which the scheduler visits tenants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from services.billing.invoicing import BillablePeriod, _batches
from services.billing.scheduler import Scheduler
from services.billing.store import ProductRecord, SubscriptionRecord

T0 = datetime(2024, 5, 1, tzinfo=UTC)
D = timedelta(days=1)


def product(prices: int) -> ProductRecord:
    usage = [{"meter_id": f"m{i}"} for i in range(prices)]
    return ProductRecord("p", "Plan", "USD", "DAY", 0, usage, T0)


def period(customer: int, day: int, prices: int = 10) -> BillablePeriod:
    sub = SubscriptionRecord(
        f"s{customer}", "t", f"c{customer}", f"x{customer}", "p", T0, None, None
    )
    return BillablePeriod(sub, product(prices), T0 + day * D, T0 + (day + 1) * D)


def test_batches_keep_a_shared_period_together_and_respect_the_call_budget() -> None:
    # 30 customers share each day: one call per meter reads them all (10 calls a day).
    shared = [period(c, day) for day in range(5) for c in range(30)]
    assert [len(b) for b in _batches(shared, calls=400, size=1000)] == [150]
    assert [len(b) for b in _batches(shared, calls=20, size=1000)] == [60, 60, 30]
    # A period of its own costs a call per price: 40 of them fill 400 calls.
    alone = [period(0, day) for day in range(100)]
    batches = _batches(alone, calls=400, size=1000)
    assert [len(b) for b in batches] == [40, 40, 20]
    assert [p for b in batches for p in b] == alone  # in order, nothing lost
    # More periods than `size` share one day: cut at `size`.
    crowd = [period(c, 0) for c in range(2500)]
    assert [len(b) for b in _batches(crowd, calls=400, size=1000)] == [1000, 1000, 500]
    # A batch always takes at least one group, however costly.
    assert [len(b) for b in _batches([period(0, 0, prices=50)], calls=1, size=1000)] == [1]
    assert _batches([], calls=400, size=1000) == []


def test_the_scheduler_rotates_and_puts_tenants_still_catching_up_last() -> None:
    scheduler = Scheduler(Any, Any, timedelta(minutes=1))  # type: ignore[arg-type]
    tenants = ["a", "b", "c", "d"]
    assert scheduler.order(tenants) == ["a", "b", "c", "d"]
    assert scheduler.order(tenants) == ["b", "c", "d", "a"]
    scheduler._behind.add("c")
    assert scheduler.order(tenants) == ["d", "a", "b", "c"]  # from c: c goes last
    assert scheduler.order(tenants) == ["d", "a", "b", "c"]  # from d
    assert scheduler.order(tenants) == ["a", "b", "d", "c"]  # from a
    assert scheduler.order([]) == []
