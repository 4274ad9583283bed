"""Credits' SQL (schema `billing`): credit types, grants, accounts, the ledger.
Every query filters on tenant_id. Every change of one customer's balance of
one type happens in a transaction holding that account's row lock, so two
replicas never record the same entry twice (the unique (entry_key, revision)
catches a bug that would)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.billing.domain.credits import (
    DEFICIT,
    WIDE,
    Draw,
    Entry,
    EntryKind,
    Grant,
    Rollover,
    ceil_day,
    debit,
    floor_day,
)
from services.billing.domain.fields import check_text, shown
from services.billing.domain.money import minor_units
from services.billing.domain.pricing import plain
from services.billing.store import SubscriptionRecord, take_invoice_numbers
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.ids import is_uuid, parse_uuid


@dataclass(frozen=True)
class CreditTypeRecord:
    id: str
    name: str
    kind: str  # CUSTOM or CURRENCY
    precision: int
    currency: str
    low_balance_threshold: Decimal | None
    created_at: datetime


@dataclass(frozen=True)
class GrantRecord:
    id: str
    customer_id: str
    credit_type_id: str
    amount: Decimal
    effective_at: datetime
    expires_at: datetime | None
    priority: int
    seq: int
    source: str
    description: str
    chain: str
    rollover: Rollover | None
    price_minor: int
    price_currency: str
    invoice_id: str
    subscription_id: str
    period_start: datetime | None

    def domain(self) -> Grant:
        return Grant(
            self.id,
            self.amount,
            self.effective_at,
            self.expires_at,
            self.priority,
            self.seq,
            self.chain,
            self.rollover,
        )


@dataclass(frozen=True)
class NewGrant:
    customer_id: str
    credit_type_id: str
    amount: Decimal
    effective_at: datetime
    expires_at: datetime | None
    priority: int
    source: str  # api, product, adjustment
    source_key: str
    description: str = ""
    chain: str = ""
    rollover: Rollover | None = None
    price_minor: int = 0
    price_currency: str = ""
    subscription_id: str | None = None
    period_start: datetime | None = None


@dataclass(frozen=True)
class AccountRecord:
    settled_until: datetime | None
    dirty_from: datetime | None
    state: dict[str, Decimal]
    balance: Decimal
    low_armed: bool
    reconciled_at: datetime | None = None


@dataclass(frozen=True)
class BalanceInputs:
    account: AccountRecord | None
    grants: list[GrantRecord]
    debits: list[Draw]  # from the account's settled point (or all, never settled)
    plans: list[tuple[SubscriptionRecord, str, dict[str, Any]]]
    overage: Decimal | None  # since the time asked, when asked


@dataclass(frozen=True)
class AdjustmentRecord:
    id: str
    seq: int
    customer_id: str
    credit_type_id: str
    amount: Decimal  # > 0 a credit, < 0 a debit
    effective_at: datetime
    reason: str
    entry_key: str  # the ledger entry answered for it ('' until entered)


@dataclass(frozen=True)
class LedgerRecord:
    id: str
    customer_id: str
    credit_type_id: str
    kind: EntryKind
    entry_key: str
    amount: Decimal
    balance_after: Decimal
    effective_at: datetime
    grant_id: str
    meter_id: str
    window_start: datetime | None
    window_end: datetime | None
    quantity: Decimal
    uncovered: Decimal
    description: str
    created_at: datetime


def _credit_type(r: asyncpg.Record) -> CreditTypeRecord:
    return CreditTypeRecord(
        str(r["id"]),
        r["name"],
        r["kind"],
        r["precision"],
        r["currency"],
        r["low_balance_threshold"],
        r["created_at"],
    )


def rollover_json(policy: Rollover | None) -> dict[str, Any] | None:
    if policy is None:
        return None
    cap = None if policy.cap is None else str(policy.cap)
    return {"percent": str(policy.percent), "cap": cap, "max": policy.max_rollovers}


def rollover_from(data: Any) -> Rollover | None:
    if data is None:
        return None
    if isinstance(data, str):
        data = json.loads(data)
    cap = data["cap"]
    return Rollover(Decimal(data["percent"]), None if cap is None else Decimal(cap), data["max"])


def _grant(r: asyncpg.Record) -> GrantRecord:
    return GrantRecord(
        id=str(r["id"]),
        customer_id=str(r["customer_id"]),
        credit_type_id=str(r["credit_type_id"]),
        amount=r["amount"],
        effective_at=r["effective_at"],
        expires_at=r["expires_at"],
        priority=r["priority"],
        seq=r["seq"],
        source=r["source"],
        description=r["description"],
        chain=r["chain"],
        rollover=rollover_from(r["rollover"]),
        price_minor=r["price_minor"],
        price_currency=r["price_currency"],
        invoice_id=str(r["invoice_id"] or ""),
        subscription_id=str(r["subscription_id"] or ""),
        period_start=r["period_start"],
    )


def _adjustment(r: asyncpg.Record) -> AdjustmentRecord:
    return AdjustmentRecord(
        id=str(r["id"]),
        seq=r["seq"],
        customer_id=str(r["customer_id"]),
        credit_type_id=str(r["credit_type_id"]),
        amount=r["amount"],
        effective_at=r["effective_at"],
        reason=r["reason"],
        entry_key=r["entry_key"],
    )


def debit_id(seq: int) -> str:
    """A debit's id in its ledger key: sorts in the order debits were made."""
    return f"{seq:019d}"


