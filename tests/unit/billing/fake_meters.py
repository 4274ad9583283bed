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
        # (tenant, meter) -> group_by keys; an event's group values by its index
        self.keys: dict[tuple[str, str], tuple[str, ...]] = {}
        self.groups: dict[tuple[str, str], dict[int, dict[str, str]]] = defaultdict(dict)
        # customer -> the error its grouped reads raise (meter refusing or timing out)
        self.group_errors: dict[str, Exception] = {}
        self.delay = delay  # makes concurrent callers overlap

    def add_meter(
        self, tenant_id: str, meter_id: str, name: str, group_by: tuple[str, ...] = ()
    ) -> None:
        self.names[(tenant_id, meter_id)] = name
        self.keys[(tenant_id, meter_id)] = group_by

    def add(
        self,
        tenant_id: str,
        meter_id: str,
        customer: str,
        when: datetime,
        value: Decimal | int | str = 1,
        group: dict[str, str] | None = None,
    ) -> None:
        events = self.events[(tenant_id, meter_id)]
        if group:
            self.groups[(tenant_id, meter_id)][len(events)] = group
        events.append((customer, when, Decimal(value)))

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
        """As meter pages: `page_size` customers with usage after the token's
        (here simply the last customer's id), in bytewise order of their ids."""
        self.calls["consumed_page"] += 1
        await asyncio.sleep(self.delay)
        totals: dict[str, Decimal] = {}
        for customer, when, value in self.events[(tenant_id, meter_id)]:
            if start <= when < end and customer > page_token:
                totals[customer] = totals.get(customer, Decimal(0)) + value
        page = sorted(totals)[:page_size]
        token = page[-1] if len(page) == page_size else ""
        return {customer: totals[customer] for customer in page}, token

    async def group_by(self, tenant_id: str, meter_id: str, field: str) -> tuple[str, ...]:
        await self.meter_name(tenant_id, meter_id, field)
        return self.keys.get((tenant_id, meter_id), ())

    async def consumed_by_group(
        self,
        tenant_id: str,
        meter_id: str,
        customer: str,
        start: datetime,
        end: datetime,
        key: str,
    ) -> list[Decimal]:
        """Like meter's QueryUsage grouped by `key`: a sum per distinct value
        ("" for events without it)."""
        self.calls["consumed_by_group"] += 1
        if customer in self.group_errors:
            raise self.group_errors[customer]
        groups = self.groups[(tenant_id, meter_id)]
        sums: dict[str, Decimal] = {}
        for i, (c, t, v) in enumerate(self.events[(tenant_id, meter_id)]):
            if c == customer and start <= t < end:
                value = groups.get(i, {}).get(key, "")
                sums[value] = sums.get(value, Decimal(0)) + v
        return list(sums.values())
