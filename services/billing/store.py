"""billing's SQL (schema `billing`): tenants and keys, customers, products,
subscriptions, invoices. Every query filters on tenant_id."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.billing.domain import late
from services.common.errors import AlreadyExists, NotFound
from services.common.ids import is_uuid, parse_uuid


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
    commitment: dict[str, int] | None = None  # JSON form, see convert.commitment_json


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
    commitment: dict[str, int] | None = None  # its own, replacing the product's


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
    voided_at: datetime | None = None
    revision: int = 0
    replaces_id: str = ""  # the voided invoice this one corrects
    replaced_by_id: str = ""  # on a voided invoice: its correction


@dataclass(frozen=True)
class PeriodFailure:
    """Why one period of one subscription could not be invoiced."""

    subscription_id: str
    period_start: datetime
    period_end: datetime
    reason: str  # for people: names the line and the cause
    cause: str  # for metrics: a short, stable word such as amount_out_of_range


@dataclass(frozen=True)
class PeriodFailureRecord:
    failure: PeriodFailure
    first_failed_at: datetime
    last_failed_at: datetime
    attempts: int


@dataclass(frozen=True)
class LateCheck:
    """One period re-priced after its backdating window closed (migration
    0012): `line` is its LATE_USAGE line's JSON, None when nothing differed."""

    subscription_id: str
    period_start: datetime
    period_end: datetime
    invoice_id: str  # the invoice compared with
    line: dict[str, Any] | None

    @property
    def key(self) -> tuple[str, datetime]:
        return self.subscription_id, self.period_start


# Adds LATE_USAGE lines (JSON) to a draft's content (JSON): the finalizing
# transaction's hook (see BillingStore.finalize_drafts).
Attach = Callable[[dict[str, Any], list[dict[str, Any]]], dict[str, Any]]


def _failure(r: asyncpg.Record) -> PeriodFailureRecord:
    return PeriodFailureRecord(
        PeriodFailure(
            str(r["subscription_id"]), r["period_start"], r["period_end"], r["reason"], r["cause"]
        ),
        r["first_failed_at"],
        r["last_failed_at"],
        r["attempts"],
    )


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
        commitment=r["commitment"],
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
        commitment=r["commitment"],
    )


def _invoice(r: asyncpg.Record) -> InvoiceRecord:
    return InvoiceRecord(
        id=str(r["id"]),
        tenant_id=r["tenant_id"],
        number=r["number"],
        customer_id=str(r["customer_id"]),
        # Empty on a one-off invoice (a credits top-up, services/billing/credits_store.py).
        subscription_id=str(r["subscription_id"] or ""),
        period_start=r["period_start"],
        period_end=r["period_end"],
        currency=r["currency"],
        status=r["status"],
        lines=r["lines"],
        subtotal_minor=r["subtotal_minor"],
        total_minor=r["total_minor"],
        finalized_at=r["finalized_at"],
        voided_at=r["voided_at"],
        revision=r["revision"],
        replaces_id=str(r["replaces_id"] or ""),
        replaced_by_id=str(r["replaced_by_id"] or ""),
    )


_SUBSCRIPTION_SELECT = (
    "SELECT s.*, c.external_id FROM billing.subscriptions s"
    " JOIN billing.customers c ON c.id = s.customer_id"
)


# Per invoice message: which invoices it is due for, the column recording that
# it went out, the order in which they go. invoice.voided waits for the
# invoice's invoice.finalized, so that it never overtakes it. Invoices
# finalized together go out in number order ("INV-1000000" after "INV-999999").
# A transaction undone by a deadlock is tried again, this many times in all.
_DEADLOCK_ATTEMPTS = 3

_PUBLISHING = {
    "finalized": (
        "finalized_at IS NOT NULL",
        "published_at",
        "finalized_at, length(number), number",
    ),
    "voided": (
        "voided_at IS NOT NULL AND published_at IS NOT NULL",
        "void_published_at",
        "voided_at, length(number), number",
    ),
}


def _chosen_subscriptions(
    column: str, subscription_id: str, among: Sequence[str] | None, param: str = "$3"
) -> tuple[str, Any]:
    """The condition on `column` (and its argument, `param`) that keeps the
    rows of one subscription, of those `among`, or (neither given) all."""
    if among is not None:
        return f"{column} = ANY({param}::uuid[])", list(among)
    if subscription_id:
        return f"{column} = {param}::uuid", parse_uuid(subscription_id, "id")
    return f"{param}::uuid IS NULL", None


