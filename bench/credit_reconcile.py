"""Measure: the ledger's side of credit reconciliation (CreditStore.quantities_per_day).

Settlement compares, once per USAGEBILLING_CREDITS_RECONCILE for each account,
the quantity its draws hold per UTC day over ingest's backdating window (up to
35 days) with meter's. This loads the ledger of one busy account (a DRAWN
entry per minute and meter for `--days` days, a correction every tenth
minute) among `--others` accounts as busy on one meter, then times
quantities_per_day over [now - days, now) (`--runs` calls, after 20 to warm
up) and one settlement pass's append of a draw per meter (what the ledger's
writes cost). The ledger is loaded at billing's migration 0010 and the later
ones are applied to it, timed.

    python -m tools.with_stack python -m bench.credit_reconcile [--days 35] [--others 5]

Needs DATABASE_URL (a server it may create and drop a database in).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.billing.credits_store import AccountRecord, CreditStore
from services.billing.domain.credits import Entry, EntryKind, floor_minute
from services.common import db

MIGRATIONS = Path(__file__).resolve().parents[1] / "services" / "billing" / "migrations"
METERS = ["00000000-0000-0000-0000-00000000000a", "00000000-0000-0000-0000-00000000000b"]

# One account's ledger: per minute and meter a DRAWN entry (quantity 1..5),
# and every tenth minute a correction (revision 1) of it.
LOAD = """
INSERT INTO billing.credit_ledger (tenant_id, customer_id, credit_type_id, kind, entry_key,
    revision, amount, balance_after, effective_at, meter_id, window_start, window_end, quantity)
SELECT 't', $1, $2, 'DRAWN', 'draw:' || m || ':' || t, r, -q, 0, t, m, t,
    t + interval '1 minute', q
FROM unnest($3::text[]) AS m, generate_series($4::timestamptz, $5::timestamptz - interval
    '1 minute', interval '1 minute') AS t,
    LATERAL (SELECT 0 AS r, (1 + extract(minute FROM t)::int % 5)::numeric AS q
        UNION ALL SELECT 1, 1 WHERE extract(minute FROM t)::int % 10 = 0) AS x
"""


def _url(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def main(days: int, others: int, runs: int) -> None:
    url = os.environ["DATABASE_URL"]
    name = f"reconcile_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pool = await db.create_pool(_url(url, name), min_size=1, max_size=2)
        try:
            await _measure(pool, days, others, runs)
        finally:
            await pool.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _measure(pool: asyncpg.Pool, days: int, others: int, runs: int) -> None:
    # The ledger is loaded as billing 0010 left it, then the later migrations
    # are applied to it (timed: what an upgrade costs).
    with tempfile.TemporaryDirectory() as earlier:
        for path in MIGRATIONS.glob("*.sql"):
            if int(path.name[:4]) <= 10:
                shutil.copy(path, earlier)
        await db.migrate(pool, "billing", Path(earlier))
    store = CreditStore(pool)
    now = floor_minute(datetime.now(UTC))
    start = now - timedelta(days=days)
    busy, kind = str(uuid.uuid4()), str(uuid.uuid4())
    loaded = time.perf_counter()
    async with pool.acquire() as conn:
        await conn.execute(LOAD, uuid.UUID(busy), uuid.UUID(kind), METERS, start, now)
        for _ in range(others):
            await conn.execute(LOAD, uuid.uuid4(), uuid.UUID(kind), METERS[:1], start, now)
        migrated = time.perf_counter()
        applied = await db.migrate(pool, "billing", MIGRATIONS)
        migrated = time.perf_counter() - migrated
        await conn.execute("VACUUM ANALYZE")
        rows = await conn.fetchval("SELECT count(*) FROM billing.credit_ledger")
        mine = await conn.fetchval(
            "SELECT count(*) FROM billing.credit_ledger WHERE customer_id = $1 AND meter_id = $2",
            uuid.UUID(busy),
            METERS[0],
        )
    print(
        f"ledger: {rows} rows ({mine} of the busy account's meter), loaded in"
        f" {time.perf_counter() - loaded - migrated:.1f} s; migrations {applied} on it in"
        f" {migrated:.2f} s"
    )
    lo = start + timedelta(hours=7, minutes=13)  # a backdating window starts mid-day
    times = []
    async with pool.acquire() as conn:
        for i in range(20 + runs):
            began = time.perf_counter()
            found = await store.quantities_per_day(conn, "t", busy, kind, METERS[0], lo, now)
            if i >= 20:
                times.append((time.perf_counter() - began) * 1000)
    total = sum(found.values(), Decimal(0))
    async with pool.acquire() as conn:
        exact = await conn.fetchval(
            "SELECT sum(quantity) FROM billing.credit_ledger WHERE customer_id = $1"
            " AND meter_id = $2 AND effective_at >= $3 AND effective_at < $4",
            uuid.UUID(busy),
            METERS[0],
            lo,
            now,
        )
    assert total == exact, (total, exact)
    times.sort()
    print(
        f"quantities_per_day over {len(found)} days, {runs} calls: p50"
        f" {statistics.median(times):.2f} ms, p99 {times[int(len(times) * 0.99) - 1]:.2f} ms"
        f" (total {total}, equal to the ledger's)"
    )
    # One pass's writes: a draw per meter for the next minute, 500 times.
    writes = []
    async with pool.acquire() as conn:
        for i in range(500):
            at = now + timedelta(minutes=i)
            entries = [
                Entry(
                    f"draw:{m}:{at.isoformat()}",
                    EntryKind.DRAWN,
                    at,
                    Decimal(-2),
                    {},
                    "",
                    m,
                    Decimal(2),
                )
                for m in METERS
            ]
            began = time.perf_counter()
            async with conn.transaction():
                await store.append(
                    conn,
                    "t",
                    busy,
                    kind,
                    AccountRecord(None, None, {}, Decimal(0), True, None),
                    entries,
                    window=lambda e: (e.at, e.at + timedelta(minutes=1)),
                )
            writes.append((time.perf_counter() - began) * 1000)
    print(f"append of 2 draws, 500 passes: p50 {statistics.median(writes):.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--days", type=int, default=35)
    parser.add_argument("--others", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.days, args.others, args.runs))
