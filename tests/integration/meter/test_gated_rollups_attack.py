"""Attacks on the gated rollups (meter.usage_gates, domain.rollup "Gates"): a
customer's UTC day read from its rows below a gate, from hour buckets between
the two, from minute buckets past both; the fold that takes a day past a gate
rebuilds its buckets from the stored rows under the gate's row lock.

Each test here states one way the gates could lose or double-count an event:
folds of one day that meet at its gate (two replicas, two fold workers, a
redelivery on the INSERT path), a day taken from below both gates past both at
once, UTC days whose arithmetic a session's time zone bends, retention sealing
while a late fold is in flight, and reads that mix days of every level (odd
zones, group-by and filters, paging by customer, events on UTC midnight)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from services.common import db, partitions
from services.meter.__main__ import MIGRATIONS
from services.meter.domain import rollup
from services.meter.domain.matching import FoldedEvent
from services.meter.retention import METER_EVENTS, RetentionStore
from services.meter.store import MeterRecord, MeterStore
from tests.integration.meter.test_rollups_match_reference import assert_buckets_match_rows


def row(
    key: int,
    customer: str,
    at: datetime,
    event_id: str,
    value: int | None = None,
    text: str | None = None,
    dims: dict[str, str] | None = None,
) -> FoldedEvent:
    return FoldedEvent(
        key, customer, at, event_id, None if value is None else Decimal(value), text, dims, None
    )


async def total(store: MeterStore, meter: MeterRecord, start: datetime, end: datetime) -> Decimal:
    found = Decimal(0)
    async for groups in store.usage(
        meter, customer_id="", bounds=[start], end=end, group_by=(), group_filter={}
    ):
        found += sum((g.value or Decimal(0) for g in groups), Decimal(0))
    return found


async def sum_meter(store: MeterStore, tenant: str = "t1") -> MeterRecord:
    return await store.create_meter(
        tenant,
        name=f"m-{uuid.uuid4().hex[:8]}",
        event_name="api.call",
        aggregation="SUM",
        property="v",
        filter=None,
        group_by=(),
        measurement_unit="",
        description="",
    )


async def waiting_on_a_lock(pool: asyncpg.Pool, at_least: int = 1) -> None:
    """Until `at_least` sessions of the database wait for a heavyweight lock."""
    for _ in range(500):
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nobody waits for a lock")


def paused_after_roll_up(store: MeterStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Makes `store`'s next fold stop inside its transaction, after its rows,
    gates and buckets are written (its locks held), until `release` is set."""
    entered, release = asyncio.Event(), asyncio.Event()
    original: Callable[[Any, Sequence[FoldedEvent]], Awaitable[None]] = store._roll_up

    async def roll_up(conn: Any, rows: Sequence[FoldedEvent]) -> None:
        await original(conn, rows)
        entered.set()
        await release.wait()

    store._roll_up = roll_up  # type: ignore[method-assign]
    return entered, release


@pytest.fixture
async def fresh_db(stack_urls: tuple[str, str]) -> AsyncIterator[str]:
    """The URL of a new database of the test server (dropped after)."""
    name = f"gates_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(stack_urls[0])
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield stack_urls[0].rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


# -- UTC days in a session whose TimeZone is not UTC --------------------------
#
# The gates are per UTC day, and the SQL that reads or rebuilds a day's rows
# bounds it as `day + interval '1 day'`. For a timestamptz that adds a calendar
# day in the session's TimeZone: 23 or 25 hours across a DST change there. The
# pool does not set TimeZone, so it is the server's (or the database's) default.


