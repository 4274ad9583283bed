"""meter against a real PostgreSQL: its migrations applied to the test database,
a fresh tenant per test (or per hypothesis example) for isolation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.common import db
from services.meter.__main__ import MIGRATIONS
from services.meter.store import MeterStore
from tests.integration.meter.harness import Meters


@pytest.fixture(scope="module")
async def meters(stack_urls: tuple[str, str]) -> AsyncIterator[Meters]:
    pool = await db.create_pool(stack_urls[0], min_size=1, max_size=4)
    # As meter wires it: one customer's reads on generic plans, so the
    # reference tests check those plans' answers too.
    reads = await db.create_pool(
        stack_urls[0], min_size=1, max_size=2, generic_plans=True, plain_reads=True
    )
    try:
        await db.migrate(pool, "meter", MIGRATIONS)
        yield Meters(MeterStore(pool, reads))
    finally:
        await reads.close()
        await pool.close()
