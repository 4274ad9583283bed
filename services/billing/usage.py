"""Reads from meter the usage that a batch of invoices needs, in as few calls
as is sensible.

Meter answers `QueryUsage` for one customer, or (with an empty customer_id) for
every customer of the tenant at once. Subscriptions that share a billing period
(the same anchor, as when many start at the same instant) share one call per
meter; a period that few subscriptions have is asked per customer, so that a
large tenant is not scanned whole for a handful of invoices."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Collection, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Final

from services.billing.meter_client import Meters
from services.common.errors import ResourceExhausted

# (meter_id, period start, period end)
UsageKey = tuple[str, datetime, datetime]
# (meter_id, period start, period end, customer external id)
CustomerUsageKey = tuple[str, datetime, datetime, str]

# One call for all customers when at least this many share a meter and period...
BULK_MIN_CUSTOMERS: Final = 8
# ...and they are at least this share of the customers being billed.
BULK_MIN_SHARE: Final = 0.25
# Meter calls in flight at once.
CONCURRENCY: Final = 16


class UsageReader:
    def __init__(
        self,
        meters: Meters,
        *,
        bulk_min_customers: int = BULK_MIN_CUSTOMERS,
        bulk_min_share: float = BULK_MIN_SHARE,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self._meters = meters
        self._bulk_min_customers = bulk_min_customers
        self._bulk_min_share = bulk_min_share
        self._concurrency = concurrency

    async def read(
        self, tenant_id: str, wanted: Mapping[UsageKey, Collection[str]]
    ) -> dict[CustomerUsageKey, Decimal]:
        """The consumed quantity of every (meter, period, customer) in `wanted`."""
        found: dict[CustomerUsageKey, Decimal] = {}
        billed = len({c for customers in wanted.values() for c in customers})
        threshold = max(self._bulk_min_customers, self._bulk_min_share * billed)
        limit = asyncio.Semaphore(self._concurrency)

        async def for_all(key: UsageKey, customers: Collection[str]) -> None:
            meter_id, start, end = key
            try:
                async with limit:
                    values = await self._meters.consumed_by_customer(
                        tenant_id, meter_id, start, end
                    )
            except ResourceExhausted:
                # Over meter's answer limits (a tenant with very many customers):
                # each customer billed is one small answer, however large the tenant.
                await asyncio.gather(*(for_one(key, customer) for customer in customers))
                return
            for customer in customers:
                found[(meter_id, start, end, customer)] = values.get(customer, Decimal(0))

        async def for_one(key: UsageKey, customer: str) -> None:
            meter_id, start, end = key
            async with limit:
                value = await self._meters.consumed(tenant_id, meter_id, customer, start, end)
            found[(meter_id, start, end, customer)] = value

        calls: list[Awaitable[None]] = []
        for key, customers in wanted.items():
            if len(customers) >= threshold:
                calls.append(for_all(key, customers))
            else:
                calls.extend(for_one(key, customer) for customer in customers)
        await _all_or_nothing(calls)
        return found


async def _all_or_nothing(calls: list[Awaitable[None]]) -> None:
    """Runs the calls concurrently; on the first failure cancels the rest and
    raises it (unwrapped, so that the error interceptor maps it)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
