"""The held aggregations' pre-aggregation (services/meter/held.py) stays what a
from-scratch computation over the stored rows gives, however events arrive:
out of order, late (between two stored events of their line), redelivered, and
in concurrent folds. Each row's step is its value minus its line's previous
value; each bucket holds its rows' count, sum of steps and sum of step x t."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.meter.__main__ import MIGRATIONS
from services.meter.domain import gauges
from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.reference import aggregate_events
from services.meter.domain.windows import WindowSize
from tests.integration.meter.harness import Ev, Meters, ev, reference_tuples

JUNE = datetime(2024, 6, 1, tzinfo=UTC)
JULY = datetime(2024, 7, 1, tzinfo=UTC)
DAY = timedelta(days=1)

# Rows whose step differs from the one recomputed from scratch, and buckets
# that differ from those recomputed (count, sum of steps, sum of step x t).
_DRIFT = """
WITH s AS (
    SELECT customer_id, event_time, dims, step,
        value - coalesce(lag(value) OVER (PARTITION BY customer_id, coalesce(dims::text, ''),
            coalesce(text_value, '') ORDER BY event_time, event_id), 0) AS want
    FROM meter.meter_events WHERE meter_key = $1 AND skip_reason IS NULL
), want AS (
    SELECT g.grain, s.customer_id, date_bin(g.step, s.event_time, '0001-01-01 00:00:00+00') AS b,
        coalesce(s.dims, '{}') AS dims, count(*) AS n, sum(s.want) AS d,
        sum(s.want * extract(epoch FROM s.event_time) * 1000000) AS m
    FROM s CROSS JOIN (VALUES ('m'::"char", interval '1 minute'), ('h', interval '1 hour'),
        ('d', interval '1 day')) AS g (grain, step)
    GROUP BY 1, 2, 3, 4
), have AS (
    SELECT grain, customer_id, bucket_start AS b, dims, n, d, m FROM meter.held_rollups
    WHERE meter_key = $1
)
SELECT (SELECT count(*) FROM s WHERE step IS DISTINCT FROM want) AS rows,
    (SELECT count(*) FROM want FULL JOIN have USING (grain, customer_id, b, dims)
     WHERE want.n IS DISTINCT FROM have.n OR want.d IS DISTINCT FROM have.d
        OR want.m IS DISTINCT FROM have.m) AS buckets
"""


async def drift(meters: Meters, meter_id: str) -> tuple[int, int]:
    key = await meters.store.pool.fetchval("SELECT key FROM meter.meters WHERE id = $1", meter_id)
    row = await meters.store.pool.fetchrow(_DRIFT, key)
    assert row is not None
    return row["rows"], row["buckets"]


async def peak_drift(meters: Meters, meter_id: str) -> list[Any]:
    """SEATS_MAX's buckets whose peak differs from the one recomputed from
    scratch: domain.gauges.span of the bucket's rows (their steps recomputed)."""
    pool = meters.store.pool
    key = await pool.fetchval("SELECT key FROM meter.meters WHERE id = $1", meter_id)
    rows = await pool.fetch(
        "SELECT customer_id, coalesce(dims, '{}')::text AS dims, event_time,"
        " value - coalesce(lag(value) OVER (PARTITION BY customer_id, coalesce(dims::text, ''),"
        " coalesce(text_value, '') ORDER BY event_time, event_id), 0) AS step"
        " FROM meter.meter_events WHERE meter_key = $1 AND skip_reason IS NULL",
        key,
    )
    grains = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": DAY}
    steps: dict[tuple[str, str, str, datetime], list[tuple[datetime, Decimal]]] = {}
    for r in rows:
        for grain, size in grains.items():
            start = (
                datetime.min.replace(tzinfo=UTC)
                + (r["event_time"] - datetime.min.replace(tzinfo=UTC)) // size * size
            )
            steps.setdefault((grain, r["customer_id"], r["dims"], start), []).append(
                (r["event_time"], r["step"])
            )
    want = {k: gauges.span(k[3], v).peak for k, v in steps.items()}
    have = {
        (r["grain"], r["customer_id"], r["dims"], r["bucket_start"]): r["peak"]
        for r in await pool.fetch(
            "SELECT grain::text, customer_id, dims::text AS dims, bucket_start, peak"
            " FROM meter.held_rollups WHERE meter_key = $1",
            key,
        )
    }
    return [
        (k, want.get(k), have.get(k))
        for k in want.keys() | have.keys()
        if want.get(k) != have.get(k)
    ]


