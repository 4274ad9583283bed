"""Reads from meter the usage that a batch of invoices needs, in as few calls
as is sensible, holding a bounded share of it at once.

Meter answers `QueryUsage` for one customer, or (with an empty customer_id)
for every customer of the tenant, a page of customers at a time in the
bytewise order of their external ids. The billing cycle goes through a
tenant's subscriptions in that same order, a page at a time, so a run reads
each shared period's usage as one forward pass over meter's pages
(`UsageStreams`): per page of subscriptions it holds the values of that page's
customers and at most one page of meter's answer ahead, whatever the number of
customers. A period that few subscriptions of the page have is asked per
customer, so that a large tenant is not scanned whole for a handful of invoices."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Final

from services.billing.meter_client import Meters
from services.common.errors import ResourceExhausted
from services.common.logs import get_logger

log = get_logger(__name__)

# (meter_id, period start, period end)
UsageKey = tuple[str, datetime, datetime]
# (meter_id, period start, period end, customer external id)
CustomerUsageKey = tuple[str, datetime, datetime, str]

# One pass over all customers when at least this many share a meter and period...
BULK_MIN_CUSTOMERS: Final = 8
# ...and they are at least this share of the customers being billed.
BULK_MIN_SHARE: Final = 0.25
# Meter calls in flight at once.
CONCURRENCY: Final = 16
# Customers per page of meter's answer: a page of ids up to 255 characters is
# under 3 MiB, far under meter's answer limits for the service token.
PAGE_CUSTOMERS: Final = 2000


class _Stream:
    """One (meter, period)'s values for every customer, read forward a page at
    a time. `advance` answers the values of a set of customers that sort after
    those of the previous call (one customer may be in both); it keeps what
    it read past them (at most a page) for the next call."""

    def __init__(self, meters: Meters, tenant_id: str, key: UsageKey, page_size: int) -> None:
        self._meters = meters
        self._tenant_id = tenant_id
        self._key = key
        self._page_size = page_size
        self._token = ""
        self._done = False
        self._read_to: str | None = None  # the last customer of the pages read
        self._ahead: dict[str, Decimal] = {}  # read, past the last call's customers
        self._last: dict[str, Decimal] = {}  # the last call's answer
        self._last_max = ""
        self.pages = 0

    async def advance(self, customers: Collection[str]) -> dict[str, Decimal] | None:
        """The values of `customers` (0 for one without usage); None when some
        sort before the previous call's (not in the order this reads in)."""
        if not customers:
            return {}
        target = max(customers)
        found: dict[str, Decimal] = {}
        for customer in customers:
            if customer <= self._last_max:  # read already: only the last call's are kept
                if customer not in self._last:
                    return None
                found[customer] = self._last[customer]
        ahead, self._ahead = self._ahead, {}
        for customer, value in ahead.items():
            self._keep(customer, value, customers, target, found)
        while not self._done and (self._read_to is None or self._read_to < target):
            meter_id, start, end = self._key
            values, self._token = await self._meters.consumed_page(
                self._tenant_id,
                meter_id,
                start,
                end,
                page_size=self._page_size,
                page_token=self._token,
            )
            self.pages += 1
            self._done = not self._token
            if values:
                self._read_to = max(values)
            for customer, value in values.items():
                self._keep(customer, value, customers, target, found)
        for customer in customers:
            found.setdefault(customer, Decimal(0))
        self._last, self._last_max = found, target
        return found

    def _keep(
        self,
        customer: str,
        value: Decimal,
        wanted: Collection[str],
        target: str,
        found: dict[str, Decimal],
    ) -> None:
        if customer in wanted:
            found[customer] = value
        elif customer > target:
            self._ahead[customer] = value


