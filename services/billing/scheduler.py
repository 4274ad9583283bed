"""Runs the billing cycle on a timer. Replicas take a PostgreSQL advisory lock,
so one runs the cycle at a time (and the cycle is idempotent anyway)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from services.billing.invoicing import Invoicing
from services.billing.store import BillingStore
from services.common.logs import get_logger

log = get_logger(__name__)


class Scheduler:
    def __init__(self, store: BillingStore, invoicing: Invoicing, every: timedelta) -> None:
        self._store = store
        self._invoicing = invoicing
        self._every = every.total_seconds()

    async def tick(self) -> int:
        """One pass over every tenant; returns how many invoices it touched."""
        touched = 0
        async with self._store.cycle_lock() as mine:
            if not mine:
                return 0
            for tenant_id in await self._store.tenant_ids():
                now = datetime.now(UTC)
                try:
                    touched += len(await self._invoicing.run_cycle(tenant_id, now, now))
                except Exception as exc:  # one tenant's trouble must not stop the others
                    log.error("billing_cycle_failed", tenant_id=tenant_id, error=repr(exc))
            await self._invoicing.publish_pending()
        return touched

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.error("scheduler_tick_failed", error=repr(exc))
            await asyncio.sleep(self._every)
