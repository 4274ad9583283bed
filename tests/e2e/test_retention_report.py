"""RetentionService.ReportOpenPeriods against the running services: only
billing's service token may report (an API key, or another service's token, is
PERMISSION_DENIED), the report is validated, and billing's reporter sends the
start of the tenant's oldest open period (services/billing/open_periods.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc

from services.billing.open_periods import OpenPeriodsReporter, oldest_open_period
from services.billing.store import BillingStore
from services.common import db
from tools.suite import Suite
from usagebilling.meter.v1 import retention_pb2, retention_pb2_grpc


def _bearer(token: str, tenant: str | None = None) -> tuple[tuple[str, str], ...]:
    auth = (("authorization", f"Bearer {token}"),)
    return auth if tenant is None else (*auth, ("x-usagebilling-tenant", tenant))


def _report(at: datetime | None) -> retention_pb2.ReportOpenPeriodsRequest:
    request = retention_pb2.ReportOpenPeriodsRequest()
    if at is not None:
        request.keep_since.FromDatetime(at)
    return request


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_only_billing_reports_open_periods(
    suite: Suite, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    tenant_id, key = new_tenant()
    since = datetime(2026, 3, 10, tzinfo=UTC)
    async with grpc.aio.insecure_channel(suite.address("meter")) as channel:
        stub = retention_pb2_grpc.RetentionServiceStub(channel)
        answer = await stub.ReportOpenPeriods(
            _report(since),
            metadata=_bearer(suite.service_tokens["billing"], tenant_id),
            timeout=30,
        )
        assert not answer.HasField("retained_since")  # retention is off: nothing dropped
        code, details = await _code(
            stub.ReportOpenPeriods(
                _report(None), metadata=_bearer(suite.service_tokens["billing"], tenant_id)
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("keep_since"), (
            details
        )
        code, details = await _code(
            stub.ReportOpenPeriods(_report(since - timedelta(days=400)), metadata=_bearer(key))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        code, details = await _code(
            stub.ReportOpenPeriods(
                _report(since), metadata=_bearer(suite.service_tokens["ingest"], tenant_id)
            )
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED and "the ingest service may not" in details

    conn = await asyncpg.connect(suite.database_url)
    try:
        stored = await conn.fetchval(
            "SELECT keep_since FROM meter.retention_floors WHERE tenant_id = $1", tenant_id
        )
    finally:
        await conn.close()
    # The API key's report (400 days earlier) was refused. (Billing's own
    # reporter may have reported the tenant since: "now", no subscription.)
    assert stored >= since


async def test_billing_reports_its_oldest_open_period(
    suite: Suite, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    tenant_id, _ = new_tenant()
    pool = await db.create_pool(suite.database_url, min_size=1, max_size=2)
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        # No subscription: nothing is open, so nothing before now is needed.
        assert await oldest_open_period(pool, tenant_id, now) == now
        customer = await pool.fetchval(
            "INSERT INTO billing.customers (tenant_id, external_id) VALUES ($1, 'c1') RETURNING id",
            tenant_id,
        )
        product = await pool.fetchval(
            "INSERT INTO billing.products (tenant_id, name, currency, billing_interval)"
            " VALUES ($1, 'p', 'USD', 'month') RETURNING id",
            tenant_id,
        )
        start = now - timedelta(days=70)
        await pool.execute(
            "INSERT INTO billing.subscriptions (tenant_id, customer_id, product_id, start_time)"
            " VALUES ($1, $2, $3, $4)",
            tenant_id,
            customer,
            product,
            start,
        )
        assert await oldest_open_period(pool, tenant_id, now) == start
        async with grpc.aio.insecure_channel(suite.address("meter")) as channel:
            reporter = OpenPeriodsReporter(
                BillingStore(pool), channel, suite.service_tokens["billing"]
            )
            await reporter.report(tenant_id, now)
        stored = await pool.fetchval(
            "SELECT keep_since FROM meter.retention_floors WHERE tenant_id = $1", tenant_id
        )
        assert stored == start
    finally:
        await pool.close()
