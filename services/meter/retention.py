"""Retention of meter's per-event rows (USAGEBILLING_METER_RETENTION_DAYS).

meter_events (a row per (meter, event)) is partitioned by month; retention drops
whole months that nothing needs any more (services.meter.domain.retention:
the setting's span, ingest's backdating window and a margin, running
backfills, and every tenant's oldest open billing period as billing reports it
through RetentionService). The rollups are kept, so usage of a dropped range is
still answered from them; ingest's event log of record and billing's invoices
are never dropped.

Every replica runs the loop; the drop itself is one transaction under the
partition lock, so replicas never drop at once. Each replica also learns the
dropped horizon here (`MeterStore.retained_since`), so that its fold skips an
event older than it (a replay of an old event would otherwise count again in
the rollups); a replica that has not learnt it yet is stopped by the database
(the retired partition refuses the row, and the fold's isolation sets the event
aside with that reason)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.common import partitions
from services.common.context import current_api_key_id, current_tenant
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.logs import get_logger
from services.common.partitions import MonthlyTable
from services.meter import convert
from services.meter.domain.matching import FoldedEvent
from services.meter.domain.retention import HELD_AGGREGATIONS, keep_from
from services.meter.store import MeterStore, seal_before
from usagebilling.meter.v1 import retention_pb2, retention_pb2_grpc

log = get_logger(__name__)

# meter_events by month of event_time (migration 0007); retention drops months.
METER_EVENTS = MonthlyTable("meter", "meter_events", "event_time")
# Takes the months retention dropped: an empty partition that refuses every
# row, so that a refold of a dropped event (a replay, a late message) fails
# instead of counting again in the rollups the first fold already fed.
_RETIRED = "meter_events_retired"


class RetentionStore:
    """What retention reads and drops (services.meter.retention)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def report_open_periods(self, tenant_id: str, keep_since: datetime) -> None:
        await self.pool.execute(
            "INSERT INTO meter.retention_floors (tenant_id, keep_since) VALUES ($1, $2)"
            " ON CONFLICT (tenant_id) DO UPDATE SET keep_since = EXCLUDED.keep_since,"
            " reported_at = now()",
            tenant_id,
            keep_since,
        )

    async def needs(self, held: Sequence[str]) -> tuple[datetime | None, list[datetime], bool]:
        """The earliest open period billing reported (None: no report yet), the
        starts of the running backfills, and whether a meter of an aggregation
        in `held` exists."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT min(keep_since) FROM meter.retention_floors) AS floor,"
            " (SELECT array_agg(created_at) FROM meter.meters"
            "  WHERE backfill_state = 'RUNNING' AND archived_at IS NULL) AS backfills,"
            " EXISTS (SELECT 1 FROM meter.meters WHERE aggregation = ANY($1::text[])) AS held",
            list(held),
        )
        assert row is not None
        return row["floor"], list(row["backfills"] or []), bool(row["held"])

    async def dropped_before(self) -> datetime | None:
        """meter_events holds no row before this; None when nothing was dropped."""
        value: datetime | None = await self.pool.fetchval(
            "SELECT dropped_before FROM meter.retention"
        )
        return value

    async def drop_before(self, before: datetime) -> list[str]:
        """Drops the months of meter_events that end at or before `before` (a
        month's start), and DEFAULT's rows before it; from then on the
        partition _RETIRED refuses rows before it. One transaction, under the
        partition lock (services.common.partitions); returns the months dropped."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{partitions.LOCK_TIMEOUT}'")
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext($1))", f"parts:{METER_EVENTS.qualified}"
            )
            done = await conn.fetchval("SELECT dropped_before FROM meter.retention")
            if done is not None and done >= before:
                return []
            going = []
            for name in await partitions.existing(conn, METER_EVENTS):
                if name in (_RETIRED, f"{METER_EVENTS.table}_default"):
                    continue
                month = datetime.strptime(name[-7:], "%Y_%m").replace(tzinfo=UTC)
                if partitions.next_month(month) <= before:
                    going.append(name)
            # No fold writes the rows going while they are sealed: SHARE waits
            # for the folds in flight (their rows and gates then committed, so
            # the seal sees them) and holds off new ones until the months are
            # gone (reads go on). A fold's row below its day's gate is in no
            # bucket: sealed without it, it would be dropped uncounted.
            for table in [*(f"meter.{name}" for name in going), METER_EVENTS.default]:
                await conn.execute(f"LOCK TABLE {table} IN SHARE MODE")
            # The days whose usage is read from their rows get buckets first.
            await seal_before(conn, before)
            dropped = []
            for name in going:
                await conn.execute(f"DROP TABLE meter.{name}")
                dropped.append(name)
            await conn.execute(f"DELETE FROM {METER_EVENTS.default} WHERE event_time < $1", before)
            await conn.execute(f"DROP TABLE IF EXISTS meter.{_RETIRED}")
            await conn.execute(
                f"CREATE TABLE meter.{_RETIRED} (LIKE {METER_EVENTS.qualified},"
                " CONSTRAINT older_than_retention CHECK (false))"
            )
            await conn.execute(
                f"ALTER TABLE {METER_EVENTS.qualified} ATTACH PARTITION meter.{_RETIRED}"
                f" FOR VALUES FROM (MINVALUE) TO ('{before.isoformat()}')"
            )
            await conn.execute(
                "INSERT INTO meter.retention (dropped_before) VALUES ($1) ON CONFLICT (one)"
                " DO UPDATE SET dropped_before = EXCLUDED.dropped_before, dropped_at = now()",
                before,
            )
        return sorted(dropped)