async def test_a_late_reading_and_redelivery(meters: Meters) -> None:
    tenant = meters.new_tenant()
    gauge = await meters.create(
        tenant, event_name="storage", aggregation="TIME_WEIGHTED_SUM", property="gb"
    )
    await meters.send(
        tenant,
        [ev("r1", "c1", JUNE, "storage", gb=10), ev("r3", "c1", JUNE + 20 * DAY, "storage", gb=30)],
    )
    # 20 days at 10, 10 at 30.
    assert await meters.total(tenant, gauge.id, JUNE, JULY, "c1") == str(24 * (200 + 300))
    late = [
        ev("r2", "c1", JUNE + 10 * DAY, "storage", gb=50),
        ev("r1", "c1", JUNE, "storage", gb=10),
    ]
    await meters.send(tenant, late)
    await meters.send(tenant, late)  # redelivered: nothing counts twice
    # 10 days at 10, 10 at 50, 10 at 30; the late reading moved r3's step.
    assert await meters.total(tenant, gauge.id, JUNE, JULY, "c1") == str(24 * (100 + 500 + 300))
    assert await drift(meters, gauge.id) == (0, 0)


@st.composite
def histories(draw: st.DrawFn) -> tuple[bool, list[list[Ev]]]:
    seats = draw(st.booleans())
    n = draw(st.integers(1, 30))
    events = []
    for i in range(n):
        when = JUNE + timedelta(
            seconds=draw(st.integers(0, 3 * 86_400)), microseconds=draw(st.sampled_from([0, 7]))
        )
        customer = draw(st.sampled_from(["c1", "c2"]))
        region = draw(st.sampled_from(["eu", "us"]))
        if seats:
            user = draw(st.sampled_from(["u1", "u2", "u3"]))
            op = draw(st.sampled_from(["add", "add", "remove"]))
            events.append(ev(f"e{i}", customer, when, "held", user=user, op=op, region=region))
        else:
            gb = draw(st.integers(-5, 50))
            events.append(ev(f"e{i}", customer, when, "held", gb=gb, region=region))
    arrival = draw(st.permutations(events))
    deliveries = []
    while arrival:
        size = draw(st.integers(1, len(arrival)))
        deliveries.append(arrival[:size])
        arrival = arrival[size:]
    deliveries += draw(st.lists(st.sampled_from(deliveries), max_size=2))  # redelivered
    return seats, deliveries


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(history=histories(), together=st.integers(1, 3), most=st.booleans())
async def test_steps_and_buckets_match_a_recomputation(
    meters: Meters, history: tuple[bool, list[list[Ev]]], together: int, most: bool
) -> None:
    seats, deliveries = history
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant,
        event_name="held",
        aggregation=("SEATS_MAX" if most else "SEATS_PRORATED") if seats else "TIME_WEIGHTED_AVG",
        property="user" if seats else "gb",
        operation_property="op" if seats else "",
        group_by=("region",) if not seats else (),
    )
    # `together` deliveries at a time fold concurrently (their lines may meet).
    for i in range(0, len(deliveries), together):
        await asyncio.gather(*(meters.send(tenant, d) for d in deliveries[i : i + together]))
    assert await drift(meters, created.id) == (0, 0)
    if seats and most:
        assert await peak_drift(meters, created.id) == []


# SEATS_MAX from its buckets: seats added and removed around an hour's edge (ties
# on one instant, on minute and hour edges), folded in any order over several
# folds, read over windows of every size in several zones, bounds on an event
# and a microsecond either side of it, against the oracle.
NOON = datetime(2024, 3, 31, 1, tzinfo=UTC)  # Europe/Berlin changes to summer time
SEAT_TIMES = st.builds(
    lambda s, us: NOON + timedelta(seconds=s, microseconds=us),
    st.one_of(
        st.integers(-7200, 7200),
        st.integers(-120, 120).map(lambda m: m * 60),
        st.sampled_from([-3600, -1, 0, 1, 59, 60, 3600]),
    ),
    st.sampled_from([0, 0, 0, 1, 999_999]),
)
MOST = MeterSpec(
    event_name="held",
    aggregation=Aggregation.SEATS_MAX,
    property="user",
    operation_property="op",
    group_by=("region",),
)


