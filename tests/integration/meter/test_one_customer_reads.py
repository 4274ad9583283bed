"""One customer's usage without groups: read in one fetch on meter's pool of
plain reads (MeterStore.reads) up to ONE_READ_WINDOWS windows, handed on
YIELD_EVERY rows at a time, and equal to the pure reference."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from datetime import UTC, datetime, timedelta
from typing import Any

from services.common import db
from services.meter.api import MeterServicer
from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.reference import aggregate_events
from services.meter.domain.windows import WindowSize
from services.meter.service import MeterService
from services.meter.store import ONE_READ_WINDOWS, YIELD_EVERY, MeterStore, UsageGroup
from tests.integration.meter.harness import Meters, ev, reference_tuples


class SlicingStore(MeterStore):
    """The real store, keeping the size of each slice of rows it hands on."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.slices: list[int] = []

    async def usage(self, *args: Any, **kwargs: Any) -> AsyncGenerator[list[UsageGroup], None]:
        async with contextlib.aclosing(super().usage(*args, **kwargs)) as slices:
            async for groups in slices:
                self.slices.append(len(groups))
                yield groups


async def test_a_month_of_hour_windows_is_one_fetch_in_slices(meters: Meters) -> None:
    """A month of HOUR windows from an odd second (745 windows: more than a
    slice, within ONE_READ_WINDOWS) answers as the reference does, every
    window, and is handed on in slices of at most YIELD_EVERY rows."""
    store = SlicingStore(meters.store.pool, meters.store.reads)
    harness = Meters(store)
    harness.service = MeterService(store)
    harness.servicer = MeterServicer(harness.service, store)
    tenant = harness.new_tenant()
    meter = await harness.create(tenant, aggregation="SUM", property="tokens")
    start = datetime(2024, 3, 1, 0, 0, 17, tzinfo=UTC)
    end = start + timedelta(days=31)
    events = [
        ev(f"e{i}", "c1" if i % 3 else "c2", start + timedelta(minutes=37 * i), tokens=i % 7 + 1)
        for i in range(1_300)
    ]
    await harness.send(tenant, events)
    got = await harness.query(tenant, meter.id, start, end, window="HOUR", customer="c1")
    spec = MeterSpec(
        event_name="api.call", aggregation=Aggregation.SUM, property="tokens", filter=None
    )
    expected = aggregate_events(
        [e.raw for e in events], spec, start, end, WindowSize.HOUR, "", "c1", (), {}
    )
    assert got == reference_tuples(expected)
    assert YIELD_EVERY < len(got) <= ONE_READ_WINDOWS
    assert store.slices == [YIELD_EVERY, len(got) - YIELD_EVERY]


async def test_plain_reads_pool_keeps_the_session(stack_urls: tuple[str, str]) -> None:
    """A pool of plain reads skips asyncpg's reset statement on release (what a
    connection set stays set: the pool is for plain SELECTs only), while the
    default pool resets it (RESET ALL)."""
    for plain, shown in ((True, "1234ms"), (False, "0")):
        pool = await db.create_pool(stack_urls[0], min_size=1, max_size=1, plain_reads=plain)
        try:
            await pool.execute("SET statement_timeout = 1234")
            assert await pool.fetchval("SHOW statement_timeout") == shown
        finally:
            await pool.close()
