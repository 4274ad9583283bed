"""Credits: credit types, grants (through the API and included in products'
periods), settlement of usage into the ledger, balances, notifications.

Settlement: for each customer's balance of a type, a pass (under the
account's row lock, so replicas and retries take turns) reads from meter the
usage per minute of every meter whose price draws that type, replays the
timeline with the pure domain (domain/credits.py) from a recheck point (the
last settled minute minus USAGEBILLING_CREDITS_RECHECK, or an earlier grant's
effective time), and records the difference between what the ledger says and
what it should say as new entries. A pass killed midway commits nothing; a
repeated pass finds no difference. Late events draw from the grants open at
their time and correct the later entries by new ones.

Reconciliation: events folded later than the recheck window (ingest accepts
them up to USAGEBILLING_BACKDATE_WINDOW back) are found by comparing, at most
once per USAGEBILLING_CREDITS_RECONCILE per account (reconciled_at, shared by
the replicas) and in the pass's transaction, meter's usage per UTC day (QueryUsage
DAY windows: meter's hour buckets, flat cost) with the quantity the ledger's
DRAWN and OVERAGE entries hold for the same minutes (each minute's quantity is
in exactly one of them per price that draws it, a zero-credit minute's too:
so meter's day is read over each price's own time and summed, a minute two
subscriptions' prices draw counting twice); the pass then replays
from the first day that differs. Billing reads usage from meter only. Exact for
COUNT and SUM meters, whose day is the sum of its minutes (other aggregations
are not compared: their late events beyond the recheck window are not drawn),
except for days whose changed minutes net to zero (negative values) and
negative minutes, which record no entry. Why not a change mark kept by meter:
it needs a write on meter's fold path for the days past both gates (which it
deliberately only reads) and a cursor exact against concurrent commits, for a
contract change; this costs one small read per account and meter a minute
(the ledger's side reads per-day sums kept by a trigger, migration 0011, and
the entries of the partial first and last days only).

The balance answer is the settled state plus the minutes since, read live from
meter and replayed the same way, so it shows an acknowledged event as soon as
meter has folded it; an event older than the recheck window shows once a
reconciliation has settled it (within USAGEBILLING_CREDITS_RECONCILE)."""

from __future__ import annotations

import asyncio
import decimal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.billing.convert import to_timedelta
from services.billing.credits_store import (
    AccountRecord,
    CreditStore,
    CreditTypeRecord,
    GrantRecord,
    LedgerRecord,
    NewGrant,
    debit_id,
)
from services.billing.domain.credits import (
    CLOCK_SKEW,
    MINUTE,
    WIDE,
    Draw,
    Entry,
    EntryKind,
    Grant,
    Overage,
    Rollover,
    available,
    ceil_minute,
    check_amount,
    check_grant_times,
    check_rate,
    corrections,
    coverage,
    draw_key,
    floor_day,
    floor_minute,
    merged,
    precision_of,
    replay,
    to_credits,
    total_drawn,
)
from services.billing.domain.fields import check_name, check_text
from services.billing.domain.invoice import InvoiceDraft, InvoiceLine, LineCredits
from services.billing.domain.late import BACKDATE_WINDOW
from services.billing.domain.money import minor_units
from services.billing.domain.periods import Interval, period_containing, period_start
from services.billing.domain.pricing import parse_decimal
from services.billing.store import BillingStore, SubscriptionRecord
from services.common.auth import on_behalf_of
from services.common.errors import AlreadyExists, InvalidArgument, Unavailable
from services.common.jetstream import BILLING_SUBJECT_PREFIX
from services.common.logs import get_logger
from usagebilling.billing.v1 import credit_pb2, product_pb2
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

log = get_logger(__name__)

RULES: Final = {
    credit_pb2.OVERAGE_RULE_FORGIVE: Overage.FORGIVE,
    credit_pb2.OVERAGE_RULE_BILL: Overage.BILL,
    credit_pb2.OVERAGE_RULE_DEFICIT: Overage.DEFICIT,
}
MAX_INCLUDED: Final = 10
MAX_PRIORITY: Final = 1000
# Periods of one subscription granted per pass at most (catch-up is bounded).
CATCHUP: Final = 31
PUBLISH_BATCH: Final = 500
# Entries of each per-replica cache of immutable records (emptied when full).
CACHE_SIZE: Final = 100_000
PUBLISH_TIMEOUT: Final = 10.0
# Aggregations whose value over a range is the sum of its minutes' values.
ADDITIVE: Final = frozenset({meter_pb2.AGGREGATION_COUNT, meter_pb2.AGGREGATION_SUM})
DAY: Final = timedelta(days=1)


@dataclass(frozen=True)
class CreditPrice:
    """A usage price that draws credits, for one subscription's time."""

    meter_id: str
    credit_type_id: str
    rate: Decimal
    rule: Overage
    start: datetime
    end: datetime | None
    subscription_id: str = ""


@dataclass(frozen=True)
class CreditUse:
    """What credits did for one usage line of one period's invoice."""

    type_name: str
    consumed: Decimal  # the meter's quantity in the period
    covered: Decimal  # the part of it credits covered
    drawn: Decimal  # credits drawn for it
    billable: Decimal  # the part billed (BILL), priced as the line's quantity
    rule: Overage
    type_id: str = ""
    rate: Decimal = Decimal(1)  # credits per unit of the meter


# (subscription id, period start) and (subscription id, period start, meter id).
PeriodKey = tuple[str, datetime]
LineKey = tuple[str, datetime, str]


def annotate_lines(drafts: dict[PeriodKey, InvoiceDraft], uses: dict[LineKey, CreditUse]) -> None:
    """Shows credits on the usage lines that drew them: quantity is what was
    consumed, free_quantity includes what credits covered (and, under
    FORGIVE/DEFICIT, the rest, which is not billed), billable_quantity and the
    amount are the billed overage; `credits` has each figure in its own field
    (InvoiceLineCredits) and the description says it in words."""
    for key, draft in list(drafts.items()):
        lines = []
        for line in draft.lines:
            use = uses.get((key[0], key[1], line.meter_id)) if line.meter_id else None
            if use is None:
                lines.append(line)
                continue
            unbilled = use.consumed - use.billable
            lines.append(
                replace(
                    line,
                    quantity=use.consumed,
                    free_quantity=line.free_quantity + unbilled,
                    credits=LineCredits(
                        credit_type_id=use.type_id,
                        credit_type_name=use.type_name,
                        credit_rate=use.rate,
                        credits_drawn=use.drawn,
                        quantity_covered=use.covered,
                        overage_quantity=use.consumed - use.covered,
                        overage_rule=use.rule.value,
                        billable_overage_quantity=use.billable,
                        overage_amount_minor=line.amount_minor,
                    ),
                    description=_credit_description(line, use),
                )
            )
        drafts[key] = replace(draft, lines=tuple(lines))


