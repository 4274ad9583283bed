"""QueryUsage over PostgreSQL agrees with the pure reference `aggregate_events`.

Random events (out of order, redelivered, with timestamp ties and event ids that
sort differently by code point than by a locale), random meters (every
aggregation, filters nested up to 3 levels, group-by) and random queries (every
window size, zones with DST changes, ranges to the second or the microsecond,
group-by subsets, group filters) go through meter's real path: CreateMeter, the
consumer's fold into PostgreSQL, QueryUsage. Each example is a fresh tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.reference import aggregate_events
from services.meter.domain.windows import WindowSize
from tests.integration.meter.harness import Cond, Ev, Flt, Meters, Raw, ev, reference_tuples

# Instants around which events and ranges fall: both DST changes of Europe/Berlin
# (01:00 UTC on the last Sundays of March and October) and America/New_York, and
# the end of a leap February (month windows).
ANCHORS = [
    datetime(2024, 3, 31, 1, tzinfo=UTC),
    datetime(2024, 10, 27, 1, tzinfo=UTC),
    datetime(2024, 3, 10, 7, tzinfo=UTC),
    datetime(2024, 11, 3, 6, tzinfo=UTC),
    datetime(2024, 2, 29, 23, 30, tzinfo=UTC),
]
ZONES = ["", "UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
DAYS = 3 * 86400

# Offsets in seconds from the anchor: anywhere, or on a round minute or hour (window
# edges), or one of a few fixed values (so that timestamps tie).
offsets = st.one_of(
    st.integers(-DAYS, DAYS),
    st.integers(-DAYS // 60, DAYS // 60).map(lambda m: m * 60),
    st.integers(-72, 72).map(lambda h: h * 3600),
    st.sampled_from([-1, 0, 1, 3600]),
)
micros = st.one_of(st.just(0), st.just(0), st.integers(0, 999_999))

strings = st.sampled_from(["eu", "us", "EU", "", "1", "1.0", "gold", "ü"])
numbers: st.SearchStrategy[Raw] = st.one_of(
    st.integers(-(10**6), 10**6),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
    st.sampled_from([0.1, 0.2, 1e300, -1e300, 5e-324, 1.5, 2.0]),
    st.sampled_from(["12.5", "-3", "1e3", "007", ".5"]),
)
raw_values: st.SearchStrategy[Raw] = st.one_of(strings, numbers, st.booleans())
# A metadata value for the aggregated property: mostly numbers, sometimes not.
property_values: st.SearchStrategy[Raw] = st.one_of(
    numbers, numbers, numbers, st.sampled_from(["abc", " 1", "NaN", "1_000"]), st.booleans()
)

KEYS = ["region", "tier", "v", "absent"]
DIMENSIONS = ["region", "tier"]


@st.composite
def conditions(draw: st.DrawFn) -> Cond:
    key = draw(st.sampled_from(KEYS))
    operator = draw(
        st.sampled_from(
            [
                "EQUALS",
                "NOT_EQUALS",
                "GREATER_THAN",
                "GREATER_THAN_OR_EQUALS",
                "LESS_THAN",
                "LESS_THAN_OR_EQUALS",
                "CONTAINS",
                "DOES_NOT_CONTAIN",
                "IN",
                "NOT_IN",
                "EXISTS",
                "NOT_EXISTS",
            ]
        )
    )
    if operator in ("EXISTS", "NOT_EXISTS"):
        return Cond(key, operator)
    if operator in ("IN", "NOT_IN"):
        return Cond(key, operator, values=tuple(draw(st.lists(raw_values, min_size=1, max_size=3))))
    if operator.startswith(("GREATER", "LESS")):
        bound: st.SearchStrategy[Raw] = st.one_of(st.integers(-5, 5), st.sampled_from([0.5, "2"]))
        return Cond(key, operator, draw(bound))
    if operator.endswith("CONTAIN") or operator == "CONTAINS":
        return Cond(key, operator, draw(st.sampled_from(["u", "e", "E", "", "1"])))
    return Cond(key, operator, draw(raw_values))


def filters(level: int = 1) -> st.SearchStrategy[Flt]:
    children = st.just([]) if level == 3 else st.lists(filters(level + 1), max_size=2)
    return st.builds(
        lambda conjunction, conds, subs: Flt(conjunction, tuple(conds), tuple(subs)),
        st.sampled_from(["OR", "AND"]),
        st.lists(conditions(), max_size=2),
        children,
    )


@dataclass(frozen=True)
class Meter:
    aggregation: Aggregation
    filter: Flt | None
    group_by: tuple[str, ...]

    def spec(self) -> MeterSpec:
        return MeterSpec(
            event_name="api.call",
            aggregation=self.aggregation,
            property="" if self.aggregation is Aggregation.COUNT else "v",
            filter=self.filter.domain() if self.filter else None,
            group_by=self.group_by,
        )


meters = st.builds(
    Meter,
    st.sampled_from(list(Aggregation)),
    # Most meters have no filter: a random filter rejects most events.
    st.one_of(st.none(), st.none(), filters()),
    st.lists(st.sampled_from(DIMENSIONS), unique=True).map(tuple),
)


@st.composite
def event_lists(draw: st.DrawFn, anchor: datetime) -> list[Ev]:
    n = draw(st.integers(2, 30))
    # Ids that sort differently by code point than by most collations ("a" < "B"
    # in en_US, "B" < "a" by code point): LATEST's tie-break must use code points.
    ids = draw(
        st.lists(
            st.text(alphabet="aBb_Zé€😀0", min_size=1, max_size=4),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    events = []
    for event_id in ids:
        when = anchor + timedelta(seconds=draw(offsets), microseconds=draw(micros))
        metadata: dict[str, Raw] = {}
        for key, values in (("v", property_values), ("region", raw_values), ("tier", strings)):
            if draw(st.integers(0, 4)) > 0:  # present 4 times in 5
                metadata[key] = draw(values)
        events.append(
            ev(
                event_id,
                draw(st.sampled_from(["c1", "c2", "C1"])),
                when,
                draw(st.sampled_from(["api.call", "api.call", "api.call", "API.call"])),
                **metadata,
            )
        )
    return events


@dataclass(frozen=True)
class Query:
    start: datetime
    end: datetime
    window: WindowSize
    tz: str
    customer: str
    group_by: tuple[str, ...]
    group_filter: dict[str, str]


@st.composite
def queries(draw: st.DrawFn, anchor: datetime, meter: Meter) -> Query:
    a = timedelta(seconds=draw(offsets), microseconds=draw(st.sampled_from([0, 0, 1])))
    b = timedelta(seconds=draw(offsets))
    kind = draw(st.sampled_from(["all", "all", "around", "any"]))
    if kind == "all":  # every event, and edges anywhere in the day before and after
        a, b = (
            -timedelta(seconds=DAYS) - abs(a) % timedelta(days=1),
            timedelta(seconds=DAYS) + abs(b) % timedelta(days=1),
        )
    elif kind == "around":  # a range that holds the anchor
        a, b = -abs(a), abs(b)
    start, end = anchor + min(a, b), anchor + max(a, b)
    if start == end:
        end += timedelta(seconds=1)
    dims = list(meter.group_by)
    filtered = bool(dims) and draw(st.booleans())
    group_filter: dict[str, str] = (
        draw(st.dictionaries(st.sampled_from(dims), strings, max_size=len(dims)))
        if filtered
        else {}
    )
    return Query(
        start=start,
        end=end,
        window=draw(st.sampled_from(list(WindowSize))),
        tz=draw(st.sampled_from(ZONES)),
        customer=draw(st.sampled_from(["", "", "", "c1", "C1", "nobody"])),
        group_by=tuple(draw(st.permutations(dims))[: draw(st.integers(0, len(dims)))]),
        group_filter=group_filter,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Meter, list[Ev], list[list[Ev]], list[Query]]:
    anchor = draw(st.sampled_from(ANCHORS))
    meter = draw(meters)
    events = draw(event_lists(anchor))
    # Arrival: any order, in fetches of any size, some fetched twice (redelivery).
    arrival = draw(st.permutations(events))
    deliveries: list[list[Ev]] = []
    while arrival:
        size = draw(st.integers(1, max(1, len(arrival))))
        deliveries.append(arrival[:size])
        arrival = arrival[size:]
    redeliver = bool(deliveries) and draw(st.booleans())
    if redeliver:
        deliveries.append(draw(st.sampled_from(deliveries)))
    query_list = draw(st.lists(queries(anchor, meter), min_size=1, max_size=4))
    return meter, events, deliveries, query_list


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(scenario=scenarios())
async def test_query_usage_agrees_with_the_reference(
    meters: Meters, scenario: tuple[Meter, list[Ev], list[list[Ev]], list[Query]]
) -> None:
    meter, events, deliveries, query_list = scenario
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
    for q in query_list:
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
            meter.spec(),
            q.start,
            q.end,
            q.window,
            q.tz,
            q.customer,
            q.group_by,
            q.group_filter,
        )
        assert got == reference_tuples(expected), q
        event(f"rows: {min(len(got), 3)}; values: {len({r[4] for r in got})}")
