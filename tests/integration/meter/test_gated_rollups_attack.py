"""Attacks on the gated rollups (meter.usage_gates, domain.rollup "Gates"): a
customer's UTC day read from its rows below a gate, from hour buckets between
the two, from minute buckets past both; the fold that takes a day past a gate
rebuilds its buckets from the stored rows under the gate's row lock.

Each test here states one way the gates could lose or double-count an event:
folds of one day that meet at its gate (two replicas, two fold workers, a
redelivery on the INSERT path), a day taken from below both gates past both at
once, UTC days whose arithmetic a session's time zone bends, retention sealing
while a late fold is in flight, and reads that mix days of every level (odd
zones, group-by and filters, paging by customer, events on UTC midnight)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.common import db, partitions
from services.common.context import set_tenant
from services.meter import store as store_module
from services.meter.__main__ import MIGRATIONS
from services.meter.domain import rollup
from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.matching import FoldedEvent
from services.meter.domain.reference import RawEvent, aggregate_events
from services.meter.domain.windows import WindowSize
from services.meter.retention import METER_EVENTS, RetentionStore
from services.meter.store import SQL_AGGREGATES, MeterRecord, MeterStore
from tests.integration.meter.harness import (
    Ev,
    Meters,
    Raw,
    RowTuple,
    ev,
    reference_tuples,
    row_tuples,
)
from tests.integration.meter.test_query_matches_reference import (
    Meter,
    filters,
    property_values,
    raw_values,
    strings,
)
from tests.integration.meter.test_rollups_match_reference import assert_buckets_match_rows
from tests.integration.test_partitioning import migrations_before
from usagebilling.meter.v1 import meter_pb2


def row(
    key: int,
    customer: str,
    at: datetime,
    event_id: str,
    value: int | None = None,
    text: str | None = None,
    dims: dict[str, str] | None = None,
) -> FoldedEvent:
    return FoldedEvent(
        key, customer, at, event_id, None if value is None else Decimal(value), text, dims, None
    )


async def total(store: MeterStore, meter: MeterRecord, start: datetime, end: datetime) -> Decimal:
    found = Decimal(0)
    async for groups in store.usage(
        meter, customer_id="", bounds=[start], end=end, group_by=(), group_filter={}
    ):
        found += sum((g.value or Decimal(0) for g in groups), Decimal(0))
    return found


async def sum_meter(store: MeterStore, tenant: str = "t1") -> MeterRecord:
    return await store.create_meter(
        tenant,
        name=f"m-{uuid.uuid4().hex[:8]}",
        event_name="api.call",
        aggregation="SUM",
        property="v",
        filter=None,
        group_by=(),
        measurement_unit="",
        description="",
    )


async def waiting_on_a_lock(pool: asyncpg.Pool, at_least: int = 1) -> None:
    """Until `at_least` sessions of the database wait for a heavyweight lock."""
    for _ in range(3000):  # (30 s: the machine may be loaded)
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nobody waits for a lock")


def paused_after_roll_up(store: MeterStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Makes `store`'s next fold stop inside its transaction, after its rows,
    gates and buckets are written (its locks held), until `release` is set."""
    entered, release = asyncio.Event(), asyncio.Event()
    original: Callable[[Any, Sequence[FoldedEvent]], Awaitable[None]] = store._roll_up

    async def roll_up(conn: Any, rows: Sequence[FoldedEvent]) -> None:
        await original(conn, rows)
        entered.set()
        await release.wait()

    store._roll_up = roll_up  # type: ignore[method-assign]
    return entered, release


@pytest.fixture
async def fresh_db(stack_urls: tuple[str, str]) -> AsyncIterator[str]:
    """The URL of a new database of the test server (dropped after)."""
    name = f"gates_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(stack_urls[0])
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield stack_urls[0].rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


# -- UTC days in a session whose TimeZone is not UTC --------------------------
#
# The gates are per UTC day, and the SQL that reads or rebuilds a day's rows
# bounds it as `day + interval '1 day'`. For a timestamptz that adds a calendar
# day in the session's TimeZone: 23 or 25 hours across a DST change there. The
# pool does not set TimeZone, so it is the server's (or the database's) default.


