"""meter's SQL for the held aggregations' pre-aggregation (migration 0009):
each event's step (its value minus its line's previous value) kept on its row,
and per bucket n, d = sum of steps, m = sum of step * t (t in microseconds since
1970), so that a window [a, b) reads

    integral = level(a-) * (b - a) + b * d - m    (d, m over the steps in [a, b))
    level at b- = level(a-) + d

with level(a-) the sum of every step before a: day buckets, then the hours,
minutes and raw rows up to a (domain.rollup cuts the pieces, as for `usage`).
The oracle is domain.gauges. SEATS_MAX (the most the level reaches inside a
window) is not a function of d and m: its buckets also keep a peak (migration
0011, domain.gauges.Span), the most the sum of the bucket's steps from its
start reaches at one of its instants, and a window reads

    most = level(a-) + max over pieces i in time order of (d_1 + ... + d_{i-1} + peak_i)

with 0 among them when no piece starts at a (then the level before a is the
level at a), a partial minute's rows read as one piece per event time. Peaks
are not additive: the fold recomputes those of the buckets it changed (`peaks`:
minutes from rows, hours from minutes, days from hours). A peak is per stored
dimensions, so a query grouped more coarsely still reads the rows
(MeterStore.held_usage).

Exactly once: the fold gives the steps only to its rows whose step is still
NULL (rows it inserted; a redelivered row was stepped by the fold that stored
it), under a per-(meter, customer) advisory lock taken, in key order, in a
statement before, so that concurrent folds of one line see each other's rows
(the statement's snapshot is taken after the lock). A late event also changes
the step of its line's next stored event: the difference goes to that event's
buckets.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from services.meter.domain import rollup
from services.meter.domain.matching import FoldedEvent

_DAY = timedelta(days=1)
_MICROS = "(extract(epoch FROM {t}) * 1000000)"  # numeric: exact to the microsecond

# One advisory lock per (meter, customer) of the rows, taken in key order
# (OFFSET 0: sorted before the locks are taken).
LOCK = """
SELECT count(pg_advisory_xact_lock(k, h)) FROM (
    SELECT DISTINCT k, hashtext(c) AS h FROM unnest($1::integer[], $2::text[]) AS u (k, c)
    ORDER BY 1, 2 OFFSET 0) AS s
"""

# Rows not stored yet, given as arrays ($1..$8; i: the row's place in the fold).
UNSTORED = """
SELECT meter_key, customer_id COLLATE "C" AS customer_id, event_time,
    event_id COLLATE "C" AS event_id, value, text_value, dims, i
FROM unnest($1::integer[], $2::text[], $3::timestamptz[], $4::text[], $5::numeric[],
    $6::text[], $7::jsonb[], $8::integer[])
    AS u (meter_key, customer_id, event_time, event_id, value, text_value, dims, i)
"""
# The given rows (keys $1..$4) that are stored and have no step yet.
GIVEN = """
SELECT e.*, 0 AS i FROM unnest($1::integer[], $2::text[], $3::timestamptz[], $4::text[])
    AS g (meter_key, customer_id, event_time, event_id)