class BillingStore:
    def __init__(self, pool: asyncpg.Pool, reads: asyncpg.Pool | None = None) -> None:
        # `reads`: a pool for the request path's single-statement lookups
        # (db.create_pool(plain_reads=True): no reset round trip on release);
        # the main pool otherwise.
        self.pool = pool
        self.reads = reads or pool

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
            parse_uuid(key_id, "id"),
        )
        if row is None:
            raise NotFound(f"id: no API key {key_id!r}")
        return ApiKeyRecord(str(row["id"]), row["tenant_id"], row["description"], True)

    async def key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self.reads.fetchrow(
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

    async def _by_id(self, table: str, tenant_id: str, row_id: str, field: str) -> asyncpg.Record:
        """One of the tenant's rows; NotFound naming `field` otherwise."""
        what = table.rstrip("s")
        row: asyncpg.Record | None = await self.reads.fetchrow(
            f"SELECT * FROM billing.{table} WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            parse_uuid(row_id, field),
        )
        if row is None:
            raise NotFound(f"{field}: no {what} {row_id!r}")
        return row

    async def _page(
        self, table: str, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[asyncpg.Record]:
        """A page of a tenant's rows in creation order (keyset: created_at, id)."""
        rows: list[asyncpg.Record] = await self.pool.fetch(
            f"SELECT * FROM billing.{table} WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return rows

    # Customers.

    async def create_customer(
        self, tenant_id: str, external_id: str, name: str, email: str
    ) -> CustomerRecord:
        """AlreadyExists naming external_id when another customer of the tenant
        has it as external id, or as id (in any letter case): RPCs that take
        "an id or an external id" then name one customer, never two. (A new
        customer's id is random: it never equals an external id taken before.)"""
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO billing.customers (tenant_id, external_id, name, email)"
                " SELECT $1, $2, $3, $4 WHERE $5::uuid IS NULL OR NOT EXISTS"
                " (SELECT 1 FROM billing.customers WHERE tenant_id = $1 AND id = $5::uuid)"
                " RETURNING *",
                tenant_id,
                external_id,
                name,
                email,
                external_id if is_uuid(external_id) else None,
            )
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(
                f"external_id: a customer with external_id {external_id!r} already exists"
            ) from exc
        if row is None:
            raise AlreadyExists(
                f"external_id: {external_id!r} is the id of another customer (RPCs that"
                " take a customer's id or external id must name one customer)"
            )
        return _customer(row)

    async def get_customer(self, tenant_id: str, customer_id: str) -> CustomerRecord:
        return _customer(await self._by_id("customers", tenant_id, customer_id, "customer_id"))

    async def get_customer_by_external_id(self, tenant_id: str, external_id: str) -> CustomerRecord:
        """The customer whose events carry `external_id`; NotFound naming external_id."""
        row = await self.reads.fetchrow(
            "SELECT * FROM billing.customers WHERE tenant_id = $1 AND external_id = $2",
            tenant_id,
            external_id,
        )
        if row is None:
            raise NotFound(f"external_id: no customer with external_id {external_id!r}")
        return _customer(row)

    async def list_customers(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[CustomerRecord]:
        return [_customer(r) for r in await self._page("customers", tenant_id, after, limit)]

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
        commitment: dict[str, int] | None = None,
    ) -> ProductRecord:
        row = await self.pool.fetchrow(
            "INSERT INTO billing.products (tenant_id, name, currency, billing_interval,"
            " fixed_price_minor, usage_prices, commitment)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
            tenant_id,
            name,
            currency,
            billing_interval,
            fixed_price_minor,
            usage_prices,
            commitment,
        )
        assert row is not None
        return _product(row)

    async def get_product(self, tenant_id: str, product_id: str) -> ProductRecord:
        return _product(await self._by_id("products", tenant_id, product_id, "product_id"))

    async def products_of(self, tenant_id: str) -> list[ProductRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.products WHERE tenant_id = $1 ORDER BY created_at, id",
            tenant_id,
        )
        return [_product(r) for r in rows]

    async def list_products(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[ProductRecord]:
        return [_product(r) for r in await self._page("products", tenant_id, after, limit)]

    # Subscriptions.

    async def create_subscription(
        self,
        tenant_id: str,
        customer_id: str,
        product_id: str,
        start_time: datetime,
        commitment: dict[str, int] | None = None,
    ) -> SubscriptionRecord:
        new_id = await self.pool.fetchval(
            "INSERT INTO billing.subscriptions"
            " (tenant_id, customer_id, product_id, start_time, commitment)"
            " VALUES ($1, $2, $3, $4, $5) RETURNING id",
            tenant_id,
            customer_id,
            product_id,
            start_time,
            commitment,
        )
        return await self.get_subscription(tenant_id, str(new_id))

    async def get_subscription(self, tenant_id: str, subscription_id: str) -> SubscriptionRecord:
        row = await self.reads.fetchrow(
            f"{_SUBSCRIPTION_SELECT} WHERE s.tenant_id = $1 AND s.id = $2",
            tenant_id,
            parse_uuid(subscription_id, "subscription_id"),
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
            parse_uuid(subscription_id, "id"),
            end_time,
            now,
        )
        return await self.get_subscription(tenant_id, subscription_id)

    # Invoices.

    async def billing_state(
        self,
        tenant_id: str,
        subscription_id: str = "",
        *,
        after: tuple[str, str] | None = None,
        limit: int | None = None,
    ) -> list[tuple[SubscriptionRecord, datetime | None]]:
        """The tenant's subscriptions (or the one given) with the end of the
        last period the cycle has dealt with: invoiced (in any status) or
        recorded as failed (None: neither yet). Failed periods are retried from
        `open_failures`, so that later periods are not held up behind them.
        In the bytewise order of the customer's external id (as meter pages
        usage), then id: at most `limit`, after the (external id, subscription
        id) `after` (keyset pages, migration 0007's index)."""
        args: list[Any] = [tenant_id, limit]
        # Conditions in the SQL text, not `$n IS NULL OR ...`: a generic plan of
        # the latter could not start from the index.
        where = ""
        if subscription_id:
            args.append(parse_uuid(subscription_id, "id"))
            where += " AND s.id = $3"
        elif after is not None:
            args += [after[0], parse_uuid(after[1], "after")]
            where += (
                ' AND c.external_id COLLATE "C" >= $3'
                ' AND (c.external_id COLLATE "C", s.id) > ($3, $4::uuid)'
            )
        rows = await self.pool.fetch(
            "SELECT s.*, c.external_id, greatest("
            "  (SELECT max(i.period_end) FROM billing.invoices i WHERE i.subscription_id = s.id),"
            "  (SELECT max(f.period_end) FROM billing.period_failures f"
            "   WHERE f.subscription_id = s.id)) AS billed_until"
            " FROM billing.customers c JOIN billing.subscriptions s ON s.customer_id = c.id"
            f" WHERE c.tenant_id = $1 AND s.tenant_id = $1{where}"
            ' ORDER BY c.external_id COLLATE "C", s.id LIMIT $2',
            *args,
        )
        return [(_subscription(r), r["billed_until"]) for r in rows]

    async def insert_drafts(
        self, tenant_id: str, drafts: Sequence[tuple[SubscriptionRecord, dict[str, Any]]]
    ) -> dict[tuple[str, datetime], str]:
        """Inserts each (subscription, draft) as revision 0 of its period, unless
        that period has had an invoice (in any status, voided too); returns the
        ids inserted by (subscription id, period start). Safe against concurrent
        runs: the unique revision key lets one of them insert, the others none."""
        if not drafts:
            return {}
        rows = await self.pool.fetch(
            "INSERT INTO billing.invoices (tenant_id, customer_id, subscription_id, period_start,"
            " period_end, currency, status, lines, subtotal_minor, total_minor)"
            " SELECT $1, d.customer_id, d.subscription_id, d.period_start, d.period_end,"
            " d.currency, 'DRAFT', d.lines::jsonb, d.subtotal, d.total"
            " FROM unnest($2::uuid[], $3::uuid[], $4::timestamptz[], $5::timestamptz[],"
            " $6::text[], $7::text[], $8::bigint[], $9::bigint[])"
            " AS d(customer_id, subscription_id, period_start, period_end, currency, lines,"
            " subtotal, total)"
            # One order for every run, so that two inserting the same periods
            # queue on the unique key instead of deadlocking.
            " ORDER BY d.subscription_id, d.period_start"
            " ON CONFLICT DO NOTHING RETURNING id, subscription_id, period_start",
            tenant_id,
            [s.customer_id for s, _ in drafts],
            [s.id for s, _ in drafts],
            [d["period_start"] for _, d in drafts],
            [d["period_end"] for _, d in drafts],
            [d["currency"] for _, d in drafts],
            [json.dumps(d["lines"]) for _, d in drafts],
            [d["subtotal_minor"] for _, d in drafts],
            [d["total_minor"] for _, d in drafts],
        )
        return {(str(r["subscription_id"]), r["period_start"]): str(r["id"]) for r in rows}

    async def draft_ids(
        self, tenant_id: str, periods: Sequence[tuple[str, datetime]]
    ) -> dict[tuple[str, datetime], str]:
        """The ids of the drafts of these (subscription id, period start)."""
        rows = await self.pool.fetch(
            "SELECT id, subscription_id, period_start FROM billing.invoices"
            " WHERE tenant_id = $1 AND subscription_id = ANY($2::uuid[]) AND status = 'DRAFT'",
            tenant_id,
            list({subscription_id for subscription_id, _ in periods}),
        )
        wanted = set(periods)
        found = {(str(r["subscription_id"]), r["period_start"]): str(r["id"]) for r in rows}
        return {key: invoice_id for key, invoice_id in found.items() if key in wanted}

    async def due_drafts(
        self,
        tenant_id: str,
        ended_by: datetime,
        subscription_id: str = "",
        *,
        per_subscription: int | None = None,
        among: Sequence[str] | None = None,
    ) -> list[InvoiceRecord]:
        """The tenant's drafts (of one subscription, or of those `among`, when
        given) whose period ended at or before `ended_by`; at most
        `per_subscription` (the oldest) of each subscription."""
        which, chosen = _chosen_subscriptions("subscription_id", subscription_id, among)
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT *, row_number() OVER"
            "  (PARTITION BY subscription_id ORDER BY period_end, period_start) AS nth"
            "  FROM billing.invoices WHERE tenant_id = $1 AND status = 'DRAFT'"
            f"  AND period_end <= $2 AND {which}) d"
            " WHERE $4::int IS NULL OR nth <= $4 ORDER BY period_end, id",
            tenant_id,
            ended_by,
            chosen,
            per_subscription,
        )
        return [_invoice(r) for r in rows]

    # Periods that could not be invoiced (see migration 0004).

    async def open_failures(
        self,
        tenant_id: str,
        subscription_id: str = "",
        *,
        per_subscription: int,
        among: Sequence[str] | None = None,
    ) -> list[PeriodFailureRecord]:
        """The tenant's failed periods (of one subscription, or of those
        `among`, when given) that still have no invoice, at most
        `per_subscription` (the oldest) of each subscription. A failed draft is
        not here: it is due like any draft."""
        which, chosen = _chosen_subscriptions("f.subscription_id", subscription_id, among, "$2")
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT f.*, row_number() OVER"
            "  (PARTITION BY f.subscription_id ORDER BY f.period_start) AS nth"
            "  FROM billing.period_failures f"
            f"  WHERE f.tenant_id = $1 AND {which}"
            "  AND NOT EXISTS (SELECT 1 FROM billing.invoices i"
            "   WHERE i.subscription_id = f.subscription_id AND i.period_start = f.period_start)"
            " ) x WHERE nth <= $3 ORDER BY subscription_id, period_start",
            tenant_id,
            chosen,
            per_subscription,
        )
        return [_failure(r) for r in rows]

    async def record_failures(
        self, tenant_id: str, failures: Sequence[PeriodFailure], now: datetime
    ) -> set[tuple[str, datetime]]:
        """Records each failed period (or counts one more attempt of it);
        returns the (subscription id, period start) of those that are new or
        fail for a new reason now, the ones worth telling someone about. Of
        two runs recording the same new failure at once, one says it is new."""
        if not failures:
            return set()
        rows = await self.pool.fetch(
            "WITH new AS (SELECT * FROM unnest($2::uuid[], $3::timestamptz[],"
            "  $4::timestamptz[], $5::text[], $6::text[])"
            "  AS n(subscription_id, period_start, period_end, reason, cause)),"
            " old AS (SELECT f.subscription_id, f.period_start, f.reason"
            "  FROM billing.period_failures f JOIN new USING (subscription_id, period_start))"
            " INSERT INTO billing.period_failures AS p (tenant_id, subscription_id, period_start,"
            " period_end, reason, cause, first_failed_at, last_failed_at)"
            " SELECT $1, n.subscription_id, n.period_start, n.period_end, n.reason, n.cause, $7, $7"
            " FROM new n"
            " ON CONFLICT (subscription_id, period_start) DO UPDATE SET"
            " period_end = EXCLUDED.period_end, reason = EXCLUDED.reason,"
            " cause = EXCLUDED.cause, last_failed_at = EXCLUDED.last_failed_at,"
            " attempts = p.attempts + 1"
            " RETURNING p.subscription_id, p.period_start, p.reason, (p.xmax = 0) AS inserted,"
            " (SELECT o.reason FROM old o WHERE o.subscription_id = p.subscription_id"
            "  AND o.period_start = p.period_start) AS old_reason",
            tenant_id,
            [f.subscription_id for f in failures],
            [f.period_start for f in failures],
            [f.period_end for f in failures],
            [f.reason for f in failures],
            [f.cause for f in failures],
            now,
        )
        return {
            (str(r["subscription_id"]), r["period_start"])
            for r in rows
            if r["inserted"] or (r["old_reason"] is not None and r["old_reason"] != r["reason"])
        }

    async def clear_failures(
        self, tenant_id: str, periods: Sequence[tuple[str, datetime]]
    ) -> list[PeriodFailureRecord]:
        """Forgets the failures of these (subscription id, period start), now
        invoiced; returns the ones there were."""
        if not periods:
            return []
        rows = await self.pool.fetch(
            "DELETE FROM billing.period_failures f USING unnest($2::uuid[], $3::timestamptz[])"
            " AS k(subscription_id, period_start) WHERE f.tenant_id = $1"
            " AND f.subscription_id = k.subscription_id AND f.period_start = k.period_start"
            " RETURNING f.*",
            tenant_id,
            [subscription_id for subscription_id, _ in periods],
            [start for _, start in periods],
        )
        return [_failure(r) for r in rows]

    async def finalize_drafts(
        self,
        tenant_id: str,
        drafts: Sequence[tuple[str, dict[str, Any]]],
        now: datetime,
        attach: Attach | None = None,
        *,
        complete: Sequence[str] = (),
    ) -> list[tuple[str, str]]:
        """Finalizes the given (invoice id, draft) invoices that are still
        drafts, with the draft's lines and totals, in one transaction: each
        takes the tenant's next invoice number (gapless, in period order).
        Given `attach`, the LATE_USAGE lines waiting for each subscription go
        on its first invoice finalized here, and are marked billed by it, in
        the same transaction (so once, whoever finalizes). The periods of the
        invoices `complete` (priced after their backdating window closed) are
        recorded checked for late usage, with no line, in it too. Returns
        (invoice id, number) for each one this call finalized; an invoice
        that another run finalized meanwhile is left alone."""
        if not drafts:
            return []
        for attempt in range(_DEADLOCK_ATTEMPTS):
            try:
                return await self._finalize_drafts(tenant_id, drafts, now, attach, complete)
            except asyncpg.DeadlockDetectedError:
                # (Another run's draft inserts of the same periods, say: the
                # transaction was undone whole, so it is simply tried again.)
                if attempt == _DEADLOCK_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    async def _finalize_drafts(
        self,
        tenant_id: str,
        drafts: Sequence[tuple[str, dict[str, Any]]],
        now: datetime,
        attach: Attach | None,
        complete: Sequence[str],
    ) -> list[tuple[str, str]]:
        async with self.pool.acquire() as conn, conn.transaction():
            # Row locks in one order (period, id), so concurrent runs queue, not deadlock;
            # a row finalized while we waited no longer matches status = 'DRAFT'.
            locked = await conn.fetch(
                "SELECT id, subscription_id FROM billing.invoices"
                " WHERE tenant_id = $1 AND id = ANY($2::uuid[]) AND status = 'DRAFT'"
                " ORDER BY period_end, period_start, id FOR UPDATE",
                tenant_id,
                [invoice_id for invoice_id, _ in drafts],
            )
            if not locked:
                return []
            content = dict(drafts)
            ids = [str(r["id"]) for r in locked]
            numbers = await take_invoice_numbers(conn, tenant_id, len(ids))
            if attach is not None:
                await _reissued_late(conn, tenant_id, ids, content, attach)
                await _attach_late(conn, tenant_id, locked, content, attach)
            chosen = [content[invoice_id] for invoice_id in ids]
            await conn.execute(
                "UPDATE billing.invoices i SET status = 'FINALIZED', number = u.number,"
                " lines = u.lines::jsonb, subtotal_minor = u.subtotal, total_minor = u.total,"
                " finalized_at = $1, updated_at = now()"
                " FROM unnest($2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])"
                " AS u(id, number, lines, subtotal, total) WHERE i.id = u.id",
                now,
                ids,
                numbers,
                [json.dumps(d["lines"]) for d in chosen],
                [d["subtotal_minor"] for d in chosen],
                [d["total_minor"] for d in chosen],
            )
            wanted = set(complete)
            if done := [invoice_id for invoice_id in ids if invoice_id in wanted]:
                await conn.execute(
                    "INSERT INTO billing.late_usage_checks (tenant_id, subscription_id,"
                    " period_start, period_end, invoice_id, checked_at)"
                    " SELECT tenant_id, subscription_id, period_start, period_end, id, $2"
                    " FROM billing.invoices WHERE id = ANY($1::uuid[])"
                    " ORDER BY subscription_id, period_start ON CONFLICT DO NOTHING",
                    done,
                    now,
                )
        return list(zip(ids, numbers, strict=True))

    # Late usage (migration 0012).

    async def late_candidates(
        self,
        tenant_id: str,
        closed_by: datetime,
        *,
        among: Sequence[str],
        per_subscription: int,
    ) -> list[InvoiceRecord]:
        """The current (FINALIZED) invoices of the periods of these
        subscriptions that ended at or before `closed_by` and were never
        checked for late usage, at most `per_subscription` (the oldest) of
        each. A period whose invoice is void (or whose correction is still a
        draft) waits; an invoice of late-usage lines only (an empty period)
        is none."""
        rows = await self.pool.fetch(
            "SELECT * FROM (SELECT i.*, row_number() OVER"
            "  (PARTITION BY i.subscription_id ORDER BY i.period_start) AS nth"
            "  FROM billing.invoices i WHERE i.tenant_id = $1"
            "  AND i.subscription_id = ANY($3::uuid[]) AND i.status = 'FINALIZED'"
            "  AND i.period_end <= $2 AND i.period_end > i.period_start"
            "  AND NOT EXISTS (SELECT 1 FROM billing.late_usage_checks c"
            "   WHERE c.subscription_id = i.subscription_id AND c.period_start = i.period_start)"
            " ) x WHERE nth <= $4 ORDER BY period_end, period_start, id",
            tenant_id,
            closed_by,
            list(among),
            per_subscription,
        )
        return [_invoice(r) for r in rows]

    async def record_late_checks(
        self, tenant_id: str, checks: Sequence[LateCheck], now: datetime
    ) -> set[tuple[str, datetime]]:
        """Records each period as checked, with its LATE_USAGE line if any,
        unless it already is (another run checked it first: its result
        stands) or the invoice it was compared with is no longer FINALIZED
        (voided meanwhile: a reissue prices the period in full, and a later
        run compares with that). The compared invoice is locked FOR SHARE, so
        a void waits for this or this sees the void. Returns the (subscription
        id, period start) recorded now."""
        if not checks:
            return set()
        rows = await self.pool.fetch(
            "INSERT INTO billing.late_usage_checks (tenant_id, subscription_id, period_start,"
            " period_end, invoice_id, checked_at, line, amount_minor)"
            " SELECT $1, c.subscription_id, c.period_start, c.period_end, c.invoice_id, $7,"
            " c.line::jsonb, coalesce((c.line::jsonb ->> 'amount_minor')::bigint, 0)"
            " FROM unnest($2::uuid[], $3::timestamptz[], $4::timestamptz[], $5::uuid[],"
            " $6::text[]) AS c(subscription_id, period_start, period_end, invoice_id, line)"
            " JOIN billing.invoices i ON i.id = c.invoice_id AND i.tenant_id = $1"
            " AND i.status = 'FINALIZED'"
            " ORDER BY c.subscription_id, c.period_start FOR SHARE OF i"
            " ON CONFLICT DO NOTHING RETURNING subscription_id, period_start",
            tenant_id,
            [c.subscription_id for c in checks],
            [c.period_start for c in checks],
            [c.period_end for c in checks],
            [c.invoice_id for c in checks],
            [None if c.line is None else json.dumps(c.line) for c in checks],
            now,
        )
        return {(str(r["subscription_id"]), r["period_start"]) for r in rows}

    async def issue_late_invoices(
        self,
        tenant_id: str,
        subscriptions: Sequence[tuple[SubscriptionRecord, str]],
        now: datetime,
        attach: Attach,
    ) -> list[str]:
        """For each (ended subscription, currency) with LATE_USAGE lines
        waiting and nothing left to finalize (no draft, no failed period), an
        invoice of its own holding them: FINALIZED now, numbered, its period
        [now, now). The lines are marked billed by it in the same
        transaction. Returns the ids of the invoices issued."""
        if not subscriptions:
            return []
        chosen = {s.id: (s, currency) for s, currency in subscriptions}
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT c.subscription_id, c.period_start, c.line FROM billing.late_usage_checks c"
                " WHERE c.tenant_id = $1 AND c.subscription_id = ANY($2::uuid[])"
                " AND c.line IS NOT NULL AND c.billed_on_invoice_id IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM billing.invoices i"
                "  WHERE i.subscription_id = c.subscription_id AND i.status = 'DRAFT')"
                " AND NOT EXISTS (SELECT 1 FROM billing.period_failures f"
                "  WHERE f.subscription_id = c.subscription_id)"
                " ORDER BY c.subscription_id, c.period_start FOR UPDATE OF c",
                tenant_id,
                list(chosen),
            )
            waiting: dict[str, list[asyncpg.Record]] = {}
            for r in rows:
                waiting.setdefault(str(r["subscription_id"]), []).append(r)
            if not waiting:
                return []
            numbers = await take_invoice_numbers(conn, tenant_id, len(waiting))
            issued = []
            for n, (subscription_id, checks) in enumerate(waiting.items()):
                subscription, currency = chosen[subscription_id]
                content = attach(
                    {"lines": [], "subtotal_minor": 0, "total_minor": 0},
                    [r["line"] for r in checks],
                )
                new_id = await conn.fetchval(
                    "INSERT INTO billing.invoices (tenant_id, number, customer_id,"
                    " subscription_id, period_start, period_end, currency, status, lines,"
                    " subtotal_minor, total_minor, finalized_at, revision)"
                    " VALUES ($1, $2, $3, $4, $5, $5, $6, 'FINALIZED', $7, $8, $9, $5,"
                    # (A voided one of the same instant holds the revision before.)
                    " (SELECT coalesce(max(revision) + 1, 0) FROM billing.invoices"
                    "  WHERE subscription_id = $4 AND period_start = $5))"
                    " RETURNING id",
                    tenant_id,
                    numbers[n],
                    parse_uuid(subscription.customer_id, "customer_id"),
                    parse_uuid(subscription_id, "subscription_id"),
                    now,
                    currency,
                    content["lines"],
                    content["subtotal_minor"],
                    content["total_minor"],
                )
                await _mark_late_billed(conn, checks, str(new_id))
                issued.append(str(new_id))
            return issued

    async def late_checks(self, tenant_id: str, subscription_id: str) -> list[asyncpg.Record]:
        """A subscription's late-usage checks, oldest period first (for tests
        and operators)."""
        rows: list[asyncpg.Record] = await self.pool.fetch(
            "SELECT * FROM billing.late_usage_checks WHERE tenant_id = $1"
            " AND subscription_id = $2 ORDER BY period_start",
            tenant_id,
            parse_uuid(subscription_id, "subscription_id"),
        )
        return rows

    async def get_invoice(self, tenant_id: str, invoice_id: str) -> InvoiceRecord:
        return _invoice(await self._by_id("invoices", tenant_id, invoice_id, "id"))

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
            parse_uuid(customer_id, "customer_id") if customer_id else None,
            parse_uuid(subscription_id, "subscription_id") if subscription_id else None,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return [_invoice(r) for r in rows]

    async def void_invoice(
        self,
        tenant_id: str,
        invoice_id: str,
        replacement: dict[str, Any] | None,
        now: datetime,
    ) -> str:
        """Voids a finalized invoice and, given a `replacement` draft, inserts it
        as the period's next revision, linked both ways, in one transaction.
        Voiding a void invoice changes nothing, except that a replacement is
        issued for one that has none yet. Returns the status the invoice had;
        a draft is left alone."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM billing.invoices WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
                tenant_id,
                parse_uuid(invoice_id, "id"),
            )
            if row is None:
                raise NotFound(f"id: no invoice {invoice_id!r}")
            status = str(row["status"])
            if status == "DRAFT":
                return status
            if status == "FINALIZED":
                await conn.execute(
                    "UPDATE billing.invoices SET status = 'VOID', voided_at = $2,"
                    " updated_at = now() WHERE id = $1",
                    row["id"],
                    now,
                )
                # The late usage it carried is billed again, on the next invoice.
                await conn.execute(
                    "UPDATE billing.late_usage_checks SET billed_on_invoice_id = NULL"
                    " WHERE tenant_id = $1 AND billed_on_invoice_id = $2",
                    tenant_id,
                    row["id"],
                )
                # Its own period's late usage still waiting is not billed: the
                # period is either not billed at all now, or reissued in full.
                await _drop_waiting_late(conn, [row])
            if replacement is not None and row["replaced_by_id"] is None:
                new_id = await conn.fetchval(
                    "INSERT INTO billing.invoices (tenant_id, customer_id, subscription_id,"
                    " period_start, period_end, currency, status, lines, subtotal_minor,"
                    " total_minor, revision, replaces_id)"
                    " VALUES ($1, $2, $3, $4, $5, $6, 'DRAFT', $7, $8, $9, $10, $11) RETURNING id",
                    tenant_id,
                    row["customer_id"],
                    row["subscription_id"],
                    row["period_start"],
                    row["period_end"],
                    replacement["currency"],
                    replacement["lines"],
                    replacement["subtotal_minor"],
                    replacement["total_minor"],
                    row["revision"] + 1,
                    row["id"],
                )
                await conn.execute(
                    "UPDATE billing.invoices SET replaced_by_id = $2 WHERE id = $1",
                    row["id"],
                    new_id,
                )
            return status

    async def unpublished(
        self, tenant_id: str | None = None, limit: int = 500, message: str = "finalized"
    ) -> list[InvoiceRecord]:
        """Invoices (of one tenant, or of all) whose invoice.<message> is due and
        not yet published, oldest first."""
        due, published, order = _PUBLISHING[message]
        rows = await self.pool.fetch(
            f"SELECT * FROM billing.invoices WHERE {due} AND {published} IS NULL"
            f" AND ($1::text IS NULL OR tenant_id = $1) ORDER BY {order} LIMIT $2",
            tenant_id,
            limit,
        )
        return [_invoice(r) for r in rows]

    async def mark_published(self, invoice_ids: Sequence[str], message: str = "finalized") -> None:
        _, published, _ = _PUBLISHING[message]
        # Rows locked in id order: concurrent runs publishing the same invoices
        # (RunBillingCycle beside the scheduler) queue instead of deadlocking.
        await self.pool.execute(
            f"UPDATE billing.invoices i SET {published} = now() FROM (SELECT id FROM"
            " billing.invoices WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE) AS l"
            " WHERE i.id = l.id",
            list(invoice_ids),
        )

    @asynccontextmanager
    async def tenant_cycle_lock(self, tenant_id: str) -> AsyncIterator[bool]:
        """A session advisory lock on one tenant's billing cycle, so that one
        replica's scheduler runs it at a time while other replicas work on
        other tenants; yields whether this one got it. Keyed (namespace,
        tenant): two tenants whose hashes collide only take turns."""
        async with self.pool.acquire() as conn:
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock(hashtext('billing:cycle'), hashtext($1))", tenant_id
            )
            try:
                yield bool(got)
            finally:
                if got:
                    await conn.execute(
                        "SELECT pg_advisory_unlock(hashtext('billing:cycle'), hashtext($1))",
                        tenant_id,
                    )


async def _reissued_late(
    conn: Any,
    tenant_id: str,
    ids: Sequence[str],
    content: dict[str, dict[str, Any]],
    attach: Attach,
) -> None:
    """In the finalizing transaction, for drafts that reissue a period whose
    late usage was found (a voided invoice's correction, priced in full): a
    LATE_USAGE line already billed on a live invoice is taken back on the
    reissue (late.taken_back); one still waiting is dropped (the reissue
    bills that usage itself). Either way the period's late usage is billed
    once. Before `_attach_late`, which then no longer sees a dropped line."""
    rows = await conn.fetch(
        "SELECT i.id AS draft_id, c.subscription_id, c.period_start, c.line,"
        " c.billed_on_invoice_id, b.number AS carrier_number"
        " FROM billing.invoices i JOIN billing.late_usage_checks c"
        " ON c.subscription_id = i.subscription_id AND c.period_start = i.period_start"
        " LEFT JOIN billing.invoices b ON b.id = c.billed_on_invoice_id"
        " WHERE i.tenant_id = $1 AND i.id = ANY($2::uuid[]) AND c.line IS NOT NULL"
        " ORDER BY c.subscription_id, c.period_start FOR UPDATE OF c",
        tenant_id,
        list(ids),
    )
    dropped = []
    for r in rows:
        if r["billed_on_invoice_id"] is None:
            dropped.append(r)
        else:
            draft_id = str(r["draft_id"])
            content[draft_id] = attach(
                content[draft_id], [late.taken_back(r["line"], r["carrier_number"])]
            )
    await _drop_waiting_late(conn, dropped)


async def _drop_waiting_late(conn: Any, periods: Sequence[asyncpg.Record]) -> None:
    """Drops the LATE_USAGE lines still waiting (not yet billed) of these
    (subscription_id, period_start): their period is reissued in full, or
    no longer billed at all."""
    if periods:
        await conn.execute(
            "UPDATE billing.late_usage_checks c SET line = NULL, amount_minor = 0"
            " FROM unnest($1::uuid[], $2::timestamptz[]) AS k(subscription_id, period_start)"
            " WHERE c.subscription_id = k.subscription_id AND c.period_start = k.period_start"
            " AND c.line IS NOT NULL AND c.billed_on_invoice_id IS NULL",
            [r["subscription_id"] for r in periods],
            [r["period_start"] for r in periods],
        )


async def take_invoice_numbers(conn: Any, tenant_id: str, count: int) -> list[str]:
    """The tenant's next `count` invoice numbers (INV-000001 on), gapless:
    taken in the caller's transaction, so they are given back if it fails."""
    last: int = await conn.fetchval(
        "INSERT INTO billing.invoice_numbers (tenant_id, last_number) VALUES ($1, $2)"
        " ON CONFLICT (tenant_id) DO UPDATE"
        " SET last_number = billing.invoice_numbers.last_number + $2"
        " RETURNING last_number",
        tenant_id,
        count,
    )
    return [f"INV-{last - count + 1 + i:06d}" for i in range(count)]


async def _attach_late(
    conn: Any,
    tenant_id: str,
    locked: Sequence[asyncpg.Record],
    content: dict[str, dict[str, Any]],
    attach: Attach,
) -> None:
    """In the finalizing transaction: puts the LATE_USAGE lines waiting for
    the subscriptions of the `locked` drafts (in period order) on the first
    draft of each, in `content`, and marks them billed by it. Their rows are
    locked, so that two runs finalizing at once bill each line once."""
    first: dict[str, str] = {}
    for r in locked:
        first.setdefault(str(r["subscription_id"]), str(r["id"]))
    rows = await conn.fetch(
        "SELECT subscription_id, period_start, line FROM billing.late_usage_checks"
        " WHERE tenant_id = $1 AND subscription_id = ANY($2::uuid[])"
        " AND line IS NOT NULL AND billed_on_invoice_id IS NULL"
        " ORDER BY subscription_id, period_start FOR UPDATE",
        tenant_id,
        list(first),
    )
    waiting: dict[str, list[asyncpg.Record]] = {}
    for r in rows:
        waiting.setdefault(str(r["subscription_id"]), []).append(r)
    for subscription_id, checks in waiting.items():
        invoice_id = first[subscription_id]
        content[invoice_id] = attach(content[invoice_id], [r["line"] for r in checks])
        await _mark_late_billed(conn, checks, invoice_id)


async def _mark_late_billed(conn: Any, checks: Sequence[asyncpg.Record], invoice_id: str) -> None:
    await conn.execute(
        "UPDATE billing.late_usage_checks c SET billed_on_invoice_id = $3"
        " FROM unnest($1::uuid[], $2::timestamptz[]) AS k(subscription_id, period_start)"
        " WHERE c.subscription_id = k.subscription_id AND c.period_start = k.period_start",
        [r["subscription_id"] for r in checks],
        [r["period_start"] for r in checks],
        parse_uuid(invoice_id, "id"),
    )