@pytest.mark.parametrize(
    ("day", "zone"),
    [
        (datetime(2024, 11, 3, tzinfo=UTC), "America/New_York"),  # 25 h: takes the next day's
        (datetime(2024, 3, 10, tzinfo=UTC), "America/New_York"),  # 23 h: leaves its last hour
        (datetime(2024, 3, 31, tzinfo=UTC), "Europe/Berlin"),
    ],
)
async def test_utc_days_do_not_bend_with_the_sessions_time_zone(
    fresh_db: str, day: datetime, zone: str
) -> None:
    admin = await asyncpg.connect(fresh_db)
    try:
        await admin.execute(f"ALTER DATABASE {fresh_db.rsplit('/', 1)[1]} SET timezone = '{zone}'")
    finally:
        await admin.close()
    pool = await db.create_pool(fresh_db, min_size=1, max_size=2)
    try:
        assert await pool.fetchval("SHOW timezone") == zone
        await db.migrate(pool, "meter", MIGRATIONS)
        store = MeterStore(pool)
        store.gates = rollup.Gates(3, 6)
        meter = await sum_meter(store)
        nxt = day + rollup.DAY
        # The day's last hour and the next day's first: each day below its gate.
        base = [
            row(meter.key, "c", day + timedelta(hours=12), "a", 1),
            row(meter.key, "c", nxt - timedelta(minutes=30), "b", 10),
            row(meter.key, "c", nxt + timedelta(minutes=30), "c", 100),
        ]
        assert await store.fold(base) == 3
        assert await total(store, meter, day, nxt + rollup.DAY) == 111
        assert await total(store, meter, day, nxt) == 11
        # The day past its hours' gate, then past both: rebuilt from its rows.
        for i, count in ((1, 1), (2, 3)):
            more = [
                row(meter.key, "c", day + timedelta(hours=1, seconds=k), f"x{i}{k}", 1000)
                for k in range(count)
            ]
            await store.fold(more)
            await assert_buckets_match_rows(pool, meter.key)
            if i == 1:  # between the gates: a read that cuts the day's last hour
                assert await total(store, meter, day, nxt - timedelta(minutes=15)) == 1011
        assert await total(store, meter, day, nxt + rollup.DAY) == 4111
        assert await total(store, meter, nxt, nxt + rollup.DAY) == 100
    finally:
        await pool.close()


# -- Retention sealing beside a fold in flight --------------------------------


async def test_retention_seals_the_rows_of_a_fold_in_flight(fresh_db: str) -> None:
    """A fold (a replica that has not learnt the new horizon yet, a late
    message) stores a row in a month that retention is dropping, below its
    day's gate, and commits while retention seals: its row must be in the
    buckets that outlive the month, or the fold must fail. Before gates the
    fold's own transaction put the row in the buckets."""
    pool = await db.create_pool(fresh_db, min_size=2, max_size=4)
    try:
        await db.migrate(pool, "meter", MIGRATIONS)
        for m in partitions.months(
            datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
        ):
            await partitions.ensure_month(pool, METER_EVENTS, m)
        store = MeterStore(pool)
        meter = await sum_meter(store)
        feb = datetime(2026, 2, 10, 12, tzinfo=UTC)
        assert await store.fold([row(meter.key, "c", feb, "e1", 1)]) == 1
        before = datetime(2026, 3, 1, tzinfo=UTC)
        late = MeterStore(pool)
        outcomes: dict[str, object] = {}
        for i, (customer, at) in enumerate(
            [("c", feb + timedelta(hours=1)), ("d", datetime(2026, 3, 13, tzinfo=UTC))]
        ):  # a day with a gate already (February), and a new one (March)
            entered, release = paused_after_roll_up(late)

            async def fold_late(customer: str = customer, at: datetime = at, i: int = i) -> int:
                return await late.fold([row(meter.key, customer, at, f"late{i}", 10**i * 10)])

            folding = asyncio.create_task(fold_late())
            await entered.wait()
            dropping = asyncio.create_task(RetentionStore(pool).drop_before(before))
            await waiting_on_a_lock(pool)
            release.set()
            outcomes[customer] = (await asyncio.gather(folding, return_exceptions=True))[0]
            dropped = await asyncio.gather(dropping, return_exceptions=True)
            assert not isinstance(dropped[0], BaseException), dropped
            del late._roll_up
            before = datetime(2026, 4, 1, tzinfo=UTC)  # the next drop: March
        expected = 1 + sum(10**i * 10 for i, c in enumerate(["c", "d"]) if outcomes[c] == 1)
        assert await total(store, meter, datetime(2026, 1, 1, tzinfo=UTC), before) == expected, (
            outcomes
        )
    finally:
        await pool.close()


# -- Folds of one customer day that meet at its gate ---------------------------