JOIN meter.meter_events e USING (meter_key, customer_id, event_time, event_id)
WHERE e.step IS NULL AND e.skip_reason IS NULL
"""

# Per line, the stored rows (those with a step) that may neighbour a new row:
# from the one before its first new row to the one after its last (one probe
# each, and a range that is empty unless rows came late); then the steps of the
# new rows and of the stored rows whose previous row is now a new one, and the
# buckets' changes.
_LINE = (
    "e.meter_key = s.meter_key AND e.customer_id = s.customer_id"
    " AND coalesce(e.dims::text, '') = s.dk AND coalesce(e.text_value, '') = s.item"
    " AND e.step IS NOT NULL"
)
_COLUMNS = "e.meter_key, e.customer_id, e.event_time, e.event_id, e.value, e.dims, e.step"
FOLD = f"""
WITH new AS (
    SELECT n.*, coalesce(n.dims::text, '') AS dk, coalesce(n.text_value, '') AS item
    FROM ({{new}}) AS n
), lines AS (  -- each line's first and last new row
    SELECT meter_key, customer_id, dk, item,
        (array_agg(event_time ORDER BY event_time, event_id))[1] AS ft,
        (array_agg(event_id ORDER BY event_time, event_id))[1] AS fid,
        (array_agg(event_time ORDER BY event_time DESC, event_id DESC))[1] AS lt,
        (array_agg(event_id ORDER BY event_time DESC, event_id DESC))[1] AS lid
    FROM new GROUP BY 1, 2, 3, 4
), stored AS (  -- the stored rows from the first one's previous to the last one's next
    SELECT DISTINCT ON (meter_key, customer_id, event_time, event_id) * FROM (
        SELECT s.dk, s.item, p.* FROM lines s CROSS JOIN LATERAL (
            SELECT {_COLUMNS} FROM meter.meter_events e WHERE {_LINE}
                AND (e.event_time, e.event_id) < (s.ft, s.fid)
            ORDER BY e.event_time DESC, e.event_id DESC LIMIT 1) AS p
        UNION ALL
        SELECT s.dk, s.item, p.* FROM lines s CROSS JOIN LATERAL (
            SELECT {_COLUMNS} FROM meter.meter_events e WHERE {_LINE}
                AND (e.event_time, e.event_id) > (s.lt, s.lid)
            ORDER BY e.event_time, e.event_id LIMIT 1) AS p
        UNION ALL
        SELECT s.dk, s.item, p.* FROM lines s CROSS JOIN LATERAL (
            SELECT {_COLUMNS} FROM meter.meter_events e WHERE {_LINE}
                AND e.event_time >= s.ft AND e.event_time <= s.lt) AS p
    ) AS x
), relevant AS (
    SELECT meter_key, customer_id, dk, item, dims, event_time, event_id, value,
        NULL::numeric AS old, true AS is_new, i FROM new
    UNION ALL
    SELECT meter_key, customer_id, dk, item, dims, event_time, event_id, value,
        step, false, NULL::integer FROM stored
), stepped AS (
    SELECT *, value - coalesce(lag(value) OVER w, 0) AS step, lag(is_new) OVER w AS after_new
    FROM relevant
    WINDOW w AS (PARTITION BY meter_key, customer_id, dk, item ORDER BY event_time, event_id)
), changed AS (
    SELECT meter_key, customer_id, dims, event_time, event_id, step, is_new, i,
        CASE WHEN is_new THEN step ELSE step - old END AS delta
    FROM stepped WHERE is_new OR after_new
), updated AS (
    UPDATE meter.meter_events e SET step = c.step FROM changed c
    WHERE e.meter_key = c.meter_key AND e.customer_id = c.customer_id
        AND e.event_time = c.event_time AND e.event_id = c.event_id{{updated}}
), buckets AS (
    SELECT c.meter_key, g.grain, c.customer_id,
        date_bin(g.step, c.event_time, '0001-01-01 00:00:00+00') AS bucket_start,
        coalesce(c.dims, '{{{{}}}}'::jsonb) AS dims, count(*) FILTER (WHERE c.is_new) AS n,
        sum(c.delta) AS d, sum(c.delta * {_MICROS.format(t="c.event_time")}) AS m
    FROM changed c CROSS JOIN (VALUES ('m'::"char", interval '1 minute'),
        ('h', interval '1 hour'), ('d', interval '1 day')) AS g (grain, step)
    GROUP BY 1, 2, 3, 4, 5
), written AS (
    INSERT INTO meter.held_rollups AS r SELECT * FROM buckets ORDER BY 1, 2, 3, 4, 5
    ON CONFLICT (meter_key, grain, customer_id, bucket_start, dims) DO UPDATE SET
        n = r.n + EXCLUDED.n, d = r.d + EXCLUDED.d, m = r.m + EXCLUDED.m
)
SELECT i, step, NULL::integer, NULL::text, NULL::text, NULL::timestamptz FROM changed WHERE is_new
UNION ALL  -- the minutes whose SEATS_MAX peaks change (meters {{peaks}})
SELECT DISTINCT NULL::integer, NULL::numeric, meter_key, customer_id,
    coalesce(dims, '{{{{}}}}'::jsonb)::text,
    date_bin('1 minute', event_time, '0001-01-01 00:00:00+00')
