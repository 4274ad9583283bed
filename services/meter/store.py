"""meter's SQL: meter definitions and the per-meter event contributions
(schema `meter`)."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from services.common.errors import AlreadyExists, NotFound
from services.common.ids import parse_uuid
from services.meter import held
from services.meter.domain import rollup
from services.meter.domain.aggregation import HELD, Aggregation
from services.meter.domain.matching import FoldedEvent

# The compact key of meter $2 of tenant $1 (meter_events holds keys, not ids).
_KEY_OF = "(SELECT key FROM meter.meters WHERE tenant_id = $1 AND id = $2)"

_METER_COLUMNS = (
    "id, key, name, event_name, aggregation, property, filter, group_by, measurement_unit,"
    " description, created_at, archived_at, backfill_state, operation_property"
)


@dataclass(frozen=True)
class MeterRecord:
    id: str
    key: int  # the compact key of the meter's rows in meter_events
    tenant_id: str
    name: str
    event_name: str
    aggregation: str  # the domain Aggregation's name, e.g. "SUM"
    property: str
    filter: dict[str, Any] | None  # the API's JSON form of usagebilling.meter.v1.Filter
    group_by: tuple[str, ...]
    measurement_unit: str
    description: str
    created_at: datetime
    archived_at: datetime | None
    backfill_state: str
    operation_property: str = ""  # seat meters: the operation's metadata key


def _meter(tenant_id: str, row: asyncpg.Record) -> MeterRecord:
    return MeterRecord(
        id=str(row["id"]),
        key=row["key"],
        tenant_id=tenant_id,
        name=row["name"],
        event_name=row["event_name"],
        aggregation=row["aggregation"],
        property=row["property"],
        filter=row["filter"],
        group_by=tuple(row["group_by"]),
        measurement_unit=row["measurement_unit"],
        description=row["description"],
        created_at=row["created_at"],
        archived_at=row["archived_at"],
        backfill_state=row["backfill_state"],
        operation_property=row["operation_property"],
    )


@dataclass(frozen=True)
class UsageGroup:
    """One aggregated row: window index (1-based, into the bounds), customer,
    dimension values, value (None when no event contributed)."""

    window: int
    customer_id: str
    dims: tuple[str, ...]
    value: Decimal | None
    count: int


# How each aggregation combines the parts of a window (buckets of the rollups,
# raw rows of its partial minutes: columns _PARTS, or text_value for
# UNIQUE_COUNT); the pure domain.aggregation.aggregate is the oracle these
# must agree with. To add an aggregation: domain/rollup.py's docstring.
SQL_AGGREGATES = {
    "COUNT": "sum(n)::numeric",
    "SUM": "sum(total)",
    "MIN": "min(lo)",
    "MAX": "max(hi)",
    "AVG": "sum(total)",  # divided exactly by n in the service (domain.average)
    "UNIQUE_COUNT": "count(DISTINCT text_value)::numeric",
    # Ties on time go to the greatest event_id by code point, as in the domain.
    "LATEST": (
        '(array_agg(latest_value ORDER BY latest_time DESC, latest_event_id COLLATE "C" DESC))[1]'
    ),
}
# A bucket's state, and a raw row read as a bucket of one event.
_PARTS = "n, total, lo, hi, latest_time, latest_event_id, latest_value"
_BUCKET_STATE = ", ".join(f"r.{c}" for c in _PARTS.split(", "))
_RAW_STATE = "1::bigint, e.value, e.value, e.value, e.event_time, e.event_id, e.value"
# A raw row taken out of its minute's bucket (domain.rollup.complements): only
# n and total subtract.
_OUTSIDE_STATE = (
    "-1::bigint, -e.value, NULL::numeric, NULL::numeric, NULL::timestamptz, NULL::text,"
    " NULL::numeric"
)
# The aggregations whose bucket less some rows is exact (columns n and total).
_SUBTRACTS = frozenset({"COUNT", "SUM", "AVG"})
# Windows up to this many are cut into pieces on the event loop; more (up to
# MAX_WINDOWS, ~0.5 s of CPU) in a worker thread.
_PLAN_INLINE = 2_000


_FIELDS = ", ".join(FoldedEvent._fields)
_ORIGIN = "'0001-01-01 00:00:00+00'"  # date_bin from year 1: floors by arithmetic alone
# The stored rows of the customers' days $1..$3 (meter keys, customers, UTC
# days) that a fold took past a gate, to build their buckets from: minutes when
# $4 (fine), hours when $5 (coarse), per day. A UTC day is interval '24 hours'
# here and in `usage`: timestamptz + '1 day' is a calendar day in the session's
# TimeZone (the server's default: 23 or 25 hours across its DST changes).
_REBUILT = (
    "keys AS (SELECT * FROM unnest($1::integer[], $2::text[], $3::timestamptz[],"
    " $4::boolean[], $5::boolean[]) AS k (meter_key, customer_id, day, fine, coarse)),"
    f" new AS (SELECT e.*, k.fine, k.coarse FROM keys k CROSS JOIN LATERAL (SELECT {_FIELDS}"
    " FROM meter.meter_events e WHERE e.meter_key = k.meter_key"
    " AND e.customer_id = k.customer_id AND e.event_time >= k.day"
    " AND e.event_time < k.day + interval '24 hours' AND e.skip_reason IS NULL) AS e)"
)
# A stored bucket (r) combined with new rows' (EXCLUDED): one rule for the fold's
# buckets made in SQL (_ROLLUP) and in Python (domain.rollup.buckets, _UPSERT).
_COMBINE = """ON CONFLICT (meter_key, grain, customer_id, bucket_start, dims) DO UPDATE SET
        n = r.n + EXCLUDED.n,
        total = CASE WHEN r.total IS NULL THEN EXCLUDED.total
            WHEN EXCLUDED.total IS NULL THEN r.total ELSE r.total + EXCLUDED.total END,
        lo = least(r.lo, EXCLUDED.lo),
        hi = greatest(r.hi, EXCLUDED.hi),
        latest_time = greatest(r.latest_time, EXCLUDED.latest_time),
        latest_event_id = CASE WHEN (EXCLUDED.latest_time, EXCLUDED.latest_event_id)
            > (r.latest_time, r.latest_event_id) THEN EXCLUDED.latest_event_id
            ELSE r.latest_event_id END,
        latest_value = CASE WHEN (EXCLUDED.latest_time, EXCLUDED.latest_event_id)
            > (r.latest_time, r.latest_event_id) THEN EXCLUDED.latest_value
            ELSE r.latest_value END"""
# The buckets of domain.rollup.buckets as arrays, upserted in key order.
_UPSERT = f"""
INSERT INTO meter.usage_rollups AS r (meter_key, grain, customer_id, bucket_start, dims,
    n, total, lo, hi, latest_time, latest_event_id, latest_value)
