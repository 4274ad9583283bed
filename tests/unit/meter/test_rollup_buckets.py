"""domain.rollup's pure parts of the gated rollups: the buckets a fold adds
(exact sums, LATEST ties by code point), each row's day, and the levels a
fold's days pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from services.meter.domain import rollup
from services.meter.domain.matching import FoldedEvent

T = datetime(2025, 3, 1, 10, 17, 41, 500_000, tzinfo=UTC)


def row(
    event_id: str, when: datetime, value: str | None, dims: dict[str, str] | None = None
) -> FoldedEvent:
    return FoldedEvent(
        7, "c", when, event_id, None if value is None else Decimal(value), None, dims, None
    )


def test_sums_are_exact_beyond_the_default_decimal_precision() -> None:
    big = "1" + "0" * 40
    added, _ = rollup.buckets(
        [row("a", T, big), row("b", T, "0.000000000000000000000000000001")], [False, False]
    )
    [(_, grain, _, start, dims, n, total, lo, hi, *_)] = added
    assert (grain, start, dims, n) == (b"h", T.replace(minute=0, second=0, microsecond=0), {}, 2)
    # 71 significant digits: the default context (28) would round the 1e-30 away.
    assert str(total) == big + ".000000000000000000000000000001"
    assert (lo, hi) == (Decimal("1e-30"), Decimal(big))


def test_latest_goes_to_the_later_time_then_the_greater_id_by_code_point() -> None:
    rows = [row("b", T, "1"), row("é", T, "2"), row("z", T - timedelta(seconds=1), "3")]
    added, _ = rollup.buckets(rows, [True, True, True])
    by_grain = {b[1]: b for b in added}
    for grain in (b"h", b"m"):
        assert by_grain[grain][9:] == (T, "é", Decimal(2))  # é (U+00E9) > b
        assert by_grain[grain][5] == 3


def test_rows_without_values_count_and_leave_sums_empty() -> None:
    added, _ = rollup.buckets([row("a", T, None), row("b", T, "5")], [False, False])
    [bucket] = added
    assert bucket[5:9] == (2, Decimal(5), Decimal(5), Decimal(5))
    added, _ = rollup.buckets([row("a", T, None)], [False])
    assert added[0][5:9] == (1, None, None, None)


def test_groups_and_minutes_are_buckets_of_their_own() -> None:
    rows = [
        row("a", T, "1", {"region": "eu"}),
        row("b", T, "2", {"region": "us"}),
        row("c", T + timedelta(minutes=1), "4", {"region": "eu"}),
    ]
    added, _ = rollup.buckets(rows, [True, True, False])
    got = sorted((b[1], b[3].minute, b[4]["region"], b[6]) for b in added)
    assert got == [
        (b"h", 0, "eu", Decimal(5)),
        (b"h", 0, "us", Decimal(2)),
        (b"m", 17, "eu", Decimal(1)),
        (b"m", 17, "us", Decimal(2)),
    ]


def test_a_rows_day_is_its_utc_day() -> None:
    east = timezone(timedelta(hours=5, minutes=30))
    late = datetime(2025, 3, 2, 2, 0, tzinfo=east)  # 2025-03-01 20:30 UTC
    assert rollup.gate_keys([row("a", late, "1"), row("b", T, "1")]) == [
        (7, "c", datetime(2025, 3, 1, tzinfo=UTC)),
        (7, "c", datetime(2025, 3, 1, tzinfo=UTC)),
    ]


def test_levels_before_and_after_a_fold() -> None:
    day = datetime(2025, 3, 1, tzinfo=UTC)
    keys = [(1, c, day) for c in "abcd"]
    added = dict.fromkeys(keys, 10)
    after = [
        (1, "a", day, 10, 64, 1440),  # new day, below: rows
        (1, "b", day, 70, 64, 1440),  # 60 -> 70: past the hours' gate now
        (1, "c", day, 1500, 64, 1440),  # 1490 -> 1500: past both already
        (1, "d", day, 10, 0, 0),  # rolled by retention or a bulk load
    ]
    assert rollup.crossings(added, after) == {
        keys[0]: (rollup.ROWS, rollup.ROWS),
        keys[1]: (rollup.ROWS, rollup.HOURS),
        keys[2]: (rollup.MINUTES, rollup.MINUTES),
        keys[3]: (rollup.MINUTES, rollup.MINUTES),
    }


def test_a_fold_adds_rows_of_days_past_a_gate_and_rebuilds_days_that_cross_one() -> None:
    day = T.replace(hour=0, minute=0, second=0, microsecond=0)
    quiet, busy, crossing, leaping = (
        (7, "quiet", day),
        (7, "busy", day),
        (7, "crossing", day),
        (7, "leaping", day),
    )
    levels = {
        quiet: (rollup.ROWS, rollup.ROWS),  # stays below the hours' gate
        busy: (rollup.MINUTES, rollup.MINUTES),
        crossing: (rollup.HOURS, rollup.MINUTES),  # into minutes: hours kept, minutes built
        leaping: (rollup.ROWS, rollup.MINUTES),  # both grains built from its rows
    }
    rows = [row(k[1], T, "1") for k in (quiet, busy, crossing, leaping, busy)]
    keys = [quiet, busy, crossing, leaping, busy]
    plan = rollup.fold_plan(rows, keys, levels)
    assert plan.rebuilt == {crossing: (True, False), leaping: (True, True)}
    # The crossing day's row still goes to its hour (its hours existed before);
    # the leaping day's is read back by the rebuild, so it is not added.
    assert [r.event_id for r in plan.dense] == ["busy", "crossing", "busy"]
    assert plan.fine == [True, False, True]