@pytest.mark.parametrize("crossing_first", [True, False])
@pytest.mark.parametrize("aggregation", ["SUM", "UNIQUE_COUNT", "LATEST"])
async def test_two_replicas_fold_one_day_while_one_crosses(
    meters: Meters, aggregation: str, crossing_first: bool
) -> None:
    """Two replicas (stores on one pool) fold rows of one customer day at once;
    one of the folds takes the day past a gate (or past both), the other not.
    The first holds the gate's row lock (paused after its writes) while the
    second's rows are stored and wait at the gate."""
    tenant = meters.new_tenant()
    created = await meters.create(tenant, aggregation=aggregation, property="v")
    record = await meters.store.get_meter(tenant, created.id)
    day = datetime(2025, 1, 1, tzinfo=UTC)
    unique = aggregation == "UNIQUE_COUNT"

    def rows(prefix: str, n: int, at: datetime) -> list[FoldedEvent]:
        return [
            row(
                record.key,
                "c",
                at + timedelta(seconds=7 * i),
                f"{prefix}{i}",
                None if unique else i + 1,
                f"u{i % 3}{prefix}" if unique else None,
            )
            for i in range(n)
        ]

    for gates, (first_n, small_n, big_n) in (
        (rollup.Gates(4, 8), (2, 1, 3)),  # ROWS -> HOURS beside ROWS
        (rollup.Gates(4, 8), (5, 1, 3)),  # HOURS -> MINUTES beside HOURS
        (rollup.Gates(3, 6), (1, 1, 6)),  # ROWS -> MINUTES beside ROWS
    ):
        one, two = MeterStore(meters.store.pool), MeterStore(meters.store.pool)
        one.gates = two.gates = meters.store.gates = gates
        day += rollup.DAY
        await one.fold(rows("a", first_n, day + timedelta(hours=3)))
        crossing = rows("x", big_n, day + timedelta(hours=5, seconds=1))
        beside = rows("y", small_n, day + timedelta(hours=5, seconds=2))
        first, second = (crossing, beside) if crossing_first else (beside, crossing)
        entered, release = paused_after_roll_up(one)
        held = asyncio.create_task(one.fold(first))
        await entered.wait()
        waiting = asyncio.create_task(two.fold(second))
        await waiting_on_a_lock(meters.store.pool)
        release.set()
        assert await held == len(first)
        assert await waiting == len(second)
        await assert_buckets_match_rows(meters.store.pool, record.key)
        stored = [*rows("a", first_n, day + timedelta(hours=3)), *crossing, *beside]
        got = await meters.query(tenant, created.id, day, day + rollup.DAY, window="MINUTE")
        expected = aggregate_events(
            [
                RawEvent(
                    r.event_id,
                    "c",
                    "api.call",
                    r.event_time,
                    {"v": r.text_value if unique else r.value},  # type: ignore[dict-item]
                )
                for r in stored
            ],
            MeterSpec("api.call", Aggregation[aggregation], "v", None, ()),
            day,
            day + rollup.DAY,
            WindowSize.MINUTE,
            "UTC",
            None,
        )
        assert got == reference_tuples(expected), gates


async def test_a_redelivery_that_crosses_takes_the_insert_path(meters: Meters) -> None:
    """A redelivered batch (COPY refused, INSERT ... ON CONFLICT) that also
    holds new rows taking the day past both gates: the repeats count once."""
    tenant = meters.new_tenant()
    created = await meters.create(tenant, aggregation="SUM", property="v", group_by=["region"])
    meters.store.gates = rollup.Gates(3, 5)
    t0 = datetime(2025, 2, 1, 23, 59, 59, 999_999, tzinfo=UTC)  # 1 µs before midnight
    events = [
        ev(f"e{i}", "c", t0 + timedelta(microseconds=1, minutes=i), v=i, region="eu")
        for i in range(8)
    ]
    events.append(ev("last", "c", t0, v=100, region="us"))
    assert await meters.send(tenant, events[:2]) == 2  # ROWS
    assert await meters.send(tenant, [events[1], events[0], *events[2:6]]) == 4  # -> MINUTES
    assert await meters.send(tenant, events) == 3  # on the INSERT path again
    record = await meters.store.get_meter(tenant, created.id)
    await assert_buckets_match_rows(meters.store.pool, record.key)
    start = datetime(2025, 2, 1, tzinfo=UTC)
    for window, tz in (("NONE", "UTC"), ("HOUR", "Asia/Kathmandu"), ("DAY", "UTC")):
        got = await meters.query(
            tenant,
            created.id,
            start,
            start + 2 * rollup.DAY,
            window=window,
            tz=tz,
            group_by=["region"],
        )
        expected = aggregate_events(
            [e.raw for e in events],
            MeterSpec("api.call", Aggregation.SUM, "v", None, ("region",)),
            start,
            start + 2 * rollup.DAY,
            WindowSize[window],
            tz,
            None,
            ("region",),
        )
        assert got == reference_tuples(expected), window


# -- Reads over days of every level (property) ---------------------------------

# Meters of every aggregation; a filter on one in five (most reject most events).
property_meters = st.builds(
    Meter,
    st.sampled_from(list(Aggregation)),
    st.one_of(st.none(), st.none(), st.none(), st.none(), filters()),
    st.lists(st.sampled_from(["region", "tier"]), unique=True).map(tuple),
)

