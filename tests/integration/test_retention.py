"""meter's retention against a real PostgreSQL (services/meter/retention.py):
it never drops a month that an open billing period, the backdating window or a
running backfill needs, drops the months nothing needs, leaves the usage of the
ranges it keeps unchanged, and a dropped event folded again counts nothing.
Each test has a database of its own: retention drops months of the whole table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest

from services.common import db, partitions
from services.meter.__main__ import MIGRATIONS
from services.meter.domain.retention import HELD_AGGREGATIONS
from services.meter.retention import (
    METER_EVENTS,
    RetainingMeterStore,
    Retention,
    RetentionStore,
)
from services.meter.store import MeterRecord, MeterStore
from tests.integration.test_partitioning import fresh_pool, month, row, where

__all__ = ["fresh_pool"]  # the fixture, used by name

NOW = datetime(2026, 7, 15, 12, tzinfo=UTC)
KEEP = timedelta(days=30)
BACKDATE = timedelta(days=35)


async def setup(pool: asyncpg.Pool) -> tuple[Retention, RetentionStore, MeterRecord]:
    """A SUM meter with an event on the 10th of each month from January to
    July 2026 (value 2**(month-1)) and one in June 2025 (no partition: DEFAULT)."""
    await db.migrate(pool, "meter", MIGRATIONS)
    for m in partitions.months(month(2026, 1), month(2026, 10)):
        await partitions.ensure_month(pool, METER_EVENTS, m)
    meters = RetainingMeterStore(pool)
    record = await meters.create_meter(
        "t1",
        name="calls",
        event_name="api.call",
        aggregation="SUM",
        property="n",
        filter=None,
        group_by=(),
        measurement_unit="",
        description="",
    )
    await meters.set_backfill_state("t1", record.id, "DONE")
    rows = [row(record.key, "cus", month(2026, m, 10), f"e{m}", 2 ** (m - 1)) for m in range(1, 8)]
    rows.append(row(record.key, "cus", month(2025, 6, 10), "e-default", 1000))
    assert await meters.fold(rows) == 8
    store = RetentionStore(pool)
    retention = Retention(store, meters, keep=KEEP, backdate_window=BACKDATE)
    return retention, store, record


async def total(store: MeterStore, meter: MeterRecord, start: datetime, end: datetime) -> Decimal:
    found = Decimal(0)
    async for groups in store.usage(
        meter, customer_id="", bounds=[start], end=end, group_by=(), group_filter={}
    ):
        found += sum((g.value or Decimal(0) for g in groups), Decimal(0))
    return found


async def months_left(pool: asyncpg.Pool) -> list[str]:
    return [
        p.removeprefix("meter.meter_events_")
        for p in await where(pool, "meter.meter_events", "true")
    ]


async def test_nothing_drops_before_billing_reports_or_while_retention_is_off(
    fresh_pool: asyncpg.Pool,
) -> None:
    retention, store, _ = await setup(fresh_pool)
    assert await retention.drop(NOW) == []  # billing has not reported
    off = Retention(store, RetainingMeterStore(fresh_pool), keep=None, backdate_window=BACKDATE)
    await store.report_open_periods("t1", NOW)
    assert await off.drop(NOW) == []
    assert await store.dropped_before() is None
    assert len(await months_left(fresh_pool)) == 8


async def test_open_periods_backfills_and_the_backdating_window_hold_retention_back(
    fresh_pool: asyncpg.Pool,
) -> None:
    pool = fresh_pool
    retention, store, meter = await setup(pool)
    meters = MeterStore(pool)
    before = {
        start: await total(meters, meter, start, NOW)
        for start in (
            month(2026, 1),
            month(2026, 3),
            month(2026, 3, 20),
            month(2026, 6),
            month(2026, 6, 11),
        )
    }

    # t1's oldest open period began on 10 March: March stays, older months go
    # (and DEFAULT's June 2025 row).
    await store.report_open_periods("t1", month(2026, 3, 10))
    await store.report_open_periods("t2", month(2026, 5, 1))
    assert await retention.drop(NOW) == ["meter_events_2026_01", "meter_events_2026_02"]
    assert await months_left(pool) == ["2026_03", "2026_04", "2026_05", "2026_06", "2026_07"]
    assert await store.dropped_before() == month(2026, 3)
    # Unchanged: the ranges kept, and from 1 January too, whose dropped months
    # are answered from the rollups (its bounds are whole minutes).
    for start, value in before.items():
        assert await total(meters, meter, start, NOW) == value, start
    assert await retention.drop(NOW) == []  # nothing more may go

    # Periods invoiced, but a backfill that began on 20 May replays from
    # 35 days before it (plus the margin): April stays.
    await store.report_open_periods("t1", month(2026, 7, 1))
    await store.report_open_periods("t2", month(2026, 7, 1))
    other = await meters.create_meter(
        "t2",
        name="late",
        event_name="api.call",
        aggregation="COUNT",
        property="",
        filter=None,
        group_by=(),
        measurement_unit="",
        description="",
    )
    await pool.execute(
        "UPDATE meter.meters SET created_at = $2 WHERE id = $1", other.id, month(2026, 5, 20)
    )
    assert await retention.drop(NOW) == ["meter_events_2026_03"]

    # The backfill done: the backdating window (35 days and a 7-day margin
    # before 15 July: 3 June) keeps June, though the setting's 30 days would not.
    await meters.set_backfill_state("t2", other.id, "DONE")
    assert await retention.drop(NOW) == ["meter_events_2026_04", "meter_events_2026_05"]
    assert await months_left(pool) == ["2026_06", "2026_07"]
    for start in (month(2026, 6), month(2026, 6, 11)):
        assert await total(meters, meter, start, NOW) == before[start]

    # A month later, with every period invoiced, June goes.
    later = NOW + timedelta(days=31)
    assert await retention.drop(later) == ["meter_events_2026_06"]
    assert await total(meters, meter, month(2026, 7), later) == 64


async def test_a_dropped_event_folded_again_counts_nothing(fresh_pool: asyncpg.Pool) -> None:
    pool = fresh_pool
    retention, store, meter = await setup(pool)
    await store.report_open_periods("t1", month(2026, 5, 1))
    assert await retention.drop(NOW) == [f"meter_events_2026_0{m}" for m in (1, 2, 3, 4)]
    replayed = [
        row(meter.key, "cus", month(2026, 2, 10), "e2", 2),  # dropped
        row(meter.key, "cus", month(2026, 5, 10), "e5", 16),  # kept: a repeat
        row(meter.key, "cus", month(2026, 5, 11), "new", 1),
    ]
    # The service's store skips what retention dropped...
    folding = RetainingMeterStore(pool)
    await Retention(store, folding, keep=KEEP, backdate_window=BACKDATE).refresh()
    assert await folding.fold(replayed) == 1
    # ...and a replica that has not learnt the horizon yet is refused by the
    # database (the retired partition takes no row), not counted twice.
    with pytest.raises(asyncpg.CheckViolationError):
        await MeterStore(pool).fold(replayed[:1])
    assert await pool.fetchval("SELECT count(*) FROM meter.meter_events WHERE event_id = 'e2'") == 0


async def test_held_meters_keep_every_month(fresh_pool: asyncpg.Pool) -> None:
    retention, store, _ = await setup(fresh_pool)
    await fresh_pool.execute(
        "INSERT INTO meter.meters (tenant_id, name, event_name, aggregation, archived_at)"
        " VALUES ('t3', 'seats', 'seat', $1, now())",
        HELD_AGGREGATIONS[2],
    )
    await store.report_open_periods("t1", NOW)
    assert await retention.drop(NOW) == []
    assert len(await months_left(fresh_pool)) == 8