def _credit_description(line: InvoiceLine, use: CreditUse) -> str:
    """A credit line's description: the usage, what credits covered, and the
    billed overage priced as the line's own description prices it (its text
    after "billable": " × 0.1", the tiers, packages or fees), e.g. "tokens:
    19 consumed, 10 covered by 10 TOKENS credits, 9 beyond them (BILL: 9
    billed × 0.1)". The line was priced on the billed overage alone, so its
    own first clause ("9 consumed, 0 free, 9 billable") would contradict it."""
    prefix = f"{line.meter_name}: "
    body = line.description.removeprefix(prefix)
    cut = body.find(" billable")
    priced = body[cut + len(" billable") :] if cut >= 0 else ""
    return (
        f"{prefix}{_text(use.consumed)} consumed, {_text(use.covered)} covered by "
        f"{_text(use.drawn)} {use.type_name} credits, {_text(use.consumed - use.covered)}"
        f" beyond them ({use.rule.value}: {_text(use.billable)} billed{priced})"
    )


@dataclass(frozen=True)
class _Hint:
    """What an account's last balance needed: the meters it drew from (read
    from meter at once the next time) and its period's start (the overage
    since then is read with the account)."""

    meters: tuple[str, ...]
    period_start: datetime


@dataclass(frozen=True)
class Balance:
    available: Decimal
    grants: list[tuple[Grant, Decimal]]
    next_expiry: datetime | None
    overage: Decimal
    settled_until: datetime | None


# --- products: validation of the request's credit fields ---


def _rollover(message: credit_pb2.RolloverPolicy, at: str, precision: int) -> Rollover | None:
    percent = parse_decimal(message.percent, f"{at}.percent")
    if not 0 <= percent <= 100:
        raise InvalidArgument(f"{at}.percent: must be within [0, 100]")
    if percent == 0:
        return None
    cap = None
    if message.cap:
        cap = check_amount(parse_decimal(message.cap, f"{at}.cap"), precision, f"{at}.cap")
    if not 1 <= message.max_rollovers <= 100:
        raise InvalidArgument(f"{at}.max_rollovers: must be 1 to 100")
    return Rollover(percent, cap, message.max_rollovers)


def _priority(value: int, field: str) -> int:
    if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgument(f"{field}: must be within [-{MAX_PRIORITY}, {MAX_PRIORITY}]")
    return value


async def product_credits(
    store: CreditStore, tenant_id: str, request: product_pb2.CreateProductRequest
) -> dict[str, Any]:
    """The product's credits as stored (see migration 0006), validated; {} for none."""
    if len(request.included_credits) > MAX_INCLUDED:
        raise InvalidArgument(f"included_credits: at most {MAX_INCLUDED}")
    types = await store.credit_types(tenant_id)

    def credit_type(type_id: str, field: str) -> CreditTypeRecord:
        if not type_id:
            raise InvalidArgument(f"{field}: required")
        if type_id not in types:
            raise InvalidArgument(f"{field}: no credit type {type_id!r}")
        return types[type_id]

    included: list[dict[str, Any]] = []
    for i, item in enumerate(request.included_credits):
        at = f"included_credits[{i}]"
        kind = credit_type(item.credit_type_id, f"{at}.credit_type_id")
        if any(x["credit_type_id"] == item.credit_type_id for x in included):
            raise InvalidArgument(f"{at}.credit_type_id: included twice")
        amount = check_amount(
            parse_decimal(item.amount, f"{at}.amount", allow_empty=False),
            kind.precision,
            f"{at}.amount",
        )
        policy = (
            _rollover(item.rollover, f"{at}.rollover", kind.precision)
            if item.HasField("rollover")
            else None
        )
        included.append(
            {
                "credit_type_id": item.credit_type_id,
                "amount": str(amount),
                "rollover": None
                if policy is None
                else {
                    "percent": str(policy.percent),
                    "cap": None if policy.cap is None else str(policy.cap),
                    "max": policy.max_rollovers,
                },
                "priority": _priority(item.priority, f"{at}.priority"),
            }
        )
    prices: dict[str, dict[str, str]] = {}
    for i, price in enumerate(request.usage_prices):
        at = f"usage_prices[{i}]"
        if not price.credit_type_id:
            if price.credit_rate or price.overage_rule:
                given = "credit_rate" if price.credit_rate else "overage_rule"
                raise InvalidArgument(
                    f"{at}.credit_type_id: required with {given} (a price draws credits"
                    " with credit_type_id, credit_rate and overage_rule, all three)"
                )
            continue
        credit_type(price.credit_type_id, f"{at}.credit_type_id")
        rate = check_rate(
            parse_decimal(price.credit_rate, f"{at}.credit_rate", allow_empty=False),
            f"{at}.credit_rate",
        )
        if price.overage_rule not in RULES:
            raise InvalidArgument(f"{at}.overage_rule: an OVERAGE_RULE_* value is required")
        prices[price.meter_id] = {
            "credit_type_id": price.credit_type_id,
            "rate": str(rate),
            "overage_rule": RULES[price.overage_rule].value,
        }
    if not included and not prices:
        return {}
    return {"included": included, "prices": prices}


def decorate_product(product: product_pb2.Product, credits: dict[str, Any]) -> None:
    """Adds the stored credits to a Product message."""
    rules = {v.value: k for k, v in RULES.items()}
    for price in product.usage_prices:
        found = credits.get("prices", {}).get(price.meter_id)
        if found:
            price.credit_type_id = found["credit_type_id"]
            price.credit_rate = found["rate"]
            price.overage_rule = rules[found["overage_rule"]]  # type: ignore[assignment]
    for item in credits.get("included", []):
        message = product.included_credits.add(
            credit_type_id=item["credit_type_id"], amount=item["amount"], priority=item["priority"]
        )
        if item["rollover"]:
            message.rollover.percent = item["rollover"]["percent"]
            message.rollover.cap = item["rollover"]["cap"] or ""
            message.rollover.max_rollovers = item["rollover"]["max"]


# --- meter: usage per minute ---


Minutes = dict[datetime, Decimal]  # one customer's usage of one meter per minute