def _debit(seq: int, effective_at: datetime, amount: Decimal) -> Draw:
    return debit(debit_id(seq), effective_at, -amount)


def _ledger(r: asyncpg.Record) -> LedgerRecord:
    return LedgerRecord(
        id=str(r["id"]),
        customer_id=str(r["customer_id"]),
        credit_type_id=str(r["credit_type_id"]),
        kind=EntryKind(r["kind"]),
        entry_key=r["entry_key"],
        amount=r["amount"],
        balance_after=r["balance_after"],
        effective_at=r["effective_at"],
        grant_id=r["grant_id"],
        meter_id=r["meter_id"],
        window_start=r["window_start"],
        window_end=r["window_end"],
        quantity=r["quantity"],
        uncovered=r["uncovered"],
        description=r["description"],
        created_at=r["created_at"],
    )


def _json(data: Any) -> Any:
    # jsonb inside a row value (balance_inputs) may come as its text.
    return json.loads(data) if isinstance(data, str) else data


def _decimals(data: Any) -> dict[str, Decimal]:
    if isinstance(data, str):
        data = json.loads(data)
    return {k: Decimal(v) for k, v in data.items()}


def _texts(values: dict[str, Decimal]) -> dict[str, str]:
    # jsonb parameters are encoded by the pool's codec (services/common/db.py).
    return {k: str(v) for k, v in values.items()}


