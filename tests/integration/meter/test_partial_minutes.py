"""A window's partial minutes, where the rows are dense, against the pure oracle.

A partial minute is read from raw rows; for one customer's COUNT, SUM or AVG a
partial minute longer than half a minute is read as its minute's bucket less
the rows outside the window (domain.rollup.complements). These tests put
events every 0.7 s around the edges, so that both sides of every cut hold rows
(the crowded events of test_rollups_match_reference seldom do), for two
customers and two regions, at gates that keep the day in minute buckets, in
hour buckets only, and in neither.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.meter.domain import rollup
from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.reference import aggregate_events
from services.meter.domain.windows import WindowSize
from tests.integration.meter.harness import Meters, ev, reference_tuples

T0 = datetime(2025, 1, 1, 10, 0, tzinfo=UTC)
# 10:00:00 to 10:05:00, every 0.7 s, alternating customers and regions; one
# pair of events shares a timestamp (an edge can fall on both).
EVENTS = [
    ev(
        f"e{i:04}",
        "c1" if i % 3 else "c2",
        T0 + timedelta(milliseconds=700 * i),
        v=(i * 37) % 11 - 3,
        region="eu" if i % 2 else "us",
    )
    for i in range(429)
] + [
    ev("tie", "c1", T0 + timedelta(milliseconds=700 * 90), v=5, region="eu"),
    # A region with two events in the second minute, at either end: a range
    # inside that minute holds none of it (and shows no row for it).
    ev("ap1", "c1", T0 + timedelta(seconds=61, milliseconds=200), v=4, region="ap"),
    ev("ap2", "c1", T0 + timedelta(seconds=118), v=9, region="ap"),
]

EDGES = [
    timedelta(seconds=60),  # on a minute: no partial minute
    timedelta(seconds=61, microseconds=500_000),  # 58.5 s of the minute in the window
    timedelta(seconds=77),
    timedelta(seconds=89, microseconds=900_000),  # just under half
    timedelta(seconds=90),  # exactly half
    timedelta(seconds=90, microseconds=100_000),  # just over half
    timedelta(seconds=105),
    timedelta(seconds=119, microseconds=999_999),  # 1 µs of the minute in the window
    timedelta(milliseconds=700 * 90),  # on the tied events' timestamp
    timedelta(milliseconds=700 * 90, microseconds=1),
]
GATES = [rollup.Gates(1, 1), rollup.Gates(1, 10**9), rollup.Gates(10**9, 10**9)]
SPECS = {
    "COUNT": MeterSpec("api.call", Aggregation.COUNT, "", None),
    "SUM": MeterSpec("api.call", Aggregation.SUM, "v", None),
    "AVG": MeterSpec("api.call", Aggregation.AVG, "v", None),
    "MAX": MeterSpec("api.call", Aggregation.MAX, "v", None),
}


async def _meter(meters: Meters, aggregation: str, gates: rollup.Gates) -> tuple[str, str]:
    meters.store.gates = gates
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant, aggregation=aggregation, property=SPECS[aggregation].property, group_by=["region"]
    )
    await meters.send(tenant, EVENTS)
    return tenant, created.id


async def _check(
    meters: Meters,
    tenant: str,
    meter_id: str,
    aggregation: str,
    start: datetime,
    end: datetime,
    *,
    window: WindowSize = WindowSize.NONE,
    group_by: tuple[str, ...] = (),
    group_filter: dict[str, str] | None = None,
) -> None:
    got = await meters.query(
        tenant,
        meter_id,
        start,
        end,
        window=window.name,
        customer="c1",
        group_by=group_by,
        group_filter=group_filter,
    )
    expected = aggregate_events(
        [e.raw for e in EVENTS],
        SPECS[aggregation],
        start,
        end,
        window,
        "",
        "c1",
        group_by,
        group_filter or {},
    )
    assert got, (start, end)  # every range here holds some of c1's events
    assert got == reference_tuples(expected), (start, end, window, group_by, group_filter)


@pytest.mark.parametrize("gates", GATES, ids=["minutes", "hours", "rows"])
@pytest.mark.parametrize("aggregation", list(SPECS))
async def test_every_edge_of_a_dense_minute_reads_as_the_reference(
    meters: Meters, aggregation: str, gates: rollup.Gates
) -> None:
    """Each start edge with each end edge (a minute or two later, or within the
    same minute), with and without groups and a group filter."""
    tenant, meter_id = await _meter(meters, aggregation, gates)
    for a in EDGES:
        for b in [*EDGES, *(e + timedelta(minutes=2) for e in EDGES)]:
            start, end = T0 + a, T0 + b + timedelta(seconds=1)
            if end <= start + timedelta(seconds=2):
                continue
            await _check(meters, tenant, meter_id, aggregation, start, end)
            await _check(meters, tenant, meter_id, aggregation, start, end, group_by=("region",))
            await _check(
                meters, tenant, meter_id, aggregation, start, end, group_filter={"region": "eu"}
            )


@pytest.mark.parametrize("aggregation", ["SUM", "COUNT", "AVG"])
async def test_windows_cut_inside_dense_minutes_read_as_the_reference(
    meters: Meters, aggregation: str
) -> None:
    """HOUR and DAY windows from a mid-minute start, and MINUTE windows in a
    zone whose offset is not whole minutes (every window then two partial
    minutes)."""
    tenant, meter_id = await _meter(meters, aggregation, rollup.Gates(1, 1))
    for window in (WindowSize.HOUR, WindowSize.DAY, WindowSize.MINUTE):
        start = T0 + timedelta(seconds=13)
        await _check(
            meters,
            tenant,
            meter_id,
            aggregation,
            start,
            T0 + timedelta(minutes=4, seconds=47),
            window=window,
            group_by=("region",),
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    aggregation=st.sampled_from(["COUNT", "SUM", "AVG"]),
    gates=st.sampled_from(GATES),
    lo=st.integers(0, 299_000_000),
    length=st.integers(1, 180_000_000),
    grouped=st.booleans(),
)
async def test_any_dense_range_reads_as_the_reference(
    meters: Meters,
    aggregation: str,
    gates: rollup.Gates,
    lo: int,
    length: int,
    grouped: bool,
) -> None:
    tenant, meter_id = await _meter(meters, aggregation, gates)
    start = T0 + timedelta(microseconds=lo)
    end = start + timedelta(microseconds=length)
    group_by = ("region",) if grouped else ()
    got = await meters.query(tenant, meter_id, start, end, customer="c1", group_by=group_by)
    expected = aggregate_events(
        [e.raw for e in EVENTS],
        SPECS[aggregation],
        start,
        end,
        WindowSize.NONE,
        "",
        "c1",
        group_by,
    )
    assert got == reference_tuples(expected), (start, end)