class UsageStreams:
    """One billing run's forward passes over meter's pages, one per shared
    (meter, period). `prepare` reads a page of subscriptions' usage of the
    shared periods (customers in bytewise order of external id, each page after
    the last); `read` then answers them without calling meter again."""

    def __init__(self, reader: UsageReader, tenant_id: str) -> None:
        self._reader = reader
        self._tenant_id = tenant_id
        self._streams: dict[UsageKey, _Stream] = {}
        self._refused: set[UsageKey] = set()  # over meter's limits: per customer instead
        self.values: dict[CustomerUsageKey, Decimal] = {}

    @property
    def pages(self) -> int:
        """Pages of meter's answers read so far."""
        return sum(stream.pages for stream in self._streams.values())

    def retain(self, keep: Callable[[UsageKey], bool]) -> None:
        """Keeps the passes of the periods `keep` says; the others start again
        from the first page when next needed."""
        self.values = {}
        self._streams = {key: s for key, s in self._streams.items() if keep(key)}

    async def prepare(self, wanted: Mapping[UsageKey, Collection[str]]) -> None:
        """Reads the usage of the periods in `wanted` (one page of subscriptions)
        that enough of its customers share, or that an earlier page read so;
        forgets the previous page's."""
        self.values = {}
        billed = len({c for customers in wanted.values() for c in customers})
        threshold = self._reader.threshold(billed)
        limit = asyncio.Semaphore(self._reader.concurrency)

        async def one(key: UsageKey, customers: Collection[str]) -> None:
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = _Stream(
                    self._reader.meters, self._tenant_id, key, self._reader.page_customers
                )
            try:
                async with limit:
                    found = await stream.advance(customers)
            except ResourceExhausted as exc:
                log.warning("usage_pages_refused", meter_id=key[0], error=str(exc))
                self._refused.add(key)
                del self._streams[key]
                return
            if found is None:  # out of order: asked per customer instead
                return
            meter_id, start, end = key
            for customer, value in found.items():
                self.values[(meter_id, start, end, customer)] = value

        calls = [
            one(key, customers)
            for key, customers in wanted.items()
            if key not in self._refused and (key in self._streams or len(customers) >= threshold)
        ]
        await _all_or_nothing(calls)


class UsageReader:
    def __init__(
        self,
        meters: Meters,
        *,
        bulk_min_customers: int = BULK_MIN_CUSTOMERS,
        bulk_min_share: float = BULK_MIN_SHARE,
        concurrency: int = CONCURRENCY,
        page_customers: int = PAGE_CUSTOMERS,
    ) -> None:
        self.meters = meters
        self._bulk_min_customers = bulk_min_customers
        self._bulk_min_share = bulk_min_share
        self.concurrency = concurrency
        self.page_customers = page_customers

    def threshold(self, billed: int) -> float:
        """How many of `billed` customers must share a period for one pass."""
        return max(self._bulk_min_customers, self._bulk_min_share * billed)

    def streams(self, tenant_id: str) -> UsageStreams:
        """A billing run's forward passes (see UsageStreams)."""
        return UsageStreams(self, tenant_id)

    async def read(
        self,
        tenant_id: str,
        wanted: Mapping[UsageKey, Collection[str]],
        streams: UsageStreams | None = None,
    ) -> dict[CustomerUsageKey, Decimal]:
        """The consumed quantity of every (meter, period, customer) in `wanted`:
        from `streams` where it has them, else a pass over the customers of
        the periods enough of them share, else per customer."""
        if streams is None:
            streams = self.streams(tenant_id)
            await streams.prepare(wanted)
        found: dict[CustomerUsageKey, Decimal] = {}
        limit = asyncio.Semaphore(self.concurrency)

        async def for_one(key: UsageKey, customer: str) -> None:
            meter_id, start, end = key
            async with limit:
                value = await self.meters.consumed(tenant_id, meter_id, customer, start, end)
            found[(meter_id, start, end, customer)] = value

        calls: list[Awaitable[None]] = []
        for (meter_id, start, end), customers in wanted.items():
            for customer in customers:
                value = streams.values.get((meter_id, start, end, customer))
                if value is None:
                    calls.append(for_one((meter_id, start, end), customer))
                else:
                    found[(meter_id, start, end, customer)] = value
        await _all_or_nothing(calls)
        return found


async def _all_or_nothing(calls: Sequence[Awaitable[None]]) -> None:
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
