"""MeterStore.usage pages by customer: `after_customer` (bytewise order) and
`customer_limit` (the first N customers with usage in the range)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.meter.store import UsageGroup
from tests.integration.meter.harness import Meters, ev

T0 = datetime(2025, 1, 1, tzinfo=UTC)


async def _usage(meters: Meters, tenant: str, meter_id: str, **kwargs: object) -> list[UsageGroup]:
    record = await meters.store.get_meter(tenant, meter_id)
    out: list[UsageGroup] = []
    async for groups in meters.store.usage(
        record,
        customer_id="",
        bounds=[T0, T0 + timedelta(hours=1)],
        end=T0 + timedelta(hours=2),
        group_by=("region",),
        group_filter={},
        **kwargs,  # type: ignore[arg-type]
    ):
        out += groups
    return out


async def test_pages_follow_bytewise_customer_order(meters: Meters) -> None:
    tenant = meters.new_tenant()
    created = await meters.create(tenant, group_by=["region"])
    customers = ["b", "B", "a", "é", "A", "c"]  # bytewise: A B a b c é
    events = [
        ev(f"{c}-{i}", c, T0 + timedelta(minutes=70 * i), region=r)
        for c in customers
        for i, r in enumerate(["eu", "us"])
    ]
    # One customer with events only outside the range never takes a page slot.
    events.append(ev("late", "Aa", T0 + timedelta(hours=5)))
    await meters.send(tenant, events)

    everything = await _usage(meters, tenant, created.id)
    order = ["A", "B", "a", "b", "c", "é"]
    assert [(g.window, g.customer_id) for g in everything] == [
        (w, c) for w in (1, 2) for c in order
    ]

    pages: list[UsageGroup] = []
    after = ""
    while True:
        page = await _usage(meters, tenant, created.id, after_customer=after, customer_limit=2)
        if not page:
            break
        assert len({g.customer_id for g in page}) <= 2
        pages += page
        after = page[-1].customer_id
    assert sorted(pages, key=lambda g: (g.window, g.customer_id.encode(), g.dims)) == everything
    assert await _usage(meters, tenant, created.id, after_customer="b") == [
        g for g in everything if g.customer_id in ("c", "é")
    ]
    # Ordered by window first, then customer, within a page too.
    page = await _usage(meters, tenant, created.id, customer_limit=3)
    assert [(g.window, g.customer_id) for g in page] == [
        (1, "A"),
        (1, "B"),
        (1, "a"),
        (2, "A"),
        (2, "B"),
        (2, "a"),
    ]
