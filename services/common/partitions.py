"""Monthly range partitions of a table partitioned by a timestamptz column
(ingest.events, meter.meter_events), made ahead of time by the service that
owns the table.

Each table has a DEFAULT partition, so an insert never fails for want of a
month; the service keeps the months it expects to write (from the backdating
window to a few months ahead) as partitions of their own, at startup and then
hourly. A month is made as a plain table and then attached: ATTACH takes only
a SHARE UPDATE EXCLUSIVE lock on the parent, so inserts and reads go on while
it runs (CREATE TABLE ... PARTITION OF would lock them out). Rows the DEFAULT
partition already holds for the month (a service that was down when the month
began) are moved into it in the same transaction.

Months are UTC calendar months; a partition is named <table>_YYYY_MM."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.common.logs import get_logger

log = get_logger(__name__)

# Months made ahead of the current one: a replica down for weeks still finds
# its months (and the DEFAULT partition catches the rest).
MONTHS_AHEAD = 3
# How often a running service checks its months.
EVERY = timedelta(hours=1)
# DDL waits at most this long for a lock, so that it never queues the busy
# write path behind it for long; a timed-out attempt is tried at the next check.
LOCK_TIMEOUT = "5s"


@dataclass(frozen=True)
class MonthlyTable:
    schema: str
    table: str
    column: str  # the timestamptz partition key

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}"

    @property
    def default(self) -> str:
        return f"{self.schema}.{self.table}_default"

    def partition(self, month: datetime) -> str:
        """The unqualified name of `month`'s partition."""
        return f"{self.table}_{month:%Y_%m}"


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_month(month: datetime) -> datetime:
    return datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)


def months(first: datetime, last: datetime) -> Iterator[datetime]:
    """The starts of the months from `first`'s to `last`'s, both included."""
    month, end = month_start(first), month_start(last)
    while month <= end:
        yield month
        month = next_month(month)


async def existing(conn: Any, table: MonthlyTable) -> dict[str, tuple[str, str]]:
    """The table's partitions: name -> (lower, upper) bound expressions as
    PostgreSQL prints them ('DEFAULT' for the default partition)."""
    rows = await conn.fetch(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = $1::regclass",
        table.qualified,
    )
    return {r["relname"]: r["bound"] for r in rows}


async def ensure_month(pool: asyncpg.Pool, table: MonthlyTable, month: datetime) -> bool:
    """Makes `month`'s partition unless it exists; True when it made it."""
    name = table.partition(month)
    lo, hi = month, next_month(month)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        # Replicas check their months at the same time: one makes each.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"parts:{table.qualified}")
        if name in await existing(conn, table):
            return False
        await conn.execute(
            f"CREATE TABLE {table.schema}.{name}"
            f" (LIKE {table.qualified} INCLUDING DEFAULTS INCLUDING STORAGE)"
        )
        # Inserts routed to DEFAULT wait for this transaction from here on
        # (ATTACH below takes the same lock to check DEFAULT holds no such row).
        await conn.execute(f"LOCK TABLE {table.default} IN SHARE ROW EXCLUSIVE MODE")
        moved = await conn.execute(
            f"WITH moved AS (DELETE FROM {table.default}"
            f" WHERE {table.column} >= $1 AND {table.column} < $2 RETURNING *)"
            f" INSERT INTO {table.schema}.{name} SELECT * FROM moved",
            lo,
            hi,
        )
        await conn.execute(
            f"ALTER TABLE {table.qualified} ATTACH PARTITION {table.schema}.{name}"
            f" FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"
        )
    log.info("partition_created", table=table.qualified, partition=name, moved=moved)
    return True


async def ensure_months(
    pool: asyncpg.Pool, table: MonthlyTable, now: datetime, behind: timedelta
) -> list[str]:
    """Makes the partitions of the months from `now - behind` to MONTHS_AHEAD
    after now's; returns the names it made."""
    last = now
    for _ in range(MONTHS_AHEAD):
        last = next_month(month_start(last))
    made = []
    for month in months(now - behind, last):
        if await ensure_month(pool, table, month):
            made.append(table.partition(month))
    return made


async def keep_ahead(pool: asyncpg.Pool, tables: list[MonthlyTable], behind: timedelta) -> None:
    """A service's background loop: its months, now and every EVERY."""
    while True:
        for table in tables:
            try:
                await ensure_months(pool, table, datetime.now(UTC), behind)
            except (asyncpg.PostgresError, OSError) as exc:
                # Inserts still land (in DEFAULT); the next check tries again.
                log.warning("partitions_not_made", table=table.qualified, error=repr(exc))
        await asyncio.sleep(EVERY.total_seconds())