CUSTOMERS = ["c1", "C1", "é", "e\u0301", "c2"]
GATE_SIZES = [
    rollup.Gates(2, 4),
    rollup.Gates(3, 7),
    rollup.Gates(1, 3),
    rollup.Gates(4, 4),
    rollup.Gates(3, 10**9),
    rollup.Gates(1, 1),
]
ZONES = ["UTC", "Asia/Kathmandu", "America/St_Johns", "Australia/Lord_Howe", "Europe/Berlin"]
DAY_ANCHORS = [
    datetime(2024, 3, 31, tzinfo=UTC),  # Europe/Berlin springs forward at 01:00
    datetime(2024, 11, 3, tzinfo=UTC),  # America/St_Johns falls back
    datetime(2025, 1, 1, tzinfo=UTC),
]
# Where in its UTC day an event falls: on midnight, its last microsecond, round
# hours and minutes, or anywhere.
in_day = st.one_of(
    st.sampled_from([timedelta(0), rollup.DAY - timedelta(microseconds=1)]),
    st.integers(0, 23).map(lambda h: timedelta(hours=h)),
    st.integers(0, 1439).map(lambda m: timedelta(minutes=m)),
    st.integers(0, 86_399_999_999).map(lambda us: timedelta(microseconds=us)),
)


@st.composite
def dense_days(draw: st.DrawFn, anchor: datetime) -> list[Ev]:
    """Customers whose UTC days (the anchor's, the one before and after) hold
    from 0 to 9 events: with small gates, days of every level side by side."""
    events: list[Ev] = []
    times: list[datetime] = []
    customers = draw(st.lists(st.sampled_from(CUSTOMERS), min_size=1, max_size=4, unique=True))
    for customer in customers:
        for day in (-1, 0, 1):
            for _ in range(draw(st.sampled_from([1, 3, 2, 4, 0, 5, 8]))):
                if times and draw(st.integers(0, 4)) == 0:
                    when = draw(st.sampled_from(times))  # a tie: LATEST by event_id
                else:
                    when = anchor + day * rollup.DAY + draw(in_day)
                times.append(when)
                metadata: dict[str, Raw] = {}
                for key, values in (
                    ("v", property_values),
                    ("region", raw_values),
                    ("tier", strings),
                ):
                    if draw(st.integers(0, 5)) > 0:
                        metadata[key] = draw(values)
                if draw(st.integers(0, 3)) > 0:  # (seats)
                    metadata["operation"] = draw(st.sampled_from(["add", "remove"]))
                event_id = f"{len(events)}{draw(st.sampled_from(['a', 'B', 'é', '']))}"
                events.append(ev(event_id, customer, when, **metadata))
    return events


@dataclass(frozen=True)
class Read:
    start: datetime
    end: datetime
    window: WindowSize
    tz: str
    customer: str
    group_by: tuple[str, ...]
    group_filter: dict[str, str]
    page_size: int


@st.composite
def reads(draw: st.DrawFn, anchor: datetime, meter: Meter) -> Read:
    edges = st.one_of(
        st.integers(-2, 2).map(lambda d: d * rollup.DAY),  # UTC midnights
        st.integers(-48, 48).map(
            lambda h: timedelta(hours=h, minutes=draw(st.sampled_from([0, 15, 30, 45])))
        ),
        st.integers(-2 * 86_400, 2 * 86_400).map(lambda s: timedelta(seconds=s)),
        st.integers(-2 * 86_400_000_000, 2 * 86_400_000_000).map(
            lambda us: timedelta(microseconds=us)
        ),
    )
    a, b = draw(edges), draw(edges)
    start, end = anchor + min(a, b), anchor + max(a, b)
    if start == end:
        end += timedelta(hours=1)
    window = draw(st.sampled_from(list(WindowSize)))
    if window is WindowSize.MINUTE and end - start > timedelta(hours=30):
        window = WindowSize.HOUR  # (keeps the answer small)
    dims = list(meter.group_by)
    group_filter: dict[str, str] = (
        draw(st.dictionaries(st.sampled_from(dims), strings, max_size=len(dims)))
        if bool(dims) and draw(st.booleans())
        else {}
    )
    return Read(
        start=start,
        end=end,
        window=window,
        tz=draw(st.sampled_from(ZONES)),
        customer=draw(st.sampled_from(["", "", "", "c1", "C1", "é", "e\u0301"])),
        group_by=tuple(draw(st.permutations(dims))[: draw(st.integers(0, len(dims)))]),
        group_filter=group_filter,
        page_size=draw(st.sampled_from([0, 0, 1, 2])),
    )


async def read_all_pages(meters: Meters, tenant: str, meter_id: str, q: Read) -> list[RowTuple]:
    request = meter_pb2.QueryUsageRequest(
        meter_id=meter_id,
        customer_id=q.customer,
        window_size=meter_pb2.WindowSize.Value(q.window.value),
        time_zone=q.tz,
        group_by=list(q.group_by),
        group_filter=q.group_filter,
        page_size=q.page_size,
    )
    request.start_time.FromDatetime(q.start)
    request.end_time.FromDatetime(q.end)
    rows: list[RowTuple] = []
    seen: set[str] = set()
    for _ in range(20):
        set_tenant(tenant)
        answer = await meters.servicer.QueryUsage(request, None)
        page = {r.customer_id for r in answer.rows}
        assert not page & seen, "a customer in two pages"
        if q.page_size:
            assert len(page) <= q.page_size
        seen |= page
        rows += row_tuples(answer.rows)
        if not answer.next_page_token:
            return sorted(rows)
        request.page_token = answer.next_page_token
    raise AssertionError("more pages than customers")


