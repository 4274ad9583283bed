"""Bytes per event on disk, after a bench run (`make bench` prints them).

Each figure is pg_total_relation_size (heap, TOAST and every index) summed over
the partitions of the tables that hold it, divided by the events in ingest's
log: what an event costs to keep, as stored by this run (dead rows included,
as in production between vacuums; no VACUUM FULL first).

- ingest_log: ingest.events (every month) and ingest.event_ids, the
  idempotency key: kept forever.
- meter_rows: meter.meter_events, a row per (meter, event): what retention
  drops (USAGEBILLING_METER_RETENTION_DAYS).
- meter_rollups: meter.usage_rollups, usage_rollup_values and usage_gates
  (a row per meter, customer and day): kept. Their size follows the busy
  (meter, customer, minute) buckets of the days past their gates, not the events.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import asyncpg

# Figure -> the tables it sums (partitioned or not).
TABLES = {
    "ingest_log": ("ingest.events", "ingest.event_ids"),
    "meter_rows": ("meter.meter_events",),
    "meter_rollups": ("meter.usage_rollups", "meter.usage_rollup_values", "meter.usage_gates"),
}

# Every leaf of a table's partition tree, or the table itself when it is not
# partitioned (pg_partition_tree lists nothing for a plain table).
_SIZE = """
SELECT coalesce(sum(pg_total_relation_size(r)), 0)::bigint FROM (
    SELECT t.relid AS r FROM pg_partition_tree($1::regclass) t WHERE t.isleaf
    UNION ALL
    SELECT c.oid FROM pg_class c WHERE c.oid = $1::regclass AND c.relkind <> 'p'
) leaves
"""


async def sizes(conn: asyncpg.Connection) -> dict[str, int]:
    """Bytes of each figure's tables; a table that does not exist counts 0."""
    found = {}
    for figure, tables in TABLES.items():
        total = 0
        for table in tables:
            if await conn.fetchval("SELECT to_regclass($1)", table) is not None:
                total += await conn.fetchval(_SIZE, table)
        found[figure] = total
    return found


async def run(database_url: str) -> dict[str, float]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CHECKPOINT")  # sizes as written, not as buffered
        events = int(await conn.fetchval("SELECT count(*) FROM ingest.events"))
        rows = int(await conn.fetchval("SELECT count(*) FROM meter.meter_events"))
        found = await sizes(conn)
    finally:
        await conn.close()
    per_event = max(events, 1)
    return {
        "stored_events": events,
        "meter_rows_per_event": rows / per_event,
        **{f"bytes_per_event_{k}": v / per_event for k, v in found.items()},
        "bytes_per_event_total": sum(found.values()) / per_event,
    }


async def load(database_url: str, events: int, days: float = 30, batch: int = 500) -> None:
    """Stores `events` bench events (bench.ingest_bench: 100 customers over
    `days`, three meters per event) through ingest's and meter's own write code,
    in this process: Ingestor.ingest, then MeterService.fold_batches on each
    outbox payload, as the relay and the consumer would (no gRPC, no NATS)."""
    from datetime import UTC, datetime

    from bench.ingest_bench import _create_meters, _events
    from services.common import db, partitions
    from services.ingest.__main__ import MIGRATIONS as INGEST_MIGRATIONS
    from services.ingest.service import Ingestor
    from services.ingest.store import EVENT_LOG, IngestStore
    from services.meter.__main__ import MIGRATIONS as METER_MIGRATIONS
    from services.meter.retention import METER_EVENTS
    from services.meter.service import MeterService
    from services.meter.store import MeterStore
    from usagebilling.ingest.v1 import ingest_pb2

    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        await db.migrate(pool, "ingest", INGEST_MIGRATIONS)
        await db.migrate(pool, "meter", METER_MIGRATIONS)
        # The months the services make at startup (services.common.partitions).
        now = datetime.now(UTC).replace(microsecond=0)
        for table in (EVENT_LOG, METER_EVENTS):
            await partitions.ensure_months(pool, table, now, timedelta(days=35))
        tenant = "00000000-0000-4000-8000-000000000042"
        meters = MeterService(MeterStore(pool))

        class Stub:  # the bench's CreateMeter calls, served in process
            async def CreateMeter(self, request: Any, metadata: Any) -> Any:
                record = await meters.create_meter(tenant, request)
                return type("Meter", (), {"id": record.id})

        await _create_meters(Stub(), None)
        ingestor = Ingestor(IngestStore(pool), lambda: None, timedelta(days=35), None)
        span = timedelta(days=days)
        load = _events(events, now - span, span - timedelta(minutes=1))
        for i in range(0, events, batch):
            await ingestor.ingest(tenant, load[i : i + batch], now)
            payloads = await pool.fetch("DELETE FROM ingest.outbox RETURNING payload")
            await meters.fold_batches(
                [ingest_pb2.EventBatch.FromString(r["payload"]) for r in payloads]
            )
    finally:
        await pool.close()


def main() -> None:
    """`python -m bench.storage [--events N] [--days D]`: loads N events into a private
    PostgreSQL (see load) and prints the bytes per event."""
    import argparse
    import asyncio
    import shutil
    from pathlib import Path

    from tools.devstack import DEFAULT_BASE_DIR, DevStack

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    # The rollups' size follows events per customer-minute: 200,000 events
    # over 6 days are as dense as make bench's 1,000,000 over 30.
    parser.add_argument("--days", type=float, default=6)
    args = parser.parse_args()
    base = Path(DEFAULT_BASE_DIR) / "bench-storage"
    shutil.rmtree(base, ignore_errors=True)  # a database of its own each time
    stack = DevStack(base)
    database_url, _ = stack.start()
    try:
        asyncio.run(load(database_url, args.events, args.days))
        for name, value in asyncio.run(run(database_url)).items():
            print(f"{name:<32}{value:>14,.1f}")
    finally:
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
