"""A billing run's forward passes over meter's pages of usage: each page of
subscriptions (customers in bytewise order) gets its customers' values, read
once, holding at most a page of meter's answer ahead; what cannot be served
in that order is asked per customer, with the same numbers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.billing.usage import UsageReader
from tests.unit.billing.fake_meters import FakeMeters

T0 = datetime(2024, 3, 1, tzinfo=UTC)
T1 = T0 + timedelta(days=1)
KEY = ("calls", T0, T1)
# 40 customers in bytewise order: "c00" .. "c39"; those with an even number have usage.
CUSTOMERS = [f"c{i:02d}" for i in range(40)]


def _meters() -> FakeMeters:
    meters = FakeMeters()
    for i, customer in enumerate(CUSTOMERS):
        if i % 2 == 0:
            meters.add("t", "calls", customer, T0, i + 1)
    meters.add("t", "calls", "zz-unsubscribed", T0, 5)
    return meters


def _value(i: int) -> Decimal:
    return Decimal(i + 1 if i % 2 == 0 else 0)


async def test_pages_of_subscriptions_read_meter_once_in_order() -> None:
    meters = _meters()
    reader = UsageReader(meters, bulk_min_customers=1, page_customers=3)
    streams = reader.streams("t")
    held = []
    # Pages of 8 customers; c07 is on two pages (two subscriptions).
    pages = [CUSTOMERS[0:8], CUSTOMERS[7:16], CUSTOMERS[16:30], CUSTOMERS[30:40]]
    for page in pages:
        await streams.prepare({KEY: set(page)})
        found = await reader.read("t", {KEY: set(page)}, streams)
        assert found == {(*KEY, c): _value(CUSTOMERS.index(c)) for c in page}
        stream = streams._streams[KEY]
        held.append(len(stream._ahead) + len(stream._last))
    # 21 customers with usage, 3 a page: 7 pages and an empty last one at most.
    assert meters.calls == {"consumed_page": 7}
    assert max(held) <= 14 + 3  # a page of customers, and at most a page ahead
    assert streams.pages == 7


async def test_out_of_order_customers_are_asked_one_by_one() -> None:
    meters = _meters()
    reader = UsageReader(meters, bulk_min_customers=1, page_customers=3)
    streams = reader.streams("t")
    await streams.prepare({KEY: set(CUSTOMERS[20:30])})
    # Behind the pass: c02 and c05 were never kept; answered per customer.
    wanted = {KEY: {"c02", "c05", "c24"}}
    await streams.prepare(wanted)
    found = await reader.read("t", wanted, streams)
    assert found == {
        (*KEY, "c02"): Decimal(3),
        (*KEY, "c05"): Decimal(0),
        (*KEY, "c24"): Decimal(25),
    }
    assert meters.calls["consumed"] == 3


async def test_retain_drops_passes_to_read_again() -> None:
    meters = _meters()
    reader = UsageReader(meters, bulk_min_customers=1, page_customers=3)
    streams = reader.streams("t")
    later = ("calls", T1, T1 + timedelta(days=1))
    await streams.prepare({KEY: set(CUSTOMERS[:10]), later: set(CUSTOMERS[:10])})
    streams.retain(lambda key: key[2] <= T1)
    assert set(streams._streams) == {KEY}
    await streams.prepare({KEY: set(CUSTOMERS[10:20]), later: set(CUSTOMERS[10:20])})
    found = await reader.read("t", {KEY: {"c12"}, later: {"c12"}}, streams)
    assert found == {(*KEY, "c12"): Decimal(13), (*later, "c12"): Decimal(0)}