@settings(
    max_examples=45,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(data=st.data())
async def test_days_of_every_level_read_exactly(meters: Meters, data: st.DataObject) -> None:
    anchor = data.draw(st.sampled_from(DAY_ANCHORS))
    meter = data.draw(property_meters)
    gates = data.draw(st.sampled_from(GATE_SIZES))
    events = data.draw(dense_days(anchor))
    arrival = data.draw(st.permutations(events))
    deliveries: list[list[Ev]] = []
    while arrival:
        size = data.draw(st.integers(1, len(arrival)))
        deliveries.append(arrival[:size])
        arrival = arrival[size:]
    if bool(deliveries) and data.draw(st.booleans()):
        # A redelivery with new rows: the INSERT path, perhaps crossing a gate.
        deliveries.insert(
            data.draw(st.integers(1, len(deliveries))),
            [*deliveries[0], *data.draw(st.sampled_from(deliveries))],
        )
    meters.store.gates = gates
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant,
        aggregation=meter.aggregation.name,
        property=meter.spec().property,
        filter=meter.filter,
        group_by=meter.group_by,
    )
    # Two at a time, as the consumer's two fold workers.
    for i in range(0, len(deliveries), 2):
        await asyncio.gather(*(meters.send(tenant, d) for d in deliveries[i : i + 2]))
    record = await meters.store.get_meter(tenant, created.id)
    await assert_buckets_match_rows(meters.store.pool, record.key)
    levels = {
        rollup.level(*g)
        for g in await meters.store.pool.fetch(
            "SELECT n, hours_from, minutes_from FROM meter.usage_gates WHERE meter_key = $1",
            record.key,
        )
    }
    event(f"levels: {sorted(levels)}")
    for q in data.draw(st.lists(reads(anchor, meter), min_size=1, max_size=3)):
        got = await read_all_pages(meters, tenant, created.id, q)
        assert got == _oracle(events, meter, q), q


