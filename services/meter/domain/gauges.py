"""Aggregations of values that hold over time: gauges (a reading holds until the
next one) and seats (an item is active from its add until its remove).

Both reduce to one model, so one oracle serves them. A *line* is one thing whose
value holds over time: for a gauge, a series (a customer and the meter's group-by
values); for seats, one item of a series, whose value is 1 while active and 0
while not. A line's value at instant t is the value of its greatest
(timestamp, event_id) event at or before t (event ids compared by code point, as
LATEST does), 0 before its first event: arrival order changes nothing, and a
second event at the same instant decides by its id. The group's level f(t) is the
sum over its lines; each held aggregation is a functional of f over a window
[start, end):

- TIME_WEIGHTED_SUM: the integral of f, in value x hours (10 GB held for a day
  is 240 GB-hours);
- TIME_WEIGHTED_AVG and SEATS_PRORATED: that integral divided by the window's
  length (10 GB for half the window and 0 for the rest: 5);
- SEATS_MAX: the most f reaches at any instant of the window (an item added and
  removed at the same instant is never active);
- SEATS_END: f just before the window's end (an event at the end belongs to the
  next window).

Exact: the integral is summed in value x microseconds without rounding; the one
division (by 3,600,000,000 for hours, by the window's microseconds for an
average) rounds to AVG_PRECISION significant digits, half-even, as AVG does.

A window has a value only once one of its group's lines has an event before the
window's end (None: no row); from then on every window has one, 0 included.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from datetime import datetime, timedelta
from decimal import (
    MAX_EMAX,
    MAX_PREC,
    MIN_EMIN,
    Context,
    Decimal,
    Inexact,
    InvalidOperation,
    Overflow,
    Rounded,
    localcontext,
)
from typing import NamedTuple

MICROS_PER_HOUR = 3_600_000_000

# Sums and products that raise rather than round (as aggregation's sums).
_EXACT = Context(
    prec=MAX_PREC,
    Emax=MAX_EMAX,
    Emin=MIN_EMIN,
    traps=[InvalidOperation, Overflow, Inexact, Rounded],
)


class Held(NamedTuple):
    """One event of a held aggregation: the line it sets, and the value it sets
    the line to from `timestamp` on (a gauge's reading; 1 for a seat's add, 0 for
    its remove)."""

    timestamp: datetime
    event_id: str
    line: Hashable
    value: Decimal


def micros(span: timedelta) -> int:
    """A duration in whole microseconds (exact: timedelta holds microseconds)."""
    return (span.days * 86_400 + span.seconds) * 1_000_000 + span.microseconds


def _levels(
    events: Sequence[Held], start: datetime, end: datetime
) -> list[tuple[datetime, Decimal]]:
    """f at each instant where it may change within [start, end): `start` itself
    and each event time in (start, end), ascending; f holds from each instant to
    the next (the last to `end`). Empty when no event is before `end`."""
    before_end = [e for e in events if e.timestamp < end]
    if not before_end:
        return []
    points = sorted({start} | {e.timestamp for e in before_end if e.timestamp > start})
    out = []
    for point in points:
        latest: dict[Hashable, Held] = {}
        for e in before_end:
            if e.timestamp <= point:
                seen = latest.get(e.line)
                if seen is None or (e.timestamp, e.event_id) > (seen.timestamp, seen.event_id):
                    latest[e.line] = e
        with localcontext(_EXACT):
            level = sum((e.value for e in latest.values()), Decimal(0))
        out.append((point, level))
    return out


def integral(events: Sequence[Held], start: datetime, end: datetime) -> Decimal | None:
    """The exact integral of f over [start, end), in value x microseconds."""
    levels = _levels(events, start, end)
    if not levels:
        return None
    bounds = [p for p, _ in levels[1:]] + [end]
    with localcontext(_EXACT):
        return sum(
            (
                level * micros(until - point)
                for (point, level), until in zip(levels, bounds, strict=True)
            ),
            Decimal(0),
        )


def peak(events: Sequence[Held], start: datetime, end: datetime) -> Decimal | None:
    """The most f reaches in [start, end)."""
    levels = _levels(events, start, end)
    return max(level for _, level in levels) if levels else None


def at_end(events: Sequence[Held], start: datetime, end: datetime) -> Decimal | None:
    """f just before `end`."""
    levels = _levels(events, start, end)
    return levels[-1][1] if levels else None


class Span(NamedTuple):
    """What the steps in a span of time [start, ...) do to the level, as the
    store pre-aggregates SEATS_MAX (services/meter/held.py): `d` the sum of its
    steps, `peak` the most the sum of its steps from `start` reaches at one of
    its instants: `start` itself (0 there when no step is at `start`) and each
    step's time, all the steps at one time counted together (an item added and
    removed at one instant is never active)."""

    start: datetime
    d: Decimal
    peak: Decimal


def span(start: datetime, steps: Sequence[tuple[datetime, Decimal]]) -> Span:
    """The Span of `steps` (time, step: a line's value minus its previous
    value), all at or after `start`, in any order."""
    at: dict[datetime, Decimal] = {}
    with localcontext(_EXACT):
        for t, step in steps:
            at[t] = at.get(t, Decimal(0)) + step
        run, top = Decimal(0), Decimal(0) if start not in at else None
        for t in sorted(at):
            run += at[t]
            top = run if top is None or run > top else top
    return Span(start, run, Decimal(0) if top is None else top)


def combine(start: datetime, spans: Sequence[Span]) -> Span:
    """The Span from `start` of consecutive spans (in time order, the first
    starting at or after `start`), a span without steps between them counting
    as nothing: d adds up, and the peak is the most of each one's peak after
    the d of those before it (0 too when none starts at `start`)."""
    with localcontext(_EXACT):
        run, top = Decimal(0), Decimal(0) if not spans or spans[0].start > start else None
        for s in spans:
            top = run + s.peak if top is None or run + s.peak > top else top
            run += s.d
    return Span(start, run, Decimal(0) if top is None else top)
