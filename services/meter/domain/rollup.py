"""How a usage read is cut into pre-aggregated buckets and raw edges (pure).

meter keeps, besides one row per (meter, event), buckets per (meter, customer,
dimensions) and UTC minute and hour (meter.usage_rollups, maintained by the
fold in the transaction that stores the rows). A window [start, end) is read as

- raw edges: the sub-minute parts at either end, read from meter_events (at
  most two partial minutes per window, so that any boundary, to the
  microsecond, is exact: periods start to the second, zones such as LMT have
  offsets like +0:19:32); for COUNT, SUM and AVG an edge longer than half a
  minute is read as its minute's bucket less the rows outside it
  (`complements`), so that a busy customer's edge costs half a minute of rows
  at most;
- whole minutes up to the first whole hour, and from the last one;
- whole hours.

`plan` does the cutting; the store runs one SQL statement over the pieces.

Where an aggregation lives (to add one, touch these three places):

- its bucket state: columns of meter.usage_rollups (n, total, lo, hi, latest_*)
  or a table of its own, as UNIQUE_COUNT keeps meter.usage_rollup_values (a
  distinct count over a range is not a sum of the buckets' counts: it costs a
  row per distinct value per bucket);
- how a fold adds events to a bucket: store.py `_ROLLUP` (an aggregate over
  the new rows per minute, the combine of minutes into hours, and the ON
  CONFLICT combine of a stored bucket with the new one: one rule, three uses);
- how buckets and raw rows combine into a window's value: store.py
  `SQL_AGGREGATES` (over the rows of `_PARTS`, where a raw row reads as a
  bucket of one event).

Gates: buckets only where they pay. A bucket per event costs a write per
event and saves no read, and most customers send a few events an hour. So the
buckets are gated per (meter, customer, UTC day) by meter.usage_gates
(migration 0010), which counts the day's rows:

- from `Gates.hours` rows on, the day's rows go into hour buckets; below, a
  read takes the day's raw rows (fewer than `Gates.hours`);
- from `Gates.minutes` rows on, into minute buckets too; below, a read takes
  the raw rows of the partial hours it cuts (fewer than `Gates.minutes`).

When a fold takes a day past a gate, it builds that day's buckets of the new
grain from the stored rows, its own included; afterwards each fold adds its
rows to them. Either every row of a day is in a grain's buckets or none is:
the read relies on it. `crossings` gives each day's level before and after a
fold; the store's SQL does the rest.

Each must agree with the pure oracle, domain.aggregation.aggregate. The held
aggregations (gauges, seats: a level carries from one event to the next, across
buckets) keep buckets of their own, of steps (services/meter/held.py, same
pieces plus day buckets for the level before a range); SEATS_MAX's buckets
also keep a peak (domain.gauges.Span), and it reads the rows
(MeterStore.held_usage) only when a query's groups merge dimension values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import localcontext
from typing import Any, NamedTuple

from services.meter.domain.aggregation import EXACT
from services.meter.domain.matching import FoldedEvent

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# The grains the store keeps buckets of, finest first, with their code in SQL.
GRAINS: tuple[tuple[str, timedelta], ...] = (("m", MINUTE), ("h", HOUR))
RAW = "r"


def floor(ts: datetime, step: timedelta) -> datetime:
    """The UTC instant at or before `ts` on a multiple of `step` (a minute or an
    hour, which divide a UTC day)."""
    if ts.tzinfo is not UTC:
        ts = ts.astimezone(UTC)
    # (Most bounds are on the grain already: plan may cut 100,000 windows.)
    if step == MINUTE:
        if not (ts.second or ts.microsecond):
            return ts
        return ts - timedelta(seconds=ts.second, microseconds=ts.microsecond)
    if step == HOUR:
        if not (ts.minute or ts.second or ts.microsecond):
            return ts
        return ts - timedelta(minutes=ts.minute, seconds=ts.second, microseconds=ts.microsecond)
    midnight = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + (ts - midnight) // step * step


def ceil(ts: datetime, step: timedelta) -> datetime:
    down = floor(ts, step)
    return down if down == ts else down + step


class Piece(NamedTuple):
    """Part of window `window` (1-based): [start, end), read at `grain` ("r" for
    raw rows, which lie within one minute)."""

    window: int
    grain: str
    start: datetime
    end: datetime


def cut(window: int, start: datetime, end: datetime) -> list[Piece]:
    """[start, end) as raw edges, whole minutes and whole hours, in order."""
    first_minute, last_minute = ceil(start, MINUTE), floor(end, MINUTE)
    if first_minute > last_minute:  # within one minute
        return [Piece(window, RAW, start, end)]
    pieces = []
    if start < first_minute:
        pieces.append(Piece(window, RAW, start, first_minute))
    if first_minute < last_minute:
        first_hour, last_hour = ceil(first_minute, HOUR), floor(last_minute, HOUR)
        if first_hour >= last_hour:
            pieces.append(Piece(window, "m", first_minute, last_minute))
        else:
            if first_minute < first_hour:
                pieces.append(Piece(window, "m", first_minute, first_hour))
            pieces.append(Piece(window, "h", first_hour, last_hour))
            if last_hour < last_minute:
                pieces.append(Piece(window, "m", last_hour, last_minute))
    if last_minute < end:
        pieces.append(Piece(window, RAW, last_minute, end))
    return pieces


@dataclass
class Pieces:
    """The pieces of one grain, as the store's SQL takes them: parallel lists,
    ascending and disjoint (windows are)."""

    windows: list[int] = field(default_factory=list)
    starts: list[datetime] = field(default_factory=list)
    ends: list[datetime] = field(default_factory=list)

    def add(self, piece: Piece) -> None:
        self.windows.append(piece.window)
        self.starts.append(piece.start)
        self.ends.append(piece.end)


# A partial minute holding more than this of its minute is read, where the
# aggregation subtracts (COUNT, SUM, AVG), as its minute's bucket less the rows
# outside the window: at most half a minute of rows either way.
COMPLEMENT_FROM = MINUTE / 2


def complements(raw: Pieces) -> tuple[Pieces, Pieces, Pieces]:
    """Splits partial minutes (RAW pieces) into those read as rows, and for the
    rest (longer than COMPLEMENT_FROM) their minutes (window, [minute, minute +
    1)) and the parts of those minutes outside the pieces (one or two each)."""
    rows, minutes, outside = Pieces(), Pieces(), Pieces()
    for w, start, end in zip(raw.windows, raw.starts, raw.ends, strict=True):
        if end - start <= COMPLEMENT_FROM:
            rows.add(Piece(w, RAW, start, end))
            continue
        minute = floor(start, MINUTE)
        minutes.add(Piece(w, "m", minute, minute + MINUTE))
        if minute < start:
            outside.add(Piece(w, RAW, minute, start))
        if end < minute + MINUTE:
            outside.add(Piece(w, RAW, end, minute + MINUTE))
    return rows, minutes, outside


def uniform_grain(bounds: Sequence[datetime], end: datetime) -> str | None:
    """The grain whose buckets each fall within one window, when reading them
    all over [bounds[0], end) costs no more than cutting: "h" when every bound
    is on a UTC hour, "m" when every bound is on a minute and windows are an
    hour long or less (MINUTE windows; and HOUR windows in zones at :30 or :45);
    else None. Then no window is cut (100,000 MINUTE windows cost no planning)."""
    edges = [*bounds, end]
    if any(b.tzinfo is not UTC for b in edges):
        return None
    if all(not (b.minute or b.second or b.microsecond) for b in edges):
        return "h"
    short = end - bounds[0] <= HOUR * len(bounds)
    if short and all(not (b.second or b.microsecond) for b in edges):
        return "m"
    return None


def plan(bounds: Sequence[datetime], end: datetime) -> dict[str, Pieces]:
    """The pieces of the windows [bounds[i], bounds[i + 1]) and [bounds[-1], end)
    (window i + 1), by grain: "m", "h" and RAW, each present."""
    out = {grain: Pieces() for grain in (RAW, *(g for g, _ in GRAINS))}
    ends = [*bounds[1:], end]
    for i, (start, stop) in enumerate(zip(bounds, ends, strict=True)):
        for piece in cut(i + 1, start, stop):
            out[piece.grain].add(piece)
    return out


class Gates(NamedTuple):
    """How many counted rows a customer's UTC day must hold before it is kept in
    hour buckets (`hours`), and in minute buckets too (`minutes`). Below them a
    read takes raw rows: fewer than `hours` per day of the range, and fewer
    than `minutes` per day for its partial hours. A gate keeps the thresholds it
    was made with, so changing these affects only days not yet seen."""

    hours: int = 64
    minutes: int = 1440


# A day's level: what its rows are pre-aggregated in (none, hours, both).
ROWS, HOURS, MINUTES = 0, 1, 2

# (meter_key, customer_id, UTC day): what a gate is kept per.
GateKey = tuple[int, str, datetime]


def level(n: int, hours_from: int, minutes_from: int) -> int:
    """The level of a day holding `n` counted rows, with its gate's thresholds."""
    return MINUTES if n >= minutes_from else HOURS if n >= hours_from else ROWS