class RetainingMeterStore(MeterStore):
    """MeterStore whose fold skips the events retention dropped (older than
    `retained_since`, which Retention.refresh keeps current): their rows are
    gone, so a second fold (a replay, a late message) would find no processed
    key and count them again in the rollups. Skipped events are logged; a
    backfill then covers only what is at or after the horizon (its replay
    starts a backdating window back from now, always after it)."""

    def __init__(self, pool: asyncpg.Pool, reads: asyncpg.Pool | None = None) -> None:
        super().__init__(pool, reads)
        self.retained_since: datetime | None = None

    async def fold(self, rows: Sequence[FoldedEvent]) -> int:
        since = self.retained_since
        if since is not None and any(row.event_time < since for row in rows):
            kept = [row for row in rows if row.event_time >= since]
            log.warning(
                "fold_older_than_retention",
                skipped=len(rows) - len(kept),
                retained_since=since.isoformat(),
            )
            rows = kept
        return await super().fold(rows)


# How often each replica re-reads the horizon (cheap: one row), and how often
# it checks whether a month may go.
REFRESH_EVERY = timedelta(minutes=1)
DROP_EVERY = timedelta(hours=1)


class Retention:
    def __init__(
        self,
        store: RetentionStore,
        meters: RetainingMeterStore,
        *,
        keep: timedelta | None,
        backdate_window: timedelta,
    ) -> None:
        self._store = store
        self._meters = meters
        self._keep = keep
        self._backdate_window = backdate_window

    async def refresh(self) -> datetime | None:
        """Reads the dropped horizon into the fold's store."""
        self._meters.retained_since = await self._store.dropped_before()
        return self._meters.retained_since

    async def drop(self, now: datetime) -> list[str]:
        """Drops the months nothing needs any more; returns their partitions.
        Nothing when retention is off."""
        if self._keep is None:
            return []
        open_periods, backfills, held = await self._store.needs(HELD_AGGREGATIONS)
        before = keep_from(
            now,
            keep=self._keep,
            backdate_window=self._backdate_window,
            open_periods=open_periods,
            backfills_started=backfills,
            held_meters=held,
        )
        if before is None:
            return []
        dropped = await self._store.drop_before(before)
        await self.refresh()
        if dropped:
            log.info("retention_dropped", before=before.isoformat(), partitions=dropped)
        return dropped

    async def run(self) -> None:
        last_drop = 0.0
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.refresh()
                if loop.time() - last_drop >= DROP_EVERY.total_seconds() or not last_drop:
                    last_drop = loop.time()
                    await self.drop(datetime.now(UTC))
            except (asyncpg.PostgresError, OSError) as exc:
                # A lock not granted in time, say: tried again next time.
                log.warning("retention_failed", error=repr(exc))
            await asyncio.sleep(REFRESH_EVERY.total_seconds())


class RetentionServicer(retention_pb2_grpc.RetentionServiceServicer):
    """Billing's reports of each tenant's oldest open period."""

    def __init__(self, store: RetentionStore) -> None:
        self._store = store

    async def ReportOpenPeriods(
        self, request: retention_pb2.ReportOpenPeriodsRequest, context: Any
    ) -> retention_pb2.ReportOpenPeriodsResponse:
        tenant_id = current_tenant()
        if current_api_key_id():
            # The auth layer lets only billing's service token through
            # (service_identity); an API key must not hold back retention.
            raise PermissionDenied("ReportOpenPeriods is for the billing service only")
        keep_since = convert.optional_time(request, "keep_since")
        if keep_since is None:
            raise InvalidArgument("keep_since: required")
        await self._store.report_open_periods(tenant_id, keep_since)
        answer = retention_pb2.ReportOpenPeriodsResponse()
        dropped = await self._store.dropped_before()
        if dropped is not None:
            answer.retained_since.FromDatetime(dropped)
        return answer
