"""The rollups (meter.usage_rollups, domain.rollup) against the pure oracle.

QueryUsage reads buckets of whole minutes and hours plus the raw rows of the
partial minutes at each window's edges; these properties crowd events into a
few minutes and hours (several in one minute, on round minutes and hours, LATEST
ties) and put the query's bounds anywhere, to the microsecond, also on an event's
own timestamp, in zones whose offsets are not whole minutes (LMT +0:19:32 in
Amsterdam before 1937, -0:44:30 in Monrovia until 1972), half and quarter hours,
and across DST changes. And however folds overlap (redelivery, a backfill beside
the consumer, concurrently), every bucket equals what the stored rows add up to.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import db
from services.meter.__main__ import MIGRATIONS
from services.meter.domain import rollup
from services.meter.domain.matching import FoldedEvent
from services.meter.domain.reference import aggregate_events
from services.meter.domain.windows import WindowSize
from tests.integration.meter.harness import Ev, Meters, Raw, ev, reference_tuples
from tests.integration.meter.test_query_matches_reference import (
    Meter,
    meters,
    property_values,
    raw_values,
    strings,
)

ANCHORS = [
    datetime(1935, 6, 1, 12, tzinfo=UTC),  # Europe/Amsterdam at +0:19:32
    datetime(1971, 3, 1, 9, tzinfo=UTC),  # Africa/Monrovia at -0:44:30
    datetime(2024, 3, 31, 1, tzinfo=UTC),  # Europe/Berlin springs forward
    datetime(2024, 11, 3, 6, tzinfo=UTC),  # America/New_York falls back
    datetime(2025, 1, 1, 0, 0, 30, tzinfo=UTC),  # half a minute past midnight
]
ZONES = [
    "UTC",
    "Europe/Amsterdam",
    "Africa/Monrovia",
    "Asia/Kathmandu",
    "America/St_Johns",
    "Europe/Berlin",
    "America/New_York",
]
SIZES = list(WindowSize)

# Seconds from the anchor: crowded into a few minutes, or anywhere in +-3 hours,
# or on round minutes and hours.
seconds = st.one_of(
    st.integers(-150, 150),
    st.integers(-3 * 3600, 3 * 3600),
    st.integers(-180, 180).map(lambda m: m * 60),
    st.integers(-3, 3).map(lambda h: h * 3600),
)
micros = st.one_of(st.just(0), st.integers(0, 999_999))

# Gate thresholds (domain.rollup.Gates) that put days on every side of their
# gates: everything pre-aggregated, nothing, hours only, and mixes.
gate_sizes = st.sampled_from(
    [
        rollup.Gates(1, 1),
        rollup.Gates(10**9, 10**9),
        rollup.Gates(1, 10**9),
        rollup.Gates(2, 5),
        rollup.Gates(6, 20),
    ]
)


@st.composite
def crowded_events(draw: st.DrawFn, anchor: datetime) -> list[Ev]:
    n = draw(st.integers(1, 40))
    ids = draw(
        st.lists(st.text("aBb_Zé0", min_size=1, max_size=3), min_size=n, max_size=n, unique=True)
    )
    times: list[datetime] = []
    events = []
    for event_id in ids:
        if times and draw(st.integers(0, 3)) == 0:
            when = draw(st.sampled_from(times))  # a tie: LATEST goes by event_id
        else:
            when = anchor + timedelta(seconds=draw(seconds), microseconds=draw(micros))
        times.append(when)
        metadata: dict[str, Raw] = {}
        for key, values in (("v", property_values), ("region", raw_values), ("tier", strings)):
            if draw(st.integers(0, 5)) > 0:
                metadata[key] = draw(values)
        events.append(ev(event_id, draw(st.sampled_from(["c1", "c2", "C1"])), when, **metadata))
    return events


@st.composite
def instants(draw: st.DrawFn, anchor: datetime, events: list[Ev]) -> datetime:
    """Anywhere near the anchor, or on an event's timestamp, or 1 µs off it."""
    on_an_event = draw(st.booleans())
    if events and on_an_event:
        when = draw(st.sampled_from(events)).raw.timestamp
        return when + timedelta(microseconds=draw(st.sampled_from([-1, 0, 0, 1])))
    return anchor + timedelta(seconds=draw(seconds), microseconds=draw(micros))


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[Meter, list[Ev], list[list[Ev]], list[tuple[datetime, datetime, WindowSize, str, str]]]:
    anchor = draw(st.sampled_from(ANCHORS))
    meter = draw(meters)
    events = draw(crowded_events(anchor))
    arrival = draw(st.permutations(events))
    deliveries: list[list[Ev]] = []
    while arrival:
        size = draw(st.integers(1, len(arrival)))
        deliveries.append(arrival[:size])
        arrival = arrival[size:]
    if draw(st.booleans()):
        deliveries.append(draw(st.sampled_from(deliveries)))  # redelivered
    queries = []
    for _ in range(draw(st.integers(1, 4))):
        a, b = draw(instants(anchor, events)), draw(instants(anchor, events))
        start, end = min(a, b), max(a, b)
        if start == end:
            end += timedelta(microseconds=draw(st.sampled_from([1, 59_999_999, 3_600_000_000])))
        queries.append(
            (
                start,
                end,
                draw(st.sampled_from(SIZES)),
                draw(st.sampled_from(ZONES)),
                draw(st.sampled_from(["", "c1"])),
            )
        )
    return meter, events, deliveries, queries


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(scenario=scenarios(), gates=gate_sizes)
async def test_rollups_agree_with_the_reference_at_any_boundary(
    meters: Meters,
    scenario: tuple[
        Meter, list[Ev], list[list[Ev]], list[tuple[datetime, datetime, WindowSize, str, str]]
    ],
    gates: rollup.Gates,
) -> None:
    meter, events, deliveries, queries = scenario
    meters.store.gates = gates
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant,
        aggregation=meter.aggregation.name,
        property=meter.spec().property,
        filter=meter.filter,
        group_by=meter.group_by,
    )
    for delivery in deliveries:
        await meters.send(tenant, delivery)
    for start, end, size, tz, customer in queries:
        got = await meters.query(
            tenant,
            created.id,
            start,
            end,
            window=size.name,
            tz=tz,
            customer=customer,
            group_by=meter.group_by,
        )
        expected = aggregate_events(
            [e.raw for e in events],
            meter.spec(),
            start,
            end,
            size,
            tz,
            customer,
            meter.group_by,
        )
        assert got == reference_tuples(expected), (start, end, size, tz, customer)