@pytest.mark.parametrize(
    ("day", "zone"),
    [
        (datetime(2024, 11, 3, tzinfo=UTC), "America/New_York"),  # 25 h: takes the next day's
        (datetime(2024, 3, 10, tzinfo=UTC), "America/New_York"),  # 23 h: leaves its last hour
        (datetime(2024, 3, 31, tzinfo=UTC), "Europe/Berlin"),
    ],
)
async def test_utc_days_do_not_bend_with_the_sessions_time_zone(
    fresh_db: str, day: datetime, zone: str
) -> None:
    admin = await asyncpg.connect(fresh_db)
    try:
        await admin.execute(f"ALTER DATABASE {fresh_db.rsplit('/', 1)[1]} SET timezone = '{zone}'")
    finally:
        await admin.close()
    pool = await db.create_pool(fresh_db, min_size=1, max_size=2)
    try:
        assert await pool.fetchval("SHOW timezone") == zone
        await db.migrate(pool, "meter", MIGRATIONS)
        store = MeterStore(pool)
        store.gates = rollup.Gates(3, 6)
        meter = await sum_meter(store)
        nxt = day + rollup.DAY
        # The day's last hour and the next day's first: each day below its gate.
        base = [
            row(meter.key, "c", day + timedelta(hours=12), "a", 1),
            row(meter.key, "c", nxt - timedelta(minutes=30), "b", 10),
            row(meter.key, "c", nxt + timedelta(minutes=30), "c", 100),
        ]
        assert await store.fold(base) == 3
        assert await total(store, meter, day, nxt + rollup.DAY) == 111
        assert await total(store, meter, day, nxt) == 11
        # The day past its hours' gate, then past both: rebuilt from its rows.
        for i, count in ((1, 1), (2, 3)):
            more = [
                row(meter.key, "c", day + timedelta(hours=1, seconds=k), f"x{i}{k}", 1000)
                for k in range(count)
            ]
            await store.fold(more)
            await assert_buckets_match_rows(pool, meter.key)
        assert await total(store, meter, day, nxt + rollup.DAY) == 4111
        assert await total(store, meter, nxt, nxt + rollup.DAY) == 100
    finally:
        await pool.close()


# -- Retention sealing beside a fold in flight --------------------------------


async def test_retention_seals_the_rows_of_a_fold_in_flight(fresh_db: str) -> None:
    """A fold (a replica that has not learnt the new horizon yet, a late
    message) stores a row in a month that retention is dropping, below its
    day's gate, and commits while retention seals: its row must be in the
    buckets that outlive the month, or the fold must fail. Before gates the
    fold's own transaction put the row in the buckets."""
    pool = await db.create_pool(fresh_db, min_size=2, max_size=4)
    try:
        await db.migrate(pool, "meter", MIGRATIONS)
        for m in partitions.months(
            datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
        ):
            await partitions.ensure_month(pool, METER_EVENTS, m)
        store = MeterStore(pool)
        meter = await sum_meter(store)
        feb = datetime(2026, 2, 10, 12, tzinfo=UTC)
        assert await store.fold([row(meter.key, "c", feb, "e1", 1)]) == 1
        before = datetime(2026, 3, 1, tzinfo=UTC)
        late = MeterStore(pool)
        outcomes: dict[str, object] = {}
        for i, (customer, at) in enumerate(
            [("c", feb + timedelta(hours=1)), ("d", datetime(2026, 3, 13, tzinfo=UTC))]
        ):  # a day with a gate already (February), and a new one (March)
            entered, release = paused_after_roll_up(late)

            async def fold_late(customer: str = customer, at: datetime = at, i: int = i) -> int:
                return await late.fold([row(meter.key, customer, at, f"late{i}", 10**i * 10)])

            folding = asyncio.create_task(fold_late())
            await entered.wait()
            dropping = asyncio.create_task(RetentionStore(pool).drop_before(before))
            await waiting_on_a_lock(pool)
            release.set()
            outcomes[customer] = (await asyncio.gather(folding, return_exceptions=True))[0]
            dropped = await asyncio.gather(dropping, return_exceptions=True)
            assert not isinstance(dropped[0], BaseException), dropped
            del late._roll_up
            before = datetime(2026, 4, 1, tzinfo=UTC)  # the next drop: March
        expected = 1 + sum(10**i * 10 for i, c in enumerate(["c", "d"]) if outcomes[c] == 1)
        assert await total(store, meter, datetime(2026, 1, 1, tzinfo=UTC), before) == expected, (
            outcomes
        )
    finally:
        await pool.close()
