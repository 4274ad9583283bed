"""QueryUsage paged by customer over real gRPC: every customer's rows in
exactly one page, in the bytewise order of the ids, tokens bound to the
query and tenant they came from, INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from tests.client import Client, event, eventually, status_of
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

# Ids whose bytewise order differs from a locale's (case, accents, digits).
CUSTOMERS = [
    *(f"cus_{i}" for i in range(17)),
    "B",
    "a",
    "Z9",
    "é",
    "e",
    "ß-1",
    "cus_ünïcode",
    "x" * 200,
]
REGIONS = ["eu", "us"]


def _request(meter_id: str, start: datetime, end: datetime, **fields: Any) -> Any:
    request = meter_pb2.QueryUsageRequest(
        meter_id=meter_id, window_size=meter_pb2.WINDOW_SIZE_HOUR, group_by=["region"], **fields
    )
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    return request


def _key(row: Any) -> tuple[Any, ...]:
    return (row.window_start.seconds, row.customer_id, dict(row.group)["region"], row.value)


async def _status(call: Any) -> tuple[grpc.StatusCode | None, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return status_of(exc), exc.details() or ""
    return None, ""


async def _metered(client: Client) -> tuple[str, datetime, datetime, list[tuple[Any, ...]]]:
    """A meter with usage of every customer in two hours and two regions, and
    the unpaged answer once every event is counted."""
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=f"m-{uuid.uuid4().hex[:8]}",
            event_name="api.call",
            aggregation=meter_pb2.AGGREGATION_COUNT,
            group_by=["region"],
        ),
    )
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    events = [
        event(
            f"e-{c}-{h}-{r}-{k}",
            customer,
            "api.call",
            start + timedelta(hours=h, minutes=k),
            region=region,
        )
        for c, customer in enumerate(CUSTOMERS)
        for h in range(2)
        for r, region in enumerate(REGIONS)
        for k in range(1 + (c + r) % 3)
    ]
    answer = await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events)
    )
    assert not answer.rejections, answer.rejections
    end = start + timedelta(hours=3)

    async def probe() -> Any:
        return await client.call(client.meter.QueryUsage, _request(meter.id, start, end))

    def counted(response: Any) -> bool:
        return sum(int(r.value) for r in response.rows) == len(events)

    whole = await eventually(probe, counted)
    assert counted(whole) and not whole.next_page_token
    return meter.id, start, end, sorted(_key(r) for r in whole.rows)


async def test_pages_hold_every_customer_once_in_bytewise_order(client: Client) -> None:
    meter_id, start, end, whole = await _metered(client)
    assert len({k[1] for k in whole}) == len(CUSTOMERS)
    for size in (1, 4, 7, len(CUSTOMERS), 100_000):
        pages: list[list[Any]] = []
        token = ""
        while True:
            request = _request(meter_id, start, end, page_size=size, page_token=token)
            response = await client.call(client.meter.QueryUsage, request)
            pages.append(list(response.rows))
            token = response.next_page_token
            if not token:
                break
            assert len(pages) <= len(CUSTOMERS) + 1
        served = [{r.customer_id for r in page} for page in pages]
        # Each page holds at most `size` customers, all the rows of each of them.
        assert all(len(customers) <= size for customers in served)
        seen = Counter(c for customers in served for c in customers)
        assert set(seen) == set(CUSTOMERS) and set(seen.values()) == {1}
        assert sorted(_key(r) for page in pages for r in page) == whole
        # Pages follow the ids' byte order (UTF-8), whatever the database's locale.
        firsts = [min(c.encode() for c in customers) for customers in served if customers]
        lasts = [max(c.encode() for c in customers) for customers in served if customers]
        assert all(last < first for last, first in zip(lasts, firsts[1:], strict=False))
        assert len(pages) in (-(-len(CUSTOMERS) // size), -(-len(CUSTOMERS) // size) + 1)


async def test_a_token_is_refused_for_another_query_or_tenant(
    client: Client, new_tenant: Any, suite: Any
) -> None:
    meter_id, start, end, _ = await _metered(client)
    first = await client.call(client.meter.QueryUsage, _request(meter_id, start, end, page_size=5))
    token = first.next_page_token
    assert token
    # The same query, the next page: fine, with another page_size too.
    nxt = await client.call(
        client.meter.QueryUsage, _request(meter_id, start, end, page_size=3, page_token=token)
    )
    assert {r.customer_id for r in nxt.rows}.isdisjoint({r.customer_id for r in first.rows})

    other_queries = [
        _request(meter_id, start, end - timedelta(hours=1), page_size=5, page_token=token),
        _request(meter_id, start, end, page_size=5, page_token=token, time_zone="Europe/Paris"),
        _request(
            meter_id, start, end, page_size=5, page_token=token, group_filter={"region": "eu"}
        ),
    ]
    other_queries[0].window_size = meter_pb2.WINDOW_SIZE_HOUR
    day = _request(meter_id, start, end, page_size=5, page_token=token)
    day.window_size = meter_pb2.WINDOW_SIZE_DAY
    other_queries.append(day)
    for request in other_queries:
        code, details = await _status(client.call(client.meter.QueryUsage, request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith("page_token: made for another query"), details

    # Another tenant, its own meter (same name and query): the token is not its.
    _, secret = new_tenant()
    other = Client({s: suite.address(s) for s in ("ingest", "meter", "billing")}, secret)
    try:
        theirs = await other.call(
            other.meter.CreateMeter,
            meter_pb2.CreateMeterRequest(
                name="x",
                event_name="api.call",
                aggregation=meter_pb2.AGGREGATION_COUNT,
                group_by=["region"],
            ),
        )
        code, details = await _status(
            other.call(
                other.meter.QueryUsage,
                _request(theirs.id, start, end, page_size=5, page_token=token),
            )
        )
        assert (code, details.split(";")[0]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "page_token: made for another query",
        )
    finally:
        await other.close()

    # Tampered, foreign, or without a page size; a negative page size.
    body, mac = token.split(".")
    bad = [
        (
            _request(meter_id, start, end, page_size=5, page_token=body[:-2] + "AA." + mac),
            "page_token",
        ),
        (_request(meter_id, start, end, page_size=5, page_token="abc"), "page_token"),
        (_request(meter_id, start, end, page_token=token), "page_size"),
        (_request(meter_id, start, end, page_size=-1), "page_size"),
    ]
    for request, field in bad:
        code, details = await _status(client.call(client.meter.QueryUsage, request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith(f"{field}: "), details


async def test_a_one_customer_query_pages_to_one_page(client: Client) -> None:
    meter_id, start, end, whole = await _metered(client)
    response = await client.call(
        client.meter.QueryUsage,
        _request(meter_id, start, end, customer_id="é", page_size=1),
    )
    assert not response.next_page_token
    assert sorted(_key(r) for r in response.rows) == [k for k in whole if k[1] == "é"]
