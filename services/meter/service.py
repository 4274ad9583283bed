"""meter's use cases: define meters, fold events into them, answer usage."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.logs import get_logger
from services.meter import convert
from services.meter.domain.aggregation import (
    HELD,
    MAX_GROUP_BY,
    Aggregation,
    MeterQuotas,
    MeterSpec,
    check_meter_quotas,
    validate_meter,
)
from services.meter.domain.filters import Filter, check_filter_size, condition_count
from services.meter.domain.matching import FoldedEvent, Matcher
from services.meter.domain.query import (
    AnswerLimits,
    AnswerSize,
    UsageQuery,
    empty_row_group,
    plan_query,
    row_bytes,
    usage_value,
)
from services.meter.domain.windows import WindowSize
from services.meter.isolation import Failure, Isolator, Outcome, fold_rows
from services.meter.store import MeterRecord, MeterStore
from services.meter.usage_paging import usage_page
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

log = get_logger(__name__)

# A backfill retries its whole replay on a transient error (folding is
# idempotent); any other failure is the events' own and they are set aside.
BACKFILL_RETRIES = frozenset({Failure.TRANSIENT})

# A query of at most about this many windows is planned on the event loop (a
# month of HOUR windows takes ~0.3 ms); a larger one in a worker thread. The
# thread's round trip costs ~0.1 ms when idle and far more under load (the
# loop waits for the GIL and the wake-up), more than planning a few windows.
PLAN_INLINE_WINDOWS = 2_000
# The shortest a window of each size lasts, to count a range's windows from
# above cheaply (a change of the zone's offset adds at most a couple).
_SHORTEST = {
    WindowSize.MINUTE: timedelta(minutes=1),
    WindowSize.HOUR: timedelta(hours=1),
    WindowSize.DAY: timedelta(hours=23),
    WindowSize.MONTH: timedelta(days=28),
}
# Meters remembered for usage reads (see MeterService._usage_meter); when full,
# forgotten all at once.
MAX_REMEMBERED_METERS = 10_000


class UsageRow(NamedTuple):
    """One row of an answer (a named tuple: a month of HOUR windows makes 600
    a call, and a frozen dataclass takes three times as long to build)."""

    window_start: datetime
    window_end: datetime
    customer_id: str
    group: dict[str, str]
    value: str


def _first_entries(entries: Mapping[str, str], n: int) -> dict[str, str]:
    """At most n entries of a request's map: enough for a limit check to see it is
    over, without copying a map of any size."""
    return dict(itertools.islice(entries.items(), n))


class MeterService:
    def __init__(self, store: MeterStore, quotas: MeterQuotas | None = None) -> None:
        self._store = store
        self._quotas = quotas or MeterQuotas()
        self._meters: dict[tuple[str, str], MeterRecord] = {}
        # Set by the wiring: starts the backfill of a new meter.
        self.on_created: Callable[[MeterRecord], None] = lambda record: None

    async def create_meter(
        self, tenant_id: str, request: meter_pb2.CreateMeterRequest
    ) -> MeterRecord:
        domain_filter: Filter | None = None
        if request.HasField("filter"):
            # Measured on the request, before a condition is converted: a filter of
            # any size is refused in time bounded by the limits.
            check_filter_size(request.filter)
            domain_filter = convert.domain_filter(request.filter)
        spec = validate_meter(
            request.name,
            request.event_name,
            convert.aggregation(request.aggregation),
            request.property,
            domain_filter,
            request.group_by,  # its length is checked before it is read
            measurement_unit=request.measurement_unit,
            description=request.description,
            operation_property=request.operation_property,
        )
        record = await self._store.create_meter(
            tenant_id,
            name=request.name,
            event_name=request.event_name,
            aggregation=convert.aggregation(request.aggregation).name,
            property=request.property,
            filter=convert.filter_json(request.filter) if domain_filter else None,
            group_by=list(request.group_by),
            measurement_unit=request.measurement_unit,
            description=request.description,
            operation_property=spec.operation_property,
            check_quotas=lambda active, filters: check_meter_quotas(
                self._quotas,
                active,
                len(filters),
                request.event_name,
                conditions=sum(convert.condition_count_json(f) for f in filters),
                new_conditions=condition_count(domain_filter),
            ),
        )
        log.info("meter_created", meter_id=record.id, name=record.name)
        self.on_created(record)
        return record

    async def _matchers(self, tenants: Iterable[str]) -> dict[str, Matcher]:
        """The active meters of each tenant that has any."""
        by_tenant: dict[str, list[tuple[int, MeterSpec]]] = defaultdict(list)
        for record in await self._store.active_meters(sorted(set(tenants))):
            by_tenant[record.tenant_id].append((record.key, convert.spec(record)))
        return {tenant: Matcher(meters) for tenant, meters in by_tenant.items()}

    async def fold_batches(self, batches: Sequence[ingest_pb2.EventBatch]) -> int:
        """Folds the events of fetched messages into every matching meter, in one
        transaction; returns the new (meter, event) rows. Meters are loaded after
        the fetch, so a meter created before an event was consumed either sees it
        here or in its backfill. Raises what the fold raised: then
        `fold_isolating` finds the events at fault."""
        matchers = await self._matchers(b.tenant_id for b in batches)
        rows: list[FoldedEvent] = []
        for batch in batches:
            matcher = matchers.get(batch.tenant_id)
            if matcher is not None:
                rows += fold_rows(matcher, batch.events)
        return await self._store.fold(rows)

    async def fold_isolating(
        self,
        batches: Sequence[ingest_pb2.EventBatch],
        retry_on: Sequence[Collection[Failure]],
        error: BaseException | None = None,
    ) -> tuple[list[Outcome], int]:
        """Folds part by part (services.meter.isolation): every event that can
        be folded is, in commits of its own; returns one Outcome per batch (the
        events that failed with their reason, or the error to retry the batch
        for) and the new rows. `error` is the failure of `fold_batches` on the
        same batches, if any. Raises only when the meters cannot be loaded."""
        isolator = Isolator(self._store, await self._matchers(b.tenant_id for b in batches))
        outcomes = await isolator.fold(batches, retry_on, error)
        return outcomes, isolator.folded

    async def fold_for_meter(
        self, record: MeterRecord, events: Sequence[ingest_pb2.Event]
    ) -> tuple[int, list[tuple[ingest_pb2.Event, str]]]:
        """A backfill's chunk: folds `events` into one meter. Returns the new
        rows and the events that could not be folded, each with its reason (the
        others are committed). Raises a transient error (the caller retries)."""
        matcher = Matcher([(record.key, convert.spec(record))])
        try:
            return await self._store.fold(fold_rows(matcher, events)), []
        except Exception as exc:
            error: BaseException = exc
        isolator = Isolator(self._store, {record.tenant_id: matcher})
        batch = ingest_pb2.EventBatch(tenant_id=record.tenant_id, events=events)
        [outcome] = await isolator.fold([batch], [BACKFILL_RETRIES], error)
        if outcome.retry is not None:
            raise outcome.retry
        return isolator.folded, outcome.failed

    async def get_meter(self, tenant_id: str, meter_id: str) -> tuple[MeterRecord, dict[str, int]]:
        """The meter and how many matching events it skipped, by reason."""
        if not meter_id:
            raise InvalidArgument("id: required")
        record = await self._store.get_meter(tenant_id, meter_id)
        return record, await self._store.skipped_counts(tenant_id, record.id)

    async def query_usage(
        self,
        tenant_id: str,
        request: meter_pb2.QueryUsageRequest,
        limits: AnswerLimits,
        hold: AnswerHold,
        next_page_token: Callable[[str], None] = lambda token: None,
    ) -> AsyncGenerator[list[UsageRow], None]:
        """The answer's rows, in order, a slice at a time; when the request asks
        for a page (page_size), only that page's customers, and once they are
        all read `next_page_token` is called with the next page's token.
        Each row is counted
        against `limits` as it is read (ResourceExhausted naming the figure, the
        limit and what to narrow, before the rest is read), and each slice is
        taken from the replica's budget through `hold` (ResourceExhausted with a
        retry-after when the replica holds too many answers). Close it (`aclosing`)
        when stopping early."""
        if not request.meter_id:
            raise InvalidArgument("meter_id: required")
        meter = await self._usage_meter(tenant_id, request.meter_id)
        query = await _plan(meter, request)
        aggregation = Aggregation[meter.aggregation]
        paging = usage_page(request, tenant_id)
        customers: set[str] = set()  # served by this page (only counted when paged)
        size = AnswerSize(limits)
        answered = False
        read = self._store.held_usage if aggregation in HELD else self._store.usage
        slices = read(
            meter,
            customer_id=query.customer_id,
            bounds=[s for s, _ in query.windows],
            end=query.end,
            group_by=query.group_by,
            group_filter=dict(query.group_filter),
            after_customer=paging.after,
            customer_limit=paging.size,
        )
        async with contextlib.aclosing(slices):
            async for groups in slices:
                rows: list[UsageRow] = []
                for g in groups:
                    window = query.windows[g.window - 1]
                    row = UsageRow(
                        window[0],
                        window[1],
                        g.customer_id,
                        dict(zip(query.group_by, g.dims, strict=True)),
                        usage_value(aggregation, g.value, g.count, window),
                    )
                    size.add(row_bytes(row.customer_id, row.group, row.value))
                    rows.append(row)
                    if paging.size is not None:
                        customers.add(g.customer_id)
                await hold.take(size.bytes + ROW_MEMORY_BYTES * size.rows)
                answered = True
                yield rows
        paging.finish(customers, query)
        next_page_token(paging.next_page_token)
        empty_group = empty_row_group(query)
        if not answered and empty_group is not None:
            yield [UsageRow(query.start, query.end, query.customer_id, empty_group, "0")]

    async def _usage_meter(self, tenant_id: str, meter_id: str) -> MeterRecord:
        """The meter, for a usage read. A read uses only what never changes of
        a meter (its key, id, aggregation and group_by: archiving and backfills
        change other fields), so a meter found is remembered and later reads
        skip a PostgreSQL round trip (a pooled fetch and the pool's reset).
        A meter not found is not remembered (meters are never deleted)."""
        key = (tenant_id, meter_id)
        meter = self._meters.get(key)
        if meter is None:
            meter = await self._store.get_meter(tenant_id, meter_id)
            if len(self._meters) >= MAX_REMEMBERED_METERS:
                self._meters.clear()
            self._meters[key] = meter
        return meter


async def _plan(meter: MeterRecord, request: meter_pb2.QueryUsageRequest) -> UsageQuery:
    """The request's query (plan_query), validated against the meter."""
    start = convert.optional_time(request, "start_time")
    end = convert.optional_time(request, "end_time")
    size = convert.window_size(request.window_size or meter_pb2.WINDOW_SIZE_NONE)
    plan = functools.partial(
        plan_query,
        meter.group_by,
        customer_id=request.customer_id,
        start=start,
        end=end,
        window_size=size,
        time_zone=request.time_zone,
        # Copied here, counted first by plan_query, which may copy them again.
        group_by=tuple(request.group_by[: MAX_GROUP_BY + 1]),
        group_filter=_first_entries(request.group_filter, MAX_GROUP_BY + 1),
    )
    shortest = _SHORTEST.get(size)
    if shortest is None or start is None or end is None or end <= start:
        return plan()  # one window, or refused at once
    if (end - start) // shortest + 2 <= PLAN_INLINE_WINDOWS:
        return plan()
    # In a worker thread: refusing is microseconds, but building the windows of
    # the largest range allowed takes 30-130 ms (up to ~0.5 s for 100,000 months),
    # and the event loop must stay free for the consumer's folds meanwhile.
    return await asyncio.to_thread(plan)


# What one row of an answer costs meter beyond its encoded bytes while it is
# held as a protobuf message (measured: about 170 bytes for a row of a short
# customer id and value, against 46 encoded).
ROW_MEMORY_BYTES = 160


class AnswerBudget:
    """How much of usage answers one replica holds at once, in bytes: an answer's
    encoded bytes plus ROW_MEMORY_BYTES per row, reserved slice by slice as the
    answer is built and released when its call ends (`AnswerHold`).

    A slice that finds no room waits up to `wait` seconds for answers to end, then
    is refused (ResourceExhausted with a retry-after) and its answer dropped. When
    every answer holding bytes is waiting for more, none could end: the newest of
    them is refused at once, so the older ones go on."""

    def __init__(self, capacity: int, *, wait: float = 5.0, retry_after: float = 1.0) -> None:
        self.capacity = capacity
        self.held = 0
        self._wait = wait
        self._retry_after = retry_after
        self._numbers = itertools.count()
        self._holding: set[AnswerHold] = set()
        self._waiting: set[AnswerHold] = set()

    def hold(self) -> AnswerHold:
        return AnswerHold(self, next(self._numbers))

    def _deadlocked(self, hold: AnswerHold) -> bool:
        """Whether `hold` is the newest of the holders, all of them waiting."""
        return (
            hold in self._holding
            and self._holding <= self._waiting
            and hold.number == max(h.number for h in self._holding)
        )

    async def _grow(self, hold: AnswerHold, total: int) -> None:
        more = total - hold.bytes
        if more <= 0:
            return
        if self.held + more > self.capacity and total <= self.capacity:
            # Polled: answers end within seconds, and this is the rare, crowded case.
            deadline = time.monotonic() + self._wait
            self._waiting.add(hold)
            try:
                while self.held + more > self.capacity and time.monotonic() < deadline:
                    if self._deadlocked(hold):
                        break
                    await asyncio.sleep(0.05)
            finally:
                self._waiting.discard(hold)
        if self.held + more > self.capacity:
            raise ResourceExhausted(
                f"answers in flight: this replica holds {self.held:,} of its"
                f" {self.capacity:,} bytes of usage answers and this answer needs"
                f" {total:,}; retry later, or narrow the query to need less",
                retry_after=self._retry_after,
            )
        self.held += more
        hold.bytes = total
        self._holding.add(hold)

    def _release(self, hold: AnswerHold) -> None:
        self.held -= hold.bytes
        hold.bytes = 0
        self._holding.discard(hold)


class AnswerHold:
    """One answer's share of the AnswerBudget; `release` when its call ends
    (idempotent). `number` orders answers by age."""

    def __init__(self, budget: AnswerBudget, number: int) -> None:
        self._budget = budget
        self.number = number
        self.bytes = 0

    async def take(self, total: int) -> None:
        """Grows this answer's share to `total` bytes (see AnswerBudget)."""
        await self._budget._grow(self, total)

    def release(self) -> None:
        self._budget._release(self)