# The buckets that the stored (not skipped) rows of meter $1 add up to, at the
# grains their day's gate is past; the migrations' backfill makes every gate past.
_PAST = """
    AND EXISTS (SELECT 1 FROM meter.usage_gates d
        WHERE d.meter_key = e.meter_key AND d.customer_id = e.customer_id
        AND d.day = date_trunc('day', e.event_time, 'UTC')
        AND d.n >= CASE g.grain WHEN 'h' THEN d.hours_from ELSE d.minutes_from END)
"""
RECOMPUTED = f"""
SELECT g.grain, e.customer_id, date_trunc(g.unit, e.event_time, 'UTC') AS bucket_start,
       coalesce(e.dims, '{{}}') AS dims, count(*) AS n, sum(e.value) AS total,
       min(e.value) AS lo, max(e.value) AS hi,
       (array_agg(e.event_time ORDER BY e.event_time DESC, e.event_id DESC))[1] AS latest_time,
       (array_agg(e.event_id ORDER BY e.event_time DESC, e.event_id DESC))[1] AS latest_event_id,
       (array_agg(e.value ORDER BY e.event_time DESC, e.event_id DESC))[1] AS latest_value
FROM meter.meter_events e
CROSS JOIN (VALUES ('m'::"char", 'minute'), ('h'::"char", 'hour')) AS g (grain, unit)
WHERE e.meter_key = $1 AND e.skip_reason IS NULL {_PAST}
GROUP BY 1, 2, 3, 4
"""
STORED = """
SELECT grain, customer_id, bucket_start, dims, n, total, lo, hi, latest_time,
       latest_event_id, latest_value
FROM meter.usage_rollups WHERE meter_key = $1
"""
VALUES_RECOMPUTED = f"""
SELECT DISTINCT g.grain, e.customer_id, date_trunc(g.unit, e.event_time, 'UTC'),
       coalesce(e.dims, '{{}}')::text, e.text_value
FROM meter.meter_events e
CROSS JOIN (VALUES ('m'::"char", 'minute'), ('h'::"char", 'hour')) AS g (grain, unit)
WHERE e.meter_key = $1 AND e.skip_reason IS NULL AND e.text_value IS NOT NULL {_PAST}
"""
VALUES_STORED = """
SELECT grain, customer_id, bucket_start, dims::text, text_value
FROM meter.usage_rollup_values WHERE meter_key = $1
"""
# A gate per day with rows.
GATES_RECOMPUTED = """
SELECT meter_key, customer_id, date_trunc('day', event_time, 'UTC'), count(*)
FROM meter.meter_events WHERE meter_key = $1 AND skip_reason IS NULL
GROUP BY 1, 2, 3
"""
GATES_STORED = """
SELECT meter_key, customer_id, day, n, minutes_from FROM meter.usage_gates WHERE meter_key = $1
"""


async def assert_buckets_match_rows(pool: asyncpg.Pool, key: int) -> None:
    async with pool.acquire() as conn:
        # A gate below its minutes' threshold counts its rows exactly; one past
        # it stops counting (the fold no longer locks it), at or above it.
        rows = {tuple(r[:3]): r[3] for r in await conn.fetch(GATES_RECOMPUTED, key)}
        gates = {tuple(r[:3]): (r[3], r[4]) for r in await conn.fetch(GATES_STORED, key)}
        assert rows.keys() == gates.keys()
        for gate, (n, roll_from) in gates.items():
            assert n == rows[gate] if n < roll_from else roll_from <= n <= rows[gate], gate
        for stored, recomputed in ((STORED, RECOMPUTED), (VALUES_STORED, VALUES_RECOMPUTED)):
            assert sorted(repr(tuple(r)) for r in await conn.fetch(stored, key)) == sorted(
                repr(tuple(r)) for r in await conn.fetch(recomputed, key)
            )


