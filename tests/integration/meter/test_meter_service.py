"""meter's rules through its servicer, service and store over PostgreSQL: each
aggregation, operator and nesting rule, validation, archiving, group-by, window
edges to the second, skipped events. Events are folded as the consumer folds them
(`fold_batches` of EventBatch messages); each test has its own tenant."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from tests.integration.meter.harness import Cond, Flt, Meters, Raw, ev
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


DAY = utc(2024, 5, 1)
START, END = utc(2024, 5, 1), utc(2024, 6, 1)
H = timedelta(hours=1)
S = timedelta(seconds=1)


async def total(meters: Meters, tenant: str, meter_id: str, customer: str = "c") -> str:
    return await meters.total(tenant, meter_id, START, END, customer)


# --- aggregations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregation", "values", "expected"),
    [
        ("COUNT", [3, "x", True], "3"),
        ("SUM", [3, -1.5, "2.25", 10**18], "1000000000000000003.75"),
        ("SUM", [0.1] * 10, "1"),  # the shortest repr of each double: exact
        ("MIN", [3, -1.5, "2.25"], "-1.5"),
        ("MAX", [3, -1.5, "2.25", "3.00"], "3"),
        ("AVG", [1, 2, 2], "1.6666666666666666666666666666666666666666666666667"),
        ("AVG", [0.1, 0.2], "0.15"),
        ("AVG", [2**63 - 1, 2**63 - 1], "9223372036854775807"),
        # 1, 1.0 and "1" are one value; strings are case-sensitive; a bool is a value.
        ("UNIQUE_COUNT", ["a", "A", "a", 1, 1.0, "1", True, "true"], "4"),
    ],
)
async def test_each_aggregation(
    meters: Meters, aggregation: str, values: list[Raw], expected: str
) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(
        tenant, aggregation=aggregation, property="" if aggregation == "COUNT" else "v"
    )
    await meters.send(
        tenant, [ev(f"e{i}", "c", DAY + i * S, v=value) for i, value in enumerate(values)]
    )
    assert await total(meters, tenant, meter.id) == expected


async def test_sum_of_extreme_doubles_is_exact(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="SUM", property="v")
    await meters.send(tenant, [ev("a", "c", DAY, v=1e300), ev("b", "c", DAY, v=5e-324)])
    assert await total(meters, tenant, meter.id) == "1" + "0" * 300 + "." + "0" * 323 + "5"


async def test_latest_takes_the_greatest_timestamp_whatever_the_arrival_order(
    meters: Meters,
) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="LATEST", property="v")
    events = [ev(f"e{i}", "c", DAY + i * H, v=i * 10) for i in range(5)]
    # Newest first, one fetch each, then the oldest again (a redelivery).
    for e in reversed(events):
        await meters.send(tenant, [e])
    await meters.send(tenant, [events[0]])
    assert await total(meters, tenant, meter.id) == "40"
    # An event that arrives last but happened before changes nothing...
    await meters.send(tenant, [ev("late", "c", DAY + 90 * S, v=-7)])
    assert await total(meters, tenant, meter.id) == "40"
    # ... and per window, each window has its own latest.
    rows = await meters.query(tenant, meter.id, DAY, DAY + 3 * H, window="HOUR")
    assert [(r[1], r[4]) for r in rows] == [(DAY, "-7"), (DAY + H, "10"), (DAY + 2 * H, "20")]


async def test_latest_breaks_timestamp_ties_by_event_id_code_points(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="LATEST", property="v")
    # By code point "e-b" (98) > "e-B" (66) > "e-A" (65); most locales sort "b"
    # before "B", so a locale-aware comparison would pick another event.
    tie = DAY + H
    await meters.send(tenant, [ev("e-b", "c", tie, v=2)])
    await meters.send(tenant, [ev("e-B", "c", tie, v=1), ev("e-A", "c", tie, v=0)])
    await meters.send(tenant, [ev("e-z", "c", tie - timedelta(microseconds=1), v=9)])
    assert await total(meters, tenant, meter.id) == "2"


async def test_min_max_avg_latest_answer_zero_for_a_customer_without_usage(
    meters: Meters,
) -> None:
    tenant = meters.new_tenant()
    for aggregation in ("MIN", "MAX", "AVG", "LATEST", "SUM", "UNIQUE_COUNT"):
        meter = await meters.create(tenant, aggregation=aggregation, property="v")
        assert await meters.query(tenant, meter.id, START, END, customer="nobody") == [
            ("nobody", START, END, (), "0")
        ]
        # Without a customer, or with windows, nothing matched gives no row.
        assert await meters.query(tenant, meter.id, START, END) == []
        assert await meters.query(tenant, meter.id, START, END, customer="x", window="DAY") == []


# --- skipped events -------------------------------------------------------------------


async def test_skipped_events_are_counted_per_meter_and_reason(meters: Meters) -> None:
    tenant = meters.new_tenant()
    summed = await meters.create(tenant, aggregation="SUM", property="v")
    counted = await meters.create(tenant, aggregation="COUNT")
    uniques = await meters.create(tenant, aggregation="UNIQUE_COUNT", property="v")
    events = [
        ev("ok", "c", DAY, v=5),
        ev("numeric-string", "c", DAY, v="2.5"),
        ev("no-v", "c", DAY, other=1),
        ev("word", "c", DAY, v="five"),
        ev("bool", "c", DAY, v=True),
        ev("spaced", "c", DAY, v=" 1"),
    ]
    await meters.send(tenant, events)
    await meters.send(tenant, events)  # a redelivery counts nothing twice, skips included
    assert await total(meters, tenant, summed.id) == "7.5"
    assert await total(meters, tenant, counted.id) == "6"
    assert await total(meters, tenant, uniques.id) == "5"  # "5", "2.5", "five", "true", " 1"
    assert dict((await meters.get(tenant, summed.id)).skipped_events) == {
        "missing_property": 1,
        "not_a_number": 3,
    }
    assert dict((await meters.get(tenant, counted.id)).skipped_events) == {}
    assert dict((await meters.get(tenant, uniques.id)).skipped_events) == {"missing_property": 1}


# --- filters --------------------------------------------------------------------------

# One event per customer, named after its `region` value.
REGIONS: dict[str, Raw | None] = {
    "eu": "eu",
    "EU": "EU",
    "us-east": "us-east",
    "int-5": 5,
    "str-5.0": "5.0",
    "true": True,
    "missing": None,
}


@pytest.mark.parametrize(
    ("condition", "matched"),
    [
        (Cond("region", "EQUALS", "eu"), {"eu"}),  # case-sensitive
        (Cond("region", "EQUALS", 5), {"int-5", "str-5.0"}),  # numbers compare as numbers
        (Cond("region", "EQUALS", True), {"true"}),
        (Cond("region", "NOT_EQUALS", "eu"), {"EU", "us-east", "int-5", "str-5.0", "true"}),
        (Cond("region", "GREATER_THAN", 4.5), {"int-5", "str-5.0"}),
        (Cond("region", "GREATER_THAN", 5), set()),
        (Cond("region", "GREATER_THAN_OR_EQUALS", "5"), {"int-5", "str-5.0"}),
        (Cond("region", "LESS_THAN", 5), set()),
        (Cond("region", "LESS_THAN", 6), {"int-5", "str-5.0"}),
        (Cond("region", "LESS_THAN_OR_EQUALS", 5.0), {"int-5", "str-5.0"}),
        (Cond("region", "CONTAINS", "u"), {"eu", "us-east"}),
        (Cond("region", "CONTAINS", "E"), {"EU"}),
        (Cond("region", "DOES_NOT_CONTAIN", "u"), {"EU", "str-5.0"}),  # strings only
        (Cond("region", "IN", values=("eu", 5)), {"eu", "int-5", "str-5.0"}),
        (Cond("region", "NOT_IN", values=("eu", 5)), {"EU", "us-east", "true"}),
        (Cond("region", "EXISTS"), set(REGIONS) - {"missing"}),
        (Cond("region", "NOT_EXISTS"), {"missing"}),
    ],
)
async def test_each_operator(meters: Meters, condition: Cond, matched: set[str]) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, filter=Flt(conditions=(condition,)))
    await meters.send(
        tenant,
        [
            ev(customer, customer, DAY, **({} if region is None else {"region": region}))
            for customer, region in REGIONS.items()
        ],
    )
    rows = await meters.query(tenant, meter.id, START, END)
    assert {r[0] for r in rows} == matched
    assert all(r[4] == "1" for r in rows)


NESTED = Flt(
    "OR",
    conditions=(Cond("region", "EQUALS", "eu"),),
    filters=(
        Flt(
            "AND",
            conditions=(Cond("tier", "EQUALS", "pro"),),
            filters=(Flt("OR", conditions=(Cond("v", "GREATER_THAN", 3), Cond("vip", "EXISTS"))),),
        ),
    ),
)


async def test_filters_nest_three_levels_with_and_or(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, filter=NESTED)
    await meters.send(
        tenant,
        [
            ev("a", "eu", DAY, region="eu"),  # level 1 OR
            ev("b", "pro-big", DAY, region="us", tier="pro", v=4),  # level 2 AND level 3 OR
            ev("c", "pro-vip", DAY, tier="pro", vip=False),
            ev("d", "pro-small", DAY, tier="pro", v=3),  # level 3 fails
            ev("e", "free-big", DAY, tier="free", v=4),  # level 2 fails
            ev("f", "none", DAY),
        ],
    )
    rows = await meters.query(tenant, meter.id, START, END)
    assert {r[0] for r in rows} == {"eu", "pro-big", "pro-vip"}


async def test_an_empty_filter_matches_every_event_and_names_are_case_sensitive(
    meters: Meters,
) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, filter=Flt("OR"))
    await meters.send(
        tenant, [ev("a", "c", DAY), ev("b", "c", DAY, x=1), ev("c", "c", DAY, "API.CALL")]
    )
    assert await total(meters, tenant, meter.id) == "2"


async def test_the_stored_filter_round_trips(meters: Meters) -> None:
    tenant = meters.new_tenant()
    created = await meters.create(tenant, filter=NESTED, group_by=["region"])
    fetched = await meters.get(tenant, created.id)
    assert fetched.filter == NESTED.proto() == created.filter
    assert list(fetched.group_by) == ["region"]


# --- validation -----------------------------------------------------------------------

FOUR_LEVELS = Flt(filters=(Flt(filters=(Flt(filters=(Flt(conditions=(Cond("k", "EXISTS"),)),)),)),))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "\x00"}, r"^name: must not contain a NUL"),
        ({"event_name": ""}, r"^event_name: required"),
        ({"aggregation": "UNSPECIFIED"}, r"^aggregation: "),
        ({"aggregation": "SUM"}, r"^property: required for AGGREGATION_SUM"),
        ({"aggregation": "LATEST"}, r"^property: required for AGGREGATION_LATEST"),
        ({"group_by": ["a", "a"]}, r"^group_by\[1\]: duplicate"),
        ({"group_by": [""]}, r"^group_by\[0\]: must not be empty"),
        ({"filter": Flt(conditions=(Cond("k", "IN"),))}, r"^filter\.conditions\[0\]\.values: "),
        (
            {"filter": Flt(conditions=(Cond("k", "IN", "a"),))},
            r"^filter\.conditions\[0\]\.value: OPERATOR_IN takes values",
        ),
        (
            {"filter": Flt(conditions=(Cond("k", "EXISTS", "a"),))},
            r"^filter\.conditions\[0\]\.value: OPERATOR_EXISTS takes no value",
        ),
        (
            {"filter": Flt(conditions=(Cond("k", "NOT_EXISTS", values=("a",)),))},
            r"^filter\.conditions\[0\]\.values: OPERATOR_NOT_EXISTS takes no values",
        ),
        (
            {"filter": Flt(conditions=(Cond("k", "EQUALS"),))},
            r"^filter\.conditions\[0\]\.value: OPERATOR_EQUALS needs a value",
        ),
        (
            {"filter": Flt(conditions=(Cond("k", "LESS_THAN", "abc"),))},
            r"^filter\.conditions\[0\]\.value: OPERATOR_LESS_THAN needs a number",
        ),
        (
            {"filter": Flt(conditions=(Cond("k", "CONTAINS", 5),))},
            r"^filter\.conditions\[0\]\.value: OPERATOR_CONTAINS needs a string",
        ),
        (
            {"filter": Flt(conditions=(Cond("", "EXISTS"),))},
            r"^filter\.conditions\[0\]\.key: required",
        ),
        (
            {"filter": Flt(filters=(Flt(conditions=(Cond("k", "EQUALS", "a\x00"),)),))},
            r"^filter\.filters\[0\]\.conditions\[0\]\.value: must not contain a NUL",
        ),
        (
            {"filter": Flt(conditions=(Cond("k", "EQUALS", float("nan")),))},
            r"^filter\.conditions\[0\]\.value: must be a finite number",
        ),
        (
            {"filter": FOUR_LEVELS},
            r"^filter\.filters\[0\]\.filters\[0\]\.filters\[0\]: .* 3 levels",
        ),
        ({"description": "\x00"}, r"^description: "),
    ],
)
async def test_create_meter_rejects_naming_the_field(
    meters: Meters, fields: dict[str, Any], message: str
) -> None:
    tenant = meters.new_tenant()
    with pytest.raises(InvalidArgument, match=message):
        await meters.create(tenant, **fields)
    set_tenant_meters = await meters.servicer.ListMeters(meter_pb2.ListMetersRequest(), None)
    assert list(set_tenant_meters.meters) == []


async def test_unknown_operator_and_conjunction_are_rejected(meters: Meters) -> None:
    tenant = meters.new_tenant()
    bad_operator = meter_pb2.Filter()
    bad_operator.conditions.add(key="k").operator = 99  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match=r"^filter\.conditions\[0\]\.operator: 99"):
        await meters.create(tenant, filter=bad_operator)
    bad_conjunction = meter_pb2.Filter()
    bad_conjunction.filters.add().conjunction = 7  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match=r"^filter\.filters\[0\]\.conjunction: 7"):
        await meters.create(tenant, filter=bad_conjunction)


async def test_three_levels_are_allowed(meters: Meters) -> None:
    tenant = meters.new_tenant()
    three = Flt(filters=(Flt(filters=(Flt(conditions=(Cond("k", "EXISTS"),)),)),))
    assert (await meters.create(tenant, filter=three)).filter == three.proto()


async def test_a_name_is_unique_per_tenant(meters: Meters) -> None:
    tenant, other = meters.new_tenant(), meters.new_tenant()
    await meters.create(tenant, name="calls")
    with pytest.raises(AlreadyExists, match=r"^name: a meter named 'calls' already exists"):
        await meters.create(tenant, name="calls", aggregation="SUM", property="v")
    assert (await meters.create(other, name="calls")).name == "calls"
    assert (await meters.create(tenant, name="Calls")).name == "Calls"


async def test_get_and_archive_unknown_meters(meters: Meters) -> None:
    tenant, other = meters.new_tenant(), meters.new_tenant()
    theirs = await meters.create(other)
    for meter_id in ("00000000-0000-0000-0000-000000000000", theirs.id):
        with pytest.raises(NotFound, match=r"^meter_id: "):
            await meters.get(tenant, meter_id)
        with pytest.raises(NotFound):
            await meters.archive(tenant, meter_id)
    # A malformed id names no meter at all: the request is wrong, not the meter missing.
    for meter_id in ("nope", f"{{{theirs.id}}}", f"urn:uuid:{theirs.id}"):
        with pytest.raises(InvalidArgument, match=r"^meter_id: "):
            await meters.get(tenant, meter_id)
        with pytest.raises(InvalidArgument, match=r"^meter_id: "):
            await meters.archive(tenant, meter_id)
    with pytest.raises(InvalidArgument, match=r"^id: required"):
        await meters.get(tenant, "")


async def test_list_meters_pages_and_rejects_forged_tokens(meters: Meters) -> None:
    tenant = meters.new_tenant()
    created = [await meters.create(tenant, name=f"m{i}") for i in range(5)]
    await meters.archive(tenant, created[1].id)
    seen: list[meter_pb2.Meter] = []
    token = ""
    while True:
        page = await meters.servicer.ListMeters(
            meter_pb2.ListMetersRequest(page_size=2, page_token=token), None
        )
        seen += page.meters
        token = page.next_page_token
        if not token:
            break
    assert [m.name for m in seen] == [f"m{i}" for i in range(5)]
    assert [m.archived for m in seen] == [False, True, False, False, False]
    for forged in ("bm90IGpzb24=", "WyJ4IiwgInkiXQ==", "WyIyMDI0LTAxLTAxIiwgIngiXQ=="):
        with pytest.raises(InvalidArgument, match=r"^page_token: "):
            await meters.servicer.ListMeters(meter_pb2.ListMetersRequest(page_token=forged), None)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"meter_id": ""}, InvalidArgument, r"^meter_id: required"),
        ({"meter_id": "00000000-0000-0000-0000-000000000000"}, NotFound, r"^meter_id: "),
        ({"start_time": None}, InvalidArgument, r"^start_time: required"),
        ({"end_time": None}, InvalidArgument, r"^end_time: required"),
        ({"end_time": START}, InvalidArgument, r"^end_time: must be after start_time"),
        ({"end_time": START - S}, InvalidArgument, r"^end_time: must be after start_time"),
        ({"time_zone": "Mars/Olympus"}, InvalidArgument, r"^time_zone: unknown time zone"),
        ({"window_size": 99}, InvalidArgument, r"^window_size: 99"),
        ({"group_by": ["tier"]}, InvalidArgument, r"^group_by\[0\]: 'tier' is not a dimension"),
        ({"group_by": ["region", "region"]}, InvalidArgument, r"^group_by\[1\]: duplicate"),
        ({"group_filter": {"tier": "x"}}, InvalidArgument, r"^group_filter: 'tier' is not a"),
        ({"customer_id": "a\x00"}, InvalidArgument, r"^customer_id: must not contain a NUL"),
        # A year of minutes is more than 100,000 windows.
        (
            {"window_size": meter_pb2.WINDOW_SIZE_MINUTE, "end_time": START + timedelta(days=366)},
            ResourceExhausted,
            r"^window_size: ",
        ),
        # The limits of datetime: years 1 and 9999.
        ({"start_time": utc(1, 1, 1)}, InvalidArgument, r"^start_time: must be between"),
        ({"end_time": utc(9999, 12, 31, 23, 59, 59)}, InvalidArgument, r"^end_time: must be"),
        (
            {"start_time": utc(1, 1, 1), "window_size": meter_pb2.WINDOW_SIZE_MONTH},
            InvalidArgument,
            r"^start_time: must be between",
        ),
        ({"start_time": (2**62, 0)}, InvalidArgument, r"^start_time: not a valid timestamp"),
        ({"end_time": (0, -1)}, InvalidArgument, r"^end_time: not a valid timestamp"),
    ],
)
async def test_query_usage_rejects_naming_the_field(
    meters: Meters, fields: dict[str, Any], error: type[Exception], message: str
) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, group_by=["region"])
    times: dict[str, Any] = {"start_time": START, "end_time": END}
    times.update({k: fields.pop(k) for k in list(fields) if k in times})
    request = meter_pb2.QueryUsageRequest(meter_id=meter.id)
    for field, value in times.items():
        if isinstance(value, datetime):
            getattr(request, field).FromDatetime(value)
        elif isinstance(value, tuple):
            getattr(request, field).seconds, getattr(request, field).nanos = value
    for field, value in fields.items():
        if isinstance(value, dict):
            getattr(request, field).update(value)
        elif isinstance(value, list):
            getattr(request, field).extend(value)
        else:
            setattr(request, field, value)
    with pytest.raises(error, match=message):
        await meters.query_request(tenant, request)


async def test_ranges_near_the_limits_of_time_work(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant)
    for window in ("NONE", "MINUTE", "HOUR", "DAY", "MONTH"):
        for start, end in (
            (utc(2, 1, 1), utc(2, 1, 1, 0, 30)),
            (utc(9998, 12, 31, 23, 30), utc(9999, 1, 1)),
        ):
            rows = await meters.query(
                tenant, meter.id, start, end, window=window, tz="Pacific/Kiritimati", customer="c"
            )
            assert rows == ([("c", start, end, (), "0")] if window == "NONE" else [])


# --- archive --------------------------------------------------------------------------


async def test_an_archived_meter_stops_counting_and_keeps_its_history(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="SUM", property="v")
    await meters.send(tenant, [ev("before", "c", DAY, v=5)])
    archived = await meters.archive(tenant, meter.id)
    assert archived.archived and archived.HasField("archive_time")
    await meters.send(tenant, [ev("after", "c", DAY + H, v=7)])
    assert await total(meters, tenant, meter.id) == "5"
    again = await meters.archive(tenant, meter.id)
    assert again.archive_time == archived.archive_time
    fetched = await meters.get(tenant, meter.id)
    assert fetched.archived and fetched.archive_time == archived.archive_time


# --- group-by -------------------------------------------------------------------------


async def test_group_by_any_subset_and_group_filter(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(
        tenant, aggregation="SUM", property="v", group_by=["region", "tier"]
    )
    await meters.send(
        tenant,
        [
            ev("a", "c", DAY, v=1, region="eu", tier="pro"),
            ev("b", "c", DAY, v=2, region="eu", tier="free"),
            ev("c", "c", DAY, v=4, region="us", tier="pro"),
            ev("d", "c", DAY, v=8, tier="pro"),  # no region: ""
            ev("e", "d", DAY, v=16, region=1, tier="pro"),  # numbers group canonically
            ev("f", "d", DAY, v=32, region=1.0, tier="pro"),
        ],
    )

    async def q(**kw: Any) -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
        return [(r[0], r[3], r[4]) for r in await meters.query(tenant, meter.id, START, END, **kw)]

    assert await q() == [("c", (), "15"), ("d", (), "48")]
    assert await q(group_by=["region"]) == [
        ("c", (("region", ""),), "8"),
        ("c", (("region", "eu"),), "3"),
        ("c", (("region", "us"),), "4"),
        ("d", (("region", "1"),), "48"),
    ]
    assert await q(group_by=["tier", "region"], customer="c", group_filter={"tier": "pro"}) == [
        ("c", (("region", ""), ("tier", "pro")), "8"),
        ("c", (("region", "eu"), ("tier", "pro")), "1"),
        ("c", (("region", "us"), ("tier", "pro")), "4"),
    ]
    assert await q(group_filter={"region": "eu"}) == [("c", (), "3")]
    assert await q(group_filter={"region": ""}) == [("c", (), "8")]
    assert await q(group_filter={"region": "1"}, group_by=["tier"]) == [
        ("d", (("tier", "pro"),), "48")
    ]
    # Nothing matches the filter: one zero row for a customer, its group from the filter.
    assert await q(customer="c", group_by=["region", "tier"], group_filter={"region": "x"}) == [
        ("c", (("region", "x"), ("tier", "")), "0")
    ]


# --- windows --------------------------------------------------------------------------


async def test_windows_are_exact_to_the_second_at_any_boundary(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant)
    t = utc(2024, 5, 1, 10)
    stamps = [
        t + timedelta(minutes=15),  # before the range
        t + timedelta(minutes=15, seconds=1),  # its first second
        t + timedelta(minutes=59, seconds=59),
        t + H,  # the first whole hour's first second
        t + H + timedelta(microseconds=1),
        t + 2 * H - timedelta(microseconds=1),
        t + 2 * H + timedelta(minutes=59, seconds=58),
        t + 2 * H + timedelta(minutes=59, seconds=59),  # the range's end: excluded
    ]
    await meters.send(tenant, [ev(f"e{i}", "c", s) for i, s in enumerate(stamps)])
    start, end = t + timedelta(minutes=15, seconds=1), t + 2 * H + timedelta(minutes=59, seconds=59)
    assert await meters.query(tenant, meter.id, start, end, window="HOUR") == [
        ("c", start, t + H, (), "2"),
        ("c", t + H, t + 2 * H, (), "3"),
        ("c", t + 2 * H, end, (), "1"),
    ]
    assert await meters.query(tenant, meter.id, start, end) == [("c", start, end, (), "6")]
    minutes = await meters.query(tenant, meter.id, start, end, window="MINUTE")
    assert minutes[0] == ("c", start, t + timedelta(minutes=16), (), "1")
    assert sum(int(r[4]) for r in minutes) == 6
    one_second = await meters.query(tenant, meter.id, t + H, t + H + S, window="MINUTE")
    assert one_second == [("c", t + H, t + H + S, (), "2")]


async def test_days_in_berlin_are_23_and_25_hours_long_around_dst(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant)
    stamps = [
        utc(2024, 3, 30, 22, 59, 59),  # 23:59:59 CET on 30 March
        utc(2024, 3, 30, 23),  # 00:00 CET on 31 March
        utc(2024, 3, 31, 21, 59, 59),  # 23:59:59 CEST on 31 March
        utc(2024, 3, 31, 22),  # 00:00 CEST on 1 April
        utc(2024, 10, 26, 22),  # 00:00 CEST on 27 October
        utc(2024, 10, 27, 22, 59, 59),  # 23:59:59 CET on 27 October
        utc(2024, 10, 27, 23),  # 00:00 CET on 28 October
    ]
    await meters.send(tenant, [ev(f"e{i}", "c", s) for i, s in enumerate(stamps)])
    spring = await meters.query(
        tenant, meter.id, utc(2024, 3, 30), utc(2024, 4, 2), window="DAY", tz="Europe/Berlin"
    )
    assert [(r[1], r[2], r[4]) for r in spring] == [
        (utc(2024, 3, 30), utc(2024, 3, 30, 23), "1"),  # clipped to the range
        (utc(2024, 3, 30, 23), utc(2024, 3, 31, 22), "2"),  # 23 hours
        (utc(2024, 3, 31, 22), utc(2024, 4, 1, 22), "1"),
    ]
    autumn = await meters.query(
        tenant,
        meter.id,
        utc(2024, 10, 26, 22),
        utc(2024, 10, 28, 23),
        window="DAY",
        tz="Europe/Berlin",
    )
    assert [(r[1], r[2], r[4]) for r in autumn] == [
        (utc(2024, 10, 26, 22), utc(2024, 10, 27, 23), "2"),  # 25 hours
        (utc(2024, 10, 27, 23), utc(2024, 10, 28, 23), "1"),
    ]


async def test_the_repeated_hour_in_berlin_is_two_hour_windows(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant)
    # 02:30 CEST and 02:30 CET on 27 October 2024: the same wall time, an hour apart.
    await meters.send(
        tenant, [ev("a", "c", utc(2024, 10, 27, 0, 30)), ev("b", "c", utc(2024, 10, 27, 1, 30))]
    )
    rows = await meters.query(
        tenant, meter.id, utc(2024, 10, 27), utc(2024, 10, 27, 2), window="HOUR", tz="Europe/Berlin"
    )
    assert [(r[1], r[2], r[4]) for r in rows] == [
        (utc(2024, 10, 27, 0), utc(2024, 10, 27, 1), "1"),
        (utc(2024, 10, 27, 1), utc(2024, 10, 27, 2), "1"),
    ]


async def test_minute_windows_across_a_fall_back_end_where_the_clock_jumps(
    meters: Meters,
) -> None:
    # At 01:00 UTC on 27 October 2024 Berlin's clock goes from 02:59:59 CEST back to
    # 02:00:00 CET: the minute that starts 00:59 UTC ends there, not an hour later.
    tenant = meters.new_tenant()
    meter = await meters.create(tenant)
    t = utc(2024, 10, 27, 1)
    await meters.send(tenant, [ev("a", "c", t - 30 * S), ev("b", "c", t), ev("c", "c", t + 59 * S)])
    rows = await meters.query(tenant, meter.id, t - H, t + H, window="MINUTE", tz="Europe/Berlin")
    minute = timedelta(minutes=1)
    assert [(r[1], r[2], r[4]) for r in rows] == [(t - minute, t, "1"), (t, t + minute, "2")]


async def test_new_york_months_follow_the_local_calendar(meters: Meters) -> None:
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, aggregation="SUM", property="v")
    await meters.send(
        tenant,
        [
            ev("oct", "c", utc(2024, 11, 1, 3, 59, 59), v=1),  # 23:59:59 EDT on 31 October
            ev("nov", "c", utc(2024, 11, 1, 4), v=10),  # midnight EDT on 1 November
            ev("nov-end", "c", utc(2024, 12, 1, 4, 59, 59), v=100),  # 23:59:59 EST, 30 Nov
            ev("dec", "c", utc(2024, 12, 1, 5), v=1000),  # midnight EST on 1 December
        ],
    )
    rows = await meters.query(
        tenant,
        meter.id,
        utc(2024, 10, 1, 4),
        utc(2025, 1, 1, 5),
        window="MONTH",
        tz="America/New_York",
    )
    assert [(r[1], r[2], r[4]) for r in rows] == [
        (utc(2024, 10, 1, 4), utc(2024, 11, 1, 4), "1"),
        (utc(2024, 11, 1, 4), utc(2024, 12, 1, 5), "110"),  # 30 days and an hour
        (utc(2024, 12, 1, 5), utc(2025, 1, 1, 5), "1000"),
    ]


# --- tenants --------------------------------------------------------------------------


async def test_a_fetch_of_several_tenants_counts_each_in_its_own_meters(meters: Meters) -> None:
    a, b = meters.new_tenant(), meters.new_tenant()
    meter_a = await meters.create(a, name="calls")
    meter_b = await meters.create(b, name="calls")
    batches = [
        ingest_pb2.EventBatch(tenant_id=a, events=[ev("x", "c", DAY).proto]),
        ingest_pb2.EventBatch(
            tenant_id=b, events=[ev("x", "c", DAY).proto, ev("y", "c", DAY).proto]
        ),
        ingest_pb2.EventBatch(tenant_id="no-meters", events=[ev("z", "c", DAY).proto]),
    ]
    await meters.service.fold_batches(batches)
    assert await total(meters, a, meter_a.id) == "1"
    assert await total(meters, b, meter_b.id) == "2"
    with pytest.raises(NotFound):
        await meters.query(a, meter_b.id, START, END)


# --- folding is idempotent ------------------------------------------------------------


async def test_a_redelivered_or_overlapping_fold_counts_each_event_once(meters: Meters) -> None:
    tenant = meters.new_tenant()
    calls = await meters.create(tenant, name="calls")
    tokens = await meters.create(tenant, name="tokens", aggregation="SUM", property="tokens")

    def batch(*ids: str) -> ingest_pb2.EventBatch:
        events = [ev(i, "c", DAY, tokens=int(i[1:])).proto for i in ids]
        return ingest_pb2.EventBatch(tenant_id=tenant, events=events)

    assert await meters.service.fold_batches([batch("e1", "e2")]) == 4  # two rows per event
    # The same message again (a redelivery): nothing new.
    assert await meters.service.fold_batches([batch("e1", "e2")]) == 0
    # Old and new events in one fetch: only the new ones count.
    assert await meters.service.fold_batches([batch("e2", "e3"), batch("e4")]) == 4
    # Folds racing each other over the same events (a backfill beside the consumer).
    racing = [batch(*(f"e{i}" for i in range(1, 40))) for _ in range(4)]
    folded = await asyncio.gather(*(meters.service.fold_batches([b]) for b in racing))
    assert sum(folded) == 2 * 35
    assert await total(meters, tenant, calls.id) == "39"
    assert await total(meters, tenant, tokens.id) == str(sum(range(1, 40)))
