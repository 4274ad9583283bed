"""The event log and meter_events partitioned by month (ingest migration 0005,
meter 0007, services/common/partitions.py) against a real PostgreSQL: existing
rows migrate, idempotency holds across months, COPY and ON CONFLICT route rows,
and a month made late takes its rows out of DEFAULT. Each test has a database of
its own (the partition DDL is global to a table)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from services.common import db, partitions
from services.ingest.__main__ import MIGRATIONS as INGEST_MIGRATIONS
from services.ingest.store import EVENT_LOG, EventRow, IngestStore
from services.meter.__main__ import MIGRATIONS as METER_MIGRATIONS
from services.meter.domain.matching import FoldedEvent
from services.meter.retention import METER_EVENTS
from services.meter.store import MeterStore


@pytest.fixture
async def fresh_pool(stack_urls: tuple[str, str]) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a new, empty database of the test server."""
    url = stack_urls[0]
    name = f"parts_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    pool = await db.create_pool(url.rsplit("/", 1)[0] + f"/{name}", min_size=1, max_size=4)
    try:
        yield pool
    finally:
        await pool.close()


def migrations_before(source: Path, version: int, into: Path) -> Path:
    into.mkdir()
    for number, path in db.migration_files(source):
        if number < version:
            shutil.copy(path, into / path.name)
    return into


async def where(pool: asyncpg.Pool, table: str, condition: str, *args: object) -> list[str]:
    """The partitions holding the matching rows."""
    rows = await pool.fetch(
        f"SELECT DISTINCT tableoid::regclass::text AS part FROM {table} WHERE {condition}", *args
    )
    return sorted(r["part"] for r in rows)


def month(year: int, m: int, day: int = 1) -> datetime:
    return datetime(year, m, day, tzinfo=UTC)