@pytest.mark.parametrize("aggregation", ["SUM", "UNIQUE_COUNT", "LATEST"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
async def test_overlapping_concurrent_folds_count_each_row_once(
    meters: Meters, aggregation: str, data: st.DataObject
) -> None:
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant, aggregation=aggregation, property="v", group_by=["region"]
    )
    record = await meters.store.get_meter(tenant, created.id)
    meters.store.gates = data.draw(gate_sizes)
    anchor = data.draw(st.sampled_from(ANCHORS))
    events = data.draw(crowded_events(anchor))
    rows = [
        FoldedEvent(
            record.key,
            e.raw.customer_id,
            e.raw.timestamp,
            e.raw.event_id,
            None if aggregation == "UNIQUE_COUNT" else data.draw(st.decimals(-5, 5, places=2)),
            data.draw(st.sampled_from(["a", "b", "c"])) if aggregation == "UNIQUE_COUNT" else None,
            {"region": data.draw(st.sampled_from(["eu", "us"]))},
            data.draw(st.sampled_from([None, None, None, "missing_property"])),
        )
        for e in events
    ]
    # Folds of overlapping slices, some at the same time: the consumer's
    # redeliveries and a backfill beside it.
    slices = data.draw(
        st.lists(
            st.lists(st.sampled_from(rows), unique_by=lambda r: r.event_id, min_size=1),
            min_size=1,
            max_size=6,
        )
    )
    slices.append(rows)
    await asyncio.gather(*(meters.store.fold(s) for s in slices))
    await assert_buckets_match_rows(meters.store.pool, record.key)
    # A further redelivery of everything changes nothing.
    assert await meters.store.fold(rows) == 0
    await assert_buckets_match_rows(meters.store.pool, record.key)


async def test_a_range_reads_buckets_and_raw_edges_exactly(meters: Meters) -> None:
    """A worked example: one customer, events every 7.5 s over three hours, and
    a range that starts and ends inside minutes."""
    tenant = meters.new_tenant()
    created = await meters.create(tenant, aggregation="SUM", property="v")
    t0 = datetime(2025, 3, 1, 10, 0, 3, 250_000, tzinfo=UTC)
    events = [ev(f"e{i}", "c", t0 + timedelta(seconds=7.5 * i), v=i) for i in range(1440)]
    await meters.send(tenant, events)
    start = datetime(2025, 3, 1, 10, 17, 41, 500_000, tzinfo=UTC)
    end = datetime(2025, 3, 1, 12, 44, 2, 1, tzinfo=UTC)
    expected = sum(i for i, e in enumerate(events) if start <= e.raw.timestamp < end)
    assert await meters.total(tenant, created.id, start, end, "c") == str(expected)


async def test_the_migration_rolls_up_the_rows_stored_before_it(
    stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Migration 0006 on a database whose meter_events already hold rows: its
    buckets are what those rows add up to, as the fold would have made them."""
    admin = await asyncpg.connect(stack_urls[0])
    name = f"rollup_{uuid.uuid4().hex[:8]}"
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        dsn = stack_urls[0].rsplit("/", 1)[0] + f"/{name}"
        pool = await db.create_pool(dsn, min_size=1, max_size=2)
        try:
            before = tmp_path / "before"
            before.mkdir()
            for path in sorted(MIGRATIONS.glob("*.sql")):
                if path.name < "0006":
                    shutil.copy(path, before / path.name)
            await db.migrate(pool, "meter", before)
            # (As the meter of that time: later migrations add columns.)
            key = await pool.fetchval(
                "INSERT INTO meter.meters (tenant_id, name, event_name, aggregation, property,"
                " group_by) VALUES ('t', 'm', 'e', 'UNIQUE_COUNT', 'v', '{region}') RETURNING key"
            )
            t0 = datetime(2024, 3, 31, 0, 59, 58, tzinfo=UTC)
            await pool.copy_records_to_table(
                "meter_events",
                schema_name="meter",
                columns=FoldedEvent._fields,
                records=[
                    FoldedEvent(
                        key,
                        f"c{i % 3}",
                        t0 + timedelta(seconds=i * 0.7),
                        f"e{i}",
                        None,
                        f"v{i % 5}",
                        {"region": "eu"} if i % 2 else None,
                        "missing_property" if i % 7 == 0 else None,
                    )
                    for i in range(200)
                ],
            )
            await db.migrate(pool, "meter", MIGRATIONS)
            await assert_buckets_match_rows(pool, key)
            assert await pool.fetchval("SELECT count(*) FROM meter.usage_rollups") > 0
        finally:
            await pool.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
