"""billing's SQL (schema `billing`): tenants and keys, customers, products,
subscriptions, invoices. Every query filters on tenant_id."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.common.errors import AlreadyExists, NotFound


def _uuid_or_missing(value: str, what: str, field: str = "id") -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFound(f"{field}: no {what} {value!r}") from None


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    tenant_id: str
    description: str
    revoked: bool


@dataclass(frozen=True)
class CustomerRecord:
    id: str
    external_id: str
    name: str
    email: str
    created_at: datetime


@dataclass(frozen=True)
class ProductRecord:
    id: str
    name: str
    currency: str
    billing_interval: str  # the domain Interval's name
    fixed_price_minor: int
    usage_prices: list[dict[str, Any]]  # JSON form, see convert.price_json
    created_at: datetime


@dataclass(frozen=True)
class SubscriptionRecord:
    id: str
    tenant_id: str
    customer_id: str
    customer_external_id: str
    product_id: str
    start_time: datetime
    end_time: datetime | None
    canceled_at: datetime | None


@dataclass(frozen=True)
class InvoiceRecord:
    id: str
    tenant_id: str
    number: str
    customer_id: str
    subscription_id: str
    period_start: datetime
    period_end: datetime
    currency: str
    status: str  # DRAFT, FINALIZED, VOID
    lines: list[dict[str, Any]]
    subtotal_minor: int
    total_minor: int
    finalized_at: datetime | None


def _customer(r: asyncpg.Record) -> CustomerRecord:
    return CustomerRecord(str(r["id"]), r["external_id"], r["name"], r["email"], r["created_at"])


def _product(r: asyncpg.Record) -> ProductRecord:
    return ProductRecord(
        id=str(r["id"]),
        name=r["name"],
        currency=r["currency"],
        billing_interval=r["billing_interval"],
        fixed_price_minor=r["fixed_price_minor"],
        usage_prices=r["usage_prices"],
        created_at=r["created_at"],
    )


def _subscription(r: asyncpg.Record) -> SubscriptionRecord:
    return SubscriptionRecord(
        id=str(r["id"]),
        tenant_id=r["tenant_id"],
        customer_id=str(r["customer_id"]),
        customer_external_id=r["external_id"],
        product_id=str(r["product_id"]),
        start_time=r["start_time"],
        end_time=r["end_time"],
        canceled_at=r["canceled_at"],
    )


def _invoice(r: asyncpg.Record) -> InvoiceRecord:
    return InvoiceRecord(
        id=str(r["id"]),
        tenant_id=r["tenant_id"],
        number=r["number"],
        customer_id=str(r["customer_id"]),
        subscription_id=str(r["subscription_id"]),
        period_start=r["period_start"],
        period_end=r["period_end"],
        currency=r["currency"],
        status=r["status"],
        lines=r["lines"],
        subtotal_minor=r["subtotal_minor"],
        total_minor=r["total_minor"],
        finalized_at=r["finalized_at"],
    )


_SUBSCRIPTION_SELECT = (
    "SELECT s.*, c.external_id FROM billing.subscriptions s"
    " JOIN billing.customers c ON c.id = s.customer_id"
)


class BillingStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # Tenants and API keys.

    async def create_tenant(self, name: str) -> str:
        return str(
            await self.pool.fetchval(
                "INSERT INTO billing.tenants (name) VALUES ($1) RETURNING tenant_id", name
            )
        )

    async def tenant_exists(self, tenant_id: str) -> bool:
        found = await self.pool.fetchval(
            "SELECT 1 FROM billing.tenants WHERE tenant_id = $1", tenant_id
        )
        return found is not None

    async def create_api_key(self, tenant_id: str, key_hash: str, description: str) -> str:
        return str(
            await self.pool.fetchval(
                "INSERT INTO billing.api_keys (tenant_id, key_hash, description)"
                " VALUES ($1, $2, $3) RETURNING id",
                tenant_id,
                key_hash,
                description,
            )
        )

    async def revoke_api_key(self, key_id: str) -> ApiKeyRecord:
        row = await self.pool.fetchrow(
            "UPDATE billing.api_keys SET revoked_at = coalesce(revoked_at, now())"
            " WHERE id = $1 RETURNING id, tenant_id, description",
            _uuid_or_missing(key_id, "API key"),
        )
        if row is None:
            raise NotFound(f"id: no API key {key_id!r}")
        return ApiKeyRecord(str(row["id"]), row["tenant_id"], row["description"], True)

    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self.pool.fetchrow(
            "SELECT id, tenant_id, description FROM billing.api_keys"
            " WHERE key_hash = $1 AND revoked_at IS NULL",
            key_hash,
        )
        if row is None:
            return None
        return ApiKeyRecord(str(row["id"]), row["tenant_id"], row["description"], False)

    async def tenant_ids(self) -> list[str]:
        rows = await self.pool.fetch("SELECT tenant_id FROM billing.tenants ORDER BY tenant_id")
        return [r["tenant_id"] for r in rows]

    # Customers.

    async def create_customer(
        self, tenant_id: str, external_id: str, name: str, email: str
    ) -> CustomerRecord:
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO billing.customers (tenant_id, external_id, name, email)"
                " VALUES ($1, $2, $3, $4) RETURNING *",
                tenant_id,
                external_id,
                name,
                email,
            )
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(
                f"external_id: a customer with external_id {external_id!r} already exists"
            ) from exc
        assert row is not None
        return _customer(row)

    async def get_customer(self, tenant_id: str, customer_id: str) -> CustomerRecord:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.customers WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            _uuid_or_missing(customer_id, "customer", "customer_id"),
        )
        if row is None:
            raise NotFound(f"customer_id: no customer {customer_id!r}")
        return _customer(row)

    async def list_customers(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[CustomerRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.customers WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return [_customer(r) for r in rows]

    # Products.

    async def create_product(
        self,
        tenant_id: str,
        *,
        name: str,
        currency: str,
        billing_interval: str,
        fixed_price_minor: int,
        usage_prices: list[dict[str, Any]],
    ) -> ProductRecord:
        row = await self.pool.fetchrow(
            "INSERT INTO billing.products (tenant_id, name, currency, billing_interval,"
            " fixed_price_minor, usage_prices) VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
            tenant_id,
            name,
            currency,
            billing_interval,
            fixed_price_minor,
            usage_prices,
        )
        assert row is not None
        return _product(row)

    async def get_product(self, tenant_id: str, product_id: str) -> ProductRecord:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.products WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            _uuid_or_missing(product_id, "product", "product_id"),
        )
        if row is None:
            raise NotFound(f"product_id: no product {product_id!r}")
        return _product(row)

    async def list_products(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ProductRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.products WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return [_product(r) for r in rows]

    # Subscriptions.

    async def create_subscription(
        self, tenant_id: str, customer_id: str, product_id: str, start_time: datetime
    ) -> SubscriptionRecord:
        new_id = await self.pool.fetchval(
            "INSERT INTO billing.subscriptions (tenant_id, customer_id, product_id, start_time)"
            " VALUES ($1, $2, $3, $4) RETURNING id",
            tenant_id,
            customer_id,
            product_id,
            start_time,
        )
        return await self.get_subscription(tenant_id, str(new_id))

    async def get_subscription(self, tenant_id: str, subscription_id: str) -> SubscriptionRecord:
        row = await self.pool.fetchrow(
            f"{_SUBSCRIPTION_SELECT} WHERE s.tenant_id = $1 AND s.id = $2",
            tenant_id,
            _uuid_or_missing(subscription_id, "subscription", "subscription_id"),
        )
        if row is None:
            raise NotFound(f"subscription_id: no subscription {subscription_id!r}")
        return _subscription(row)

    async def subscriptions(
        self, tenant_id: str, customer_id: str = ""
    ) -> list[SubscriptionRecord]:
        rows = await self.pool.fetch(
            f"{_SUBSCRIPTION_SELECT} WHERE s.tenant_id = $1"
            " AND ($2::uuid IS NULL OR s.customer_id = $2) ORDER BY s.start_time, s.id",
            tenant_id,
            customer_id or None,
        )
        return [_subscription(r) for r in rows]

    async def cancel_subscription(
        self, tenant_id: str, subscription_id: str, end_time: datetime, now: datetime
    ) -> SubscriptionRecord:
        """Sets the end once: a second cancellation only moves it earlier."""
        await self.pool.execute(
            "UPDATE billing.subscriptions SET end_time = least(coalesce(end_time, $3), $3),"
            " canceled_at = coalesce(canceled_at, $4) WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            _uuid_or_missing(subscription_id, "subscription", "id"),
            end_time,
            now,
        )
        return await self.get_subscription(tenant_id, subscription_id)

    # Invoices.

    async def last_period_end(self, subscription_id: str) -> datetime | None:
        value: datetime | None = await self.pool.fetchval(
            "SELECT max(period_end) FROM billing.invoices WHERE subscription_id = $1",
            subscription_id,
        )
        return value

    async def insert_invoice(
        self, tenant_id: str, subscription: SubscriptionRecord, draft: dict[str, Any]
    ) -> str | None:
        """Inserts a DRAFT for the period unless one exists; its id, or None."""
        new_id = await self.pool.fetchval(
            "INSERT INTO billing.invoices (tenant_id, customer_id, subscription_id, period_start,"
            " period_end, currency, status, lines, subtotal_minor, total_minor)"
            " VALUES ($1, $2, $3, $4, $5, $6, 'DRAFT', $7, $8, $9)"
            " ON CONFLICT (subscription_id, period_start) DO NOTHING RETURNING id",
            tenant_id,
            subscription.customer_id,
            subscription.id,
            draft["period_start"],
            draft["period_end"],
            draft["currency"],
            draft["lines"],
            draft["subtotal_minor"],
            draft["total_minor"],
        )
        return str(new_id) if new_id else None

    async def drafts(self, tenant_id: str) -> list[InvoiceRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.invoices WHERE tenant_id = $1 AND status = 'DRAFT'"
            " ORDER BY period_end, id",
            tenant_id,
        )
        return [_invoice(r) for r in rows]

    @asynccontextmanager
    async def locked_draft(self, invoice_id: str) -> AsyncIterator[tuple[Any, bool]]:
        """A transaction holding the invoice's row lock; yields (connection,
        still a draft). Whoever holds it may update or finalize the invoice."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM billing.invoices WHERE id = $1 FOR UPDATE", invoice_id
            )
            yield conn, status == "DRAFT"

    async def update_draft(self, conn: Any, invoice_id: str, draft: dict[str, Any]) -> None:
        await conn.execute(
            "UPDATE billing.invoices SET lines = $2, subtotal_minor = $3, total_minor = $4,"
            " updated_at = now() WHERE id = $1 AND status = 'DRAFT'",
            invoice_id,
            draft["lines"],
            draft["subtotal_minor"],
            draft["total_minor"],
        )

    async def finalize(self, conn: Any, tenant_id: str, invoice_id: str, now: datetime) -> str:
        """Takes the tenant's next invoice number and finalizes; returns the number."""
        sequence = await conn.fetchval(
            "INSERT INTO billing.invoice_numbers (tenant_id, last_number) VALUES ($1, 1)"
            " ON CONFLICT (tenant_id) DO UPDATE"
            " SET last_number = billing.invoice_numbers.last_number + 1 RETURNING last_number",
            tenant_id,
        )
        number = f"INV-{sequence:06d}"
        await conn.execute(
            "UPDATE billing.invoices SET status = 'FINALIZED', number = $2, finalized_at = $3,"
            " updated_at = now() WHERE id = $1",
            invoice_id,
            number,
            now,
        )
        return number

    async def get_invoice(self, tenant_id: str, invoice_id: str) -> InvoiceRecord:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.invoices WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            _uuid_or_missing(invoice_id, "invoice"),
        )
        if row is None:
            raise NotFound(f"id: no invoice {invoice_id!r}")
        return _invoice(row)

    async def list_invoices(
        self,
        tenant_id: str,
        *,
        customer_id: str,
        subscription_id: str,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[InvoiceRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.invoices WHERE tenant_id = $1"
            " AND ($2::uuid IS NULL OR customer_id = $2)"
            " AND ($3::uuid IS NULL OR subscription_id = $3)"
            " AND ($4::timestamptz IS NULL OR (period_start, id) < ($4, $5::uuid))"
            " ORDER BY period_start DESC, id DESC LIMIT $6",
            tenant_id,
            _uuid_or_missing(customer_id, "customer", "customer_id") if customer_id else None,
            _uuid_or_missing(subscription_id, "subscription", "subscription_id")
            if subscription_id
            else None,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return [_invoice(r) for r in rows]

    async def void_invoice(self, tenant_id: str, invoice_id: str) -> str:
        """Voids a finalized invoice; returns the status it had."""
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM billing.invoices WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                _uuid_or_missing(invoice_id, "invoice"),
            )
            if status is None:
                raise NotFound(f"id: no invoice {invoice_id!r}")
            if status == "FINALIZED":
                await conn.execute(
                    "UPDATE billing.invoices SET status = 'VOID', voided_at = now(),"
                    " updated_at = now() WHERE id = $1",
                    invoice_id,
                )
            return str(status)

    async def unpublished(self, limit: int = 100) -> list[InvoiceRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.invoices WHERE finalized_at IS NOT NULL"
            " AND published_at IS NULL ORDER BY finalized_at LIMIT $1",
            limit,
        )
        return [_invoice(r) for r in rows]

    async def mark_published(self, invoice_id: str) -> None:
        await self.pool.execute(
            "UPDATE billing.invoices SET published_at = now() WHERE id = $1", invoice_id
        )

    @asynccontextmanager
    async def cycle_lock(self) -> AsyncIterator[bool]:
        """A session advisory lock so that one replica's scheduler runs the cycle
        at a time; yields whether this one got it."""
        async with self.pool.acquire() as conn:
            got = await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('billing:cycle'))")
            try:
                yield bool(got)
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock(hashtext('billing:cycle'))")
