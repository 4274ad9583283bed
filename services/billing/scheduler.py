"""Runs the billing cycle on a timer, tenant by tenant.

Fairness: each tenant's run is bounded (the catch-up bound per subscription,
and the run budget, see invoicing), so one tenant delays another by at most
its own bounded work; a tenant whose last run left work (more_pending) goes
after the others, and each tick starts one tenant further on (round-robin).
Each tenant's cycle is under its own PostgreSQL advisory lock, so replicas work
on different tenants at once and never on the same one (the cycle is
idempotent anyway). One tenant's failure never stops the others."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import structlog

from services.billing.invoicing import Invoicing
from services.billing.store import BillingStore
from services.common import context as call_context
from services.common import tracing
from services.common.logs import get_logger

log = get_logger(__name__)


class Scheduler:
    def __init__(self, store: BillingStore, invoicing: Invoicing, every: timedelta) -> None:
        self._store = store
        self._invoicing = invoicing
        self._every = every.total_seconds()
        self._turn = 0
        # Tenants whose last run here left work: they go last in the next tick.
        self._behind: set[str] = set()

    def order(self, tenant_ids: list[str]) -> list[str]:
        """This tick's order: rotated by one tenant each tick, and the tenants
        still catching up after the others."""
        if not tenant_ids:
            return []
        k = self._turn % len(tenant_ids)
        self._turn += 1
        rotated = tenant_ids[k:] + tenant_ids[:k]
        return [t for t in rotated if t not in self._behind] + [
            t for t in rotated if t in self._behind
        ]

    async def tick(self) -> int:
        """One pass over every tenant; returns how many invoices it touched."""
        touched = 0
        for tenant_id in self.order(await self._store.tenant_ids()):
            # One request id and one trace per tenant's run: meter's log lines
            # and spans for the calls it makes are found by them.
            request_id = uuid.uuid4().hex
            call_context.set_request_id(request_id)
            with (
                structlog.contextvars.bound_contextvars(tenant_id=tenant_id, request_id=request_id),
                tracing.span("billing cycle", **{"usagebilling.tenant_id": tenant_id}),
            ):
                touched += await self._run_tenant(tenant_id)
        return touched

    async def _run_tenant(self, tenant_id: str) -> int:
        async with self._store.tenant_cycle_lock(tenant_id) as mine:
            if not mine:
                return 0  # another replica is on it
            now = datetime.now(UTC)
            try:
                report = await self._invoicing.cycle(tenant_id, now, now)
            except Exception as exc:  # one tenant's trouble must not stop the others
                log.error("billing_cycle_failed", error=repr(exc))
                try:  # voids and earlier invoices still go out
                    await self._invoicing.publish_pending(tenant_id)
                except Exception as publish_exc:
                    log.warning("invoice_publish_failed", error=repr(publish_exc))
                return 0
        if report.more_pending:
            self._behind.add(tenant_id)
        else:
            self._behind.discard(tenant_id)
        return len(report.invoice_ids)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.error("scheduler_tick_failed", error=repr(exc))
            await asyncio.sleep(self._every)