SELECT * FROM unnest($1::integer[], $2::"char"[], $3::text[], $4::timestamptz[], $5::jsonb[],
    $6::bigint[], $7::numeric[], $8::numeric[], $9::numeric[], $10::timestamptz[], $11::text[],
    $12::numeric[]) AS u (meter_key, grain, customer_id, bucket_start, dims)
ORDER BY u.meter_key, u.grain, u.customer_id COLLATE "C", u.bucket_start, u.dims
{_COMBINE}
"""
_UPSERT_VALUES = """
INSERT INTO meter.usage_rollup_values
SELECT * FROM unnest($1::integer[], $2::"char"[], $3::text[], $4::timestamptz[], $5::jsonb[],
    $6::text[]) AS u (meter_key, grain, customer_id, bucket_start, dims, text_value)
ORDER BY u.meter_key, u.grain, u.customer_id COLLATE "C", u.bucket_start, u.dims,
    u.text_value COLLATE "C"
ON CONFLICT DO NOTHING
"""
# Adds the rows `new` (its CTEs first) to the buckets: each row to its minute's
# bucket when `fine`, to its hour's when `coarse` (domain.rollup); one aggregate
# per minute, the hours from those, upserted in key order; a bucket that exists
# combines the two states. `{values}` is _VALUES when some row may hold a
# text_value (UNIQUE_COUNT), else ""; `{gates}` _BULK_GATES or "". The
# statement's value is how many rows `new` holds.
_ROLLUP = """
WITH {new},
src AS (
    SELECT n.meter_key, n.customer_id COLLATE "C" AS customer_id,
        coalesce(n.dims, '{{}}'::jsonb) AS dims,
        date_bin('1 minute', n.event_time, '0001-01-01 00:00:00+00') AS minute,
        n.event_time, n.event_id COLLATE "C" AS event_id, n.value, n.text_value,
        n.fine, n.coarse
    FROM new n WHERE n.skip_reason IS NULL
), minutes AS (
    SELECT meter_key, customer_id, dims, minute, fine, coarse,
        count(*) AS n, sum(value) AS total, min(value) AS lo, max(value) AS hi,
        (array_agg(event_time ORDER BY event_time DESC, event_id DESC))[1] AS latest_time,
        (array_agg(event_id ORDER BY event_time DESC, event_id DESC))[1] AS latest_event_id,
        (array_agg(value ORDER BY event_time DESC, event_id DESC))[1] AS latest_value
    FROM src GROUP BY 1, 2, 3, 4, 5, 6
), buckets AS (
    SELECT meter_key, 'm'::"char" AS grain, customer_id, minute AS bucket_start, dims,
        n, total, lo, hi, latest_time, latest_event_id, latest_value
    FROM minutes WHERE fine
    UNION ALL
    SELECT meter_key, 'h', customer_id, date_bin('1 hour', minute, '0001-01-01 00:00:00+00'),
        dims, sum(n), sum(total), min(lo), max(hi),
        (array_agg(latest_time ORDER BY latest_time DESC, latest_event_id DESC))[1],
        (array_agg(latest_event_id ORDER BY latest_time DESC, latest_event_id DESC))[1],
        (array_agg(latest_value ORDER BY latest_time DESC, latest_event_id DESC))[1]
    FROM minutes WHERE coarse GROUP BY 1, 3, 4, 5
), rolled AS (
    INSERT INTO meter.usage_rollups AS r (meter_key, grain, customer_id, bucket_start, dims,
        n, total, lo, hi, latest_time, latest_event_id, latest_value)
    SELECT * FROM buckets ORDER BY 1, 2, 3, 4, 5
{combine}
){values}{gates}
SELECT count(*) FROM new
""".replace("{combine}", _COMBINE.replace("{", "{{").replace("}", "}}"))
# UNIQUE_COUNT's distinct values per bucket, for the same grains.
_VALUES = """, distinct_values AS (
    INSERT INTO meter.usage_rollup_values
    SELECT DISTINCT s.meter_key, g.grain, s.customer_id,
        date_bin(g.step, s.event_time, '0001-01-01 00:00:00+00'), s.dims, s.text_value
    FROM src s CROSS JOIN (VALUES ('m'::"char", interval '1 minute'), ('h', interval '1 hour'))
        AS g (grain, step)
    WHERE s.text_value IS NOT NULL AND CASE g.grain WHEN 'm' THEN s.fine ELSE s.coarse END
    ORDER BY 1, 2, 3, 4, 5, 6
    ON CONFLICT DO NOTHING
)"""
# Rows loaded in bulk: their days are rolled at every grain whatever their size.
_BULK_GATES = """, bulk_gates AS (
    INSERT INTO meter.usage_gates AS g (meter_key, customer_id, day, n, hours_from,
        minutes_from)
    SELECT meter_key, customer_id, date_bin('1 day', minute, '0001-01-01 00:00:00+00'),
        sum(n), 0, 0
    FROM minutes GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (meter_key, customer_id, day) DO UPDATE SET n = g.n + EXCLUDED.n
)"""
# Adds a fold's rows to their days' gates ($1..$3 the days, $6 the rows of
# each), made with thresholds $4 and $5, in key order; returns each gate after
# (domain.rollup.crossings).
_GATES = """
INSERT INTO meter.usage_gates AS g (meter_key, customer_id, day, n, hours_from, minutes_from)
SELECT u.meter_key, u.customer_id, u.day, u.n, $4, $5
FROM unnest($1::integer[], $2::text[], $3::timestamptz[], $6::bigint[])
    AS u (meter_key, customer_id, day, n)
ORDER BY 1, 2, 3
ON CONFLICT (meter_key, customer_id, day) DO UPDATE SET n = g.n + EXCLUDED.n
RETURNING meter_key, customer_id, day, n, hours_from, minutes_from
"""
# Which of the days $1..$3 are past both gates.
_PAST = """
SELECT k.meter_key, k.customer_id, k.day
FROM unnest($1::integer[], $2::text[], $3::timestamptz[]) AS k (meter_key, customer_id, day)
WHERE EXISTS (SELECT FROM meter.usage_gates g WHERE g.meter_key = k.meter_key
    AND g.customer_id = k.customer_id AND g.day = k.day AND g.n >= g.minutes_from)
