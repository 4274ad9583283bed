"""A one-month SEATS_MAX read at 100,000 seat events, from the buckets' peaks
(migration 0011) and from the rows (the read before it: the store of commit
bb4e02f, loaded from git for the comparison).

    .venv/bin/python -m tools.with_stack .venv/bin/python -m bench.seats_max [EVENTS]

One customer, 500 items added and removed at random over June 2024 (seeded),
loaded in bulk and stepped and rolled up as the fold would (roll_up_stored).
Prints each read's median and best time over 7 calls, its value, and the
tuples PostgreSQL fetched from meter_events and held_rollups for one call
(pg_stat_user_tables, after its 10 s flush)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.common import db
from services.meter.__main__ import MIGRATIONS
from services.meter.store import MeterStore

JUNE = datetime(2024, 6, 1, tzinfo=UTC)
JULY = datetime(2024, 7, 1, tzinfo=UTC)
BEFORE = "bb4e02f"  # main before SEATS_MAX read buckets

_TUPLES = """
SELECT coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)) FILTER (
    WHERE relname LIKE 'meter_events%'), 0)::bigint,
    coalesce(sum(seq_tup_read + coalesce(idx_tup_fetch, 0)) FILTER (
    WHERE relname = 'held_rollups'), 0)::bigint
FROM pg_stat_user_tables WHERE schemaname = 'meter'
"""


def _old_store() -> Any:
    """MeterStore as of BEFORE (its SEATS_MAX read takes the rows)."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:services/meter/store.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "old_store.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("old_store", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_store"] = module  # (its dataclasses look themselves up)
    spec.loader.exec_module(module)
    return module.MeterStore


async def _read(store: Any, meter: Any) -> Decimal | None:
    value = None
    async for groups in store.held_usage(
        meter, customer_id="c1", bounds=[JUNE], end=JULY, group_by=[], group_filter={}
    ):
        value = groups[0].value
    return value


async def load(store: MeterStore, events: int) -> Any:
    """The meter, with `events` seat events of customer c1 in June, rolled up."""
    pool = store.pool
    meter = await store.create_meter(
        "bench",
        name="seats",
        event_name="seat",
        aggregation="SEATS_MAX",
        property="user",
        filter=None,
        group_by=[],
        measurement_unit="",
        description="",
        operation_property="op",
    )
    key = await pool.fetchval("SELECT key FROM meter.meters WHERE id = $1", meter.id)
    rng = random.Random(7)
    span = (JULY - JUNE) // timedelta(microseconds=1)
    rows = [
        (
            key,
            "c1",
            JUNE + timedelta(microseconds=rng.randrange(span)),
            f"e{i}",
            Decimal(rng.random() < 0.55),
            f"u{rng.randrange(500)}",
            None,
            None,
        )
        for i in range(events)
    ]
    began = time.monotonic()
    await pool.copy_records_to_table(
        "meter_events",
        schema_name="meter",
        records=rows,
        columns=(
            "meter_key",
            "customer_id",
            "event_time",
            "event_id",
            "value",
            "text_value",
            "dims",
            "skip_reason",
        ),
    )
    await store.roll_up_stored(key, JUNE, JULY)
    await pool.execute("VACUUM ANALYZE meter.meter_events")
    await pool.execute("VACUUM ANALYZE meter.held_rollups")
    print(f"loaded {events:,} events in {time.monotonic() - began:.1f} s", flush=True)
    return meter


async def main(events: int) -> None:
    pool = await db.create_pool(os.environ["DATABASE_URL"], min_size=1, max_size=4)
    await db.migrate(pool, "meter", MIGRATIONS)
    store = MeterStore(pool)
    meter = await load(store, events)
    for name, reader in (("rows (before)", _old_store()(pool)), ("buckets (after)", store)):
        times, value = [], None
        for _ in range(7):
            t0 = time.perf_counter()
            value = await _read(reader, meter)
            times.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(11)  # the stats of the calls above are flushed
        e0, r0 = await pool.fetchrow(_TUPLES)
        await _read(reader, meter)
        await asyncio.sleep(11)
        e1, r1 = await pool.fetchrow(_TUPLES)
        print(
            f"{name}: median {statistics.median(times):.1f} ms, best {min(times):.1f} ms,"
            f" value {value}; tuples fetched: meter_events {e1 - e0:,}, held_rollups {r1 - r0:,}",
            flush=True,
        )
    await pool.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000))
