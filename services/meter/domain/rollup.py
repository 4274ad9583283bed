"""How a usage read is cut into pre-aggregated buckets and raw edges (pure).

meter keeps, besides one row per (meter, event), buckets per (meter, customer,
dimensions) and UTC minute and hour (meter.usage_rollups, maintained by the
fold in the transaction that stores the rows). A window [start, end) is read as

- raw edges: the sub-minute parts at either end, read from meter_events (at
  most two partial minutes per window, so that any boundary, to the
  microsecond, is exact: periods start to the second, zones such as LMT have
  offsets like +0:19:32);
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
buckets are gated per (meter, customer) by meter.usage_gates (migration 0010):

- a UTC day's rows go into hour buckets once the day holds `Gates.day` rows;
  below that, a read takes the day's raw rows (fewer than `Gates.day`);
- an hour of such a day goes into minute buckets once it holds `Gates.hour`
  rows; below that, a read takes the raw rows of its part of the hour.

When a fold takes a day (hour) over its gate, it builds that day's hour (that
hour's minute) buckets from the stored rows, its own included; afterwards each
fold adds its rows to them. Either every row of a day (hour) is in the buckets
or none is: the read relies on it. `crossings` classifies a fold's days and
hours; the store's SQL does the rest.

Each must agree with the pure oracle, domain.aggregation.aggregate. The held
aggregations (gauges, seats: a level carries from one event to the next, across
buckets) keep buckets of their own, of steps (services/meter/held.py, same
pieces plus day buckets for the level before a range); SEATS_MAX reads the rows
(MeterStore.held_usage).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

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
    hour buckets, and an hour of such a day before it is kept in minute buckets.
    Below them a read takes raw rows: fewer than `day` per day of the range and
    fewer than `hour` per partial hour. A gate row keeps the threshold it was
    made with, so changing these affects only days (hours) not yet seen."""

    day: int = 64
    hour: int = 120


# (meter_key, customer_id, UTC day or hour start): what a gate row is kept per.
GateKey = tuple[int, str, datetime]


def gate_keys(rows: Sequence[FoldedEvent], step: timedelta) -> list[GateKey]:
    """The gate of each of `rows` (in order): its (meter, customer, UTC day or
    hour start) for `step` DAY or HOUR."""
    # (Every row of every fold passes here: a date or an hour is cheap to take
    # and to hash; a start datetime is made once per distinct one.)
    starts: dict[object, datetime] = {}
    keys: list[GateKey] = []
    append = keys.append
    for row in rows:
        ts = row.event_time
        if ts.tzinfo is not UTC:
            ts = ts.astimezone(UTC)
        part: object = ts.date() if step == DAY else (ts.date(), ts.hour)
        start = starts.get(part)
        if start is None:
            start = starts[part] = floor(ts, step)
        append((row.meter_key, row.customer_id, start))
    return keys


def crossings(
    added: Mapping[GateKey, int], after: Iterable[tuple[int, str, datetime, int, int]]
) -> tuple[set[GateKey], set[GateKey]]:
    """The gates a fold's rows were already past (their rows go into the
    buckets), and those the fold takes past (build their buckets from every
    stored row), from what the fold `added` per gate and each gate's
    (meter_key, customer_id, start, n, roll_from) after its upsert."""
    past: set[GateKey] = set()
    crossed: set[GateKey] = set()
    for meter_key, customer_id, start, n, roll_from in after:
        key = (meter_key, customer_id, start)
        if n - added[key] >= roll_from:
            past.add(key)
        elif n >= roll_from:
            crossed.add(key)
    return past, crossed
