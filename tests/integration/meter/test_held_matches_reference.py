"""Gauges and seats over PostgreSQL agree with the pure reference.

Random readings and seat changes (out of order, redelivered, ties on time, before
and inside the range), random held meters (each gauge and seat aggregation,
group-by, a filter sometimes) and random queries (every window size, zones with
DST changes, ranges to the second or the microsecond, group-by subsets, group
filters, one customer or all) go through meter's real path: CreateMeter, the
fold into PostgreSQL, QueryUsage. Each example is a fresh tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.meter.domain.aggregation import SEATS, Aggregation, MeterSpec
from services.meter.domain.reference import aggregate_events
from services.meter.domain.windows import WindowSize
from tests.integration.meter.harness import Cond, Ev, Flt, Meters, Raw, ev, reference_tuples
from tests.integration.meter.test_query_matches_reference import (
    ANCHORS,
    DIMENSIONS,
    Query,
    micros,
    numbers,
    offsets,
    queries,
)

HELD_KINDS = [
    Aggregation.TIME_WEIGHTED_AVG,
    Aggregation.TIME_WEIGHTED_SUM,
    Aggregation.SEATS_END,
    Aggregation.SEATS_MAX,
    Aggregation.SEATS_PRORATED,
]


@dataclass(frozen=True)
class Meter:
    aggregation: Aggregation
    filter: Flt | None
    group_by: tuple[str, ...]

    @property
    def seats(self) -> bool:
        return self.aggregation in SEATS

    def spec(self) -> MeterSpec:
        return MeterSpec(
            event_name="held",
            aggregation=self.aggregation,
            property="user" if self.seats else "gb",
            filter=self.filter.domain() if self.filter else None,
            group_by=self.group_by,
            operation_property="op" if self.seats else "",
        )


meters = st.builds(
    Meter,
    st.sampled_from(HELD_KINDS),
    st.sampled_from([None, None, None, Flt("AND", (Cond("region", "NOT_EQUALS", "us"),))]),
    st.lists(st.sampled_from(DIMENSIONS), unique=True).map(tuple),
)


@st.composite
def event_lists(draw: st.DrawFn, anchor: datetime) -> list[Ev]:
    n = draw(st.integers(1, 25))
    ids = draw(
        st.lists(
            st.text(alphabet="aBb_Zé0", min_size=1, max_size=3), min_size=n, max_size=n, unique=True
        )
    )
    events = []
    for event_id in ids:
        when = anchor + timedelta(seconds=draw(offsets), microseconds=draw(micros))
        metadata: dict[str, Raw] = {}
        if draw(st.integers(0, 9)) > 0:
            metadata["gb"] = draw(st.one_of(numbers, st.integers(0, 100), st.integers(0, 100)))
        if draw(st.integers(0, 9)) > 0:
            users: list[Raw] = ["u1", "u2", "u3", 4, "4"]  # 4 and "4": one item
            metadata["user"] = draw(st.sampled_from(users))
        if draw(st.integers(0, 9)) > 0:
            metadata["op"] = draw(st.sampled_from(["add", "add", "remove", "ADD"]))
        for key in DIMENSIONS:
            if draw(st.integers(0, 3)) > 0:
                metadata[key] = draw(st.sampled_from(["eu", "us", ""]))
        customer = draw(st.sampled_from(["c1", "c2", "C1"]))
        events.append(ev(event_id, customer, when, "held", **metadata))
    return events


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Meter, list[Ev], list[list[Ev]], list[Query]]:
    anchor = draw(st.sampled_from(ANCHORS))
    meter = draw(meters)
    events = draw(event_lists(anchor))
    arrival = draw(st.permutations(events))
    deliveries: list[list[Ev]] = []
    while arrival:
        size = draw(st.integers(1, max(1, len(arrival))))
        deliveries.append(arrival[:size])
        arrival = arrival[size:]
    redeliver = bool(deliveries) and draw(st.booleans())
    if redeliver:
        deliveries.append(draw(st.sampled_from(deliveries)))
    query_list = draw(st.lists(queries(anchor, meter), min_size=1, max_size=4))  # type: ignore[arg-type]
    return meter, events, deliveries, query_list


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(scenario=scenarios())
async def test_held_usage_agrees_with_the_reference(
    meters: Meters, scenario: tuple[Meter, list[Ev], list[list[Ev]], list[Query]]
) -> None:
    meter, events, deliveries, query_list = scenario
    tenant = meters.new_tenant()
    spec = meter.spec()
    created = await meters.create(
        tenant,
        event_name="held",
        aggregation=meter.aggregation.name,
        property=spec.property,
        filter=meter.filter,
        group_by=meter.group_by,
        operation_property=spec.operation_property,
    )
    for delivery in deliveries:
        await meters.send(tenant, delivery)
    for q in query_list:
        if q.window is WindowSize.MINUTE and q.end - q.start > timedelta(days=2):
            q = Query(q.start, q.end, WindowSize.HOUR, q.tz, q.customer, q.group_by, q.group_filter)
        got = await meters.query(
            tenant,
            created.id,
            q.start,
            q.end,
            window=q.window.name,
            tz=q.tz,
            customer=q.customer,
            group_by=q.group_by,
            group_filter=q.group_filter,
        )
        expected = aggregate_events(
            [e.raw for e in events],
            spec,
            q.start,
            q.end,
            q.window,
            q.tz,
            q.customer,
            q.group_by,
            q.group_filter,
        )
        assert got == reference_tuples(expected), q
        event(f"rows: {min(len(got), 3)}; values: {min(len({r[4] for r in got}), 3)}")