FROM changed WHERE meter_key = ANY({{peaks}}::integer[])
"""

# SEATS_MAX's peaks (domain.gauges.Span): a bucket's is the most the sum of its
# steps from its start reaches at one of its instants (its start, 0 there when
# no step is at it, and each distinct event time, all steps at one time
# together). Not additive: a fold recomputes those of the buckets it changed,
# given as the minutes $1..$4 (meter_key, customer_id, dims, minute): a
# minute's from its rows, an hour's from its minutes' (d, peak) in order, a
# day's from its hours'. The fold's upsert has locked every one of them.
_KEYS = """
SELECT DISTINCT meter_key, customer_id COLLATE "C" AS customer_id, dims::jsonb AS dims,
    date_bin({step}, minute, '0001-01-01 00:00:00+00') AS start
FROM unnest($1::integer[], $2::text[], $3::text[], $4::timestamptz[])
    AS u (meter_key, customer_id, dims, minute)
"""


def combined_peak(parts: str, keys: str, start: str) -> str:
    """The one rule that combines pieces' peaks (domain.gauges.Span), for
    buckets and for windows alike: a SELECT of `keys` and `peak` from the
    relation `parts` (columns `keys`, t, d, peak; one row per instant t of a
    group), per group of `keys` starting at `start` (an expression of the
    keys): the most, over its pieces in time order, of the d of the pieces
    before one plus its peak, and 0 (the level at the start) when no piece
    starts at `start`."""
    return (
        f"SELECT {keys}, CASE WHEN min(t) > {start} THEN greatest(max(run), 0)"
        " ELSE max(run) END AS peak"
        f" FROM (SELECT *, sum(d) OVER (PARTITION BY {keys} ORDER BY t) - d + peak AS run"
        f" FROM {parts}) AS x GROUP BY {keys}"
    )


# (Written as an upsert of buckets that all exist: it probes the primary key
# once per bucket, where an UPDATE ... FROM may be planned as a merge join that
# rescans the customer's buckets per bucket.)
_SET_PEAK = (
    "INSERT INTO meter.held_rollups AS r (meter_key, grain, customer_id, bucket_start, dims,"
    " n, d, m, peak)"
    " SELECT meter_key, '{grain}', customer_id, start, dims, 0, 0, 0, peak FROM ("
    + combined_peak("parts", "meter_key, customer_id, dims, start", "start")
    + ") AS p ORDER BY 1, 2, 3, 4, 5"
    " ON CONFLICT (meter_key, grain, customer_id, bucket_start, dims)"
    " DO UPDATE SET peak = EXCLUDED.peak"
)

PEAKS = (
    # A minute's instants: its rows' steps added up per event time.
    # (One index range per bucket: OFFSET 0 keeps each lateral a nested loop.)
    "WITH k AS (" + _KEYS.format(step="interval '1 minute'") + "), parts AS ("
    " SELECT k.*, e.t, e.d, e.d AS peak FROM k CROSS JOIN LATERAL ("
    " SELECT e.event_time AS t, sum(e.step) AS d FROM meter.meter_events e"
    " WHERE e.meter_key = k.meter_key AND e.customer_id = k.customer_id"
    " AND e.event_time >= k.start AND e.event_time < k.start + interval '1 minute'"
    " AND coalesce(e.dims, '{}') = k.dims AND e.step IS NOT NULL GROUP BY 1 OFFSET 0) AS e)"
    + _SET_PEAK.format(grain="m"),
    *(
        f"WITH k AS ({_KEYS.format(step=step)}), parts AS ("
        " SELECT k.*, r.* FROM k CROSS JOIN LATERAL (SELECT r.bucket_start AS t, r.d, r.peak"
        f" FROM meter.held_rollups r WHERE r.meter_key = k.meter_key AND r.grain = '{child}'"
        " AND r.customer_id = k.customer_id"
        f" AND r.bucket_start >= k.start AND r.bucket_start < k.start + {step}"
        f" AND r.dims = k.dims OFFSET 0) AS r)" + _SET_PEAK.format(grain=grain)
        for child, grain, step in (("m", "h", "interval '1 hour'"), ("h", "d", "interval '1 day'"))
    ),
)

# (meter_key, customer_id, dims as JSON text, minute) of buckets whose peaks a
# fold changed.
Minute = tuple[int, str, str, datetime]


async def peaks(conn: Any, minutes: Sequence[Minute]) -> None:
    """Recomputes the SEATS_MAX peaks of `minutes`' buckets and of their hours
    and days, after the fold's rows are stored and stepped (in its transaction,
    under its locks)."""
    if not minutes:
        return
    columns = [list(c) for c in zip(*sorted(set(minutes)), strict=True)]
    for statement in PEAKS:
        await conn.execute(statement, *columns)


def _split(found: Sequence[Any]) -> tuple[dict[int, Decimal], list[Minute]]:
    """FOLD's answer: the new rows' steps by place, and the minutes whose
    peaks change."""
    steps, minutes = {}, []
    for r in found:
        if r[2] is None:
            steps[r[0]] = r[1]
        else:
            minutes.append((r[2], r[3], r[4], r[5]))
    return steps, minutes


async def steps_before_copy(
    conn: Any, rows: Sequence[FoldedEvent], places: Sequence[int], peaked: Sequence[int] = ()
) -> tuple[dict[int, Decimal], list[Minute]]:
    """The fold's usual path (in its transaction, before it COPYs `rows`, none
    stored yet): the steps of the held meters' rows (at `places` in `rows`), by
    place, for the COPY to write; their buckets, and the steps of the stored
    rows that late ones now precede, are written here. Should a row turn out to
    be stored already, the COPY fails and the transaction undoes all of it.
    Also the minutes of the SEATS_MAX meters (keys `peaked`) whose peaks the
    rows change: `peaks` them once the rows are stored."""
    if not places:
        return {}, []
    held = [rows[i] for i in places]
    keys = [row.meter_key for row in held]
    customers = [row.customer_id for row in held]
    await conn.execute(LOCK, keys, customers)
    found = await conn.fetch(
        FOLD.format(new=UNSTORED, updated=" AND NOT c.is_new", peaks="$9"),
        keys,
        customers,
        [row.event_time for row in held],
        [row.event_id for row in held],
        [row.value for row in held],
        [row.text_value for row in held],
        [row.dims for row in held],
        list(places),
        list(peaked),
    )
    return _split(found)


async def fold(conn: Any, rows: Sequence[FoldedEvent], peaked: Sequence[int] = ()) -> None:
    """Steps the held meters' `rows` (in the caller's transaction, after they
    were inserted; those stored before are left as they are), and the peaks of
    the SEATS_MAX meters' (keys `peaked`) buckets they change."""
    if not rows:
        return
    keys = [row.meter_key for row in rows]
    customers = [row.customer_id for row in rows]
    await conn.execute(LOCK, keys, customers)
    found = await conn.fetch(
        FOLD.format(new=GIVEN, updated="", peaks="$5"),
        keys,
        customers,
        [row.event_time for row in rows],
        [row.event_id for row in rows],
        list(peaked),
    )
    await peaks(conn, _split(found)[1])


