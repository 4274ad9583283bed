"""domain.rollup: a window is cut into raw edges, whole minutes and whole hours
that cover it exactly, each piece where its grain's buckets can answer it."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter.domain.rollup import (
    COMPLEMENT_FROM,
    HOUR,
    MINUTE,
    RAW,
    complements,
    cut,
    floor,
    plan,
    uniform_grain,
)

T0 = datetime(2024, 3, 31, 0, 0, tzinfo=UTC)
instants = st.one_of(
    st.integers(-(10**11), 10**11).map(lambda us: T0 + timedelta(microseconds=us)),
    st.integers(-3000, 3000).map(lambda m: T0 + m * MINUTE),
    st.integers(-50, 50).map(lambda h: T0 + h * HOUR),
    st.sampled_from([datetime(2, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)]),
)


@settings(deadline=None, max_examples=500)
@given(a=instants, b=instants)
def test_pieces_cover_the_window_exactly(a: datetime, b: datetime) -> None:
    start, end = min(a, b), max(a, b) + timedelta(microseconds=1)
    pieces = cut(7, start, end)
    assert pieces[0].start == start and pieces[-1].end == end
    for before, after in itertools.pairwise(pieces):
        assert before.end == after.start
    for p in pieces:
        assert p.window == 7 and p.start < p.end
        if p.grain == RAW:  # within one minute: its bucket names its customers
            assert floor(p.start, MINUTE) == floor(p.end - timedelta(microseconds=1), MINUTE)
        else:
            step = MINUTE if p.grain == "m" else HOUR
            assert floor(p.start, step) == p.start and floor(p.end, step) == p.end
    assert sum(p.grain == RAW for p in pieces) <= 2
    assert sum(p.grain == "h" for p in pieces) <= 1


def test_an_odd_offset_day_reads_two_partial_minutes() -> None:
    # A day in Amsterdam at +0:19:32 (1935): from 23:40:28 UTC to 23:40:28 UTC.
    start = datetime(1935, 6, 1, 23, 40, 28, tzinfo=UTC)
    pieces = cut(1, start, start + timedelta(days=1))
    assert [(p.grain, p.start.time(), p.end.time()) for p in pieces] == [
        (RAW, start.time(), datetime(1, 1, 1, 23, 41).time()),
        ("m", datetime(1, 1, 1, 23, 41).time(), datetime(1, 1, 1, 0, 0).time()),
        ("h", datetime(1, 1, 1, 0, 0).time(), datetime(1, 1, 1, 23, 0).time()),
        ("m", datetime(1, 1, 1, 23, 0).time(), datetime(1, 1, 1, 23, 40).time()),
        (RAW, datetime(1, 1, 1, 23, 40).time(), start.time()),
    ]


def test_plan_groups_pieces_by_grain_in_order() -> None:
    bounds = [T0 + timedelta(seconds=30), T0 + HOUR + timedelta(seconds=30)]
    pieces = plan(bounds, T0 + 3 * HOUR)
    assert pieces[RAW].windows == [1, 1, 2]
    assert pieces["m"].windows == [1, 2]
    assert pieces["h"].windows == [2]
    assert pieces["m"].starts == sorted(pieces["m"].starts)


def test_windows_on_a_grain_are_read_without_cutting() -> None:
    hours = [T0 + h * HOUR for h in range(3)]
    assert uniform_grain(hours, T0 + 3 * HOUR) == "h"
    minutes = [T0 + m * MINUTE for m in range(100)]
    assert uniform_grain(minutes, T0 + 100 * MINUTE) == "m"
    # Kathmandu's days start at :15: cutting reads fewer buckets than all minutes.
    days = [T0 + timedelta(minutes=15) + d * timedelta(days=1) for d in range(3)]
    assert uniform_grain(days, days[-1] + timedelta(days=1)) is None
    assert uniform_grain([T0 + timedelta(seconds=30)], T0 + HOUR) is None


@settings(deadline=None, max_examples=500)
@given(a=instants, b=instants)
def test_a_long_partial_minute_is_its_minute_less_the_rest(a: datetime, b: datetime) -> None:
    """Each partial minute is read either as rows (at most half a minute) or as
    its whole minute less one or two outside parts (each under half a minute)
    that, with the piece, tile the minute exactly."""
    start, end = min(a, b), max(a, b) + timedelta(microseconds=1)
    raw = plan([start], end)[RAW]
    rows, minutes, outside = complements(raw)
    assert len(rows.windows) + len(minutes.windows) == len(raw.windows)
    for lo, hi in zip(rows.starts, rows.ends, strict=True):
        assert hi - lo <= COMPLEMENT_FROM and (lo, hi) in zip(raw.starts, raw.ends, strict=True)
    for lo, hi in zip(minutes.starts, minutes.ends, strict=True):
        [(piece_lo, piece_hi)] = [
            (s, e) for s, e in zip(raw.starts, raw.ends, strict=True) if floor(s, MINUTE) == lo
        ]
        assert piece_hi - piece_lo > COMPLEMENT_FROM and hi == lo + MINUTE
        parts = sorted(
            [(piece_lo, piece_hi)]
            + [(s, e) for s, e in zip(outside.starts, outside.ends, strict=True) if lo <= s < hi]
        )
        assert parts[0][0] == lo and parts[-1][1] == hi
        assert all(x[1] == y[0] for x, y in itertools.pairwise(parts))
        assert all(e - s < COMPLEMENT_FROM for s, e in parts if (s, e) != (piece_lo, piece_hi))
    assert set(outside.windows) <= {1}


def test_a_period_from_second_5_reads_55_seconds_as_the_minute_less_5() -> None:
    start = datetime(2025, 1, 1, 10, 0, 5, tzinfo=UTC)
    rows, minutes, outside = complements(plan([start], start + timedelta(days=30))[RAW])
    assert rows.starts == [start + timedelta(days=30) - timedelta(seconds=5)]
    assert minutes.starts == [start - timedelta(seconds=5)]
    assert (outside.starts, outside.ends) == ([start - timedelta(seconds=5)], [start])