"""
# A fold's rows that were not stored before (the path for repeats).
_INSERTED = (
    f"INSERT INTO meter.meter_events ({_FIELDS})"
    " SELECT * FROM unnest($1::integer[], $2::text[], $3::timestamptz[], $4::text[],"
    " $5::numeric[], $6::text[], $7::jsonb[], $8::text[])"
    f" ORDER BY 1, 2, 3, 4 ON CONFLICT DO NOTHING RETURNING {_FIELDS}"
)
# A fold that deadlocks with another is undone and tried again, this many
# times in all (the consumer retries its batch after that).
_FOLD_ATTEMPTS = 3


# Gauges, by the domain Aggregation's name (see held_usage).
_GAUGES = frozenset({"TIME_WEIGHTED_AVG", "TIME_WEIGHTED_SUM"})


# Rows read (through a cursor) and mapped between two turns of the event loop
# when a usage answer is large (100,000 rows take about a second of CPU to map
# and encode, in all): the consumer's folds and other calls run in between.
YIELD_EVERY = 500
# One customer's usage without groups over at most this many windows (a row a
# window at most) is read in one fetch rather than through a cursor: a month
# of HOUR windows is at most 745.
ONE_READ_WINDOWS = 1_000


async def seal_before(conn: Any, before: datetime) -> None:
    """Pre-aggregates, at every grain, each customer's days before `before` that
    are below a gate, and makes them past both (thresholds 0): for retention,
    in the transaction that then drops their rows."""
    days = await conn.fetch(
        "SELECT meter_key, customer_id, day, n < hours_from FROM meter.usage_gates"
        " WHERE n < minutes_from AND day < $1 ORDER BY 1, 2, 3",
        before,
    )
    if days:
        await conn.execute(
            _ROLLUP.format(new=_REBUILT, values=_VALUES, gates=""),
            *[[d[i] for d in days] for i in range(3)],
            [True] * len(days),
            [d[3] for d in days],
            timeout=3600,
        )
    await conn.execute(
        "UPDATE meter.usage_gates SET hours_from = 0, minutes_from = 0"
        " WHERE n < minutes_from AND day < $1",
        before,
    )


def _groups(rows: Sequence[asyncpg.Record], width: int) -> list[UsageGroup]:
    """Usage rows (window, customer, `width` dimension values, value, n)."""
    return [
        UsageGroup(
            window=r[0],
            customer_id=r[1],
            dims=tuple(r[2 : 2 + width]),
            value=r["value"],
            count=r["n"],
        )
        for r in rows
    ]


def _key_columns(keys: Iterable[rollup.GateKey]) -> list[list[Any]]:
    """Days as the arrays $1..$3 of _REBUILT, _PAST and _GATES, in key order."""
    ordered = sorted(keys)
    return [[k[i] for k in ordered] for i in range(3)]


class MeterStore:
    def __init__(self, pool: asyncpg.Pool, reads: asyncpg.Pool | None = None) -> None:
        self.pool = pool
        # One customer's usage without groups (a balance check, a usage page):
        # a pool of generic plans (db.create_pool) when given. Planning that
        # statement cost 0.8 to 1.2 ms a call, more than running it.
        self.reads = reads or pool
        # Whether a meter key is a held aggregation's (a meter's aggregation
        # never changes): the fold steps those rows (services/meter/held.py).
        self._held_keys: dict[int, bool] = {}
        # The SEATS_MAX meters among them: the fold keeps their buckets' peaks.
        self._peak_keys: set[int] = set()
        # Where buckets start to pay (domain.rollup.Gates); tests lower them.
        self.gates = rollup.Gates()

    async def _held_rows(self, conn: Any, rows: Sequence[FoldedEvent]) -> list[FoldedEvent]:
        unknown = {row.meter_key for row in rows} - self._held_keys.keys()
        if unknown:
            found = await conn.fetch(
                "SELECT key, aggregation = ANY($2::text[]), aggregation = $3 FROM meter.meters"
                " WHERE key = ANY($1::integer[])",
                list(unknown),
                [a.name for a in HELD],
                Aggregation.SEATS_MAX.name,
            )
            self._held_keys.update((r[0], r[1]) for r in found)
            self._peak_keys.update(r[0] for r in found if r[2])
        return [row for row in rows if self._held_keys.get(row.meter_key)]

    async def create_meter(
        self,
        tenant_id: str,
        *,
        name: str,
        event_name: str,
        aggregation: str,
        property: str,
        filter: dict[str, Any] | None,
        group_by: Sequence[str],
        measurement_unit: str,
        description: str,
        check_quotas: Callable[[int, list[dict[str, Any] | None]], None] = lambda n, f: None,
        operation_property: str = "",
    ) -> MeterRecord:
        """Inserts the meter. `check_quotas(active, filters)` sees how many active
        meters the tenant has, and the filters of those on `event_name`, and raises
        to refuse: it runs in the insert's transaction under a per-tenant advisory
        lock, so two concurrent creates cannot both take the last slot."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext('meter.meters'), hashtext($1))", tenant_id
            )
            active = await conn.fetchval(
                "SELECT count(*) FROM meter.meters WHERE tenant_id = $1 AND archived_at IS NULL",
                tenant_id,
            )
            same_event = await conn.fetch(
                "SELECT filter FROM meter.meters"
                " WHERE tenant_id = $1 AND event_name = $2 AND archived_at IS NULL",
                tenant_id,
                event_name,
            )
            check_quotas(active, [r["filter"] for r in same_event])
            try:
                row = await conn.fetchrow(
                    "INSERT INTO meter.meters (tenant_id, name, event_name, aggregation,"
                    " property, filter, group_by, measurement_unit, description,"
                    " operation_property) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                    f" RETURNING {_METER_COLUMNS}",
                    tenant_id,
                    name,
                    event_name,
                    aggregation,
                    property,
                    filter,
                    list(group_by),
                    measurement_unit,
                    description,
                    operation_property,
                )
            except asyncpg.UniqueViolationError as exc:
                raise AlreadyExists(f"name: a meter named {name!r} already exists") from exc
        assert row is not None
        return _meter(tenant_id, row)

    async def get_meter(self, tenant_id: str, meter_id: str) -> MeterRecord:
        row = await self.pool.fetchrow(
            f"SELECT {_METER_COLUMNS} FROM meter.meters WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            parse_uuid(meter_id, "meter_id"),
        )
        if row is None:
            raise NotFound(f"meter_id: no meter {meter_id!r}")
        return _meter(tenant_id, row)

    async def list_meters(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[MeterRecord]:
        rows = await self.pool.fetch(
            f"SELECT {_METER_COLUMNS} FROM meter.meters WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else "00000000-0000-0000-0000-000000000000",
            limit,
        )
        return [_meter(tenant_id, r) for r in rows]

    async def archive_meter(self, tenant_id: str, meter_id: str) -> MeterRecord:
        await self.get_meter(tenant_id, meter_id)
        await self.pool.execute(
            "UPDATE meter.meters SET archived_at = coalesce(archived_at, now())"
            " WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            meter_id,
        )
        return await self.get_meter(tenant_id, meter_id)

    async def set_backfill_state(self, tenant_id: str, meter_id: str, state: str) -> None:
        await self.pool.execute(
            "UPDATE meter.meters SET backfill_state = $3 WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            meter_id,
            state,
        )

    async def meters_with_backfill_running(self) -> list[MeterRecord]:
        rows = await self.pool.fetch(
            f"SELECT tenant_id, {_METER_COLUMNS} FROM meter.meters"
            " WHERE backfill_state = 'RUNNING' AND archived_at IS NULL"
        )
        return [_meter(r["tenant_id"], r) for r in rows]

    async def active_meters(self, tenant_ids: Sequence[str]) -> list[MeterRecord]:
        rows = await self.pool.fetch(
            f"SELECT tenant_id, {_METER_COLUMNS} FROM meter.meters"
            " WHERE tenant_id = ANY($1::text[]) AND archived_at IS NULL",
            list(tenant_ids),
        )
        return [_meter(r["tenant_id"], r) for r in rows]

    async def fold(self, rows: Sequence[FoldedEvent]) -> int:
        """Stores the contributions not stored before, in one transaction; a
        repeat of (meter, event) is ignored. Returns how many were new. The
        same transaction adds exactly the new rows to the usage rollups."""
        if not rows:
            return 0
        # A customer's rows go in together, so that their usage query later
        # reads a few heap pages per fetch instead of one page per event.
        by_customer: dict[str, list[FoldedEvent]] = defaultdict(list)
        for row in rows:
            by_customer[row.customer_id].append(row)
        rows = [row for group in by_customer.values() for row in group]
        columns = [list(column) for column in zip(*rows, strict=True)]
        kept = [row for row in rows if row.skip_reason is None]  # the rows that count
        async with self.pool.acquire() as conn:
            stepped = await self._held_rows(conn, kept)
            places = [  # where `stepped` lies in `rows`
                i
                for i, row in enumerate(rows)
                if row.skip_reason is None and self._held_keys.get(row.meter_key)
            ]
            # Almost always every row is new: COPY them, the cheapest write
            # PostgreSQL has, and roll them all up. The primary key still
            # refuses a repeat (a redelivered message, a backfill overlapping
            # the consumer); then the whole transaction is undone and the rows
            # go in again through INSERT ... ON CONFLICT DO NOTHING, which skips
            # the repeats and rolls up only what it inserted (RETURNING).
            try:
                async with conn.transaction():
                    # Gauges' and seats' rows go in with their steps.
                    steps, minutes = await held.steps_before_copy(
                        conn, rows, places, sorted({r.meter_key for r in stepped} & self._peak_keys)
                    )
                    await conn.copy_records_to_table(
                        "meter_events",
                        schema_name="meter",
                        columns=(*FoldedEvent._fields, "step") if steps else FoldedEvent._fields,
                        records=[(*row, steps.get(i)) for i, row in enumerate(rows)]
                        if steps
                        else rows,
                    )
                    await self._roll_up(conn, kept)
                    await held.peaks(conn, minutes)  # (from the rows just stored)
                return len(rows)
            except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
                pass
            # Rows, gates and buckets go in key order, so that concurrent folds
            # lock them in one order; a deadlock all the same undoes the whole
            # transaction, which is then tried again.
            for attempt in range(_FOLD_ATTEMPTS):
                try:
                    async with conn.transaction():
                        inserted = [FoldedEvent(*r) for r in await conn.fetch(_INSERTED, *columns)]
                        await self._roll_up(conn, [r for r in inserted if r.skip_reason is None])
                        # Only the rows not stepped before.
                        await held.fold(
                            conn, stepped, sorted({r.meter_key for r in stepped} & self._peak_keys)
                        )
                    return len(inserted)
                except asyncpg.DeadlockDetectedError:
                    if attempt == _FOLD_ATTEMPTS - 1:
                        raise
            raise AssertionError("unreachable")

    async def _roll_up(self, conn: Any, rows: Sequence[FoldedEvent]) -> None:
        """Adds the fold's stored `rows` (counted ones) to their days' gates, and
        to the buckets of the grains their days are past; builds the buckets of
        the grains it takes days past (domain.rollup, "Gates"). A gate's row
        lock, held to the commit, orders the folds of one customer's day, so a
        day's buckets are built once, from every row stored before."""
        if not rows:
            return
        keys = rollup.gate_keys(rows)
        rebuilt, dense, fine = rollup.fold_plan(
            rows, keys, await self._pass_gates(conn, Counter(keys))
        )
        if dense:
            # Aggregated here, from the rows in hand: the buckets go up, not the
            # rows a second time (a third of the fold's cost at 300 rows a day).
            added, values = rollup.buckets(dense, fine)
            await conn.execute(_UPSERT, *[list(c) for c in zip(*added, strict=True)])
            if values:
                await conn.execute(_UPSERT_VALUES, *[list(c) for c in zip(*values, strict=True)])
        if rebuilt:  # (after the gates' upsert: sees every earlier fold's rows)
            ordered = sorted(rebuilt)
            await conn.execute(
                _ROLLUP.format(new=_REBUILT, values=_VALUES, gates=""),
                *_key_columns(ordered),
                [rebuilt[k][0] for k in ordered],
                [rebuilt[k][1] for k in ordered],
            )

    async def _pass_gates(
        self, conn: Any, added: Mapping[rollup.GateKey, int]
    ) -> dict[rollup.GateKey, tuple[int, int]]:
        """Each day's level (domain.rollup) before and after the fold's rows
        `added` (a count per day)."""
        # A day past both gates stays so: those are read without a lock, and not
        # counted any further (concurrent folds of a busy customer's day would
        # queue on its row). The others are counted under their row locks.
        keys = sorted(added)
        levels = {
            (r[0], r[1], r[2]): (rollup.MINUTES, rollup.MINUTES)
            for r in await conn.fetch(_PAST, *_key_columns(keys))
        }
        keys = [k for k in keys if k not in levels]
        if keys:
            counted = await conn.fetch(
                _GATES,
                *_key_columns(keys),
                self.gates.hours,
                self.gates.minutes,
                [added[k] for k in keys],
            )
            levels.update(rollup.crossings(added, (tuple(r) for r in counted)))
        return levels

    async def roll_up_stored(self, meter_key: int, start: datetime, end: datetime) -> None:
        """Rolls up the meter's rows in [start, end) that were written to
        meter_events directly (benches and tests that load rows in bulk), at
        every grain whatever their number (their days' gates are made past);
        only for rows never rolled up, in days the fold never wrote, or they
        count twice."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _ROLLUP.format(
                    new=f"new AS (SELECT {_FIELDS}, true AS fine, true AS coarse"
                    " FROM meter.meter_events"
                    " WHERE meter_key = $1 AND event_time >= $2 AND event_time < $3)",
                    values=_VALUES,
                    gates=_BULK_GATES,
                ),
                meter_key,
                start,
                end,
            )
            if await self._held_rows(conn, [FoldedEvent(meter_key, "", start, "", *[None] * 4)]):
                await held.fold_stored(
                    conn, meter_key, start, end, peak=meter_key in self._peak_keys
                )

    async def insert_and_roll_up(self, select: str, *args: Any) -> int:
        """Inserts the rows that `select` yields (meter_events' columns, none
        stored before) and rolls them up at every grain, in one statement, as
        roll_up_stored does. For benches that load millions of rows (not of held
        meters: their steps stay unset; roll_up_stored sets them)."""
        async with self.pool.acquire() as conn:
            inserted = await conn.fetchval(
                _ROLLUP.format(
                    new=f"stored AS (INSERT INTO meter.meter_events {select} RETURNING {_FIELDS}),"
                    " new AS (SELECT *, true AS fine, true AS coarse FROM stored)",
                    values=_VALUES,
                    gates=_BULK_GATES,
                ),
                *args,
                timeout=3600,
            )
        return int(inserted)

    async def skipped_counts(self, tenant_id: str, meter_id: str) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT skip_reason, count(*) AS n FROM meter.meter_events"
            f" WHERE meter_key = {_KEY_OF} AND skip_reason IS NOT NULL"
            " GROUP BY skip_reason",
            tenant_id,
            meter_id,
        )
        return {r["skip_reason"]: r["n"] for r in rows}

    async def usage(
        self,
        meter: MeterRecord,
        *,
        customer_id: str,
        bounds: Sequence[datetime],
        end: datetime,
        group_by: Sequence[str],
        group_filter: dict[str, str],
        after_customer: str = "",
        customer_limit: int | None = None,
    ) -> AsyncGenerator[list[UsageGroup], None]:
        """Aggregates the meter's contributions in [bounds[0], end), bucketed by
        the window starts in `bounds` (ascending), in order, YIELD_EVERY rows at a
        time: read through a cursor, so that meter holds one slice of the
        aggregated rows at once and its caller can stop (refuse an answer over its
        limits) before PostgreSQL has sent them all. Close it (`aclosing`) when
        stopping early: it holds a pooled connection until closed.

        Reads the rollups' buckets and the raw rows of the windows' partial
        minutes (domain.rollup), so its cost follows the windows, not the events.

        Paging by customer: only customers whose id sorts bytewise (COLLATE "C")
        after `after_customer`, and of those only the first `customer_limit`
        that have usage in the range (all their rows, in the usual order)."""
        uniform = rollup.uniform_grain(bounds, end)
        if uniform is not None:  # every bucket of one grain lies in one window
            pieces = {grain: rollup.Pieces() for grain in (rollup.RAW, "m", "h")}
            pieces[uniform] = rollup.Pieces(list(range(1, len(bounds) + 1)), list(bounds), [])
        elif len(bounds) < _PLAN_INLINE:
            pieces = rollup.plan(bounds, end)
        else:
            pieces = await asyncio.to_thread(rollup.plan, bounds, end)
        args: list[Any] = [meter.key]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        def customers(alias: str) -> list[str]:
            out = []
            if customer_id:
                out.append(f"{alias}.customer_id = {arg(customer_id)}")
            if after_customer:
                out.append(f'{alias}.customer_id > {arg(after_customer)}::text COLLATE "C"')
            return out

        def conditions(alias: str) -> str:
            out = customers(alias)
            for key, value in sorted(group_filter.items()):
                out.append(f"coalesce({alias}.dims->>{arg(key)}, '') = {arg(value)}")
            return "".join(f" AND {c}" for c in out)

        def given(p: rollup.Pieces) -> str:
            return (
                f"unnest({arg(p.windows)}::integer[], {arg(p.starts)}::timestamptz[],"
                f" {arg(p.ends)}::timestamptz[]) AS p (w, lo, hi)"
            )

        unique = meter.aggregation == "UNIQUE_COUNT"
        table = "meter.usage_rollup_values" if unique else "meter.usage_rollups"
        state = "r.text_value" if unique else _BUCKET_STATE
        raw_state = "e.text_value" if unique else _RAW_STATE

        def scanned(grain: str) -> str:
            # One scan of the range's buckets; width_bucket finds each one's piece.
            p = pieces[grain]
            if grain == uniform:  # the pieces are the windows, back to back
                return (
                    f"SELECT width_bucket(r.bucket_start, {arg(p.starts)}::timestamptz[]) AS w,"
                    f" r.customer_id, r.dims, {state} FROM {table} r"
                    f" WHERE r.meter_key = $1 AND r.grain = '{grain}'"
                    f" AND r.bucket_start >= {arg(p.starts[0])} AND r.bucket_start < {arg(end)}"
                    f"{conditions('r')}"
                )
            return (
                f"SELECT ({arg(p.windows)}::integer[])[x.i] AS w, r.customer_id, r.dims,"
                f" {state} FROM {table} r CROSS JOIN LATERAL (SELECT width_bucket("
                f"r.bucket_start, {arg(p.starts)}::timestamptz[]) AS i) AS x"
                f" WHERE r.meter_key = $1 AND r.grain = '{grain}'"
                f" AND r.bucket_start >= {arg(p.starts[0])} AND r.bucket_start < {arg(p.ends[-1])}"
                f" AND r.bucket_start < ({arg(p.ends)}::timestamptz[])[x.i]{conditions('r')}"
            )

        def ranged(grain: str, p: rollup.Pieces) -> str:
            # One index range per piece (OFFSET 0: not flattened into a join
            # that would scan more than the piece).
            return (
                f"SELECT p.w, r.* FROM {given(p)} CROSS JOIN LATERAL (SELECT r.customer_id,"
                f" r.dims, {state} FROM {table} r WHERE r.meter_key = $1"
                f" AND r.grain = '{grain}' AND r.bucket_start >= p.lo AND r.bucket_start < p.hi"
                f"{conditions('r')} OFFSET 0) AS r"
            )

        parts = []
        if pieces["h"].windows:  # hour pieces are dense: only minutes lie between
            parts.append(scanned("h"))
        minutes = pieces["m"]
        if uniform == "m":
            parts.append(scanned("m"))
        elif minutes.windows:
            covered = sum(
                (b - a for a, b in zip(minutes.starts, minutes.ends, strict=True)), timedelta()
            )
            # Dense (MINUTE or HOUR windows): one scan; sparse (the edges of
            # longer windows): a range each, so as not to read what lies between.
            dense = minutes.ends[-1] - minutes.starts[0] <= 4 * covered
            parts.append(scanned("m") if dense else ranged("m", minutes))

        def raw_rows(p: rollup.Pieces, state: str) -> str:
            # A partial minute's rows, for the customers its minute's buckets
            # name: each a range of meter_events' primary key (customer, time).
            return (
                f"SELECT p.w, e.* FROM {given(p)}"
                " CROSS JOIN LATERAL (SELECT DISTINCT m.customer_id FROM meter.usage_rollups m"
                " WHERE m.meter_key = $1 AND m.grain = 'm'"
                " AND m.bucket_start = date_trunc('minute', p.lo, 'UTC')"
                f"{''.join(f' AND {c}' for c in customers('m'))} OFFSET 0) AS c"
                " CROSS JOIN LATERAL (SELECT e.customer_id, coalesce(e.dims, '{}'::jsonb),"
                f" {state} FROM meter.meter_events e WHERE e.meter_key = $1"
                " AND e.customer_id = c.customer_id AND e.event_time >= p.lo"
                f" AND e.event_time < p.hi AND e.skip_reason IS NULL{conditions('e')}"
                " OFFSET 0) AS e"
            )

        raw = pieces[rollup.RAW]
        # One customer's partial minutes of over half a minute, where the
        # aggregation subtracts: the minute's bucket less the rows outside (the
        # rows a read takes then follow half a minute, not the customer's rate).
        subtract = bool(customer_id) and customer_limit is None and meter.aggregation in _SUBTRACTS
        if subtract:
            raw, whole, outside = rollup.complements(raw)
            if whole.windows:
                parts.append(ranged("m", whole))
                parts.append(raw_rows(outside, _OUTSIDE_STATE))
        if raw.windows:
            parts.append(raw_rows(raw, raw_state))

        # Days below a gate (domain.rollup, "Gates"), read from their rows: those
        # below the hours' gate wholly, those past it but below the minutes'
        # gate where the windows cut their hours (minute pieces, partial minutes).
        def gated(level: str) -> str:
            return f"g.meter_key = $1 AND {level}" + "".join(f" AND {c}" for c in customers("g"))

        day_rows = (
            "CROSS JOIN LATERAL (SELECT e.* FROM meter.meter_events e WHERE e.meter_key = $1"
            " AND e.customer_id = g.customer_id AND e.event_time >= greatest(g.day, {lo})"
            " AND e.event_time < least(g.day + interval '24 hours', {hi})"
            " AND e.skip_reason IS NULL{conditions} OFFSET 0) AS e"
        )
        fields = f"e.customer_id, coalesce(e.dims, '{{}}'::jsonb), {raw_state}"

        def whole_range(level: str) -> str:
            return (
                f"SELECT width_bucket(e.event_time, {arg(list(bounds))}::timestamptz[]) AS w,"
                f" {fields} FROM meter.usage_gates g "
                + day_rows.format(lo=arg(bounds[0]), hi=arg(end), conditions=conditions("e"))
                + f" WHERE {gated(level)} AND g.day > {arg(bounds[0] - rollup.DAY)}"
                f" AND g.day < {arg(end)}"
            )

        parts.append(whole_range("g.n < g.hours_from"))
        hours_only = "g.n >= g.hours_from AND g.n < g.minutes_from"
        if uniform == "m":
            parts.append(whole_range(hours_only))
        elif uniform is None and (pieces["m"].windows or pieces[rollup.RAW].windows):
            cut = rollup.Pieces()
            for grain in ("m", rollup.RAW):
                cut.windows += pieces[grain].windows
                cut.starts += pieces[grain].starts
                cut.ends += pieces[grain].ends
            parts.append(
                f"SELECT p.w, {fields} FROM unnest({arg(cut.windows)}::integer[],"
                f" {arg(cut.starts)}::timestamptz[], {arg(cut.ends)}::timestamptz[])"
                " AS p (w, lo, hi) CROSS JOIN LATERAL (SELECT g.* FROM meter.usage_gates g"
                f" WHERE {gated(hours_only)} AND g.day > p.lo - interval '24 hours'"
                " AND g.day < p.hi OFFSET 0) AS g "
                + day_rows.format(lo="p.lo", hi="p.hi", conditions=conditions("e"))
            )
        columns = (
            "w, customer_id, dims, text_value" if unique else f"w, customer_id, dims, {_PARTS}"
        )
        paged = ""
        if customer_limit is not None:
            paged = (
                " WHERE customer_id IN (SELECT DISTINCT customer_id FROM parts"
                f" ORDER BY customer_id LIMIT {arg(customer_limit)})"
            )
        dims = [f"coalesce(dims->>{arg(key)}, '')" for key in group_by]
        keys = ", ".join(str(i) for i in range(1, 3 + len(dims)))
        query = (
            f"WITH parts ({columns}) AS ({' UNION ALL '.join(parts)})"
            f" SELECT {', '.join(['w', 'customer_id', *dims])},"
            f" {SQL_AGGREGATES[meter.aggregation]} AS value,"
            f" {'count(*)' if unique else 'sum(n)'} AS n"
            f" FROM parts{paged} GROUP BY {keys}"
            # (A bucket less its outside rows can leave a group no event.)
            f"{' HAVING sum(n) > 0' if subtract else ''} ORDER BY {keys}"
        )

        if customer_id and not group_by and len(bounds) <= ONE_READ_WINDOWS:
            # One customer, no groups: a row per window at most, in one round
            # trip (a cursor's transaction takes four, and the pool's reset one
            # more: a balance check asks this before each request it serves),
            # handed on YIELD_EVERY rows at a time all the same.
            rows = await self.reads.fetch(query, *args)
            for low in range(0, len(rows), YIELD_EVERY):
                yield _groups(rows[low : low + YIELD_EVERY], len(dims))
            return
        # A cursor needs a transaction; a read-only one takes no locks to speak of.
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            cursor = await conn.cursor(query, *args)
            while True:
                rows = await cursor.fetch(YIELD_EVERY)
                if rows:
                    yield _groups(rows, len(dims))
                # A short slice is the last: no round trip to hear so (most
                # answers are one slice).
                if len(rows) < YIELD_EVERY:
                    break
                del rows

    async def held_usage(
        self,
        meter: MeterRecord,
        *,
        customer_id: str,
        bounds: Sequence[datetime],
        end: datetime,
        group_by: Sequence[str],
        group_filter: dict[str, str],
        after_customer: str = "",
        customer_limit: int | None = None,
    ) -> AsyncGenerator[list[UsageGroup], None]:
        """`usage` for the held aggregations (gauges and seats, domain.gauges):
        SEATS_END and SEATS_MAX give the level, the others the exact integral
        in value x microseconds (domain.aggregation.held_value divides it).

        A line (customer, dims, and text_value: a seat's item) holds each
        event's value until its next event, in (event_time, event_id) order;
        integrals and the level at a window's end add up over the lines of a
        group, and SEATS_MAX takes the group's level (the lines' steps added
        up in time order). Pieces are cut at the windows' bounds.

        Reads the rows in the range, and each line's last row before it: one
        index probe per customer for a gauge without dimensions, else a scan
        of the rows before the range. Not from the rollups (their buckets do
        not hold what a line's value is between events): the cost grows with
        the events in the range.

        Only SEATS_MAX grouped more coarsely than the meter reads this way;
        everything else reads the pre-aggregated steps (and SEATS_MAX's peaks)
        instead (held.usage)."""
        # SEATS_MAX's peaks are per stored dimensions: they serve a read whose
        # groups are those (a peak does not add up over several groups' buckets).
        if meter.aggregation != "SEATS_MAX" or set(group_by) == set(meter.group_by):
            async for found in held.usage(
                self.pool,
                meter.key,
                meter.aggregation,
                customer_id=customer_id,
                bounds=bounds,
                end=end,
                group_by=group_by,
                group_filter=group_filter,
                after_customer=after_customer,
                customer_limit=customer_limit,
                yield_every=YIELD_EVERY,
            ):
                yield [UsageGroup(*g) for g in found]
            return
        args: list[Any] = [meter.tenant_id, meter.id, list(bounds), bounds[0], end]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        # A gauge without dimensions takes the fast path below.
        fast = not meter.group_by and meter.aggregation in _GAUGES
        conditions = [f"meter_key = {_KEY_OF}", "event_time < $5", "skip_reason IS NULL"]
        customer = arg(customer_id) if customer_id else ""
        if customer:
            conditions.append(f"customer_id = {customer}")
        after = f'{arg(after_customer)}::text COLLATE "C"'
        conditions.append(f"customer_id > {after}")
        for key, value in sorted(group_filter.items()):
            conditions.append(f"coalesce(dims->>{arg(key)}, '') = {arg(value)}")
        if customer_limit is not None and not fast:
            first = " AND ".join(conditions)
            conditions.append(
                "customer_id IN (SELECT DISTINCT customer_id FROM meter.meter_events"
                f" WHERE {first} ORDER BY customer_id LIMIT {arg(customer_limit)})"
            )
        dims = [f"coalesce(dims->>{arg(key)}, '') AS g{i}" for i, key in enumerate(group_by)]
        group = ", ".join(["customer_id", *(f"g{i}" for i in range(len(group_by)))])
        # A line's key; a gauge without dimensions has one line per customer (so
        # its rows come in the primary key's order, with nothing to sort).
        line = (
            "customer_id"
            if fast
            # jsonb compares slowly; its text, bytewise, is one key all the same.
            else 'customer_id, (dims::text COLLATE "C"), text_value COLLATE "C"'
        )
        where = " AND ".join(conditions)
        columns = "customer_id, dims, text_value, event_time, event_id, value"
        customers = ""  # a CTE of the customers read, on the fast path
        if not fast:
            # Each line's last row before the range: a scan of the rows before it.
            events = (
                f"(SELECT DISTINCT ON ({line}) {columns} FROM meter.meter_events"
                f" WHERE {where} AND event_time < $4"
                f" ORDER BY {line}, event_time DESC, event_id DESC)"
                f" UNION ALL (SELECT {columns} FROM meter.meter_events"
                f" WHERE {where} AND event_time >= $4)"
            )
        else:
            # A gauge without dimensions: a line is a customer, and its last row
            # before the range is one step back in the primary key's order; the
            # customers are walked in that order too (one index probe each).
            own = (
                f"meter_key = {_KEY_OF} AND skip_reason IS NULL AND event_time < $5"
                f" AND customer_id > {after}"
            )
            if customer_id:
                customers = f"customers AS (SELECT {customer}::text AS customer_id),"
            else:
                limit = "" if customer_limit is None else f" LIMIT {arg(customer_limit)}"
                customers = f"""
                    walk AS (
                        SELECT (SELECT min(customer_id) FROM meter.meter_events
                            WHERE {own}) AS customer_id
                        UNION ALL
                        SELECT (SELECT min(customer_id) FROM meter.meter_events
                            WHERE {own} AND customer_id > walk.customer_id)
                        FROM walk WHERE walk.customer_id IS NOT NULL
                    ), customers AS (
                        SELECT customer_id FROM walk WHERE customer_id IS NOT NULL{limit}
                    ),"""
            events = (
                f"(SELECT last.* FROM customers, LATERAL (SELECT {columns}"
                f" FROM meter.meter_events e WHERE e.meter_key = {_KEY_OF}"
                " AND e.customer_id = customers.customer_id AND e.skip_reason IS NULL"
                " AND e.event_time < $4 ORDER BY e.event_time DESC, e.event_id DESC LIMIT 1)"
                f" AS last) UNION ALL (SELECT {columns} FROM meter.meter_events WHERE {own}"
                " AND event_time >= $4 AND customer_id IN (SELECT customer_id FROM customers))"
            )
        if meter.aggregation == "SEATS_MAX":
            # The most at one instant needs the group's level: the lines' steps
            # (value minus the line's previous value) added up in time order.
            level = f"""
                step AS (
                    SELECT {", ".join(["customer_id", *dims])}, event_time,
                        value - coalesce(lag(value) OVER (PARTITION BY {line}
                            ORDER BY event_time, event_id), 0) AS d
                    FROM ({events}) AS e
                ), change AS (
                    SELECT {group}, event_time AS t, sum(d) AS d
                    FROM step GROUP BY {group}, event_time
                ), level AS (
                    SELECT {group}, t, sum(d) OVER (PARTITION BY {group} ORDER BY t) AS f,
                        coalesce(lead(t) OVER (PARTITION BY {group} ORDER BY t), $5) AS t_next
                    FROM change
                )"""
            value = "max(f)"
        else:
            # Integrals and the level at a window's end add up over lines: each
            # line's value holds from its event to its next.
            level = f"""
                level AS (
                    SELECT {", ".join(["customer_id", *dims])}, value AS f, event_time AS t,
                        coalesce(lead(event_time) OVER (PARTITION BY {line}
                            ORDER BY event_time, event_id), $5) AS t_next
                    FROM ({events}) AS e
                )"""
            # extract(epoch ...) is numeric, exact to the microsecond.
            value = (
                "sum(f) FILTER (WHERE pb = coalesce(($3::timestamptz[])[w + 1], $5))"
                if meter.aggregation == "SEATS_END"
                else "sum(f * (extract(epoch FROM pb) - extract(epoch FROM pa)) * 1000000)"
            )
        # The windows a piece of level overlaps (one, without windows).
        windows = (
            "(VALUES (1)) AS x (w)"
            if len(bounds) == 1
            else "generate_series(width_bucket(greatest(t, $4), $3::timestamptz[]),"
            " width_bucket(least(t_next, $5) - interval '1 microsecond', $3::timestamptz[])) AS w"
        )
        query = f"""
            WITH RECURSIVE {customers} {level}, piece AS (
                SELECT {group}, f, w,
                    greatest(t, ($3::timestamptz[])[w]) AS pa,
                    least(t_next, coalesce(($3::timestamptz[])[w + 1], $5)) AS pb
                FROM level, {windows}
                WHERE t_next > $4 AND t_next > t
            )
            SELECT w, {group}, {value} AS value, count(*) AS n
            FROM piece GROUP BY w, {group} ORDER BY w, {group}
        """
        async with self.pool.acquire() as conn, conn.transaction(readonly=True):
            cursor = await conn.cursor(query, *args)
            while rows := await cursor.fetch(YIELD_EVERY):
                yield _groups(rows, len(group_by))
                del rows


@dataclass(frozen=True)
class QuarantineRecord:
    """Events the fold set aside (or the raw bytes of a message that could not
    be decoded, when `decodable` is false). `size_bytes` is the payload's size."""

    id: str
    tenant_id: str
    decodable: bool
    reason: str
    event_ids: tuple[str, ...]
    attempts: int
    quarantined_at: datetime
    last_attempt_at: datetime
    size_bytes: int


_QUARANTINE_COLUMNS = (
    "id, tenant_id, decodable, reason, event_ids, attempts, quarantined_at, last_attempt_at,"
    " octet_length(payload) AS size_bytes"
)


def _quarantined(row: asyncpg.Record) -> QuarantineRecord:
    return QuarantineRecord(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        decodable=row["decodable"],
        reason=row["reason"],
        event_ids=tuple(row["event_ids"]),
        attempts=row["attempts"],
        quarantined_at=row["quarantined_at"],
        last_attempt_at=row["last_attempt_at"],
        size_bytes=row["size_bytes"],
    )


class QuarantineStore:
    """meter.quarantine: what the fold set aside (services.meter.quarantine)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def add(
        self,
        *,
        tenant_id: str,
        fingerprint: bytes,
        payload: bytes,
        decodable: bool,
        reason: str,
        event_ids: Sequence[str],
        attempts: int,
    ) -> bool:
        """Sets the payload aside; True when it is new. The same fingerprint
        again (a redelivered message) updates the row's reason and attempts."""
        inserted = await self.pool.fetchval(
            "INSERT INTO meter.quarantine (tenant_id, fingerprint, payload, decodable, reason,"
            " event_ids, attempts) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (fingerprint) DO UPDATE SET reason = EXCLUDED.reason,"
            " attempts = meter.quarantine.attempts + 1, last_attempt_at = now()"
            " RETURNING xmax = 0",
            tenant_id,
            fingerprint,
            payload,
            decodable,
            reason,
            list(event_ids),
            attempts,
        )
        return bool(inserted)

    async def page(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[QuarantineRecord]:
        """Newest first, strictly after `after` (the (quarantined_at, id) of the
        last row of the previous page); every tenant's when `tenant_id` is ""."""
        rows = await self.pool.fetch(
            f"SELECT {_QUARANTINE_COLUMNS} FROM meter.quarantine"
            " WHERE ($1 = '' OR tenant_id = $1)"
            " AND ($2::timestamptz IS NULL OR (quarantined_at, id) < ($2, $3::uuid))"
            " ORDER BY quarantined_at DESC, id DESC LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else "00000000-0000-0000-0000-000000000000",
            limit,
        )
        return [_quarantined(r) for r in rows]

    async def payloads(self, ids: Sequence[str]) -> list[tuple[QuarantineRecord, bytes]]:
        """The named rows that exist, oldest first, with their payloads."""
        rows = await self.pool.fetch(
            f"SELECT {_QUARANTINE_COLUMNS}, payload FROM meter.quarantine"
            " WHERE id = ANY($1::uuid[]) ORDER BY quarantined_at, id",
            list(ids),
        )
        return [(_quarantined(r), bytes(r["payload"])) for r in rows]

    async def failed_again(
        self,
        quarantine_id: str,
        *,
        fingerprint: bytes,
        payload: bytes,
        reason: str,
        event_ids: Sequence[str],
    ) -> QuarantineRecord | None:
        """After a replay that failed (for some of its events): the row keeps
        those events and the new reason, one attempt more. None when the row is
        gone meanwhile, or another row already holds exactly these events (that
        one stays)."""
        try:
            row = await self.pool.fetchrow(
                "UPDATE meter.quarantine SET fingerprint = $2, payload = $3, reason = $4,"
                " event_ids = $5, attempts = attempts + 1, last_attempt_at = now()"
                f" WHERE id = $1 RETURNING {_QUARANTINE_COLUMNS}",
                quarantine_id,
                fingerprint,
                payload,
                reason,
                list(event_ids),
            )
        except asyncpg.UniqueViolationError:
            await self.remove([quarantine_id])
            return None
        return _quarantined(row) if row is not None else None

    async def remove(self, ids: Sequence[str]) -> int:
        result: str = await self.pool.execute(
            "DELETE FROM meter.quarantine WHERE id = ANY($1::uuid[])", list(ids)
        )
        return int(result.split()[-1])

    async def depth(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM meter.quarantine"))
