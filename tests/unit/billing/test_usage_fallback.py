"""When meter refuses the answer for every customer as too large (its limits
for the service token), billing asks for each customer it bills instead, and the
numbers are the same."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from services.billing.usage import UsageReader
from services.common.errors import ResourceExhausted
from tests.unit.billing.fake_meters import FakeMeters
from tests.unit.billing.test_usage_reader import EXPECTED, WANTED, _meters


class RefusingBulk(FakeMeters):
    """meter over its answer limits for the read of every customer."""

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
        self.calls["consumed_page"] += 1
        raise ResourceExhausted("answer: more than 500,000 rows")


async def test_a_refused_bulk_read_falls_back_to_one_call_per_customer() -> None:
    meters = RefusingBulk()
    meters.events = _meters().events
    found = await UsageReader(meters, concurrency=2).read("t1", WANTED)
    assert found == EXPECTED
    # The bulk call for "calls" was refused; its 21 customers asked one by one,
    # "bytes" (2 customers) per customer from the start.
    assert meters.calls == {"consumed_page": 1, "consumed": 23}