def gate_keys(rows: Sequence[FoldedEvent]) -> list[GateKey]:
    """The day of each of `rows` (in order): its (meter, customer, UTC day)."""
    # (Every row of every fold passes here: a date is cheap to take and to
    # hash; a start datetime is made once per distinct one.)
    starts: dict[object, datetime] = {}
    keys: list[GateKey] = []
    append = keys.append
    for row in rows:
        ts = row.event_time
        if ts.tzinfo is not UTC:
            ts = ts.astimezone(UTC)
        date = ts.date()
        start = starts.get(date)
        if start is None:
            start = starts[date] = floor(ts, DAY)
        append((row.meter_key, row.customer_id, start))
    return keys


def crossings(
    added: Mapping[GateKey, int], after: Iterable[tuple[int, str, datetime, int, int, int]]
) -> dict[GateKey, tuple[int, int]]:
    """Each day's level before and after a fold, from what the fold `added` per
    day and each gate's (meter_key, customer_id, day, n, hours_from,
    minutes_from) after its upsert."""
    levels = {}
    for meter_key, customer_id, day, n, hours_from, minutes_from in after:
        key = (meter_key, customer_id, day)
        levels[key] = (
            level(n - added[key], hours_from, minutes_from),
            level(n, hours_from, minutes_from),
        )
    return levels


