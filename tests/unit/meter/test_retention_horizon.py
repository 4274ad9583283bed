"""How far meter's retention may drop (services/meter/domain/retention.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from services.meter.domain.retention import MARGIN, keep_from

NOW = datetime(2026, 7, 15, 12, tzinfo=UTC)
DAY = timedelta(days=1)


def at(month: int, day: int = 1, year: int = 2026) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def keep(
    open_periods: datetime | None,
    *,
    days: int = 30,
    backfills: Sequence[datetime] = (),
    held: bool = False,
) -> datetime | None:
    return keep_from(
        NOW,
        keep=days * DAY,
        backdate_window=35 * DAY,
        open_periods=open_periods,
        backfills_started=backfills,
        held_meters=held,
    )


def test_the_earliest_need_decides_and_whole_months_go() -> None:
    # The open period is the earliest need: its month stays.
    assert keep(at(3, 10)) == at(3)
    # The backdating window and its margin (3 June) keep June.
    assert datetime(2026, 6, 3, 12, tzinfo=UTC) == NOW - 35 * DAY - MARGIN
    assert keep(at(7, 10)) == at(6)
    # The setting itself, when it reaches furthest back (27 December 2025).
    assert keep(NOW, days=200) == at(12, year=2025)
    # A running backfill replays the window back from its start (8 April).
    assert keep(NOW, backfills=[at(5, 20)]) == at(4)


def test_nothing_goes_without_billing_or_with_held_meters() -> None:
    assert keep(None) is None
    assert keep(NOW, held=True) is None
