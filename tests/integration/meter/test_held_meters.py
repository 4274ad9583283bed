"""Gauge and seat meters through meter's real path (CreateMeter, fold into
PostgreSQL, GetMeter, QueryUsage), with figures worked out by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.common.context import set_tenant
from services.common.errors import InvalidArgument
from tests.integration.meter.harness import Meters, RowTuple, ev, row_tuples
from usagebilling.meter.v1 import meter_pb2

JUNE = datetime(2024, 6, 1, tzinfo=UTC)
JULY = datetime(2024, 7, 1, tzinfo=UTC)
DAY = timedelta(days=1)


async def test_storage_month_in_gb_hours_and_average(meters: Meters) -> None:
    tenant = meters.new_tenant()
    gb_hours = await meters.create(
        tenant, event_name="storage", aggregation="TIME_WEIGHTED_SUM", property="gb"
    )
    average = await meters.create(
        tenant, event_name="storage", aggregation="TIME_WEIGHTED_AVG", property="gb"
    )
    # Sent out of order; a reading in May carries into June.
    await meters.send(
        tenant,
        [
            ev("r3", "c1", JUNE + 10 * DAY, "storage", gb=40),
            ev("r1", "c1", JUNE - 5 * DAY, "storage", gb=99),
            ev("r2", "c1", JUNE, "storage", gb=10),
        ],
    )
    assert await meters.total(tenant, gb_hours.id, JUNE, JULY, "c1") == "21600"
    assert await meters.total(tenant, average.id, JUNE, JULY, "c1") == "30"
    # July has no event: 40 GB all month (31 days).
    assert await meters.total(tenant, gb_hours.id, JULY, JULY + 31 * DAY, "c1") == "29760"
    # Day windows in Berlin, over the first two local days of June.
    berlin = datetime(2024, 5, 31, 22, tzinfo=UTC)
    rows = await meters.query(
        tenant, average.id, berlin, berlin + 2 * DAY, window="DAY", tz="Europe/Berlin"
    )
    # May 31 22:00Z to June 1 00:00Z at 99, then 10: (2 x 99 + 22 x 10) / 24
    assert [r[4] for r in rows] == ["17.416666666666666666666666666666666666666666666667", "10"]


async def test_seats_carry_over_and_same_minute(meters: Meters) -> None:
    tenant = meters.new_tenant()
    kinds = {}
    for kind in ("SEATS_END", "SEATS_MAX", "SEATS_PRORATED"):
        created = await meters.create(
            tenant,
            event_name="member",
            aggregation=kind,
            property="user_id",
            operation_property="op",
        )
        assert created.operation_property == "op"
        kinds[kind] = created.id
    t = JUNE + 2 * DAY
    await meters.send(
        tenant,
        [
            ev("a1", "c1", JUNE - 10 * DAY, "member", user_id="ann", op="add"),
            ev("a2", "c1", JUNE - 9 * DAY, "member", user_id="bob", op="add"),
            ev("a3", "c1", t + timedelta(seconds=10), "member", user_id="cy", op="add"),
            ev("a4", "c1", t + timedelta(seconds=40), "member", user_id="cy", op="remove"),
            ev("a5", "c1", t, "member", user_id="dee", op="ADD"),  # skipped
        ],
    )
    minute = (t, t + timedelta(minutes=1))
    assert await meters.total(tenant, kinds["SEATS_END"], *minute, "c1") == "2"
    assert await meters.total(tenant, kinds["SEATS_MAX"], *minute, "c1") == "3"
    assert await meters.total(tenant, kinds["SEATS_PRORATED"], *minute, "c1") == "2.5"
    # July: no events at all; ann and bob carry over.
    for kind in kinds.values():
        assert await meters.total(tenant, kind, JULY, JULY + 31 * DAY, "c1") == "2"
    got = await meters.get(tenant, kinds["SEATS_END"])
    assert dict(got.skipped_events) == {"not_an_operation": 1}


@pytest.mark.parametrize(
    ("aggregation", "prop", "operation_property", "field"),
    [
        ("SEATS_MAX", "user_id", "user_id", "operation_property"),
        ("SUM", "v", "op", "operation_property"),
        ("TIME_WEIGHTED_AVG", "", "", "property"),
        ("SEATS_END", "", "", "property"),
    ],
)
async def test_create_meter_names_the_field(
    meters: Meters, aggregation: str, prop: str, operation_property: str, field: str
) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}: "):
        await meters.create(
            meters.new_tenant(),
            aggregation=aggregation,
            property=prop,
            operation_property=operation_property,
        )


@pytest.mark.parametrize(
    ("aggregation", "prop", "group_by"),
    [
        ("TIME_WEIGHTED_SUM", "gb", ()),  # the fast path: a line per customer
        ("TIME_WEIGHTED_AVG", "gb", ("region",)),
        ("SEATS_PRORATED", "user_id", ()),
    ],
)
async def test_pages_by_customer_hold_what_one_answer_holds(
    meters: Meters, aggregation: str, prop: str, group_by: tuple[str, ...]
) -> None:
    tenant = meters.new_tenant()
    created = await meters.create(
        tenant, event_name="held", aggregation=aggregation, property=prop, group_by=group_by
    )
    customers = ["b", "B", "a", "é", "A", "c"]  # bytewise: A B a b c é
    await meters.send(
        tenant,
        [
            ev(f"{c}-{i}", c, JUNE + (i - 1) * 30 * DAY + DAY * n, "held",
               gb=n + i, user_id=f"u{i}", operation="add", region=["eu", "us"][i])
            for n, c in enumerate(customers)
            for i in range(2)
        ]
        # Only after the range: no row, no page slot.
        + [ev("late", "Aa", JULY + DAY, "held", gb=1, user_id="u", operation="add")],
    )  # fmt: skip
    request = meter_pb2.QueryUsageRequest(
        meter_id=created.id, window_size=meter_pb2.WINDOW_SIZE_DAY, group_by=list(group_by)
    )
    request.start_time.FromDatetime(JUNE)
    request.end_time.FromDatetime(JUNE + 10 * DAY)
    whole = await meters.query_request(tenant, request)
    assert {row[0] for row in whole} == set(customers)
    paged: list[RowTuple] = []
    seen: list[set[str]] = []
    while True:
        request.page_size = 4
        set_tenant(tenant)
        response = await meters.servicer.QueryUsage(request, None)
        paged += row_tuples(response.rows)
        seen.append({r.customer_id for r in response.rows})
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
    assert sorted(paged) == whole
    assert seen[0] == {"A", "B", "a", "b"}