def _oracle(events: Sequence[Ev], meter: Any, q: Any) -> list[Any]:
    """What the pure oracle answers to read `q` over `events`."""
    return reference_tuples(
        aggregate_events(
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
    )


# -- Retention's seal over days of every level ---------------------------------


async def test_a_dropped_month_reads_as_before_at_every_level(fresh_db: str) -> None:
    """February holds customer days below both gates, between them and past
    both (and rows on UTC midnight and in its last microsecond); retention
    seals and drops it. Reads whose bounds are whole minutes (the raw rows of
    partial minutes are gone with the month) answer as the oracle, before and
    after: windows that cut hours (Asia/Kathmandu), minutes, days, group-by,
    pages of one customer."""
    pool = await db.create_pool(fresh_db, min_size=1, max_size=4)
    try:
        await db.migrate(pool, "meter", MIGRATIONS)
        jan, apr = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
        for m in partitions.months(jan, apr):
            await partitions.ensure_month(pool, METER_EVENTS, m)
        meters = Meters(MeterStore(pool))
        meters.store.gates = rollup.Gates(3, 6)
        tenant = meters.new_tenant()
        feb = datetime(2026, 2, 10, tzinfo=UTC)
        events = [ev("a0", "a", feb + timedelta(hours=9, seconds=13), v=1, region="eu")]
        events += [
            ev(
                f"b{i}",
                "B",
                feb + rollup.DAY + timedelta(hours=9 + i, seconds=7 * i),
                v=i,
                region=r,
            )
            for i, r in enumerate(["eu", "us", "eu", "us"])
        ]  # HOURS
        events += [
            ev(f"c{i}", "é", feb + 2 * rollup.DAY + timedelta(minutes=37 * i, seconds=i), v=-i)
            for i in range(7)
        ]  # MINUTES
        events += [
            ev("mid", "a", feb + 3 * rollup.DAY, v=5, region="us"),  # on midnight
            ev("last", "a", datetime(2026, 3, 1, tzinfo=UTC) - timedelta(microseconds=1), v=7),
            ev("kept", "a", datetime(2026, 3, 1, tzinfo=UTC), v=11),
        ]
        created = {
            aggregation: await meters.create(
                tenant, aggregation=aggregation, property="v", group_by=["region"]
            )
            for aggregation in ("SUM", "UNIQUE_COUNT", "LATEST", "AVG", "MAX")
        }
        for i in range(0, len(events), 3):
            await meters.send(tenant, events[i : i + 3])
        reads = [
            Read(jan, apr, WindowSize.NONE, "UTC", "", ("region",), {}, 0),
            Read(jan, apr, WindowSize.DAY, "Asia/Kathmandu", "", (), {}, 1),
            Read(
                feb - timedelta(minutes=15),
                feb + 4 * rollup.DAY + timedelta(minutes=45),
                WindowSize.HOUR,
                "Asia/Kathmandu",
                "",
                ("region",),
                {},
                0,
            ),
            Read(
                feb + rollup.DAY + timedelta(hours=8, minutes=59),
                feb + 3 * rollup.DAY + timedelta(minutes=1),
                WindowSize.MINUTE,
                "UTC",
                "",
                (),
                {},
                2,
            ),
            Read(jan, apr, WindowSize.MONTH, "America/St_Johns", "B", ("region",), {}, 0),
            Read(jan, apr, WindowSize.NONE, "UTC", "", ("region",), {"region": "us"}, 1),
        ]

        async def check() -> None:
            for aggregation, meter in created.items():
                spec = MeterSpec("api.call", Aggregation[aggregation], "v", None, ("region",))
                for q in reads:
                    got = await read_all_pages(meters, tenant, meter.id, q)
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
                    assert got == reference_tuples(expected), (aggregation, q)

        levels = await pool.fetch(
            "SELECT DISTINCT n >= hours_from, n >= minutes_from FROM meter.usage_gates"
        )
        assert len(levels) == 3
        await check()
        assert await RetentionStore(pool).drop_before(datetime(2026, 3, 1, tzinfo=UTC))
        assert await pool.fetchval("SELECT count(*) FROM meter.meter_events") == len(created)
        await check()
        # A late event into a sealed day: refused by the retired partition.
        with pytest.raises(asyncpg.CheckViolationError):
            await meters.store.fold(
                [row(1, "a", feb + timedelta(hours=1), "later", 1)]  # (any meter key)
            )
    finally:
        await pool.close()


# -- A meter before the gates beside one after them ----------------------------

# The fold before migration 0010 (dbd15f5^): each new row into its minute's and
# its hour's bucket, no gate.
_OLD_FOLD = store_module._ROLLUP.format(
    new=f"stored AS (INSERT INTO meter.meter_events ({store_module._FIELDS})"
    " SELECT * FROM unnest($1::integer[], $2::text[], $3::timestamptz[], $4::text[],"
    " $5::numeric[], $6::text[], $7::jsonb[], $8::text[])"
    f" ON CONFLICT DO NOTHING RETURNING {store_module._FIELDS}),"
    " new AS (SELECT *, true AS fine, true AS coarse FROM stored)",
    values=store_module._VALUES,
    gates="",
)


@pytest.mark.xfail(
    strict=True,
    reason="migration 0010 is unsafe while meter replicas from before it still fold (a"
    " rolling upgrade after the migration Job): their rows go into buckets of a day"
    " without a gate; the next fold of a new replica makes the day's gate below its"
    " thresholds, so a read takes those rows raw and from the buckets (and a later"
    " crossing rebuilds them into the buckets again). Not fixable in the fold alone (an"
    " old replica may also fold into a day whose gate exists): docs/upgrade.md now lists"
    " 0010 among the migrations that need meter scaled to 0 first",
)
async def test_a_fold_of_a_replica_from_before_the_gates_counts_once(meters: Meters) -> None:
    tenant = meters.new_tenant()
    created = await meters.create(tenant, aggregation="SUM", property="v")
    record = await meters.store.get_meter(tenant, created.id)
    meters.store.gates = rollup.Gates()
    day = datetime(2025, 5, 5, tzinfo=UTC)
    old = [
        row(record.key, "c", day + timedelta(hours=1, minutes=i), f"old{i}", 1) for i in range(3)
    ]
    await meters.store.pool.fetchval(_OLD_FOLD, *[list(c) for c in zip(*old, strict=True)])
    assert await meters.store.fold([row(record.key, "c", day + timedelta(hours=2), "new", 10)])
    assert await total(meters.store, record, day, day + rollup.DAY) == 13


# -- Paging by customer over days of different levels --------------------------


async def test_pages_by_customer_take_every_level_in_bytewise_order(meters: Meters) -> None:
    """Customers whose ids differ only in case or in how an accent is written,
    each with its day at another level (rows, hours, minutes), paged one
    customer at a time (after_customer, customer_limit) over windows that cut
    hours: the pages add up to the unpaged answer, in bytewise order."""
    tenant = meters.new_tenant()
    created = await meters.create(tenant, aggregation="LATEST", property="v", group_by=["r"])
    record = await meters.store.get_meter(tenant, created.id)
    meters.store.gates = rollup.Gates(3, 6)
    day = datetime(2025, 6, 1, tzinfo=UTC)
    density = {"A": 1, "a": 4, "é": 7, "e\u0301": 2, "B": 6}
    events = [
        ev(
            f"{c}{i}",
            c,
            day + timedelta(hours=1, minutes=50 * i, seconds=i),
            v=i * 10 + k,
            r=f"r{i % 2}",
        )
        for k, (c, n) in enumerate(density.items())
        for i in range(n)
    ]
    await meters.send(tenant, events)
    levels = {
        r[0]: rollup.level(*r[1:])
        for r in await meters.store.pool.fetch(
            "SELECT customer_id, n, hours_from, minutes_from FROM meter.usage_gates"
            " WHERE meter_key = $1",
            record.key,
        )
    }
    assert levels == {"A": 0, "a": 1, "é": 2, "e\u0301": 0, "B": 2}
    bounds = [day + timedelta(minutes=45) + timedelta(hours=h) for h in range(8)]
    end = day + timedelta(hours=8, minutes=30)

    async def usage(after: str, limit: int | None) -> list[Any]:
        out: list[Any] = []
        async for groups in meters.store.usage(
            record,
            customer_id="",
            bounds=bounds,
            end=end,
            group_by=("r",),
            group_filter={},
            after_customer=after,
            customer_limit=limit,
        ):
            out += groups
        return out

    everything = await usage("", None)
    assert sorted({g.customer_id for g in everything}, key=str.encode) == sorted(
        density, key=str.encode
    )
    pages: list[Any] = []
    after = ""
    while page := await usage(after, 1):
        assert len({g.customer_id for g in page}) == 1
        assert page[0].customer_id.encode() > after.encode()
        pages += page
        after = page[0].customer_id
    assert sorted(pages, key=lambda g: (g.window, g.customer_id.encode(), g.dims)) == everything
    expected = aggregate_events(
        [e.raw for e in events],
        MeterSpec("api.call", Aggregation.LATEST, "v", None, ("r",)),
        bounds[0],
        end,
        WindowSize.NONE,
        "UTC",
        None,
        ("r",),
    )
    got = await meters.query(tenant, created.id, bounds[0], end, group_by=["r"])
    assert got == reference_tuples(expected)


# -- Migration 0010 over days a meter before it folded -------------------------


async def test_days_folded_before_the_gates_take_late_events_exactly(
    fresh_db: str, tmp_path: Path
) -> None:
    """A meter before 0010 folded busy and quiet days (rows in buckets at both
    grains); after the migration their gates are past both (thresholds 0) and
    late events add to their buckets; a new quiet day beside them is read raw.
    Every bucket equals its rows, and reads (UNIQUE_COUNT, windows cutting
    hours) equal the oracle."""
    pool = await db.create_pool(fresh_db, min_size=1, max_size=2)
    try:
        await db.migrate(pool, "meter", migrations_before(MIGRATIONS, 10, tmp_path / "old"))
        key = await pool.fetchval(
            "INSERT INTO meter.meters (tenant_id, name, event_name, aggregation, property,"
            " group_by) VALUES ('t', 'm', 'api.call', 'UNIQUE_COUNT', 'v', '{}') RETURNING key"
        )
        day = datetime(2025, 7, 1, tzinfo=UTC)
        old = [
            row(key, "c", day + timedelta(minutes=7 * i, seconds=i), f"o{i}", text=f"u{i % 4}")
            for i in range(30)
        ] + [row(key, "q", day + rollup.DAY, "q0", text="u9")]
        await pool.fetchval(_OLD_FOLD, *[list(c) for c in zip(*old, strict=True)])
        await db.migrate(pool, "meter", MIGRATIONS)
        assert await pool.fetch(
            "SELECT customer_id, n, hours_from, minutes_from FROM meter.usage_gates ORDER BY 1"
        ) == [("c", 30, 0, 0), ("q", 1, 0, 0)]
        store = MeterStore(pool)
        store.gates = rollup.Gates(5, 10)
        late = [
            row(key, "c", day + timedelta(hours=1, seconds=30), "l0", text="u7"),
            row(key, "q", day + rollup.DAY + timedelta(hours=23), "l1", text="u8"),
            row(key, "n", day + 2 * rollup.DAY, "l2", text="u9"),  # on midnight, new day
        ]
        assert await store.fold(late) == 3
        await assert_buckets_match_rows(pool, key)
        meter = MeterRecord(
            "00000000-0000-0000-0000-000000000000", key, "t", "m", "api.call",
            "UNIQUE_COUNT", "v", None, (), "", "", day, None, "DONE",
        )  # fmt: skip
        spec = MeterSpec("api.call", Aggregation.UNIQUE_COUNT, "v", None, ())
        raw = [
            RawEvent(r.event_id, r.customer_id, "api.call", r.event_time, {"v": r.text_value or ""})
            for r in [*old, *late]
        ]
        start, end = day + timedelta(minutes=15), day + 3 * rollup.DAY
        bounds = [start + timedelta(hours=h) for h in range(72)]
        got = [
            (g.window, g.customer_id, g.value)
            async for groups in store.usage(
                meter, customer_id="", bounds=bounds, end=end, group_by=(), group_filter={}
            )
            for g in groups
        ]
        expected = aggregate_events(raw, spec, start, end, WindowSize.HOUR, "Asia/Kathmandu", None)
        assert len(expected) == 7
        assert sorted((r.window_start, r.customer_id, r.value) for r in expected) == sorted(
            (bounds[w - 1], c, str(v)) for w, c, v in got
        )
    finally:
        await pool.close()


@pytest.mark.parametrize("gates", [rollup.Gates(3, 6), rollup.Gates(2, 2), rollup.Gates(5, 9)])
async def test_many_folds_of_one_day_count_each_row_once(
    meters: Meters, gates: rollup.Gates
) -> None:
    """Two replicas with two fold workers each, and redeliveries: eight folds at
    once of one customer's day (and its neighbour across midnight), each a few
    rows, overlapping, so that the day crosses its gates inside the crowd."""
    tenant = meters.new_tenant()
    created = await meters.create(tenant, aggregation="SUM", property="v")
    record = await meters.store.get_meter(tenant, created.id)
    stores = [MeterStore(meters.store.pool) for _ in range(2)]
    for store in stores:
        store.gates = gates
    day = datetime(2025, 9, 9, tzinfo=UTC)
    for round_ in range(4):
        day += 2 * rollup.DAY
        rows = [
            row(record.key, "c", day - timedelta(seconds=30) + timedelta(seconds=13 * i), f"{i}", i)
            for i in range(16)
        ]
        slices = [rows[i : i + 3] for i in range(0, 16, 2)]  # overlapping by one
        await asyncio.gather(*(stores[i % 2].fold(s) for i, s in enumerate(slices)))
        await assert_buckets_match_rows(meters.store.pool, record.key)
        assert await total(meters.store, record, day - rollup.DAY, day + rollup.DAY) == sum(
            range(16)
        ), round_


# -- A dropped month read against the oracle (property) ------------------------

MARCH = datetime(2026, 3, 1, tzinfo=UTC)


@st.composite
def minute_reads(draw: st.DrawFn, meter: Meter) -> Read:
    """Reads whose bounds are whole minutes (the partial minutes' rows of a
    dropped month are gone with it), in zones whose offsets are whole minutes."""
    edges = st.one_of(
        st.integers(-2, 2).map(lambda d: d * rollup.DAY),
        st.integers(-3 * 1440, 3 * 1440).map(lambda m: timedelta(minutes=m)),
    )
    a, b = draw(edges), draw(edges)
    start, end = MARCH + min(a, b), MARCH + max(a, b)
    if start == end:
        end += timedelta(minutes=1)
    window = draw(st.sampled_from(list(WindowSize)))
    if window is WindowSize.MINUTE and end - start > timedelta(hours=30):
        window = WindowSize.HOUR
    dims = list(meter.group_by)
    return Read(
        start=start,
        end=end,
        window=window,
        tz=draw(st.sampled_from(ZONES)),
        customer=draw(st.sampled_from(["", "", "c1", "é"])),
        group_by=tuple(draw(st.permutations(dims))[: draw(st.integers(0, len(dims)))]),
        group_filter={},
        page_size=draw(st.sampled_from([0, 0, 1])),
    )


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(data=st.data())
async def test_a_dropped_month_reads_as_the_oracle(
    stack_urls: tuple[str, str], data: st.DataObject
) -> None:
    """Days of every level on either side of 1 March; retention drops
    February: reads over it, and across the cut, answer as the oracle."""
    meter = data.draw(property_meters.filter(lambda m: m.aggregation.name in SQL_AGGREGATES))
    gates = data.draw(st.sampled_from(GATE_SIZES))
    events = data.draw(dense_days(MARCH - rollup.DAY))  # 28 Feb, 1 and 2 March
    events += data.draw(dense_days(MARCH - 2 * rollup.DAY))  # 27 Feb too
    events = list({e.raw.event_id: e for e in events}.values())  # (ids repeat across draws)
    reads_ = data.draw(st.lists(minute_reads(meter), min_size=1, max_size=3))
    name = f"gates_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(stack_urls[0])
    await admin.execute(f"CREATE DATABASE {name}")
    pool = await db.create_pool(stack_urls[0].rsplit("/", 1)[0] + f"/{name}", max_size=2)
    try:
        await db.migrate(pool, "meter", MIGRATIONS)
        for m in partitions.months(MARCH - rollup.DAY * 40, MARCH + rollup.DAY * 40):
            await partitions.ensure_month(pool, METER_EVENTS, m)
        meters = Meters(MeterStore(pool))
        meters.store.gates = gates
        tenant = meters.new_tenant()
        created = await meters.create(
            tenant,
            aggregation=meter.aggregation.name,
            property=meter.spec().property,
            filter=meter.filter,
            group_by=meter.group_by,
        )
        for i in range(0, len(events), 5):
            await meters.send(tenant, events[i : i + 5])
        assert await RetentionStore(pool).drop_before(MARCH)
        for q in reads_:
            got = await read_all_pages(meters, tenant, created.id, q)
            assert got == _oracle(events, meter, q), q
    finally:
        await pool.close()
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()
