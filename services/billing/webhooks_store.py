"""Webhooks' SQL (schema `billing`): endpoints and deliveries. Every query a
tenant's call makes filters on tenant_id; the sender's queries (due
deliveries) span tenants."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from services.billing.domain.webhooks import should_disable
from services.common.errors import NotFound
from services.common.ids import parse_uuid


@dataclass(frozen=True)
class EndpointRecord:
    tenant_id: str
    id: str
    url: str
    event_types: tuple[str, ...]
    description: str
    secret: str
    previous_secret: str
    previous_secret_until: datetime | None
    enabled: bool
    disabled_reason: str
    failing_since: datetime | None
    created_at: datetime

    def secrets(self, now: datetime) -> list[str]:
        """The secrets that sign now: the current one, and the previous one
        during a rotation's overlap."""
        until = self.previous_secret_until
        if self.previous_secret and until is not None and now < until:
            return [self.secret, self.previous_secret]
        return [self.secret]


@dataclass(frozen=True)
class DeliveryRecord:
    tenant_id: str
    id: str
    endpoint_id: str
    message_id: str
    event_type: str
    payload: str
    status: str  # PENDING, SUCCEEDED, FAILED
    attempts: int
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    status_code: int
    latency_ms: int
    response_body: str
    error: str
    created_at: datetime


@dataclass(frozen=True)
class Attempt:
    """One attempt's outcome."""

    status_code: int
    latency_ms: int
    response_body: str
    error: str

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300


def _endpoint(r: asyncpg.Record) -> EndpointRecord:
    return EndpointRecord(
        tenant_id=r["tenant_id"],
        id=str(r["id"]),
        url=r["url"],
        event_types=tuple(r["event_types"]),
        description=r["description"],
        secret=r["secret"],
        previous_secret=r["previous_secret"],
        previous_secret_until=r["previous_secret_until"],
        enabled=r["enabled"],
        disabled_reason=r["disabled_reason"],
        failing_since=r["failing_since"],
        created_at=r["created_at"],
    )


def _delivery(r: asyncpg.Record) -> DeliveryRecord:
    return DeliveryRecord(
        tenant_id=r["tenant_id"],
        id=str(r["id"]),
        endpoint_id=str(r["endpoint_id"]),
        message_id=r["message_id"],
        event_type=r["event_type"],
        payload=r["payload"],
        status=r["status"],
        attempts=r["attempts"],
        next_attempt_at=r["next_attempt_at"],
        last_attempt_at=r["last_attempt_at"],
        status_code=r["status_code"],
        latency_ms=r["latency_ms"],
        response_body=r["response_body"],
        error=r["error"],
        created_at=r["created_at"],
    )


