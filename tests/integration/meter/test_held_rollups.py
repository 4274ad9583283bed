"""The held aggregations' pre-aggregation (services/meter/held.py) stays what a
from-scratch computation over the stored rows gives, however events arrive:
out of order, late (between two stored events of their line), redelivered, and
in concurrent folds. Each row's step is its value minus its line's previous
value; each bucket holds its rows' count, sum of steps and sum of step x t."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.meter.harness import Ev, Meters, ev

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
@given(history=histories(), together=st.integers(1, 3))
async def test_steps_and_buckets_match_a_recomputation(
    meters: Meters, history: tuple[bool, list[list[Ev]]], together: int
) -> None:
    seats, deliveries = history
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant,
        event_name="held",
        aggregation="SEATS_PRORATED" if seats else "TIME_WEIGHTED_AVG",
        property="user" if seats else "gb",
        operation_property="op" if seats else "",
        group_by=("region",) if not seats else (),
    )
    # `together` deliveries at a time fold concurrently (their lines may meet).
    for i in range(0, len(deliveries), together):
        await asyncio.gather(*(meters.send(tenant, d) for d in deliveries[i : i + together]))
    assert await drift(meters, created.id) == (0, 0)
