"""Tells meter, per tenant, where the tenant's oldest open billing period
starts (RetentionService.ReportOpenPeriods), so that meter's retention never
drops the per-event rows a period still to be invoiced needs. Every billing
replica reports every tenant each REPORT_EVERY (a report is idempotent, and
cheap next to a cycle): the answer moves only as periods are invoiced, and a
new subscription that starts in the past is reported within REPORT_EVERY,
while meter keeps at least the backdating window and a week anyway. A
finalized period stays open until it is checked for late usage."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from services.billing.store import BillingStore
from services.common.auth import on_behalf_of
from services.common.logs import get_logger
from usagebilling.meter.v1 import retention_pb2, retention_pb2_grpc

log = get_logger(__name__)

REPORT_EVERY = timedelta(minutes=10)


# The start of tenant $1's oldest period not yet invoiced (finalized or voided):
# a draft, a failed period, or the period after a subscription's last invoice
# (its start before the first); or finalized but not yet checked for late usage
# (migration 0012: its re-price reads the usage again); $2 (now) when there is
# none.
_OLDEST_OPEN_PERIOD = """
SELECT least($2::timestamptz,
    (SELECT min(coalesce(done.last_end, s.start_time)) FROM billing.subscriptions s
     LEFT JOIN LATERAL (SELECT max(i.period_end) AS last_end FROM billing.invoices i
                        WHERE i.subscription_id = s.id AND i.status <> 'DRAFT') done ON true
     WHERE s.tenant_id = $1
       AND (s.end_time IS NULL OR coalesce(done.last_end, s.start_time) < s.end_time)),
    (SELECT min(period_start) FROM billing.period_failures WHERE tenant_id = $1),
    (SELECT min(period_start) FROM billing.invoices WHERE tenant_id = $1 AND status = 'DRAFT'),
    (SELECT min(i.period_start) FROM billing.invoices i
     WHERE i.tenant_id = $1 AND i.status = 'FINALIZED' AND i.subscription_id IS NOT NULL
       AND i.period_end > i.period_start
       AND NOT EXISTS (SELECT 1 FROM billing.late_usage_checks c
                       WHERE c.subscription_id = i.subscription_id
                         AND c.period_start = i.period_start)))
"""


async def oldest_open_period(pool: asyncpg.Pool, tenant_id: str, now: datetime) -> datetime:
    value: datetime = await pool.fetchval(_OLDEST_OPEN_PERIOD, tenant_id, now)
    return value


class OpenPeriodsReporter:
    def __init__(self, store: BillingStore, channel: grpc.aio.Channel, service_token: str) -> None:
        self._store = store
        self._stub = retention_pb2_grpc.RetentionServiceStub(channel)
        self._service_token = service_token
        self._reported: dict[str, datetime] = {}

    async def run(self) -> None:
        while True:
            try:
                for tenant_id in await self._store.tenant_ids():
                    await self.report(tenant_id, datetime.now(UTC))
            except (asyncpg.PostgresError, OSError) as exc:
                log.warning("open_periods_not_reported", error=repr(exc))
            await asyncio.sleep(REPORT_EVERY.total_seconds())

    async def report(self, tenant_id: str, now: datetime) -> None:
        """Reports the tenant's oldest open period, unless it did so lately. A
        failure is logged and tried at the next cycle: until then meter keeps
        what it was last told (an earlier start, since periods only close)."""
        last = self._reported.get(tenant_id)
        if last is not None and now - last < REPORT_EVERY:
            return
        keep_since = await oldest_open_period(self._store.pool, tenant_id, now)
        request = retention_pb2.ReportOpenPeriodsRequest()
        request.keep_since.FromDatetime(keep_since)
        try:
            await self._stub.ReportOpenPeriods(
                request, metadata=on_behalf_of(self._service_token, tenant_id), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            log.warning("open_periods_not_reported", code=exc.code().name)
            return
        self._reported[tenant_id] = now