class CreditStore:
    def __init__(self, pool: asyncpg.Pool, reads: asyncpg.Pool | None = None) -> None:
        # `reads`: a pool for the request path's single-statement lookups
        # (db.create_pool(plain_reads=True): no reset round trip on release);
        # the main pool otherwise.
        self.pool = pool
        self.reads = reads or pool
        # Per account, this replica's callers of `locked` (see there): a lock
        # and how many hold or await it (dropped at none).
        self._accounts: dict[tuple[str, str, str], tuple[asyncio.Lock, list[int]]] = {}

    # Credit types.

    async def create_credit_type(
        self,
        tenant_id: str,
        name: str,
        kind: str,
        precision: int,
        currency: str,
        threshold: Decimal | None,
    ) -> CreditTypeRecord:
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO billing.credit_types (tenant_id, name, kind, precision, currency,"
                " low_balance_threshold) VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
                tenant_id,
                name,
                kind,
                precision,
                currency,
                threshold,
            )
        except asyncpg.UniqueViolationError as exc:
            raise AlreadyExists(f"name: a credit type named {name!r} already exists") from exc
        assert row is not None
        return _credit_type(row)

    async def get_credit_type(
        self, tenant_id: str, type_id: str, field: str = "credit_type_id"
    ) -> CreditTypeRecord:
        if not type_id:
            raise InvalidArgument(f"{field}: required")
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.credit_types WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            parse_uuid(type_id, field),
        )
        if row is None:
            raise NotFound(f"{field}: no credit type {type_id!r}")
        return _credit_type(row)

    async def credit_types(self, tenant_id: str) -> dict[str, CreditTypeRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.credit_types WHERE tenant_id = $1", tenant_id
        )
        return {str(r["id"]): _credit_type(r) for r in rows}

    async def list_credit_types(
        self, tenant_id: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[CreditTypeRecord]:
        rows = await self.pool.fetch(
            "SELECT * FROM billing.credit_types WHERE tenant_id = $1"
            " AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3::uuid))"
            " ORDER BY created_at, id LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else str(uuid.UUID(int=0)),
            limit,
        )
        return [_credit_type(r) for r in rows]

    # Customers, by id or by the external id events carry.

    async def customer(self, tenant_id: str, ref: str, field: str) -> tuple[str, str]:
        """(id, external id) of the tenant's customer `ref` (an id or an external
        id: at most 255 characters, as an external id is)."""
        check_text(field, ref, required=True)
        row = await self.pool.fetchrow(
            "SELECT id, external_id FROM billing.customers WHERE tenant_id = $1"
            " AND (id = $2::uuid OR external_id = $3) ORDER BY (id = $2::uuid) DESC LIMIT 1",
            tenant_id,
            ref if is_uuid(ref) else None,
            ref,
        )
        if row is None:
            raise NotFound(f"{field}: no customer {shown(ref)}")
        return str(row["id"]), row["external_id"]

    # Products' credits (the `credits` column of billing.products).

    async def set_product_credits(
        self, tenant_id: str, product_id: str, credits: dict[str, Any]
    ) -> None:
        await self.pool.execute(
            "UPDATE billing.products SET credits = $3 WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            uuid.UUID(product_id),
            credits,
        )

    async def product_credits(self, tenant_id: str, product_id: str = "") -> dict[str, Any]:
        """The credits JSON of the tenant's products (or of one) by product id."""
        rows = await self.reads.fetch(
            "SELECT id, credits FROM billing.products WHERE tenant_id = $1"
            " AND ($2::uuid IS NULL OR id = $2) AND credits <> '{}'::jsonb",
            tenant_id,
            uuid.UUID(product_id) if product_id else None,
        )
        return {str(r["id"]): r["credits"] for r in rows}

    async def subscriptions_of(
        self, tenant_id: str, product_ids: Sequence[str]
    ) -> list[SubscriptionRecord]:
        """The subscriptions to these products (those with credits), not the
        tenant's others: a tenant may have a million."""
        rows = await self.pool.fetch(
            "SELECT s.*, c.external_id FROM billing.subscriptions s"
            " JOIN billing.customers c ON c.id = s.customer_id"
            " WHERE s.tenant_id = $1 AND s.product_id = ANY($2::uuid[])"
            " ORDER BY s.start_time, s.id",
            tenant_id,
            [uuid.UUID(p) for p in product_ids],
        )
        return [_subscription(r) for r in rows]

    async def customer_plans(
        self, tenant_id: str, customer_id: str
    ) -> list[tuple[SubscriptionRecord, str, dict[str, Any]]]:
        """The customer's subscriptions, each with its product's billing
        interval and credits, in one query (the balance is on the request path)."""
        rows = await self.pool.fetch(
            "SELECT s.*, c.external_id, p.billing_interval, p.credits"
            " FROM billing.subscriptions s JOIN billing.customers c ON c.id = s.customer_id"
            " JOIN billing.products p ON p.id = s.product_id"
            " WHERE s.tenant_id = $1 AND s.customer_id = $2 ORDER BY s.start_time, s.id",
            tenant_id,
            uuid.UUID(customer_id),
        )
        return [(_subscription(r), r["billing_interval"], r["credits"]) for r in rows]

    async def balance_inputs(
        self, tenant_id: str, customer_id: str, type_id: str, overage_since: datetime | None
    ) -> BalanceInputs:
        """What a balance reads from PostgreSQL, in one statement (one round
        trip and one pooled connection: the balance is on the request path):
        the account, its grants, the customer's plans (as customer_plans) and,
        when `overage_since` is given, the overage entered since then."""
        row = await self.reads.fetchrow(
            "SELECT (SELECT a FROM billing.credit_accounts a WHERE a.tenant_id = $1"
            " AND a.customer_id = $2 AND a.credit_type_id = $3) AS account,"
            " ARRAY(SELECT g FROM billing.credit_grants g WHERE g.tenant_id = $1"
            " AND g.customer_id = $2 AND g.credit_type_id = $3 ORDER BY g.seq) AS grants,"
            # The debits a balance may replay: from the settled point (or the
            # earlier point a grant or debit dirtied) on; all when never settled.
            " ARRAY(SELECT (d.seq, d.effective_at, d.amount) FROM billing.credit_adjustments d"
            " WHERE d.tenant_id = $1 AND d.customer_id = $2 AND d.credit_type_id = $3"
            " AND d.amount < 0 AND d.effective_at >= coalesce((SELECT least(a.settled_until,"
            " a.dirty_from) FROM billing.credit_accounts a WHERE a.tenant_id = $1"
            " AND a.customer_id = $2 AND a.credit_type_id = $3), '-infinity')) AS debits,"
            " ARRAY(SELECT (s.id, s.tenant_id, s.customer_id, c.external_id, s.product_id,"
            " s.start_time, s.end_time, s.canceled_at, p.billing_interval, p.credits)"
            " FROM billing.subscriptions s JOIN billing.customers c ON c.id = s.customer_id"
            " JOIN billing.products p ON p.id = s.product_id"
            " WHERE s.tenant_id = $1 AND s.customer_id = $2 ORDER BY s.start_time, s.id) AS plans,"
            " CASE WHEN $4::timestamptz IS NOT NULL THEN (SELECT coalesce(sum(uncovered), 0)"
            " FROM billing.credit_ledger WHERE tenant_id = $1 AND customer_id = $2"
            " AND credit_type_id = $3 AND kind = 'OVERAGE' AND effective_at >= $4) END AS overage",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            overage_since,
        )
        assert row is not None
        plans = []
        for s in row["plans"]:  # anonymous records: by position, as selected
            record = SubscriptionRecord(
                id=str(s[0]),
                tenant_id=s[1],
                customer_id=str(s[2]),
                customer_external_id=s[3],
                product_id=str(s[4]),
                start_time=s[5],
                end_time=s[6],
                canceled_at=s[7],
            )
            plans.append((record, s[8], _json(s[9])))
        account = row["account"]
        return BalanceInputs(
            None if account is None else _account(account),
            [_grant(g) for g in row["grants"]],
            [_debit(*d) for d in row["debits"]],
            plans,
            row["overage"],
        )

    # Accounts and grants.

    @asynccontextmanager
    async def locked(
        self, tenant_id: str, customer_id: str, type_id: str
    ) -> AsyncIterator[tuple[Any, AccountRecord]]:
        """A transaction holding the account's row lock (created on first use).

        The callers of one account on this replica queue on an asyncio lock
        first, without a connection: only one per replica then holds a pooled
        connection while it waits for the row lock (which another replica
        may hold), so many concurrent calls for one account (debits, say)
        cannot take the whole pool and stall every tenant's database work.
        Under the lock, callers use `conn` only: never another pooled
        connection, which would wait for the pool while holding one."""
        key = (tenant_id, customer_id, type_id)
        lock, users = self._accounts.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock, self._locked(tenant_id, customer_id, type_id) as found:
                yield found
        finally:
            users[0] -= 1
            if not users[0]:
                del self._accounts[key]

    @asynccontextmanager
    async def _locked(
        self, tenant_id: str, customer_id: str, type_id: str
    ) -> AsyncIterator[tuple[Any, AccountRecord]]:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO billing.credit_accounts (tenant_id, customer_id, credit_type_id)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                tenant_id,
                uuid.UUID(customer_id),
                uuid.UUID(type_id),
            )
            row = await conn.fetchrow(
                "SELECT * FROM billing.credit_accounts WHERE tenant_id = $1 AND customer_id = $2"
                " AND credit_type_id = $3 FOR UPDATE",
                tenant_id,
                uuid.UUID(customer_id),
                uuid.UUID(type_id),
            )
            assert row is not None
            yield conn, _account(row)

    async def account(self, tenant_id: str, customer_id: str, type_id: str) -> AccountRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.credit_accounts WHERE tenant_id = $1 AND customer_id = $2"
            " AND credit_type_id = $3",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
        )
        return None if row is None else _account(row)

    async def accounts(self, tenant_id: str) -> list[tuple[str, str]]:
        """(customer id, credit type id) of every account the tenant has."""
        rows = await self.pool.fetch(
            "SELECT customer_id, credit_type_id FROM billing.credit_accounts WHERE tenant_id = $1",
            tenant_id,
        )
        return [(str(r["customer_id"]), str(r["credit_type_id"])) for r in rows]

    async def credit_tenant_ids(self) -> list[str]:
        """The tenants that have created a credit type, in id order."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT tenant_id FROM billing.credit_types ORDER BY tenant_id"
        )
        return [r["tenant_id"] for r in rows]

    async def account_marks(
        self, tenant_id: str
    ) -> dict[tuple[str, str], tuple[datetime | None, datetime | None, datetime | None]]:
        """(settled_until, dirty_from, reconciled_at) by (customer id, credit
        type id) of every account the tenant has."""
        rows = await self.pool.fetch(
            "SELECT customer_id, credit_type_id, settled_until, dirty_from, reconciled_at"
            " FROM billing.credit_accounts WHERE tenant_id = $1",
            tenant_id,
        )
        return {
            (str(r["customer_id"]), str(r["credit_type_id"])): (
                r["settled_until"],
                r["dirty_from"],
                r["reconciled_at"],
            )
            for r in rows
        }

    async def grant_by_key(self, tenant_id: str, source_key: str) -> GrantRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM billing.credit_grants WHERE tenant_id = $1 AND source_key = $2",
            tenant_id,
            source_key,
        )
        return None if row is None else _grant(row)

    async def insert_grant(
        self, conn: Any, tenant_id: str, account: AccountRecord, grant: NewGrant
    ) -> tuple[GrantRecord, bool]:
        """Inserts the grant and its GRANTED entry, once per source_key (on the
        account's locked connection); returns (grant, whether it is new)."""
        row = await conn.fetchrow(
            "INSERT INTO billing.credit_grants (tenant_id, customer_id, credit_type_id, amount,"
            " effective_at, expires_at, priority, source, source_key, description, chain,"
            " rollover, price_minor, price_currency, subscription_id, period_start)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,"
            " $16) ON CONFLICT (tenant_id, source_key) DO NOTHING RETURNING *",
            tenant_id,
            uuid.UUID(grant.customer_id),
            uuid.UUID(grant.credit_type_id),
            grant.amount,
            grant.effective_at,
            grant.expires_at,
            grant.priority,
            grant.source,
            grant.source_key,
            grant.description,
            grant.chain,
            rollover_json(grant.rollover),
            grant.price_minor,
            grant.price_currency,
            uuid.UUID(grant.subscription_id) if grant.subscription_id else None,
            grant.period_start,
        )
        if row is None:
            existing = await conn.fetchrow(
                "SELECT * FROM billing.credit_grants WHERE tenant_id = $1 AND source_key = $2",
                tenant_id,
                grant.source_key,
            )
            assert existing is not None
            return _grant(existing), False
        record = _grant(row)
        if grant.price_minor > 0:
            record = await self._top_up_invoice(conn, tenant_id, record, grant.description)
        kind = EntryKind.ADJUSTED if grant.source == "adjustment" else EntryKind.GRANTED
        entry = Entry(
            f"grant:{record.id}",
            kind,
            record.effective_at,
            record.amount,
            {record.id: record.amount},
            grant_id=record.id,
        )
        await self.append(
            conn, tenant_id, grant.customer_id, grant.credit_type_id, account, [entry],
            description=grant.description,
        )  # fmt: skip
        # Backdated (a product's period found late): settle again from it.
        await self.dirty(
            conn, tenant_id, grant.customer_id, grant.credit_type_id, account, record.effective_at
        )
        return record, True

    async def dirty(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        type_id: str,
        account: AccountRecord,
        at: datetime,
    ) -> None:
        """A change in effect from `at`: when the account is settled past it,
        the next pass settles again from it (dirty_from)."""
        if account.settled_until is None or at >= account.settled_until:
            return
        await conn.execute(
            "UPDATE billing.credit_accounts SET dirty_from = least(coalesce(dirty_from, $4),"
            " $4) WHERE tenant_id = $1 AND customer_id = $2 AND credit_type_id = $3",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            at,
        )

    # Adjustments (AdjustCredits): one per idempotency key, either sign.

    async def claim_adjustment(
        self,
        conn: Any,
        tenant_id: str,
        key: str,
        customer_id: str,
        type_id: str,
        amount: Decimal,
        at: datetime,
        reason: str,
    ) -> tuple[AdjustmentRecord, bool]:
        """Inserts the adjustment of idempotency key `key`, or finds the one
        that has it (a concurrent call with the key waits for the first to
        commit); returns (adjustment, whether it is new)."""
        row = await conn.fetchrow(
            "INSERT INTO billing.credit_adjustments (tenant_id, idempotency_key, customer_id,"
            " credit_type_id, amount, effective_at, reason) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING *",
            tenant_id,
            key,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            amount,
            at,
            reason,
        )
        if row is not None:
            return _adjustment(row), True
        row = await conn.fetchrow(
            "SELECT * FROM billing.credit_adjustments WHERE tenant_id = $1"
            " AND idempotency_key = $2",
            tenant_id,
            key,
        )
        assert row is not None
        return _adjustment(row), False

    async def set_adjustment_entry(self, conn: Any, adjustment_id: str, entry_key: str) -> None:
        await conn.execute(
            "UPDATE billing.credit_adjustments SET entry_key = $2 WHERE id = $1",
            uuid.UUID(adjustment_id),
            entry_key,
        )

    async def debits(self, conn: Any, tenant_id: str, customer_id: str, type_id: str) -> list[Draw]:
        """The account's debits, as draws (few: each is a manual call)."""
        rows = await conn.fetch(
            "SELECT seq, effective_at, amount FROM billing.credit_adjustments"
            " WHERE tenant_id = $1 AND customer_id = $2 AND credit_type_id = $3 AND amount < 0"
            " ORDER BY effective_at, seq",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
        )
        return [_debit(r["seq"], r["effective_at"], r["amount"]) for r in rows]

    async def first_entry(
        self, conn: Any, tenant_id: str, customer_id: str, type_id: str, entry_key: str
    ) -> LedgerRecord:
        """The first revision of an entry (what AdjustCredits answered)."""
        row = await conn.fetchrow(
            "SELECT * FROM billing.credit_ledger WHERE tenant_id = $1 AND customer_id = $2"
            " AND credit_type_id = $3 AND entry_key = $4 AND revision = 0",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            entry_key,
        )
        assert row is not None
        return _ledger(row)

    async def _top_up_invoice(
        self, conn: Any, tenant_id: str, grant: GrantRecord, description: str
    ) -> GrantRecord:
        """Issues the finalized one-off invoice of a priced grant, numbered in
        the tenant's sequence, in the grant's transaction (so both or neither)."""
        (number,) = await take_invoice_numbers(conn, tenant_id, 1)
        price = Decimal(grant.price_minor).scaleb(-minor_units(grant.price_currency))
        type_name = await conn.fetchval(
            "SELECT name FROM billing.credit_types WHERE tenant_id = $1 AND id = $2",
            tenant_id,
            uuid.UUID(grant.credit_type_id),
        )
        line = {
            "description": f"Credits top-up: {plain(grant.amount)} {type_name} credits"
            + (f" ({description})" if description else ""),
            "meter_id": "",
            "meter_name": "",
            "quantity": "1",
            "free_quantity": "0",
            "billable_quantity": "1",
            "unit_price": format(price, "f"),
            "amount_minor": grant.price_minor,
            "tiers": [],
        }
        invoice_id = await conn.fetchval(
            "INSERT INTO billing.invoices (tenant_id, number, customer_id, subscription_id,"
            " period_start, period_end, currency, status, lines, subtotal_minor, total_minor,"
            " finalized_at) VALUES ($1, $2, $3, NULL, $4, $4, $5, 'FINALIZED', $6, $7, $7,"
            " now()) RETURNING id",
            tenant_id,
            number,
            uuid.UUID(grant.customer_id),
            grant.effective_at,
            grant.price_currency,
            [line],
            grant.price_minor,
        )
        await conn.execute(
            "UPDATE billing.credit_grants SET invoice_id = $2 WHERE id = $1",
            uuid.UUID(grant.id),
            invoice_id,
        )
        return replace(grant, invoice_id=str(invoice_id))

    async def grants(
        self, tenant_id: str, customer_id: str, type_id: str, conn: Any = None
    ) -> list[GrantRecord]:
        rows = await (conn or self.pool).fetch(
            "SELECT * FROM billing.credit_grants WHERE tenant_id = $1 AND customer_id = $2"
            " AND credit_type_id = $3 ORDER BY seq",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
        )
        return [_grant(r) for r in rows]

    async def last_included(self, tenant_id: str) -> dict[tuple[str, str], datetime]:
        """The last period start granted per (subscription, credit type)."""
        rows = await self.pool.fetch(
            "SELECT subscription_id, credit_type_id, max(period_start) AS last"
            " FROM billing.credit_grants WHERE tenant_id = $1 AND source = 'product'"
            " GROUP BY subscription_id, credit_type_id",
            tenant_id,
        )
        return {(str(r["subscription_id"]), str(r["credit_type_id"])): r["last"] for r in rows}

    # The ledger.

    async def state_before(
        self, conn: Any, tenant_id: str, customer_id: str, type_id: str, at: datetime
    ) -> dict[str, Decimal]:
        """What each grant (and the deficit) had left before `at`: the sum of
        the allocations of the entries that took effect before it."""
        rows = await conn.fetch(
            "SELECT a.key, sum(a.value::numeric) AS left FROM billing.credit_ledger l,"
            " jsonb_each_text(l.allocations) a WHERE l.tenant_id = $1 AND l.customer_id = $2"
            " AND l.credit_type_id = $3 AND l.effective_at < $4 GROUP BY a.key",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            at,
        )
        return {r["key"]: r["left"] for r in rows if r["left"] != 0}

    async def derived_since(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        type_id: str,
        at: datetime,
        until: datetime | None = None,
    ) -> tuple[list[Entry], dict[str, int]]:
        """The derived entries (not grants) in effect from `at` (and before
        `until`: a debit's entry is entered when it is made, at a minute not
        settled yet), and the number of revisions recorded per entry key."""
        rows = await conn.fetch(
            "SELECT * FROM billing.credit_ledger WHERE tenant_id = $1 AND customer_id = $2"
            " AND credit_type_id = $3 AND effective_at >= $4 AND entry_key NOT LIKE 'grant:%'"
            " AND ($5::timestamptz IS NULL OR effective_at < $5) ORDER BY id",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            at,
            until,
        )
        revisions: dict[str, int] = {}
        entries = []
        for r in rows:
            revisions[r["entry_key"]] = max(revisions.get(r["entry_key"], 0), r["revision"] + 1)
            entries.append(
                Entry(
                    r["entry_key"],
                    EntryKind(r["kind"]),
                    r["effective_at"],
                    r["amount"],
                    _decimals(r["allocations"]),
                    grant_id=r["grant_id"],
                    meter_id=r["meter_id"],
                    quantity=r["quantity"],
                    uncovered=r["uncovered"],
                )
            )
        return entries, revisions

    async def append(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        type_id: str,
        account: AccountRecord,
        entries: Sequence[Entry],
        *,
        revisions: dict[str, int] | None = None,
        window: Any = None,
        description: str = "",
    ) -> Decimal:
        """Appends entries (balance_after running on from the account's
        balance) and stores the new balance; returns it. `window(entry)` gives
        a draw's (start, end)."""
        balance = account.balance
        revisions = revisions or {}
        rows = []
        for e in entries:
            balance = WIDE.add(balance, e.amount)  # exact, however large
            start, end = window(e) if window and e.meter_id else (None, None)
            rows.append(
                (
                    tenant_id,
                    uuid.UUID(customer_id),
                    uuid.UUID(type_id),
                    e.kind.value,
                    e.key,
                    revisions.get(e.key, 0),
                    e.amount,
                    balance,
                    e.at,
                    _texts(dict(e.allocations)),
                    e.grant_id,
                    e.meter_id,
                    start,
                    end,
                    e.quantity,
                    e.uncovered,
                    description,
                )
            )
        if rows:
            await conn.executemany(
                "INSERT INTO billing.credit_ledger (tenant_id, customer_id, credit_type_id, kind,"
                " entry_key, revision, amount, balance_after, effective_at, allocations,"
                " grant_id, meter_id, window_start, window_end, quantity, uncovered,"
                " description) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
                " $12, $13, $14, $15, $16, $17)",
                rows,
            )
            await conn.execute(
                "UPDATE billing.credit_accounts SET balance = $4 WHERE tenant_id = $1"
                " AND customer_id = $2 AND credit_type_id = $3",
                tenant_id,
                uuid.UUID(customer_id),
                uuid.UUID(type_id),
                balance,
            )
        return balance

    async def settled(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        type_id: str,
        until: datetime,
        state: dict[str, Decimal],
        reconciled_at: datetime | None = None,
    ) -> None:
        """Records the pass: settled to `until` with `state` there, and, when
        given, the time its days were compared with meter's."""
        await conn.execute(
            "UPDATE billing.credit_accounts SET settled_until = $4, state = $5,"
            " dirty_from = NULL, reconciled_at = coalesce($6, reconciled_at)"
            " WHERE tenant_id = $1 AND customer_id = $2 AND credit_type_id = $3",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            until,
            _texts(state),
            reconciled_at,
        )

    async def reconciled(
        self, conn: Any, tenant_id: str, customer_id: str, type_id: str, at: datetime
    ) -> None:
        await conn.execute(
            "UPDATE billing.credit_accounts SET reconciled_at = $4 WHERE tenant_id = $1"
            " AND customer_id = $2 AND credit_type_id = $3",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            at,
        )

    async def quantities_per_day(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        type_id: str,
        meter_id: str,
        start: datetime,
        end: datetime,
    ) -> dict[datetime, Decimal]:
        """The meter's quantity the ledger's draws hold over [start, end), per
        UTC day (keyed by its midnight): every revision of every DRAWN and
        OVERAGE entry (a minute's quantity is in exactly one of them, a
        zero-credit minute's too), so each minute counts as last settled. The
        whole days are read from their sums (credit_drawn_days, kept by a
        trigger on the ledger, migration 0011), a partial first and last day
        from the entries."""
        first, last = ceil_day(start), floor_day(end)  # the whole days: [first, last)
        if first > last:  # within one day
            first = last = end
        ledger = (
            "SELECT date_bin('1 day', effective_at, '2000-01-01 00:00:00+00') AS day, quantity"
            " FROM billing.credit_ledger WHERE tenant_id = $1 AND customer_id = $2"
            " AND credit_type_id = $3 AND meter_id = $4 AND kind IN ('DRAWN', 'OVERAGE')"
            " AND effective_at >= {lo} AND effective_at < {hi}"
        )
        rows = await conn.fetch(
            "SELECT day, sum(quantity) AS quantity FROM ("
            " SELECT day, quantity FROM billing.credit_drawn_days WHERE tenant_id = $1"
            " AND customer_id = $2 AND credit_type_id = $3 AND meter_id = $4"
            " AND day >= $7 AND day < $8"
            f" UNION ALL {ledger.format(lo='$5', hi='$7')}"
            f" UNION ALL {ledger.format(lo='$8', hi='$6')}"
            ") AS x GROUP BY 1",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            meter_id,
            start,
            end,
            first,
            last,
        )
        return {r["day"]: r["quantity"] for r in rows if r["quantity"] != 0}

    async def overage_since(
        self, tenant_id: str, customer_id: str, type_id: str, since: datetime
    ) -> Decimal:
        value = await self.reads.fetchval(
            "SELECT coalesce(sum(uncovered), 0) FROM billing.credit_ledger WHERE tenant_id = $1"
            " AND customer_id = $2 AND credit_type_id = $3 AND kind = 'OVERAGE'"
            " AND effective_at >= $4",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            since,
        )
        return Decimal(value)

    async def drawn(
        self,
        tenant_id: str,
        customer_id: str,
        type_id: str,
        meter_id: str,
        subscription_id: str,
        start: datetime,
        end: datetime,
    ) -> Decimal:
        """Credits of a type drawn for one meter's usage over [start, end)
        (whole minutes, within the subscription's time) by the subscription's
        price: the draws of minutes no other price of the meter drew (their
        key ends with the minute's "+00:00") and its own where others did
        (their key ends with its id; see domain.credits.draw_key)."""
        value = await self.pool.fetchval(
            "SELECT coalesce(sum(-amount), 0) FROM billing.credit_ledger WHERE tenant_id = $1"
            " AND customer_id = $2 AND credit_type_id = $3 AND meter_id = $4 AND kind = 'DRAWN'"
            " AND effective_at >= $6 AND effective_at < $7"
            " AND (entry_key LIKE '%+00:00' OR entry_key LIKE '%+00:00:' || $5)",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            meter_id,
            subscription_id,
            start,
            end,
        )
        return Decimal(value)

    async def ledger_page(
        self,
        tenant_id: str,
        *,
        customer_id: str | None,
        type_id: str | None,
        kind: str | None,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[LedgerRecord]:
        if after is not None and not after[1].isdigit():
            raise InvalidArgument("page_token: not a token this service issued")
        rows = await self.pool.fetch(
            "SELECT * FROM billing.credit_ledger WHERE tenant_id = $1"
            " AND ($2::uuid IS NULL OR customer_id = $2)"
            " AND ($3::uuid IS NULL OR credit_type_id = $3)"
            " AND ($4::text IS NULL OR kind = $4)"
            " AND ($5::timestamptz IS NULL OR effective_at >= $5)"
            " AND ($6::timestamptz IS NULL OR effective_at < $6)"
            " AND ($7::timestamptz IS NULL OR (created_at, id) > ($7, $8::bigint))"
            " ORDER BY created_at, id LIMIT $9",
            tenant_id,
            uuid.UUID(customer_id) if customer_id else None,
            uuid.UUID(type_id) if type_id else None,
            kind,
            start,
            end,
            after[0] if after else None,
            int(after[1]) if after else 0,
            limit,
        )
        return [_ledger(r) for r in rows]

    # Notifications (outbox: the ledger itself).

    async def unpublished(self, limit: int) -> list[tuple[str, LedgerRecord]]:
        """The first `limit` entries not published yet, in id order, plus the
        rest of the draw-down of each DRAWN one among them: the DRAWN entries
        of its account and minute recorded by the same pass (the same
        transaction, so the same created_at), which are one message."""
        rows = await self.pool.fetch(
            "WITH head AS (SELECT * FROM billing.credit_ledger WHERE published_at IS NULL"
            " ORDER BY id LIMIT $1)"
            " SELECT * FROM head UNION SELECT l.* FROM head h JOIN billing.credit_ledger l"
            " ON h.kind = 'DRAWN' AND l.kind = 'DRAWN' AND l.published_at IS NULL"
            " AND l.tenant_id = h.tenant_id AND l.customer_id = h.customer_id"
            " AND l.credit_type_id = h.credit_type_id AND l.effective_at = h.effective_at"
            " AND l.created_at = h.created_at ORDER BY id",
            limit,
        )
        return [(r["tenant_id"], _ledger(r)) for r in rows]

    async def mark_published(self, ids: Sequence[str]) -> None:
        await self.pool.execute(
            "UPDATE billing.credit_ledger SET published_at = now() WHERE id = ANY($1::bigint[])",
            [int(i) for i in ids],
        )

    async def last_entry_id(self, tenant_id: str, customer_id: str, type_id: str) -> int:
        value = await self.pool.fetchval(
            "SELECT coalesce(max(id), 0) FROM billing.credit_ledger WHERE tenant_id = $1"
            " AND customer_id = $2 AND credit_type_id = $3",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
        )
        return int(value)

    async def set_low_armed(
        self, tenant_id: str, customer_id: str, type_id: str, armed: bool
    ) -> bool:
        """Sets the account's low-balance flag; True when it changed."""
        status = await self.pool.execute(
            "UPDATE billing.credit_accounts SET low_armed = $4 WHERE tenant_id = $1"
            " AND customer_id = $2 AND credit_type_id = $3 AND low_armed <> $4",
            tenant_id,
            uuid.UUID(customer_id),
            uuid.UUID(type_id),
            armed,
        )
        return bool(status.endswith(" 1"))


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


def _account(r: asyncpg.Record) -> AccountRecord:
    return AccountRecord(
        r["settled_until"],
        r["dirty_from"],
        _decimals(r["state"]),
        r["balance"],
        r["low_armed"],
        r["reconciled_at"],
    )


__all__ = ["DEFICIT", "CreditStore"]