class MinuteUsage:
    """Reads one customer's usage of one meter per minute from meter."""

    def __init__(self, channel: grpc.aio.Channel, service_token: str) -> None:
        self._stub = meter_pb2_grpc.MeterServiceStub(channel)
        self._token = service_token
        self._additive: dict[tuple[str, str], bool] = {}  # by (tenant id, meter id)

    async def read(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> Minutes:
        return await self._windows(
            tenant_id, meter_id, customer, start, end, meter_pb2.WINDOW_SIZE_MINUTE
        )

    async def days(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> dict[datetime, Decimal]:
        """One customer's usage of one meter over [start, end) per UTC day
        (the first and last clipped to the range), keyed by the day's
        midnight; days of no usage left out. Flat cost: meter reads its
        hour buckets."""
        found = await self._windows(
            tenant_id, meter_id, customer, start, end, meter_pb2.WINDOW_SIZE_DAY
        )
        return {floor_day(start): value for start, value in found.items()}

    async def _windows(
        self,
        tenant_id: str,
        meter_id: str,
        customer: str,
        start: datetime,
        end: datetime,
        size: meter_pb2.WindowSize.ValueType,
    ) -> dict[datetime, Decimal]:
        """The usage per window (UTC) by window start; windows of none left out."""
        request = meter_pb2.QueryUsageRequest(
            meter_id=meter_id, customer_id=customer, window_size=size
        )
        request.start_time.FromDatetime(start)
        request.end_time.FromDatetime(end)
        try:
            answer = await self._stub.QueryUsage(
                request, metadata=on_behalf_of(self._token, tenant_id), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"meter service: {exc.code().name}: {exc.details()}") from exc
        found: dict[datetime, Decimal] = {}
        for row in answer.rows:
            value = Decimal(row.value)
            if value:
                found[row.window_start.ToDatetime(tzinfo=UTC)] = value
        return found

    async def additive(self, tenant_id: str, meter_id: str) -> bool:
        """Whether the meter's value over a day is the sum of its minutes'
        (COUNT, SUM): only then can a day total tell a missed minute."""
        key = (tenant_id, meter_id)
        if (found := self._additive.get(key)) is None:  # an aggregation never changes
            try:
                meter = await self._stub.GetMeter(
                    meter_pb2.GetMeterRequest(id=meter_id),
                    metadata=on_behalf_of(self._token, tenant_id),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                raise Unavailable(f"meter service: {exc.code().name}: {exc.details()}") from exc
            found = meter.aggregation in ADDITIVE
            if len(self._additive) >= CACHE_SIZE:
                self._additive.clear()
            self._additive[key] = found
        return found


# --- the service ---


class Credits:
    def __init__(
        self,
        store: CreditStore,
        billing: BillingStore,
        usage: MinuteUsage,
        js: Any = None,
        *,
        lag: timedelta = timedelta(seconds=5),
        recheck: timedelta = timedelta(hours=1),
        interval: timedelta = timedelta(seconds=1),
        reconcile: timedelta = timedelta(minutes=1),
        backdate: timedelta = BACKDATE_WINDOW,
    ) -> None:
        self._store = store
        self._billing = billing
        self._usage = usage
        self._js = js
        self._lag = lag
        self._recheck = recheck
        self._reconcile = reconcile
        self._backdate = backdate
        self._interval = interval.total_seconds()
        # Never change once created (no API updates them): remembered per replica.
        self._customers: dict[tuple[str, str], tuple[str, str]] = {}
        self._types: dict[tuple[str, str], CreditTypeRecord] = {}
        # Per account, what its last balance needed (a hint, checked each time).
        self._hints: dict[tuple[str, str, str], _Hint] = {}

    # Credit types.

    async def create_type(
        self, tenant_id: str, request: credit_pb2.CreateCreditTypeRequest
    ) -> CreditTypeRecord:
        check_name("name", request.name)
        if request.kind == credit_pb2.CREDIT_UNIT_KIND_CUSTOM:
            if request.currency:
                raise InvalidArgument("currency: must be empty for CREDIT_UNIT_KIND_CUSTOM")
            kind, currency = "CUSTOM", ""
        elif request.kind == credit_pb2.CREDIT_UNIT_KIND_CURRENCY:
            minor_units(request.currency)
            kind, currency = "CURRENCY", request.currency
        else:
            raise InvalidArgument("kind: a CREDIT_UNIT_KIND_* value is required")
        precision = precision_of(kind, request.precision, currency)
        threshold = None
        if request.low_balance_threshold:
            threshold = check_amount(
                parse_decimal(request.low_balance_threshold, "low_balance_threshold"),
                precision,
                "low_balance_threshold",
                sign="0+",
            )
        return await self._store.create_credit_type(
            tenant_id, request.name, kind, precision, currency, threshold
        )

    # Grants.

    async def grant(
        self, tenant_id: str, request: credit_pb2.GrantCreditsRequest, now: datetime
    ) -> GrantRecord:
        """A grant through the API. The same idempotency_key with the same
        request answers the first grant (whenever it is repeated: its
        effective time may have passed since); with another customer, credit
        type, amount, priority, time, description or price it is
        ALREADY_EXISTS naming idempotency_key."""
        check_text("idempotency_key", request.idempotency_key, required=True)
        check_text("description", request.description, required=False)
        customer_id, _ = await self._store.customer(tenant_id, request.customer_id, "customer_id")
        kind = await self._store.get_credit_type(tenant_id, request.credit_type_id)
        amount = check_amount(
            parse_decimal(request.amount, "amount", allow_empty=False), kind.precision, "amount"
        )
        priority = _priority(request.priority, "priority")
        if request.price_minor < 0:
            raise InvalidArgument("price_minor: must not be negative")
        if request.price_minor:
            minor_units(request.price_currency, field="price_currency")
        elif request.price_currency:
            raise InvalidArgument("price_minor: required with price_currency")
        given = None
        if request.HasField("effective_time"):
            given = _time(request.effective_time, "effective_time")
        expire_time = None
        if request.HasField("expire_time"):
            expire_time = _time(request.expire_time, "expire_time")
        after = None
        if request.HasField("expire_after"):
            after = to_timedelta(request.expire_after, "expire_after")
        source_key = f"api:{request.idempotency_key}"
        if (found := await self._store.grant_by_key(tenant_id, source_key)) is not None:
            # A retry: compared with the first grant before the checks that
            # depend on now (its effective time may be past by now).
            _check_same_grant(found, customer_id, kind.id, amount, priority, request, given,
                              expire_time, after)  # fmt: skip
            return found
        effective, expires = check_grant_times(now, given, expire_time, after)
        new = NewGrant(
            customer_id=customer_id,
            credit_type_id=kind.id,
            amount=amount,
            effective_at=effective,
            expires_at=expires,
            priority=priority,
            source="api",
            source_key=source_key,
            description=request.description,
            price_minor=request.price_minor,
            price_currency=request.price_currency,
        )
        async with self._store.locked(tenant_id, customer_id, kind.id) as (conn, account):
            record, created = await self._store.insert_grant(conn, tenant_id, account, new)
        if not created:  # a concurrent call with the same key made it
            _check_same_grant(record, customer_id, kind.id, amount, priority, request, given,
                              expire_time, after)  # fmt: skip
        return record

    async def adjust(
        self, tenant_id: str, request: credit_pb2.AdjustCreditsRequest, now: datetime
    ) -> LedgerRecord:
        """A manual credit (amount > 0: a grant that never expires, effective
        at the next whole minute) or debit (amount < 0, at the current whole
        minute), each entered as one ADJUSTED entry; answers that entry. A
        debit takes from the grants open at its minute in draw order, after
        that minute's usage; what they lack is a deficit, repaid first by the
        next grant (whatever the prices' overage rule). The same
        idempotency_key answers the first entry; with another customer,
        credit type or amount it is ALREADY_EXISTS naming idempotency_key."""
        check_text("reason", request.reason, required=True)
        check_text("idempotency_key", request.idempotency_key, required=True)
        customer_id, external_id = await self._store.customer(
            tenant_id, request.customer_id, "customer_id"
        )
        kind = await self._store.get_credit_type(tenant_id, request.credit_type_id)
        amount = check_amount(
            parse_decimal(request.amount, "amount", allow_empty=False),
            kind.precision,
            "amount",
            sign="!0",
        )
        at = ceil_minute(now) if amount > 0 else floor_minute(now)
        # Read before the lock: the locked transaction holds a pooled
        # connection, and awaiting another one under it deadlocks once
        # concurrent callers hold the whole pool waiting for this lock.
        prices = (
            [
                p
                for _, _, p in await self.prices_of(tenant_id, customer_id)
                if p.credit_type_id == kind.id
            ]
            if amount < 0
            else []
        )
        async with self._store.locked(tenant_id, customer_id, kind.id) as (conn, account):
            adjustment, new = await self._store.claim_adjustment(
                conn, tenant_id, request.idempotency_key, customer_id, kind.id, amount, at,
                request.reason,
            )  # fmt: skip
            if not new:
                if (adjustment.customer_id, adjustment.credit_type_id, adjustment.amount) != (
                    customer_id,
                    kind.id,
                    amount,
                ):
                    raise AlreadyExists(
                        "idempotency_key: already used for an adjustment of "
                        f"{_text(adjustment.amount)} credits of type {adjustment.credit_type_id}"
                        f" to customer {adjustment.customer_id}"
                    )
                return await self._store.first_entry(
                    conn, tenant_id, customer_id, kind.id, adjustment.entry_key
                )
            if amount > 0:
                record, _ = await self._store.insert_grant(
                    conn,
                    tenant_id,
                    account,
                    NewGrant(
                        customer_id=customer_id,
                        credit_type_id=kind.id,
                        amount=amount,
                        effective_at=at,
                        expires_at=None,
                        priority=0,
                        source="adjustment",
                        source_key=f"adjust:{request.idempotency_key}",
                        description=request.reason,
                    ),
                )
                entry_key = f"grant:{record.id}"
            else:
                entry = await self._debit_entry(
                    conn, tenant_id, customer_id, external_id, kind, account, adjustment.seq,
                    prices,
                )  # fmt: skip
                await self._store.append(
                    conn, tenant_id, customer_id, kind.id, account, [entry],
                    description=request.reason,
                )  # fmt: skip
                await self._store.dirty(conn, tenant_id, customer_id, kind.id, account, at)
                entry_key = entry.key
            await self._store.set_adjustment_entry(conn, adjustment.id, entry_key)
            return await self._store.first_entry(conn, tenant_id, customer_id, kind.id, entry_key)

    async def _debit_entry(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        external_id: str,
        kind: CreditTypeRecord,
        account: AccountRecord,
        seq: int,
        prices: Sequence[CreditPrice],
    ) -> Entry:
        """The entry of a new debit (already inserted, on the account's locked
        connection): the replay from the account's settled point through the
        debit's minute, with the usage metered since, as the balance and the
        settlement pass replay it. A later pass corrects it by a new entry if
        late usage before it changes which grants it took from. `prices`: the
        account's, read before the lock (nothing here takes another pooled
        connection)."""
        grants = await self._store.grants(tenant_id, customer_id, kind.id, conn)
        debits = await self._store.debits(conn, tenant_id, customer_id, kind.id)
        mine = next(d for d in debits if d.key == f"debit:{debit_id(seq)}")
        start, state = account.settled_until, account.state
        if start is None:
            start = min([g.effective_at for g in grants] + [p.start for p in prices] + [mine.at])
            state = {}
        if account.dirty_from is not None:
            start = min(start, account.dirty_from)
        start = min(start, mine.at)
        if start != account.settled_until:
            state = await self._store.state_before(conn, tenant_id, customer_id, kind.id, start)
        until = mine.at + MINUTE
        draws = await self._draws(tenant_id, external_id, prices, start, until, kind.precision)
        domain = [g.domain() for g in grants]
        entries, _ = replay(domain, draws + debits, state, start, until, kind.precision)
        return next(e for e in entries if e.key == mine.key)

    async def grant_included(
        self,
        tenant_id: str,
        now: datetime,
        subscriptions: Sequence[SubscriptionRecord],
        credits: dict[str, Any] | None = None,
    ) -> int:
        """Grants every product's included credits for each period of each
        subscription that has started by `now` (at most CATCHUP periods per
        subscription and type per pass); once each, by source key. `credits`:
        the products' credits, when read already."""
        if credits is None:
            credits = await self._store.product_credits(tenant_id)
        if not any(c.get("included") for c in credits.values()):
            return 0
        products = {p.id: p for p in await self._billing.products_of(tenant_id)}
        last = await self._store.last_included(tenant_id)
        granted = 0
        for subscription in subscriptions:
            product = products[subscription.product_id]
            for item in credits.get(product.id, {}).get("included", []):
                type_id = item["credit_type_id"]
                since = last.get((subscription.id, type_id))
                for start, end in _periods(
                    subscription, Interval[product.billing_interval], since, now
                ):
                    granted += await self._grant_period(tenant_id, subscription, item, start, end)
        return granted

    async def _grant_period(
        self,
        tenant_id: str,
        subscription: SubscriptionRecord,
        item: dict[str, Any],
        start: datetime,
        end: datetime,
    ) -> int:
        # Floors, not ceilings: one period's grant then expires exactly when
        # the next one takes effect, so that rollover finds it.
        effective, expires = floor_minute(start), floor_minute(end)
        if expires <= effective:
            return 0
        type_id = item["credit_type_id"]
        policy = item["rollover"]
        new = NewGrant(
            customer_id=subscription.customer_id,
            credit_type_id=type_id,
            amount=Decimal(item["amount"]),
            effective_at=effective,
            expires_at=expires,
            priority=item["priority"],
            source="product",
            source_key=f"product:{subscription.id}:{type_id}:{start.isoformat()}",
            description="included credits",
            chain=f"{subscription.id}:{type_id}",
            rollover=None
            if policy is None
            else Rollover(
                Decimal(policy["percent"]),
                None if policy["cap"] is None else Decimal(policy["cap"]),
                policy["max"],
            ),
            subscription_id=subscription.id,
            period_start=start,
        )
        async with self._store.locked(tenant_id, subscription.customer_id, type_id) as (
            conn,
            account,
        ):
            _, new_grant = await self._store.insert_grant(conn, tenant_id, account, new)
        return int(new_grant)

    # Prices that draw credits.

    async def prices_of(
        self,
        tenant_id: str,
        customer_id: str = "",
        *,
        subscriptions: Sequence[SubscriptionRecord] | None = None,
        credits: dict[str, Any] | None = None,
    ) -> list[tuple[str, str, CreditPrice]]:
        """(customer id, external id, price) for every subscription's usage price
        that draws credits (of one customer, or all, or of `subscriptions`)."""
        if credits is None:
            credits = await self._store.product_credits(tenant_id)
        if not any(c.get("prices") for c in credits.values()):
            return []
        if subscriptions is None:
            subscriptions = await self._billing.subscriptions(tenant_id, customer_id)
        return _prices(subscriptions, credits)

    async def _draws(
        self,
        tenant_id: str,
        external_id: str,
        prices: Sequence[CreditPrice],
        start: datetime,
        end: datetime,
        precision: int,
        read: Mapping[str, tuple[datetime, Minutes]] | None = None,
    ) -> list[Draw]:
        """The draws of the prices' usage over [start, end). `read` holds
        minutes already read per meter, each from a time to `end`: only what
        they miss is asked of meter (the reads go out together)."""
        wanted: list[tuple[CreditPrice, datetime, datetime]] = []
        asks: dict[tuple[str, datetime, datetime], Any] = {}
        for price in prices:
            lo = max(start, price.start)
            hi = end if price.end is None else min(end, price.end)
            if lo >= hi:
                continue
            wanted.append((price, lo, hi))
            since = read[price.meter_id][0] if read and price.meter_id in read else hi
            ask = (price.meter_id, lo, min(hi, since))
            if lo < since and ask not in asks:
                asks[ask] = self._usage.read(tenant_id, price.meter_id, external_id, *ask[1:])
        # Every read is of one customer and meter, per minute: merged per meter.
        minutes: dict[str, Minutes] = {m: dict(found) for m, (_, found) in (read or {}).items()}
        for (meter_id, _, _), found in zip(asks, await asyncio.gather(*asks.values()), strict=True):
            minutes.setdefault(meter_id, {}).update(found)
        # Each price draws its meter's usage (as each bills it on its own
        # invoice line); a minute that several subscriptions' prices of one
        # meter draw has one draw per subscription, keyed by it.
        spans: dict[str, list[tuple[datetime, datetime]]] = {}
        for price, lo, hi in wanted:
            spans.setdefault(price.meter_id, []).append((lo, hi))
        draws: list[Draw] = []
        for price, lo, hi in wanted:
            shares = spans[price.meter_id]
            for minute, quantity in sorted(minutes.get(price.meter_id, {}).items()):
                if not lo <= minute < hi:
                    continue
                shared = len(shares) > 1 and sum(a <= minute < b for a, b in shares) > 1
                draws.append(
                    Draw(
                        draw_key(price.meter_id, minute, price.subscription_id if shared else ""),
                        minute,
                        to_credits(quantity, price.rate, precision),
                        price.rule,
                        price.meter_id,
                        quantity,
                    )
                )
        return draws

    # Settlement.

    async def settle_tenant(self, tenant_id: str, now: datetime) -> int:
        """Grants due included credits, then settles every account; returns
        how many entries were recorded."""
        # One snapshot of the subscriptions for both: a subscription created
        # in between would be settled before its included credits exist. Only
        # the subscriptions to products with credits are read.
        credits = await self._store.product_credits(tenant_id)
        credited = [pid for pid, c in credits.items() if c]
        subscriptions = await self._store.subscriptions_of(tenant_id, credited) if credited else []
        await self.grant_included(tenant_id, now, subscriptions, credits)
        prices = await self.prices_of(tenant_id, subscriptions=subscriptions, credits=credits)
        accounts: dict[tuple[str, str], tuple[str, list[CreditPrice]]] = {}
        for customer_id, external_id, price in prices:
            key = (customer_id, price.credit_type_id)
            accounts.setdefault(key, (external_id, []))[1].append(price)
        marks = await self._store.account_marks(tenant_id)
        for key in marks:
            accounts.setdefault(key, ("", []))
        types = await self._store.credit_types(tenant_id)
        until = floor_minute(now - self._lag)
        recorded = 0
        for (customer_id, type_id), (external_id, account_prices) in accounts.items():
            settled_until, dirty_from, reconciled_at = marks.get(
                (customer_id, type_id), (None, None, None)
            )
            if (settled_until, dirty_from) == (until, None) and not self._due(reconciled_at, now):
                # Settled this minute already, not dirtied since and compared
                # with meter lately (as read without the lock: settle_account
                # checks again under it), so a pass takes no lock for the
                # accounts it has nothing to do for.
                continue
            try:
                if not external_id:
                    _, external_id = await self._store.customer(
                        tenant_id, customer_id, "customer_id"
                    )
                recorded += await self.settle_account(
                    tenant_id, customer_id, external_id, types[type_id], account_prices, now
                )
            except Exception as exc:  # one account's trouble must not stop the tenant's others
                log.error(
                    "credit_account_settlement_failed",
                    tenant_id=tenant_id,
                    customer_id=customer_id,
                    credit_type_id=type_id,
                    error=repr(exc),
                )
        return recorded

    async def settle_account(
        self,
        tenant_id: str,
        customer_id: str,
        external_id: str,
        kind: CreditTypeRecord,
        prices: Sequence[CreditPrice],
        now: datetime,
        *,
        until: datetime | None = None,
    ) -> int:
        """Settles one account up to `until` (default: the last whole minute
        at least the lag ago); returns how many entries it recorded."""
        until = min(until or now, floor_minute(now - self._lag))
        async with self._store.locked(tenant_id, customer_id, kind.id) as (conn, account):
            grants = await self._store.grants(tenant_id, customer_id, kind.id, conn)
            due = self._due(account.reconciled_at, now)
            if account.settled_until == until and account.dirty_from is None and not due:
                return 0  # settled already this minute: the next closes at the minute's end
            debits = await self._store.debits(conn, tenant_id, customer_id, kind.id)
            start = self._start(account, grants, prices, until, debits)
            if start is None:
                return 0
            if due and account.settled_until is not None:
                # Minutes before the recheck point that meter changed since
                # they were settled (late events): settle again from the first.
                # (A first pass reads every minute: a reconciliation by itself.)
                late = await self._first_difference(
                    conn, tenant_id, customer_id, external_id, kind.id, prices, start, now
                )
                if late is not None and late < start:
                    log.info(
                        "credit_late_usage",
                        tenant_id=tenant_id,
                        customer_id=customer_id,
                        credit_type_id=kind.id,
                        settle_from=late.isoformat(),
                    )
                    start = late
            if start >= until:
                if due:
                    await self._store.reconciled(conn, tenant_id, customer_id, kind.id, now)
                return 0
            state = account.state
            if start != account.settled_until:
                state = await self._store.state_before(conn, tenant_id, customer_id, kind.id, start)
            draws = await self._draws(tenant_id, external_id, prices, start, until, kind.precision)
            domain = [g.domain() for g in grants]
            desired, final = replay(domain, draws + debits, state, start, until, kind.precision)
            recorded, revisions = await self._store.derived_since(
                conn, tenant_id, customer_id, kind.id, start, until
            )
            fixes = corrections(desired, recorded)
            await self._store.append(
                conn,
                tenant_id,
                customer_id,
                kind.id,
                account,
                fixes,
                revisions=revisions,
                window=lambda e: (e.at, e.at + MINUTE),
            )
            await self._store.settled(
                conn, tenant_id, customer_id, kind.id, until, final, now if due else None
            )
        return len(fixes)

    def _due(self, reconciled_at: datetime | None, now: datetime) -> bool:
        """Whether an account's settled days are to be compared with meter's."""
        return reconciled_at is None or reconciled_at <= now - self._reconcile

    async def _first_difference(
        self,
        conn: Any,
        tenant_id: str,
        customer_id: str,
        external_id: str,
        type_id: str,
        prices: Sequence[CreditPrice],
        end: datetime,
        now: datetime,
    ) -> datetime | None:
        """Reconciliation: the first minute, within ingest's backdating window
        and before `end` (the recheck point), from which the ledger's draws
        may miss usage, or None. Per meter (of COUNT or SUM) and price, the
        quantity meter holds per UTC day is compared with what the ledger's
        draws hold for the same minutes; a day that differs is settled again
        from its first minute in range. Flat cost: a day read per meter
        (meter's hour buckets) and per meter one read of the ledger's day
        sums (CreditStore.quantities_per_day)."""
        oldest = floor_minute(now - self._backdate)
        ranges: dict[str, list[tuple[datetime, datetime]]] = {}
        for price in prices:
            lo = max(oldest, price.start)
            hi = end if price.end is None else min(end, price.end)
            if lo < hi:
                ranges.setdefault(price.meter_id, []).append((lo, hi))
        for meter_id in list(ranges):
            if not await self._usage.additive(tenant_id, meter_id):
                del ranges[meter_id]
        # Each price's span is read (a minute that two subscriptions' prices
        # draw is in the ledger twice, once per draw); the same span once.
        asks = sorted({(m, lo, hi) for m, spans in ranges.items() for lo, hi in spans})
        if not asks:
            return None
        metered = dict(
            zip(
                asks,
                await asyncio.gather(
                    *(self._usage.days(tenant_id, m, external_id, lo, hi) for m, lo, hi in asks)
                ),
                strict=True,
            )
        )
        first: datetime | None = None
        for meter_id, spans in ranges.items():
            want: dict[datetime, Decimal] = {}
            for span in spans:
                for day, value in metered[(meter_id, *span)].items():
                    want[day] = want.get(day, Decimal(0)) + value
            have: dict[datetime, Decimal] = {}
            for lo, hi in merged(spans):
                found = await self._store.quantities_per_day(
                    conn, tenant_id, customer_id, type_id, meter_id, lo, hi
                )
                for day, value in found.items():
                    have[day] = have.get(day, Decimal(0)) + value
            lowest = min(lo for lo, _ in spans)
            for day in set(want) | set(have):
                if want.get(day, Decimal(0)) != have.get(day, Decimal(0)):
                    at = max(day, lowest)
                    first = at if first is None else min(first, at)
        return first

    def _start(
        self,
        account: AccountRecord,
        grants: Sequence[GrantRecord],
        prices: Sequence[CreditPrice],
        until: datetime,
        debits: Sequence[Draw] = (),
    ) -> datetime | None:
        """Where a pass replays from: the recheck point, or earlier when a
        grant took effect before it; None when there is nothing to settle."""
        earliest = [g.effective_at for g in grants] + [p.start for p in prices]
        earliest += [d.at for d in debits]
        if not earliest:
            return None
        first = min(earliest)
        if account.settled_until is None:
            return first
        start = max(first, account.settled_until - self._recheck)
        if account.dirty_from is not None:
            start = min(start, account.dirty_from)
        return min(start, account.settled_until)

    # The balance.

    async def balance(
        self, tenant_id: str, customer_ref: str, type_id: str, now: datetime
    ) -> tuple[str, Balance]:
        # On the request path: what never changes (a customer's ids, a credit
        # type) is remembered, PostgreSQL is read in one statement, and meter's
        # minutes since settlement's usual point are read at the same time
        # (for the meters this account drew from last time; what the fresh
        # state needs beyond that is read after it).
        (customer_id, external_id), kind = await asyncio.gather(
            self._customer(tenant_id, customer_ref), self._credit_type(tenant_id, type_id)
        )
        end = floor_minute(now) + MINUTE
        key = (tenant_id, customer_id, kind.id)
        hint = self._hints.get(key)
        inputs = self._store.balance_inputs(
            tenant_id, customer_id, kind.id, hint.period_start if hint else None
        )
        early: dict[str, tuple[datetime, Minutes]] = {}
        if hint and hint.meters:
            # Settlement keeps settled_until at most a minute or so behind this.
            since = min(floor_minute(now - self._lag) - MINUTE, end)
            found, minutes = await asyncio.gather(
                inputs,
                asyncio.gather(
                    *(self._usage.read(tenant_id, m, external_id, since, end) for m in hint.meters)
                ),
            )
            early = {m: (since, read) for m, read in zip(hint.meters, minutes, strict=True)}
        else:
            found = await inputs
        account, grants, plans, debits = found.account, found.grants, found.plans, found.debits
        subscriptions = [s for s, _, _ in plans]
        credits = {s.product_id: c for s, _, c in plans}
        prices = [p for _, _, p in _prices(subscriptions, credits) if p.credit_type_id == kind.id]
        period_start = _period_start(
            [(s, i) for s, i, _ in plans if s.end_time is None or s.end_time > now], now
        )
        if len(self._hints) >= CACHE_SIZE:
            self._hints.clear()
        self._hints[key] = _Hint(tuple(sorted({p.meter_id for p in prices})), period_start)
        domain = [g.domain() for g in grants]
        settled = account.settled_until if account else None
        state = dict(account.state) if account else {}
        start = settled
        if account is None or settled is None:
            earliest = [g.effective_at for g in grants] + [p.start for p in prices]
            earliest += [d.at for d in debits]
            start = min(earliest) if earliest else end
            state = {}
        elif account.dirty_from is not None and account.dirty_from < settled:
            start = account.dirty_from
            async with self._store.pool.acquire() as conn:
                state = await self._store.state_before(conn, tenant_id, customer_id, kind.id, start)
        assert start is not None
        live: list[Entry] = []
        draws = self._draws(tenant_id, external_id, prices, start, end, kind.precision, early)
        if found.overage is not None and hint and hint.period_start == period_start:
            draws_found, overage = await draws, found.overage
        else:  # read since another time (or not at all): read again
            draws_found, overage = await asyncio.gather(
                draws, self._store.overage_since(tenant_id, customer_id, kind.id, period_start)
            )
        if start < end:
            live, state = replay(domain, draws_found + debits, state, start, end, kind.precision)
        total, listed = available(domain, state, now)
        expiries = [g.expires for g, _ in listed if g.expires is not None and g.open_at(now)]
        with decimal.localcontext(WIDE):
            overage += sum(
                (e.uncovered for e in live if e.at >= period_start and e.kind is EntryKind.OVERAGE),
                Decimal(0),
            )
        return customer_id, Balance(
            total, listed, min(expiries) if expiries else None, overage, settled
        )

    async def _customer(self, tenant_id: str, ref: str) -> tuple[str, str]:
        key = (tenant_id, ref)
        if (found := self._customers.get(key)) is None:
            found = await self._store.customer(tenant_id, ref, "customer_id")
            if len(self._customers) >= CACHE_SIZE:
                self._customers.clear()
            self._customers[key] = found
        return found

    async def _credit_type(self, tenant_id: str, type_id: str) -> CreditTypeRecord:
        key = (tenant_id, type_id)
        if (found := self._types.get(key)) is None:
            found = await self._store.get_credit_type(tenant_id, type_id)
            if len(self._types) >= CACHE_SIZE:
                self._types.clear()
            self._types[key] = found
        return found

    # Invoices.

    async def apply_to_usage(
        self,
        tenant_id: str,
        periods: Sequence[Any],
        usage: dict[tuple[str, datetime, datetime, str], Decimal],
        now: datetime | None = None,
    ) -> dict[LineKey, CreditUse]:
        """For the usage prices of these periods (BillablePeriod) that draw
        credits: what credits did per (subscription, period start, meter),
        for `annotate`, whose `billable` is the quantity to price: the part
        credits did not cover that is billed (under BILL; none under FORGIVE
        and DEFICIT). `usage` is left as read (two subscriptions may price
        the same meter over the same period: each line has its own draws).
        An ended period is settled up to its end first. Periods are taken at
        whole minutes, as the ledger is."""
        now = now or datetime.now(UTC)
        credits = await self._store.product_credits(tenant_id)
        found: dict[LineKey, CreditUse] = {}
        types = await self._store.credit_types(tenant_id) if credits else {}
        for period in periods:
            prices = credits.get(period.product.id, {}).get("prices", {})
            subscription = period.subscription
            for meter_id, p in prices.items():
                key = (meter_id, period.start, period.end, subscription.customer_external_id)
                if key not in usage:
                    continue
                kind = types[p["credit_type_id"]]
                end = floor_minute(period.end)
                if end <= now - self._lag:
                    await self.settle_account(
                        tenant_id,
                        subscription.customer_id,
                        subscription.customer_external_id,
                        kind,
                        [
                            price
                            for _, _, price in await self.prices_of(
                                tenant_id, subscription.customer_id
                            )
                            if price.credit_type_id == kind.id
                        ],
                        now,
                        until=end,
                    )
                drawn = await self._store.drawn(
                    tenant_id,
                    subscription.customer_id,
                    kind.id,
                    meter_id,
                    subscription.id,
                    floor_minute(period.start),
                    end,
                )
                consumed, rate = usage[key], Decimal(p["rate"])
                rule = Overage(p["overage_rule"])
                covered, billable = coverage(consumed, drawn, rate, rule)
                found[(subscription.id, period.start, meter_id)] = CreditUse(
                    kind.name, consumed, covered, drawn, billable, rule, kind.id, rate
                )
        return found

    def annotate(
        self, drafts: dict[PeriodKey, InvoiceDraft], uses: dict[LineKey, CreditUse]
    ) -> None:
        annotate_lines(drafts, uses)

    # Notifications.

    async def publish_pending(self) -> int:
        """Publishes the ledger entries not yet published, one message per
        entry, but draw-downs summarized (one credit.drawn per customer, type
        and minute that one pass recorded: see draw_messages), then marks
        them; returns how many messages went out. Nats-Msg-Ids derive from
        the entries, so a repeat after a crash or by another replica is
        absorbed by the stream's duplicate window."""
        if self._js is None:
            return 0
        published = 0
        while batch := await self._store.unpublished(PUBLISH_BATCH):
            acked: list[str] = []
            complete = True
            for subject, payload, msg_id, entries in outbox_messages(batch):
                try:
                    await self._js.publish(
                        subject,
                        payload.SerializeToString(),
                        headers={"Nats-Msg-Id": msg_id},
                        timeout=PUBLISH_TIMEOUT,
                    )
                except Exception as exc:
                    log.warning("credit_publish_failed", entry_id=entries[0].id, error=repr(exc))
                    complete = False
                    break
                acked += [e.id for e in entries]
                published += 1
            await self._store.mark_published(acked)
            if not complete:
                break
        return published

    async def check_low(
        self, tenant_id: str, customer_id: str, kind: CreditTypeRecord, now: datetime
    ) -> None:
        """credit.balance_low once each time the balance falls below the type's
        threshold; armed again when it is back at or above it."""
        if kind.low_balance_threshold is None or self._js is None:
            return
        account = await self._store.account(tenant_id, customer_id, kind.id)
        if account is None:
            return
        _, balance = await self.balance(tenant_id, customer_id, kind.id, now)
        low = balance.available < kind.low_balance_threshold
        if low and account.low_armed:
            payload = credit_pb2.CreditEvent(
                tenant_id=tenant_id,
                balance=str(balance.available),
                threshold=str(kind.low_balance_threshold),
            )
            payload.entry.customer_id = customer_id
            payload.entry.credit_type_id = kind.id
            # One message per fall: a fall after the balance was lifted again
            # comes after the entry that lifted it, so the last entry names it.
            last = await self._store.last_entry_id(tenant_id, customer_id, kind.id)
            msg_id = f"credit-low-{tenant_id}-{customer_id}-{kind.id}-{last}"
            await self._js.publish(
                f"{BILLING_SUBJECT_PREFIX}.credit.balance_low",
                payload.SerializeToString(),
                headers={"Nats-Msg-Id": msg_id},
                timeout=PUBLISH_TIMEOUT,
            )
            await self._store.set_low_armed(tenant_id, customer_id, kind.id, False)
        elif not low and not account.low_armed:
            await self._store.set_low_armed(tenant_id, customer_id, kind.id, True)

    # The background task.

    async def tick(self) -> None:
        now = datetime.now(UTC)
        # Only tenants with a credit type can have grants, accounts or prices
        # that draw credits: the others cost nothing each second.
        for tenant_id in await self._store.credit_tenant_ids():
            try:
                await self.settle_tenant(tenant_id, now)
                types = await self._store.credit_types(tenant_id)
                if any(t.low_balance_threshold is not None for t in types.values()):
                    for customer_id, type_id in await self._store.accounts(tenant_id):
                        await self.check_low(tenant_id, customer_id, types[type_id], now)
            except Exception as exc:  # one tenant's trouble must not stop the others
                log.error("credit_settlement_failed", tenant_id=tenant_id, error=repr(exc))
        try:
            await self.publish_pending()
        except Exception as exc:
            log.warning("credit_publish_failed", error=repr(exc))

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:
                log.error("credit_tick_failed", error=repr(exc))
            await asyncio.sleep(self._interval)


def draw_messages(
    batch: Sequence[tuple[str, LedgerRecord]],
) -> list[tuple[str, list[LedgerRecord]]]:
    """(tenant id, entries) of each message of an outbox batch, in the order
    of each message's first entry: one per entry, but the DRAWN entries of one
    account and minute recorded together (one pass: the same created_at)
    make one, in meter id order."""
    messages: list[tuple[str, list[LedgerRecord]]] = []
    draws: dict[tuple[str, str, str, datetime, datetime], list[LedgerRecord]] = {}
    for tenant_id, entry in batch:
        if entry.kind is not EntryKind.DRAWN:
            messages.append((tenant_id, [entry]))
            continue
        key = (tenant_id, entry.customer_id, entry.credit_type_id, entry.effective_at)
        group = draws.get((*key, entry.created_at))
        if group is None:
            group = draws[(*key, entry.created_at)] = []
            messages.append((tenant_id, group))
        group.append(entry)
    for group in draws.values():
        group.sort(key=lambda e: (e.meter_id, int(e.id)))
    return messages


def outbox_messages(
    batch: Sequence[tuple[str, LedgerRecord]],
) -> list[tuple[str, credit_pb2.CreditEvent, str, list[LedgerRecord]]]:
    """(subject, payload, Nats-Msg-Id, entries) of each message of a batch."""
    out = []
    for tenant_id, entries in draw_messages(batch):
        first = entries[0]
        subject = f"{BILLING_SUBJECT_PREFIX}.credit.{first.kind.value.lower()}"
        if first.kind is not EntryKind.DRAWN:
            payload = credit_pb2.CreditEvent(tenant_id=tenant_id, entry=proto_entry(first))
            out.append((subject, payload, f"credit-entry-{first.id}", entries))
            continue
        last = max(entries, key=lambda e: int(e.id))
        summary = credit_pb2.CreditDrawDown(
            customer_id=first.customer_id,
            credit_type_id=first.credit_type_id,
            window_start=_ts(first.effective_at),
            window_end=_ts(first.effective_at + MINUTE),
            credits_drawn=_text(total_drawn(e.amount for e in entries)),
            balance_after=_text(last.balance_after),
            create_time=_ts(first.created_at),
            meters=[
                credit_pb2.CreditDrawPart(
                    meter_id=e.meter_id,
                    credits_drawn=_text(-e.amount),
                    quantity=_text(e.quantity),
                    entry_id=e.id,
                )
                for e in entries
            ],
        )
        lowest = min(entries, key=lambda e: int(e.id))
        msg_id = (
            f"credit-drawn-{first.customer_id}-{first.credit_type_id}-"
            f"{first.effective_at.astimezone(UTC):%Y%m%dT%H%MZ}-{lowest.id}"
        )
        payload = credit_pb2.CreditEvent(tenant_id=tenant_id, draw_down=summary)
        out.append((subject, payload, msg_id, entries))
    return out


def _period_start(active: Sequence[tuple[SubscriptionRecord, str]], now: datetime) -> datetime:
    """The start of the customer's current period (its latest active
    subscription's, at the whole minute); the start of time without one."""
    if not active:
        return datetime(1970, 1, 1, tzinfo=UTC)
    s, interval = active[-1]
    start, _, _ = period_containing(s.start_time, Interval[interval], max(now, s.start_time))
    return floor_minute(start)


def _prices(
    subscriptions: Sequence[SubscriptionRecord], credits: dict[str, Any]
) -> list[tuple[str, str, CreditPrice]]:
    """(customer id, external id, price) of each subscription's usage price
    that draws credits; `credits` by product id."""
    found: list[tuple[str, str, CreditPrice]] = []
    for s in subscriptions:
        for meter_id, p in (credits.get(s.product_id) or {}).get("prices", {}).items():
            price = CreditPrice(
                meter_id,
                p["credit_type_id"],
                Decimal(p["rate"]),
                Overage(p["overage_rule"]),
                floor_minute(s.start_time),
                # Whole minutes, as its periods' grants: the minute it ends
                # in is not its (nor is it drawn twice on a plan change then).
                None if s.end_time is None else floor_minute(s.end_time),
                s.id,
            )
            found.append((s.customer_id, s.customer_external_id, price))
    return found


def _periods(
    subscription: SubscriptionRecord, interval: Interval, since: datetime | None, now: datetime
) -> list[tuple[datetime, datetime]]:
    """The periods of the subscription after the one starting at `since`
    (from its first without), that have started by `now`, CATCHUP at most."""
    anchor = subscription.start_time
    n = 0
    if since is not None:
        _, _, n = period_containing(anchor, interval, since)
        n += 1
    found: list[tuple[datetime, datetime]] = []
    while len(found) < CATCHUP:
        start, end = period_start(anchor, interval, n), period_start(anchor, interval, n + 1)
        if start > now or (subscription.end_time is not None and start >= subscription.end_time):
            break
        if subscription.end_time is not None:
            end = min(end, subscription.end_time)
        found.append((start, end))
        n += 1
    return found


def _check_same_grant(
    found: GrantRecord,
    customer_id: str,
    type_id: str,
    amount: Decimal,
    priority: int,
    request: credit_pb2.GrantCreditsRequest,
    effective: datetime | None,
    expire_time: datetime | None,
    after: timedelta | None,
) -> None:
    """AlreadyExists naming idempotency_key unless `found` (the grant made
    under the request's key) is what this request asks for. An effective
    time not given is the first call's now, whatever it was."""
    same = (
        found.source == "api"
        and (found.customer_id, found.credit_type_id, found.amount, found.priority)
        == (customer_id, type_id, amount, priority)
        and found.description == request.description
        and (found.price_minor, found.price_currency)
        == (request.price_minor, request.price_currency)
    )
    if same and effective is not None:
        # The first call stored ceil_minute(max(effective, its now)), its now
        # at most CLOCK_SKEW after effective (no arithmetic on the request's
        # time, which may lie at the end of datetime's range).
        same = found.effective_at - MINUTE - CLOCK_SKEW < effective <= found.effective_at
    if same:
        if after is not None:
            same = (
                found.expires_at is not None
                and found.expires_at - found.effective_at == MINUTE * (after // MINUTE)
            )
        elif expire_time is not None:
            same = found.expires_at == floor_minute(expire_time)
        else:
            same = found.expires_at is None
    if not same:
        raise AlreadyExists(
            f"idempotency_key: already used for grant {found.id} of {_text(found.amount)}"
            f" credits of type {found.credit_type_id} to customer {found.customer_id}, with"
            " other values: a key names one grant (the same request again answers it)"
        )


def _time(value: Any, field: str) -> datetime:
    try:
        when: datetime = value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(f"{field}: not a valid timestamp") from None
    return when


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def proto_entry(entry: LedgerRecord) -> credit_pb2.CreditLedgerEntry:
    message = credit_pb2.CreditLedgerEntry(
        id=entry.id,
        customer_id=entry.customer_id,
        credit_type_id=entry.credit_type_id,
        kind=credit_pb2.CreditEntryKind.Value(f"CREDIT_ENTRY_KIND_{entry.kind.value}"),
        amount=_text(entry.amount),
        balance_after=_text(entry.balance_after),
        effective_time=_ts(entry.effective_at),
        create_time=_ts(entry.created_at),
        grant_id=entry.grant_id,
        meter_id=entry.meter_id,
        quantity=_text(entry.quantity),
        credits_uncovered=_text(entry.uncovered),
        description=entry.description,
    )
    if entry.window_start is not None and entry.window_end is not None:
        message.window_start.CopyFrom(_ts(entry.window_start))
        message.window_end.CopyFrom(_ts(entry.window_end))
    return message


def _text(value: Decimal) -> str:
    # Plain notation, no trailing zeros beyond what the value has: "0", "-25", "1.5".
    text = format(value.normalize(), "f") if value else "0"
    return text
