"""Usage alerts' SQL (schema `billing`): alerts, and the firings whose
primary key (alert, customer, period start) makes each fire once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import asyncpg

from services.common.errors import NotFound
from services.common.ids import parse_uuid


@dataclass(frozen=True)
class AlertRecord:
    tenant_id: str
    id: str
    meter_id: str
    customer_id: str  # "" for every customer
    quantity: Decimal | None
    amount_minor: int | None
    created_at: datetime


def _alert(r: asyncpg.Record) -> AlertRecord:
    return AlertRecord(
        tenant_id=r["tenant_id"],
        id=str(r["id"]),
        meter_id=r["meter_id"],
        customer_id=str(r["customer_id"]) if r["customer_id"] else "",
        quantity=r["quantity"],
        amount_minor=r["amount_minor"],
        created_at=r["created_at"],
    )


class AlertStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self,
        tenant_id: str,
        meter_id: str,
        customer_id: str,
        quantity: Decimal | None,
        amount_minor: int | None,
    ) -> AlertRecord:
        row = await self.pool.fetchrow(
            "INSERT INTO billing.usage_alerts (tenant_id, meter_id, customer_id, quantity,"
            " amount_minor) VALUES ($1, $2, $3, $4, $5) RETURNING *",
            tenant_id,
            meter_id,
            customer_id or None,
            quantity,
            amount_minor,
        )
        assert row is not None
        return _alert(row)

    async def page(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[AlertRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.usage_alerts WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return [_alert(r) for r in rows]

    async def delete(self, tenant_id: str, alert_id: str) -> None:
        done = await self.pool.execute(
            "DELETE FROM billing.usage_alerts WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            parse_uuid(alert_id, "id"),
        )
        if done == "DELETE 0":
            raise NotFound(f"id: no usage alert {alert_id!r}")

    async def all_alerts(self) -> list[AlertRecord]:
        """Every tenant's alerts."""
        rows = await self.pool.fetch(
            "SELECT * FROM billing.usage_alerts ORDER BY tenant_id, created_at"
        )
        return [_alert(r) for r in rows]

    async def fired(self, alert_id: str, customer_id: str, period_start: datetime) -> bool:
        found = await self.pool.fetchval(
            "SELECT true FROM billing.usage_alert_firings"
            " WHERE alert_id = $1 AND customer_id = $2 AND period_start = $3",
            alert_id,
            customer_id,
            period_start,
        )
        return bool(found)

    async def fire(
        self,
        tenant_id: str,
        alert_id: str,
        customer_id: str,
        period_start: datetime,
        payload: bytes,
    ) -> bool:
        """Records the firing; False when it was already recorded (by this
        replica earlier, or by another)."""
        inserted = await self.pool.fetchval(
            "INSERT INTO billing.usage_alert_firings (tenant_id, alert_id, customer_id,"
            " period_start, payload) VALUES ($1, $2, $3, $4, $5)"
            " ON CONFLICT DO NOTHING RETURNING true",
            tenant_id,
            alert_id,
            customer_id,
            period_start,
            payload,
        )
        return bool(inserted)

    async def unpublished(self, limit: int) -> list[tuple[str, str, datetime, bytes]]:
        rows = await self.pool.fetch(
            "SELECT alert_id, customer_id, period_start, payload FROM billing.usage_alert_firings"
            " WHERE NOT published ORDER BY created_at LIMIT $1",
            limit,
        )
        return [
            (str(r["alert_id"]), str(r["customer_id"]), r["period_start"], bytes(r["payload"]))
            for r in rows
        ]

    async def mark_published(self, alert_id: str, customer_id: str, period_start: datetime) -> None:
        await self.pool.execute(
            "UPDATE billing.usage_alert_firings SET published = true"
            " WHERE alert_id = $1 AND customer_id = $2 AND period_start = $3",
            alert_id,
            customer_id,
            period_start,
        )