async def test_ingest_log_migrates_and_stays_idempotent_across_months(
    fresh_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    pool = fresh_pool
    await db.migrate(pool, "ingest", migrations_before(INGEST_MIGRATIONS, 5, tmp_path / "old"))
    # The log before 0005: events in two past months.
    for event_id, at in (
        ("a", month(2026, 3, 5)),
        ("b", month(2026, 3, 9)),
        ("c", month(2026, 5, 2)),
    ):
        await pool.execute(
            "INSERT INTO ingest.events (tenant_id, event_id, customer_id, event_name,"
            " event_time, metadata) VALUES ('t1', $1, 'cus', 'api.call', $2, '{\"n\": 1}')",
            event_id,
            at,
        )
    assert 5 in await db.migrate(pool, "ingest", INGEST_MIGRATIONS)

    assert await where(pool, "ingest.events", "true") == [
        "ingest.events_2026_03",
        "ingest.events_2026_05",
    ]
    store = IngestStore(pool)
    got = await store.get_event("t1", "b")
    assert (got.event_time, dict(got.metadata)) == (month(2026, 3, 9), {"n": 1})

    # The same ids again, even with other times (another month): duplicates.
    again = [
        EventRow("a", "cus", "api.call", month(2026, 5, 20), {}),
        EventRow("c", "cus", "api.call", month(2026, 3, 1), {}),
        EventRow("d", "cus", "api.call", month(2026, 5, 3), {}),
    ]
    assert await store.store_batch("t1", again, lambda ids: b"x") == {"d"}
    assert await pool.fetchval("SELECT count(*) FROM ingest.events") == 4
    assert await store.store_batch("t2", again, lambda ids: b"x") == {"a", "c", "d"}

    # A month with no partition yet lands in DEFAULT; making the month moves it.
    late = EventRow("e", "cus", "api.call", month(2027, 2, 3), {})
    assert await store.store_batch("t1", [late], lambda ids: b"x") == {"e"}
    assert await where(pool, "ingest.events", "event_id = 'e'") == ["ingest.events_default"]
    assert await partitions.ensure_month(pool, EVENT_LOG, month(2027, 2))
    assert not await partitions.ensure_month(pool, EVENT_LOG, month(2027, 2))
    assert await where(pool, "ingest.events", "event_id = 'e'") == ["ingest.events_2027_02"]
    assert await store.store_batch("t1", [late], lambda ids: b"x") == set()

    # Reads across months: newest first, and a replay oldest first.
    page, more = await store.list_events(
        "t1",
        customer_id="",
        event_name="",
        start=None,
        end=None,
        after=None,
        limit=10,
        max_bytes=1 << 20,
    )
    assert [e.event_id for e in page] == ["e", "d", "c", "b", "a"] and not more
    replayed = [
        e.event_id
        async for e in store.replay("t1", ["api.call"], month(2026, 1), month(2028, 1), page=2)
    ]
    assert replayed == ["a", "b", "c", "d", "e"]
    assert (await store.get_event("t1", "e")).event_time == month(2027, 2, 3)


async def test_ensure_months_makes_the_window_and_months_ahead(fresh_pool: asyncpg.Pool) -> None:
    await db.migrate(fresh_pool, "ingest", INGEST_MIGRATIONS)
    made = await partitions.ensure_months(
        fresh_pool, EVENT_LOG, month(2026, 12, 1), timedelta(days=35)
    )
    assert made == [
        f"events_{m}" for m in ("2026_10", "2026_11", "2027_01", "2027_02", "2027_03")
    ] or (
        # The current month may have been made by the migration already.
        "events_2027_03" in made
    )
    async with fresh_pool.acquire() as conn:
        names = set(await partitions.existing(conn, EVENT_LOG))
    for m in ("2026_10", "2026_11", "2026_12", "2027_01", "2027_02", "2027_03"):
        assert f"events_{m}" in names


def row(key: int, customer: str, at: datetime, event_id: str, value: int) -> FoldedEvent:
    return FoldedEvent(key, customer, at, event_id, Decimal(value), None, None, None)


async def test_meter_events_migrate_and_fold_by_copy_and_on_conflict(
    fresh_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    pool = fresh_pool
    await db.migrate(pool, "meter", migrations_before(METER_MIGRATIONS, 7, tmp_path / "old"))
    key = await pool.fetchval(
        "INSERT INTO meter.meters (tenant_id, name, event_name, aggregation)"
        " VALUES ('t1', 'm', 'api.call', 'SUM') RETURNING key"
    )
    await pool.execute(
        "INSERT INTO meter.meter_events (meter_key, customer_id, event_time, event_id, value)"
        " VALUES ($1, 'cus', $2, 'old-1', 5), ($1, 'cus', $3, 'old-2', 7)",
        key,
        month(2026, 4, 2),
        month(2026, 6, 30),
    )
    applied = await db.migrate(pool, "meter", METER_MIGRATIONS)
    assert 7 in applied
    assert await where(pool, "meter.meter_events", "true") == [
        "meter.meter_events_2026_04",
        "meter.meter_events_2026_06",
    ]
    store = MeterStore(pool)
    for m in (month(2026, 5), month(2026, 7)):
        await partitions.ensure_month(pool, METER_EVENTS, m)
    fresh = [
        row(key, "cus", month(2026, 5, 3), "n-1", 1),
        row(key, "cus", month(2026, 7, 1), "n-2", 2),
    ]
    assert await store.fold(fresh) == 2  # COPY, routed to two months
    # A repeat beside a new row: COPY is refused, ON CONFLICT keeps the new one.
    mixed = [
        row(key, "cus", month(2026, 4, 2), "old-1", 5),
        row(key, "cus", month(2026, 7, 2), "n-3", 3),
    ]
    assert await store.fold(mixed) == 1
    assert await store.fold(mixed + fresh) == 0
    total = await pool.fetchval(
        "SELECT sum(value) FROM meter.meter_events WHERE meter_key = $1", key
    )
    assert total == 5 + 7 + 1 + 2 + 3
    assert await where(pool, "meter.meter_events", "true") == [
        "meter.meter_events_2026_04",
        "meter.meter_events_2026_05",
        "meter.meter_events_2026_06",
        "meter.meter_events_2026_07",
    ]
