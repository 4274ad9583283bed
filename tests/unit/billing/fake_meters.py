"""A stand-in for the meter service (another service, reached over gRPC): SUM
meters whose usage the test states event by event. Not a mock of PostgreSQL or
NATS: billing's own store still runs against the real servers."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from datetime import datetime
from decimal import Decimal

from services.common.errors import InvalidArgument


class FakeMeters:
    def __init__(self, delay: float = 0.0) -> None:
        self.names: dict[tuple[str, str], str] = {}
        # (tenant, meter) -> [(customer external id, event time, value)]
        self.events: dict[tuple[str, str], list[tuple[str, datetime, Decimal]]] = defaultdict(list)
        self.calls: Counter[str] = Counter()
        self.delay = delay  # makes concurrent callers overlap

    def add_meter(self, tenant_id: str, meter_id: str, name: str) -> None:
        self.names[(tenant_id, meter_id)] = name

    def add(
        self,
        tenant_id: str,
        meter_id: str,
        customer: str,
        when: datetime,
        value: Decimal | int | str = 1,
    ) -> None:
        self.events[(tenant_id, meter_id)].append((customer, when, Decimal(value)))

    async def meter_name(self, tenant_id: str, meter_id: str, field: str) -> str:
        self.calls["meter_name"] += 1
        if (tenant_id, meter_id) not in self.names:
            raise InvalidArgument(f"{field}: no meter {meter_id!r}")
        return self.names[(tenant_id, meter_id)]

    async def consumed(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> Decimal:
        self.calls["consumed"] += 1
        await asyncio.sleep(self.delay)
        return sum(
            (
                v
                for c, t, v in self.events[(tenant_id, meter_id)]
                if c == customer and start <= t < end
            ),
            Decimal(0),
        )

    async def consumed_by_customer(
        self, tenant_id: str, meter_id: str, start: datetime, end: datetime
    ) -> dict[str, Decimal]:
        self.calls["consumed_by_customer"] += 1
        await asyncio.sleep(self.delay)
        totals: dict[str, Decimal] = {}
        for customer, when, value in self.events[(tenant_id, meter_id)]:
            if start <= when < end:
                totals[customer] = totals.get(customer, Decimal(0)) + value
        return totals
