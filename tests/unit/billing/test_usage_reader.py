"""The usage reader: the same numbers whichever way it asks meter, and one call
per meter and period when many customers share it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.billing.meter_client import Meters
from services.billing.usage import UsageReader
from services.common.errors import Unavailable
from tests.unit.billing.fake_meters import FakeMeters

T0 = datetime(2024, 3, 1, tzinfo=UTC)
T1 = T0 + timedelta(days=1)
T2 = T1 + timedelta(days=1)


def _meters() -> FakeMeters:
    meters = FakeMeters()
    for i in range(20):
        meters.add("t1", "calls", f"c{i}", T0 + timedelta(hours=i), i)  # c0 has 0
        meters.add("t1", "calls", f"c{i}", T1, 100)  # the next period: not counted
    meters.add("t1", "bytes", "c3", T0, "0.5")
    meters.add("t2", "calls", "c1", T0, 7)  # another tenant
    return meters


WANTED = {
    ("calls", T0, T1): {f"c{i}" for i in range(20)} | {"nobody"},
    ("bytes", T0, T1): {"c3", "c4"},
}
EXPECTED = {
    **{("calls", T0, T1, f"c{i}"): Decimal(i) for i in range(20)},
    ("calls", T0, T1, "nobody"): Decimal(0),
    ("bytes", T0, T1, "c3"): Decimal("0.5"),
    ("bytes", T0, T1, "c4"): Decimal(0),
}


async def test_many_customers_of_one_period_take_one_call() -> None:
    meters = _meters()
    found = await UsageReader(meters).read("t1", WANTED)
    assert found == EXPECTED
    # 21 customers share `calls` (one call); 2 share `bytes`: asked one by one.
    assert meters.calls == {"consumed_page": 1, "consumed": 2}


@pytest.mark.parametrize("bulk_min_customers", [1, 1000])
async def test_either_way_the_same_numbers(bulk_min_customers: int) -> None:
    meters = _meters()
    reader = UsageReader(meters, bulk_min_customers=bulk_min_customers, bulk_min_share=0)
    assert await reader.read("t1", WANTED) == EXPECTED
    calls = {"consumed_page": 2} if bulk_min_customers == 1 else {"consumed": 23}
    assert meters.calls == calls


async def test_a_small_group_among_many_customers_is_asked_per_customer() -> None:
    # 10 customers share a period, but 100 are being billed: 10 calls, not a scan.
    meters = _meters()
    wanted = {
        ("calls", T0, T1): {f"c{i}" for i in range(10)},
        **{("calls", T1 + timedelta(minutes=i), T2): {f"x{i}"} for i in range(90)},
    }
    await UsageReader(meters).read("t1", wanted)
    assert meters.calls == {"consumed": 100}


class _Broken:
    def __init__(self) -> None:
        self.started = 0

    async def meter_name(self, tenant_id: str, meter_id: str, field: str) -> str:
        raise AssertionError("not used")

    async def consumed(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> Decimal:
        self.started += 1
        raise Unavailable("meter service: UNAVAILABLE")

    async def consumed_page(
        self,
        tenant_id: str,
        meter_id: str,
        start: datetime,
        end: datetime,
        *,
        page_size: int,
        page_token: str = "",
    ) -> tuple[dict[str, Decimal], str]:
        raise AssertionError("not used")


async def test_a_failing_call_fails_the_read_with_its_own_error() -> None:
    broken = _Broken()
    meters: Meters = broken
    with pytest.raises(Unavailable):
        await UsageReader(meters, concurrency=2).read("t1", {("calls", T0, T1): {"a", "b", "c"}})
    assert broken.started >= 1