async def fold_stored(
    conn: Any, meter_key: int, start: datetime, end: datetime, peak: bool
) -> None:
    """Steps the meter's rows in [start, end) that have none (rows loaded in
    bulk), as the fold would have (and the peaks, when `peak`: SEATS_MAX)."""
    customers = await conn.fetch(
        "SELECT DISTINCT customer_id FROM meter.meter_events"
        " WHERE meter_key = $1 AND event_time >= $2 AND event_time < $3 AND step IS NULL",
        meter_key,
        start,
        end,
    )
    ids = [r[0] for r in customers]
    await conn.execute(LOCK, [meter_key] * len(ids), ids)
    found = await conn.fetch(
        FOLD.format(
            new="SELECT *, 0 AS i FROM meter.meter_events WHERE meter_key = $1 AND event_time >= $2"
            " AND event_time < $3 AND step IS NULL AND skip_reason IS NULL",
            updated="",
            peaks="$4",
        ),
        meter_key,
        start,
        end,
        [meter_key] if peak else [],
    )
    await peaks(conn, _split(found)[1])


async def usage(
    pool: asyncpg.Pool,
    meter_key: int,
    aggregation: str,
    *,
    customer_id: str,
    bounds: Sequence[datetime],
    end: datetime,
    group_by: Sequence[str],
    group_filter: dict[str, str],
    after_customer: str,
    customer_limit: int | None,
    yield_every: int,
) -> AsyncGenerator[list[tuple[int, str, tuple[str, ...], Decimal | None, int]], None]:
    """(window, customer, dims, value, events so far) of each window that has a
    value, in (window, customer, dims) order: the exact integral in value x
    microseconds, SEATS_END's level, or SEATS_MAX's most at one instant (only
    when `group_by` names each of the meter's dimensions: a peak does not add
    up over the dimensions' buckets). See the module's docstring."""
    peaked = aggregation == "SEATS_MAX"
    # A piece's start and peak (SEATS_MAX): a raw row is an instant whose peak
    # is its step (the instant's rows are added up below).
    extra = ", r.bucket_start, r.peak" if peaked else ""
    day = rollup.floor(bounds[0], _DAY)
    # Window 0: the level before the range; its pieces first, so that each
    # grain's pieces ascend (as scanned() needs).
    pieces = {grain: rollup.Pieces() for grain in (rollup.RAW, "m", "h")}
    for piece in rollup.cut(0, day, bounds[0]) if day < bounds[0] else []:
        pieces[piece.grain].add(piece)
    for grain, more in rollup.plan(bounds, end).items():
        pieces[grain].windows += more.windows
        pieces[grain].starts += more.starts
        pieces[grain].ends += more.ends
    args: list[Any] = [meter_key]

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    def customers(alias: str) -> str:
        out = ""
        if customer_id:
            out += f" AND {alias}.customer_id = {arg(customer_id)}"
        if after_customer:
            out += f' AND {alias}.customer_id > {arg(after_customer)}::text COLLATE "C"'
        return out

    def conditions(alias: str) -> str:
        out = customers(alias)
        for key, value in sorted(group_filter.items()):
            out += f" AND coalesce({alias}.dims->>{arg(key)}, '') = {arg(value)}"
        return out

    def given(grain: str) -> str:
        p = pieces[grain]
        return (
            f"unnest({arg(p.windows)}::integer[], {arg(p.starts)}::timestamptz[],"
            f" {arg(p.ends)}::timestamptz[]) AS p (w, lo, hi)"
        )

    parts = [
        f"SELECT 0, r.customer_id, r.dims, r.n, r.d, r.m{extra} FROM meter.held_rollups r"
        f" WHERE r.meter_key = $1 AND r.grain = 'd' AND r.bucket_start < {arg(day)}"
        f"{conditions('r')}"
    ]
    for grain in ("h", "m"):
        p = pieces[grain]
        covered = sum((b - a for a, b in zip(p.starts, p.ends, strict=True)), timedelta())
        if p.windows and p.ends[-1] - p.starts[0] <= 4 * covered:
            # Dense (HOUR or MINUTE windows): one scan, width_bucket finds the piece.
            parts.append(
                f"SELECT ({arg(p.windows)}::integer[])[x.i], r.customer_id, r.dims, r.n, r.d,"
                f" r.m{extra} FROM meter.held_rollups r CROSS JOIN LATERAL (SELECT width_bucket("
                f"r.bucket_start, {arg(p.starts)}::timestamptz[]) AS i) AS x"
                f" WHERE r.meter_key = $1 AND r.grain = '{grain}'"
                f" AND r.bucket_start >= {arg(p.starts[0])} AND r.bucket_start < {arg(p.ends[-1])}"
                f" AND r.bucket_start < ({arg(p.ends)}::timestamptz[])[x.i]{conditions('r')}"
            )
        elif p.windows:
            parts.append(
                f"SELECT p.w, r.* FROM {given(grain)} CROSS JOIN LATERAL (SELECT r.customer_id,"
                f" r.dims, r.n, r.d, r.m{extra} FROM meter.held_rollups r WHERE r.meter_key = $1"
                f" AND r.grain = '{grain}' AND r.bucket_start >= p.lo AND r.bucket_start < p.hi"
                f"{conditions('r')} OFFSET 0) AS r"
            )
    if pieces[rollup.RAW].windows:
        micros = _MICROS.format(t="e.event_time")
        parts.append(
            f"SELECT p.w, e.* FROM {given(rollup.RAW)}"
            " CROSS JOIN LATERAL (SELECT DISTINCT m.customer_id FROM meter.held_rollups m"
            " WHERE m.meter_key = $1 AND m.grain = 'm'"
            f" AND m.bucket_start = date_trunc('minute', p.lo, 'UTC'){customers('m')}"
            " OFFSET 0) AS c"
            " CROSS JOIN LATERAL (SELECT e.customer_id, coalesce(e.dims, '{}'::jsonb),"
            f" 1::bigint, e.step, e.step * {micros}{', e.event_time, e.step' if peaked else ''}"
            " FROM meter.meter_events e"
            " WHERE e.meter_key = $1 AND e.customer_id = c.customer_id AND e.event_time >= p.lo"
            f" AND e.event_time < p.hi AND e.step IS NOT NULL{conditions('e')} OFFSET 0) AS e"
        )
    dims = [f"coalesce(dims->>{arg(key)}, '') AS g{i}" for i, key in enumerate(group_by)]
    group = ", ".join(["customer_id", *(f"g{i}" for i in range(len(group_by)))])
    on = " AND ".join(
        f"p.{c} = x.{c}" for c in ["w", "customer_id", *(f"g{i}" for i in range(len(group_by)))]
    )
    paged = ""
    if customer_limit is not None:
        paged = (
            " WHERE customer_id IN (SELECT DISTINCT customer_id FROM per"
            f" ORDER BY customer_id LIMIT {arg(customer_limit)})"
        )
    tops, top, joined = "", "", ""
    if peaked:
        # Each window's pieces in time order (a raw instant's rows added up):
        # the most of the d before a piece plus its peak, and 0 (the level
        # before the window) when no piece starts at the window's start.
        b = arg(list(bounds))
        tops = f""", inst AS (
            SELECT w, {", ".join(["customer_id", *dims])}, t, sum(d) AS d, sum(peak) AS peak
            FROM parts WHERE w >= 1 GROUP BY w, {group}, t
        ), top AS ({combined_peak("inst", f"w, {group}", f"({b}::timestamptz[])[w]")})"""
        top = ", coalesce(q.peak, 0) AS top"
        joined = " LEFT JOIN top q ON " + on.replace("p.", "q.")
        value = "f0 + top"
    elif aggregation == "SEATS_END":
        value = "f0 + d"
    else:
        b, e = arg(list(bounds)), arg(end)
        start_us = _MICROS.format(t=f"({b}::timestamptz[])[w]")
        end_us = _MICROS.format(t=f"coalesce(({b}::timestamptz[])[w + 1], {e}::timestamptz)")
        value = f"f0 * ({end_us} - {start_us}) + {end_us} * d - m"
    query = f"""
        WITH parts (w, customer_id, dims, n, d, m{", t, peak" if peaked else ""}) AS (
            {" UNION ALL ".join(parts)}
        ){tops},
        per AS (
            SELECT w, {", ".join(["customer_id", *dims])}, sum(n) AS n, sum(d) AS d, sum(m) AS m
            FROM parts GROUP BY w, {group}
        ), grp AS (SELECT DISTINCT {group} FROM per{paged}),
        grid AS (
            SELECT x.w, {", ".join(f"x.{c}" for c in group.split(", "))},
                coalesce(p.n, 0) AS n, coalesce(p.d, 0) AS d, coalesce(p.m, 0) AS m{top}
            FROM (SELECT grp.*, s.w FROM grp CROSS JOIN generate_series(0, {len(bounds)}) AS s (w))
                AS x LEFT JOIN per p ON {on}{joined}
        ), run AS (
            SELECT *, sum(d) OVER g - d AS f0, sum(n) OVER g AS seen FROM grid
            WINDOW g AS (PARTITION BY {group} ORDER BY w)
        )
        SELECT w, {group}, {value} AS value, seen FROM run
        WHERE w >= 1 AND seen > 0 ORDER BY w, {group}
    """
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(query, *args)
        while rows := await cursor.fetch(yield_every):
            yield [
                (r[0], r[1], tuple(r[2 : 2 + len(group_by)]), r["value"], r["seen"]) for r in rows
            ]
            del rows