_ZERO = str(uuid.UUID(int=0))


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # Endpoints.

    async def create_endpoint(
        self, tenant_id: str, url: str, event_types: Sequence[str], description: str, secret: str
    ) -> EndpointRecord:
        row = await self.pool.fetchrow(
            "INSERT INTO billing.webhook_endpoints (tenant_id, url, event_types, description,"
            " secret) VALUES ($1, $2, $3, $4, $5) RETURNING *",
            tenant_id,
            url,
            list(event_types),
            description,
            secret,
        )
        assert row is not None
        return _endpoint(row)

    async def get_endpoint(
        self, tenant_id: str, endpoint_id: str, field: str = "id"
    ) -> EndpointRecord:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.webhook_endpoints WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            parse_uuid(endpoint_id, field),
        )
        if row is None:
            raise NotFound(f"{field}: no webhook endpoint {endpoint_id!r}")
        return _endpoint(row)

    async def list_endpoints(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[EndpointRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.webhook_endpoints WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else _ZERO,
            limit,
        )
        return [_endpoint(r) for r in rows]

    async def endpoints_for(self, tenant_id: str, event_type: str) -> list[EndpointRecord]:
        """The tenant's enabled endpoints that want this message type."""
        rows = await self.pool.fetch(
            "SELECT * FROM billing.webhook_endpoints WHERE tenant_id = $1 AND enabled"
            " AND $2 = ANY (event_types)",
            tenant_id,
            event_type,
        )
        return [_endpoint(r) for r in rows]

    async def endpoints_by_id(self, ids: Sequence[str]) -> dict[str, EndpointRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.webhook_endpoints WHERE id = ANY ($1::uuid[])", list(ids)
        )
        return {str(r["id"]): _endpoint(r) for r in rows}

    async def _update(
        self, tenant_id: str, endpoint_id: str, sets: str, *args: object
    ) -> EndpointRecord:
        row = await self.pool.fetchrow(
            f"UPDATE billing.webhook_endpoints SET {sets} WHERE tenant_id = $1 AND id = $2"
            " RETURNING *",
            tenant_id,
            parse_uuid(endpoint_id, "id"),
            *args,
        )
        if row is None:
            raise NotFound(f"id: no webhook endpoint {endpoint_id!r}")
        return _endpoint(row)

    async def rotate_secret(
        self, tenant_id: str, endpoint_id: str, secret: str, overlap_until: datetime
    ) -> EndpointRecord:
        return await self._update(
            tenant_id,
            endpoint_id,
            "previous_secret = secret, previous_secret_until = $4, secret = $3",
            secret,
            overlap_until,
        )

    async def set_enabled(
        self, tenant_id: str, endpoint_id: str, enabled: bool, reason: str
    ) -> EndpointRecord:
        # Enabling forgets the failures: the disable clock starts again.
        return await self._update(
            tenant_id,
            endpoint_id,
            "enabled = $3, disabled_reason = $4,"
            " failing_since = CASE WHEN $3 THEN NULL ELSE failing_since END",
            enabled,
            reason,
        )

    async def delete_endpoint(self, tenant_id: str, endpoint_id: str) -> None:
        done = await self.pool.execute(
            "DELETE FROM billing.webhook_endpoints WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            parse_uuid(endpoint_id, "id"),
        )
        if done == "DELETE 0":
            raise NotFound(f"id: no webhook endpoint {endpoint_id!r}")

    async def record_health(
        self, endpoint_id: str, succeeded: bool, now: datetime, disable_after: timedelta
    ) -> EndpointRecord | None:
        """After an attempt: a success clears failing_since; a failure sets it
        when unset, and disables the endpoint once it has failed for
        disable_after. Returns the endpoint when this call disabled it."""
        if succeeded:
            await self.pool.execute(
                "UPDATE billing.webhook_endpoints SET failing_since = NULL"
                " WHERE id = $1 AND failing_since IS NOT NULL",
                endpoint_id,
            )
            return None
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM billing.webhook_endpoints WHERE id = $1 FOR UPDATE", endpoint_id
            )
            if row is None:
                return None
            since = row["failing_since"] or now
            disable = row["enabled"] and should_disable(since, now, disable_after)
            reason = f"failing since {since.astimezone(UTC).isoformat()}"
            updated = await conn.fetchrow(
                "UPDATE billing.webhook_endpoints SET failing_since = $2,"
                " enabled = enabled AND NOT $3,"
                " disabled_reason = CASE WHEN $3 THEN $4 ELSE disabled_reason END"
                " WHERE id = $1 RETURNING *",
                endpoint_id,
                since,
                disable,
                reason,
            )
        assert updated is not None
        return _endpoint(updated) if disable else None

    # Deliveries.

    async def enqueue(
        self,
        tenant_id: str,
        endpoint_ids: Sequence[str],
        message_id: str,
        event_type: str,
        payload: str,
        now: datetime,
    ) -> None:
        """One delivery per endpoint, due now; a message seen again (JetStream
        redelivered it) finds its rows and adds none."""
        if not endpoint_ids:
            return
        await self.pool.execute(
            "INSERT INTO billing.webhook_deliveries (tenant_id, endpoint_id, message_id,"
            " event_type, payload, next_attempt_at)"
            " SELECT $1, e, $3, $4, $5, $6 FROM unnest($2::uuid[]) AS e"
            " ON CONFLICT (endpoint_id, message_id) DO NOTHING",
            tenant_id,
            list(endpoint_ids),
            message_id,
            event_type,
            payload,
            now,
        )

    async def claim_due(
        self, now: datetime, lease: timedelta, limit: int, busy: Sequence[str]
    ) -> list[DeliveryRecord]:
        """Due deliveries of enabled endpoints not in `busy`, at most one per
        endpoint, leased: their next_attempt_at moves to now + lease, so that
        another replica does not take them, and a sender that dies leaves
        them due again when the lease ends (at least once)."""
        rows = await self.pool.fetch(
            "WITH due AS ("
            "  SELECT DISTINCT ON (d.endpoint_id) d.id FROM billing.webhook_deliveries d"
            "  JOIN billing.webhook_endpoints e ON e.id = d.endpoint_id"
            "  WHERE d.status = 'PENDING' AND d.next_attempt_at <= $1 AND e.enabled"
            "    AND NOT d.endpoint_id = ANY ($4::uuid[])"
            "  ORDER BY d.endpoint_id, d.next_attempt_at"
            "), picked AS ("
            "  SELECT d.id FROM billing.webhook_deliveries d JOIN due USING (id)"
            "  WHERE d.status = 'PENDING' AND d.next_attempt_at <= $1"
            "  LIMIT $3 FOR UPDATE OF d SKIP LOCKED"
            ")"
            " UPDATE billing.webhook_deliveries d SET next_attempt_at = $1 + $2"
            " FROM picked WHERE d.id = picked.id RETURNING d.*",
            now,
            lease,
            limit,
            list(busy),
        )
        return [_delivery(r) for r in rows]

    async def record_attempt(
        self, delivery_id: str, attempt: Attempt, now: datetime, next_at: datetime | None
    ) -> None:
        status = "SUCCEEDED" if attempt.succeeded else ("PENDING" if next_at else "FAILED")
        await self.pool.execute(
            "UPDATE billing.webhook_deliveries SET status = $2, attempts = attempts + 1,"
            " next_attempt_at = $3, last_attempt_at = $4, status_code = $5, latency_ms = $6,"
            " response_body = $7, error = $8 WHERE id = $1",
            delivery_id,
            status,
            None if attempt.succeeded else next_at,
            now,
            attempt.status_code,
            attempt.latency_ms,
            attempt.response_body,
            attempt.error,
        )

    async def list_deliveries(
        self, tenant_id: str, endpoint_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[DeliveryRecord]:
        await self.get_endpoint(tenant_id, endpoint_id, "endpoint_id")
        rows = await self.pool.fetch(
            "SELECT * FROM billing.webhook_deliveries WHERE tenant_id = $1 AND endpoint_id = $2"
            " AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))"
            " ORDER BY created_at DESC, id DESC LIMIT $5",
            tenant_id,
            endpoint_id,
            after[0] if after else None,
            after[1] if after else _ZERO,
            limit,
        )
        return [_delivery(r) for r in rows]

    async def retry(self, tenant_id: str, delivery_id: str, now: datetime) -> DeliveryRecord:
        row = await self.pool.fetchrow(
            "UPDATE billing.webhook_deliveries SET status = 'PENDING', next_attempt_at = $3"
            " WHERE tenant_id = $1 AND id = $2 RETURNING *",
            tenant_id,
            parse_uuid(delivery_id, "id"),
            now,
        )
        if row is None:
            raise NotFound(f"id: no webhook delivery {delivery_id!r}")
        return _delivery(row)