class FoldPlan(NamedTuple):
    """What a fold does with its rows, given each day's levels (`crossings`):
    `rebuilt` per day it takes past a gate: (build its minutes, build its
    hours) from the stored rows; `dense` the rows added to the buckets of
    days past a gate before the fold, `fine` whether each goes to its
    minute's bucket too (its day was past the minutes' gate)."""

    rebuilt: dict[GateKey, tuple[bool, bool]]
    dense: list[FoldedEvent]
    fine: list[bool]


def fold_plan(
    rows: Sequence[FoldedEvent], keys: Sequence[GateKey], levels: Mapping[GateKey, tuple[int, int]]
) -> FoldPlan:
    """Rows of a day crossing a gate are not added one by one: the rebuild
    reads them back with the day's earlier rows (under the gate's row lock,
    every row of a day is then in the grain's buckets, none twice)."""
    rebuilt = {
        key: (after == MINUTES, before == ROWS)
        for key, (before, after) in levels.items()
        if before < after
    }
    dense, fine = [], []
    for row, key in zip(rows, keys, strict=True):
        before = levels[key][0]
        if before != ROWS:
            dense.append(row)
            fine.append(before == MINUTES)
    return FoldPlan(rebuilt, dense, fine)


# A bucket as meter.usage_rollups holds it: (meter_key, grain, customer_id,
# bucket_start, dims, n, total, lo, hi, latest_time, latest_event_id,
# latest_value); and a distinct value of UNIQUE_COUNT's in a bucket:
# (meter_key, grain, customer_id, bucket_start, dims, text_value).
Bucket = tuple[Any, ...]
BucketValue = tuple[Any, ...]


def buckets(
    rows: Sequence[FoldedEvent], fine: Sequence[bool]
) -> tuple[list[Bucket], list[BucketValue]]:
    """What `rows` add to the buckets: each row to its UTC hour's, and to its
    minute's where `fine`; per (meter, grain, customer, start, dims) the count,
    the exact sum, min and max of the values (None where no value), and the
    latest event (time, then event_id by code point, as the SQL's COLLATE "C").
    Mirrors the fold's SQL aggregate (store._ROLLUP), which combines a stored
    bucket with these; the oracle is domain.aggregation.aggregate."""
    states: dict[tuple[Any, ...], list[Any]] = {}
    dims_of: dict[tuple[Any, ...], dict[str, Any]] = {(): {}}
    values: set[tuple[Any, ...]] = set()
    with localcontext(EXACT):
        for row, minute_too in zip(rows, fine, strict=True):
            ts = row.event_time
            if ts.tzinfo is not UTC:
                ts = ts.astimezone(UTC)
            dims: tuple[Any, ...] = ()
            if row.dims:
                dims = tuple(sorted(row.dims.items()))
                dims_of.setdefault(dims, row.dims)
            hour = (
                row.meter_key,
                b"h",
                row.customer_id,
                ts.replace(minute=0, second=0, microsecond=0),
                dims,
            )
            keys = [hour]
            if minute_too:
                keys.append(
                    (
                        row.meter_key,
                        b"m",
                        row.customer_id,
                        ts.replace(second=0, microsecond=0),
                        dims,
                    )
                )
            value = row.value
            for key in keys:
                state = states.get(key)
                if state is None:
                    states[key] = [1, value, value, value, row.event_time, row.event_id, value]
                else:
                    state[0] += 1
                    if value is not None:
                        if state[1] is None:
                            state[1] = state[2] = state[3] = value
                        else:
                            state[1] += value
                            if value < state[2]:
                                state[2] = value
                            if value > state[3]:
                                state[3] = value
                    if (row.event_time, row.event_id) > (state[4], state[5]):
                        state[4], state[5], state[6] = row.event_time, row.event_id, value
                if row.text_value is not None:
                    values.add((*key, row.text_value))
    return (
        [(*key[:4], dims_of[key[4]], *state) for key, state in states.items()],
        [(*v[:4], dims_of[v[4]], v[5]) for v in values],
    )