@st.composite
def seat_histories(draw: st.DrawFn) -> tuple[list[Ev], list[list[Ev]]]:
    times = draw(st.lists(SEAT_TIMES, min_size=1, max_size=6))
    events = []
    for i in range(draw(st.integers(1, 30))):
        events.append(
            ev(
                f"{draw(st.sampled_from('abz'))}{i}",
                draw(st.sampled_from(["c1", "c2"])),
                draw(st.one_of(st.sampled_from(times), SEAT_TIMES)),  # ties
                "held",
                user=draw(st.sampled_from(["u1", "u2", "u3", "u4"])),
                op=draw(st.sampled_from(["add", "add", "remove"])),
                region=draw(st.sampled_from(["eu", "us"])),
            )
        )
    arrival = draw(st.permutations(events))
    deliveries = []
    while arrival:
        size = draw(st.integers(1, len(arrival)))
        deliveries.append(arrival[:size])
        arrival = arrival[size:]
    return events, deliveries


@st.composite
def bounds(draw: st.DrawFn, events: list[Ev]) -> datetime:
    near = draw(st.sampled_from([e.raw.timestamp for e in events]))
    return draw(
        st.one_of(
            st.sampled_from(
                [near, near - timedelta(microseconds=1), near + timedelta(microseconds=1)]
            ),
            SEAT_TIMES,
            st.sampled_from([NOON - DAY, NOON + DAY, NOON - 3 * timedelta(hours=1)]),
        )
    )


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(history=seat_histories(), data=st.data())
async def test_seats_max_from_buckets_matches_the_oracle(
    meters: Meters, history: tuple[list[Ev], list[list[Ev]]], data: st.DataObject
) -> None:
    events, deliveries = history
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant,
        event_name="held",
        aggregation="SEATS_MAX",
        property="user",
        operation_property="op",
        group_by=MOST.group_by,
    )
    for delivery in deliveries:  # one fold each: late events in later folds
        await meters.send(tenant, delivery)
    assert await peak_drift(meters, created.id) == []
    for _ in range(3):
        a, b = data.draw(bounds(events)), data.draw(bounds(events))
        start, end = min(a, b), max(a, b)
        if start == end:
            end += timedelta(microseconds=1)
        window = data.draw(st.sampled_from(list(WindowSize)))
        if window is WindowSize.MINUTE and end - start > timedelta(hours=6):
            window = WindowSize.HOUR
        tz = data.draw(
            st.sampled_from(["", "Europe/Berlin", "Asia/Kolkata", "Australia/Lord_Howe"])
        )
        customer = data.draw(st.sampled_from(["", "c1"]))
        # Grouped by the meter's dimension: the buckets; without: the rows.
        group_by = data.draw(st.sampled_from([("region",), ()]))
        got = await meters.query(
            tenant,
            created.id,
            start,
            end,
            window=window.name,
            tz=tz,
            customer=customer,
            group_by=group_by,
        )
        expected = aggregate_events(
            [e.raw for e in events], MOST, start, end, window, tz, customer, group_by, {}
        )
        assert got == reference_tuples(expected), (start, end, window, tz, customer, group_by)


async def test_the_migration_fills_the_peaks_the_fold_keeps(meters: Meters) -> None:
    """Migration 0011's fill of the buckets stored before it (its statements
    after the ALTER, run again on buckets whose peaks are cleared) gives what
    the fold keeps."""
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant,
        event_name="held",
        aggregation="SEATS_MAX",
        property="user",
        operation_property="op",
        group_by=("region",),
    )
    t = NOON + timedelta(seconds=30)
    history = [
        ("a1", NOON - timedelta(hours=2), "u1", "add", "eu"),
        ("a2", t, "u2", "add", "eu"),
        ("a3", t, "u2", "remove", "eu"),  # never active
        ("a4", t, "u3", "add", "eu"),
        ("a5", t + timedelta(minutes=61), "u1", "remove", "eu"),
        ("a6", t + timedelta(minutes=61), "u4", "add", "us"),
    ]
    for event_id, when, user, op, region in history:
        await meters.send(
            tenant, [ev(event_id, "c1", when, "held", user=user, op=op, region=region)]
        )
    assert await peak_drift(meters, created.id) == []
    pool = meters.store.pool
    key = await pool.fetchval("SELECT key FROM meter.meters WHERE id = $1", created.id)
    await pool.execute("UPDATE meter.held_rollups SET peak = NULL WHERE meter_key = $1", key)
    assert await peak_drift(meters, created.id) != []
    sql = (MIGRATIONS / "0011_held_peaks.sql").read_text()
    await pool.execute(sql.split("ADD COLUMN peak numeric;", 1)[1])
    assert await peak_drift(meters, created.id) == []
