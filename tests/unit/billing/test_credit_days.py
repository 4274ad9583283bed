"""Reconciliation's pure helpers (domain.credits): the UTC day of an instant
and the union of half-open ranges."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.billing.domain.credits import ceil_day, floor_day, merged

D0 = datetime(2026, 3, 10, tzinfo=UTC)


def at(hours: float) -> datetime:
    return D0 + timedelta(hours=hours)


@pytest.mark.parametrize(
    ("when", "day"),
    [
        (D0, D0),  # midnight is its own day
        (D0 + timedelta(microseconds=1), D0),
        (at(23.999), D0),
        (at(24), at(24)),
        (D0 - timedelta(microseconds=1), at(-24)),
        # Another offset: the UTC day, given in UTC.
        (datetime(2026, 3, 10, 1, 30, tzinfo=timezone(timedelta(hours=5))), at(-24)),
        (datetime(2026, 3, 9, 22, 0, tzinfo=timezone(timedelta(hours=-5))), D0),
        # Across a month and a year's end.
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2026, 12, 31, tzinfo=UTC)),
    ],
)
def test_floor_day(when: datetime, day: datetime) -> None:
    got = floor_day(when)
    assert got == day
    assert got.tzinfo == UTC


@pytest.mark.parametrize(
    ("when", "day"),
    [
        (D0, D0),
        (D0 + timedelta(microseconds=1), at(24)),
        (at(23.999), at(24)),
        (D0 - timedelta(microseconds=1), D0),
        (datetime(2026, 3, 10, 5, 0, tzinfo=timezone(timedelta(hours=5))), D0),
        (datetime(2026, 3, 10, 5, 1, tzinfo=timezone(timedelta(hours=5))), at(24)),
    ],
)
def test_ceil_day(when: datetime, day: datetime) -> None:
    got = ceil_day(when)
    assert got == day
    assert got.tzinfo == UTC


@pytest.mark.parametrize(
    ("spans", "union"),
    [
        ([], []),
        ([(at(1), at(2))], [(at(1), at(2))]),
        # Disjoint, given out of order: sorted, kept apart.
        ([(at(5), at(6)), (at(1), at(2))], [(at(1), at(2)), (at(5), at(6))]),
        # Touching half-open ranges join.
        ([(at(1), at(2)), (at(2), at(3))], [(at(1), at(3))]),
        # Overlapping, and one inside another.
        ([(at(1), at(4)), (at(2), at(3)), (at(3), at(6))], [(at(1), at(6))]),
        ([(at(1), at(10)), (at(2), at(3))], [(at(1), at(10))]),
        # The same range twice.
        ([(at(1), at(2)), (at(1), at(2))], [(at(1), at(2))]),
        # A gap of one microsecond stays a gap.
        (
            [(at(1), at(2)), (at(2) + timedelta(microseconds=1), at(3))],
            [(at(1), at(2)), (at(2) + timedelta(microseconds=1), at(3))],
        ),
    ],
)
def test_merged(
    spans: list[tuple[datetime, datetime]], union: list[tuple[datetime, datetime]]
) -> None:
    given = list(spans)
    assert merged(spans) == union
    assert spans == given  # the input is left as it was
