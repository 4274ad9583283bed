"""Credit settlement against a real PostgreSQL: no draw-down entered twice or
missed under repeated passes, two replicas at once, passes killed midway,
late events within the recheck window, and a grant found after its time; the
ledger always ends where the pure domain says from all the events at once.
Meter (another service) is a stand-in that answers usage per minute."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.billing.credits import Credits
from services.billing.credits_store import CreditStore
from services.billing.domain.credits import (
    DEFICIT,
    Draw,
    EntryKind,
    Grant,
    Overage,
    Rollover,
    available,
    floor_day,
    floor_minute,
    replay,
    to_credits,
)
from services.billing.invoicing import BillablePeriod
from services.billing.store import BillingStore
from services.common import db
from services.common.errors import AlreadyExists
from tests.integration.billing.conftest import MIGRATIONS, _with_database
from usagebilling.billing.v1 import credit_pb2

D = Decimal
M = timedelta(minutes=1)


class MinuteMeter:
    """Usage per minute of one SUM meter, from events the test states."""

    def __init__(self, delay: float = 0.0) -> None:
        self.events: list[tuple[str, datetime, Decimal]] = []
        self.delay = delay

    async def read(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> dict[datetime, Decimal]:
        await asyncio.sleep(self.delay)
        found: dict[datetime, Decimal] = defaultdict(Decimal)
        for who, when, value in self.events:
            if who == customer and start <= when < end:
                found[floor_minute(when)] += value
        return dict(found)

    async def days(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> dict[datetime, Decimal]:
        found: dict[datetime, Decimal] = defaultdict(Decimal)
        minutes = await MinuteMeter.read(self, tenant_id, meter_id, customer, start, end)
        for minute, value in minutes.items():
            found[minute.replace(hour=0, minute=0)] += value
        return {day: value for day, value in found.items() if value}

    async def additive(self, tenant_id: str, meter_id: str) -> bool:
        return True  # a SUM meter


async def _setup(pool: Any) -> tuple[str, str, str, str, datetime]:
    """A tenant, a customer on a daily product whose tokens draw credits
    (DEFICIT) with 100 included per day rolling 50 % once; returns (tenant,
    customer id, type id, meter id, subscription start)."""
    billing = BillingStore(pool)
    store = CreditStore(pool)
    tenant = await billing.create_tenant("t")
    customer = await billing.create_customer(tenant, "cus", "", "")
    kind = await store.create_credit_type(tenant, "tokens", "CUSTOM", 0, "", None)
    product = await billing.create_product(
        tenant,
        name="p",
        currency="USD",
        billing_interval="DAY",
        fixed_price_minor=0,
        usage_prices=[],
    )
    meter_id = "00000000-0000-0000-0000-000000000001"
    await store.set_product_credits(
        tenant,
        product.id,
        {
            "included": [
                {
                    "credit_type_id": kind.id,
                    "amount": "100",
                    "rollover": {"percent": "50", "cap": None, "max": 1},
                    "priority": 0,
                }
            ],
            "prices": {
                meter_id: {"credit_type_id": kind.id, "rate": "1", "overage_rule": "DEFICIT"}
            },
        },
    )
    start = floor_minute(datetime.now(UTC)) - timedelta(days=1, minutes=30)
    await billing.create_subscription(tenant, customer.id, product.id, start)
    return tenant, customer.id, kind.id, meter_id, start


def _oracle(
    grants: list[Grant],
    meter: MinuteMeter,
    meter_id: str,
    start: datetime,
    until: datetime,
    debits: Sequence[Draw] = (),
) -> dict[str, Decimal]:
    minutes: dict[datetime, Decimal] = defaultdict(Decimal)
    for _, when, value in meter.events:
        minutes[floor_minute(when)] += value
    draws = [
        Draw(
            f"draw:{meter_id}:{m.isoformat()}",
            m,
            to_credits(v, D(1), 0),
            Overage.DEFICIT,
            meter_id,
            v,
        )
        for m, v in minutes.items()
    ]
    _, state = replay(grants, [*draws, *debits], {}, start, until, 0)
    return state


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_replicas_retries_crashes_and_late_events_converge(pool: Any, seed: int) -> None:
    rng = random.Random(seed)
    tenant, customer_id, type_id, meter_id, start = await _setup(pool)
    meter = MinuteMeter(delay=0.002)
    store = CreditStore(pool)
    billing = BillingStore(pool)
    # Two replicas; a long recheck window so that every late event here is in it.
    replicas = [
        Credits(store, billing, meter, lag=timedelta(0), recheck=timedelta(days=2))  # type: ignore[arg-type]
        for _ in range(2)
    ]
    now = datetime.now(UTC)
    for _ in range(60):
        meter.events.append(
            ("cus", start + timedelta(seconds=rng.randrange(0, 60 * 60 * 25)), D(rng.randint(1, 9)))
        )

    async def passes(credits: Credits, count: int) -> None:
        for _ in range(count):
            await credits.settle_tenant(tenant, now)

    # Two replicas at once, several passes each.
    await asyncio.gather(passes(replicas[0], 3), passes(replicas[1], 3))
    # Late events (within the window), and passes killed midway. An account is
    # settled again when a minute closes: each round is a minute later.
    for round_ in range(4):
        now += M
        for _ in range(10):
            when = start + timedelta(seconds=rng.randrange(0, 60 * 60 * 25))
            meter.events.append(("cus", when, D(rng.randint(1, 9))))
        task = asyncio.ensure_future(replicas[round_ % 2].settle_tenant(tenant, now))
        await asyncio.sleep(rng.random() * 0.05)
        task.cancel()  # a kill: its transaction rolls back, nothing half-written
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(passes(replicas[0], 1), passes(replicas[1], 1))

    grants = [g.domain() for g in await store.grants(tenant, customer_id, type_id)]
    assert len(grants) == 2  # the two periods started by now, once each
    until = floor_minute(now)
    expected = _oracle(grants, meter, meter_id, start, until)
    async with pool.acquire() as conn:
        recorded = await store.state_before(conn, tenant, customer_id, type_id, until)
        rows = await conn.fetch(
            "SELECT entry_key, revision, amount, balance_after, quantity, kind"
            " FROM billing.credit_ledger WHERE tenant_id = $1 ORDER BY id",
            tenant,
        )
    assert recorded == expected
    # The balance is the sum of the ledger; balance_after runs on in order.
    running = D(0)
    for row in rows:
        running += row["amount"]
        assert row["balance_after"] == running
    last = floor_minute(now) - timedelta(microseconds=1)
    assert available(grants, expected, last)[0] == running
    # Every unit metered is in exactly one minute's draw (corrections included).
    metered = sum(v for _, when, v in meter.events if when < until)
    entered = sum(r["quantity"] for r in rows if r["kind"] in ("DRAWN", "OVERAGE"))
    assert entered == metered
    # Keys and revisions are unique (the table's constraint would have refused a repeat).
    assert len({(r["entry_key"], r["revision"]) for r in rows}) == len(rows)
    _ = Rollover  # the product's policy above


async def test_a_grant_found_late_resettles_from_its_time(pool: Any) -> None:
    """An API grant is never backdated, but a product's period grant can be
    entered after the ledger passed its start (the task was down): the
    account is settled again from it, by new entries."""
    tenant, customer_id, type_id, meter_id, start = await _setup(pool)
    meter = MinuteMeter()
    store = CreditStore(pool)
    credits = Credits(store, BillingStore(pool), meter, lag=timedelta(0), recheck=M)  # type: ignore[arg-type]
    meter.events.append(("cus", start + timedelta(hours=2), D(30)))
    now = datetime.now(UTC)
    # Settle without the included grants (as if they were not granted yet).
    prices = [p for _, _, p in await credits.prices_of(tenant)]
    kinds = await store.credit_types(tenant)
    await credits.settle_account(tenant, customer_id, "cus", kinds[type_id], prices, now)
    async with pool.acquire() as conn:
        before = await store.state_before(conn, tenant, customer_id, type_id, floor_minute(now))
    assert before == {"deficit": D(-30)}
    await credits.settle_tenant(tenant, now)  # grants both periods, then settles again
    grants = [g.domain() for g in await store.grants(tenant, customer_id, type_id)]
    expected = _oracle(grants, meter, meter_id, start, floor_minute(now))
    async with pool.acquire() as conn:
        after = await store.state_before(conn, tenant, customer_id, type_id, floor_minute(now))
    assert after == expected
    # Period 1: 100 - 30 = 70 left, 35 rolled into period 2 (100 + 35).
    assert sum(expected.values()) == D(135)


async def test_the_balance_reads_every_unsettled_minute_whatever_it_read_first(pool: Any) -> None:
    """The balance reads meter's latest minutes together with the account (for
    the meters of its last answer) and what the account needs beyond them
    after: with an account settled long ago, just now, or not yet, the answer
    is what the domain says from all the events."""
    tenant, customer_id, type_id, meter_id, start = await _setup(pool)
    meter = MinuteMeter()
    store = CreditStore(pool)
    credits = Credits(store, BillingStore(pool), meter, lag=timedelta(0), recheck=M)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    for when, value in [(start + timedelta(hours=2), 30), (now - 20 * M, 5), (now - 10 * M, 7)]:
        meter.events.append(("cus", when, D(value)))

    async def check() -> None:
        grants = [g.domain() for g in await store.grants(tenant, customer_id, type_id)]
        expected = _oracle(grants, meter, meter_id, start, floor_minute(now) + M)
        for _ in range(2):  # without, then with what the first answer left behind
            _, balance = await credits.balance(tenant, "cus", type_id, now)
            assert balance.available == available(grants, expected, now)[0]

    await credits.grant_included(tenant, now, await BillingStore(pool).subscriptions(tenant, ""))
    await check()  # never settled: from the grants' time
    await credits.settle_tenant(tenant, now - 15 * M)
    meter.events.append(("cus", now - timedelta(seconds=30), D(4)))
    await check()  # settled 15 minutes ago: the minutes between are read after
    await credits.settle_tenant(tenant, now)
    meter.events.append(("cus", now, D(2)))
    await check()  # settled this minute


async def test_late_events_beyond_the_recheck_window_are_drawn(pool: Any) -> None:
    """Events folded hours after their minute (beyond the recheck window, within
    the backdating window) are found by the reconciliation with meter's day
    totals and drawn from the grants open at their time, by new entries; a
    reconciliation that finds the days equal (zero-credit minutes included)
    reads nothing again."""
    tenant, customer_id, type_id, meter_id, start = await _setup(pool)
    meter = MinuteMeter()
    store = CreditStore(pool)
    credits = Credits(store, BillingStore(pool), meter, lag=timedelta(0), recheck=M)  # type: ignore[arg-type]
    now = datetime.now(UTC)
    # 0.4 tokens is 0 credits (precision 0): an entry of 0 that holds the quantity.
    meter.events += [("cus", start + timedelta(hours=1), D(30)), ("cus", now - 9 * M, D("0.4"))]
    await credits.settle_tenant(tenant, now)
    # Late: one in the first period (its grant has expired since), one 3 h ago.
    meter.events += [("cus", start + timedelta(hours=2), D(20)), ("cus", now - 180 * M, D(5))]
    # Reconciled less than USAGEBILLING_CREDITS_RECONCILE ago: not compared yet.
    await credits.settle_tenant(tenant, now + timedelta(seconds=30))
    grants = [g.domain() for g in await store.grants(tenant, customer_id, type_id)]
    async with pool.acquire() as conn:
        stale = await store.state_before(conn, tenant, customer_id, type_id, floor_minute(now))
    assert stale != _oracle(grants, meter, meter_id, start, floor_minute(now))
    later = now + 2 * M
    await credits.settle_tenant(tenant, later)
    until = floor_minute(later)
    async with pool.acquire() as conn:
        recorded = await store.state_before(conn, tenant, customer_id, type_id, until)
        quantity = await conn.fetchval(
            "SELECT sum(quantity) FROM billing.credit_ledger WHERE tenant_id = $1"
            " AND kind IN ('DRAWN', 'OVERAGE')",
            tenant,
        )
    assert recorded == _oracle(grants, meter, meter_id, start, until)
    assert quantity == D("55.4")
    _, balance = await credits.balance(tenant, "cus", type_id, later)
    assert balance.available == available(grants, recorded, later)[0]

    # Equal days: a reconciliation reads only the recheck window again.
    asked: list[datetime] = []
    read = meter.read

    async def spy(t: str, m: str, c: str, lo: datetime, hi: datetime) -> dict[datetime, Decimal]:
        asked.append(lo)
        return await read(t, m, c, lo, hi)

    meter.read = spy  # type: ignore[method-assign,assignment]
    assert await credits.settle_tenant(tenant, later + 2 * M) == 0
    assert asked and min(asked) >= until - M


async def test_a_debit_is_entered_at_once_settled_without_a_repeat_and_corrected_by_late_usage(
    pool: Any,
) -> None:
    """AdjustCredits(-amount) enters its ADJUSTED entry at once, at the current
    minute, which no pass has settled yet: a pass up to that minute leaves
    it alone (it does not take it for an entry to undo), a pass past it
    enters nothing more; late usage before it moves it by a correction of
    amount 0. The ledger, the balance and the domain agree throughout."""
    tenant, customer_id, type_id, meter_id, start = await _setup(pool)
    meter = MinuteMeter()
    store = CreditStore(pool)
    credits = Credits(store, BillingStore(pool), meter, lag=timedelta(0), recheck=timedelta(days=2))  # type: ignore[arg-type]
    now = floor_minute(datetime.now(UTC)) + timedelta(seconds=30)
    # Period 2 (100 included, plus 35 rolled over if period 1 used 30).
    meter.events.append(("cus", start + timedelta(hours=2), D(30)))
    meter.events.append(("cus", now - 5 * M, D(20)))
    await credits.settle_tenant(tenant, now - M)

    def request(key: str, amount: str) -> credit_pb2.AdjustCreditsRequest:
        return credit_pb2.AdjustCreditsRequest(
            customer_id="cus",
            credit_type_id=type_id,
            amount=amount,
            reason="r",
            idempotency_key=key,
        )

    async def ledger() -> list[Any]:
        return list(
            await pool.fetch(
                "SELECT entry_key, revision, kind, amount, balance_after, allocations"
                " FROM billing.credit_ledger WHERE tenant_id = $1 ORDER BY id",
                tenant,
            )
        )

    async def agree(at: datetime, debits: list[Draw]) -> None:
        grants = [g.domain() for g in await store.grants(tenant, customer_id, type_id)]
        expected = _oracle(grants, meter, meter_id, start, floor_minute(at) + M, debits)
        _, balance = await credits.balance(tenant, "cus", type_id, at)
        assert balance.available == available(grants, expected, at)[0]

    # 135 - 20 = 115 left; a debit of 150 takes them all and leaves 35 a deficit.
    entry = await credits.adjust(tenant, request("d1", "-150"), now)
    assert (entry.kind, entry.amount, entry.uncovered) == (EntryKind.ADJUSTED, D(-150), D(35))
    assert entry.effective_at == floor_minute(now)
    assert entry.balance_after == D(-35)
    debits = await store.debits(pool, tenant, customer_id, type_id)
    assert [d.key for d in debits] == [entry.entry_key]
    await agree(now, debits)
    # Idempotent; the key with another amount is refused naming it.
    assert (await credits.adjust(tenant, request("d1", "-150"), now)).id == entry.id
    with pytest.raises(AlreadyExists, match="idempotency_key"):
        await credits.adjust(tenant, request("d1", "-15"), now)
    # A pass up to the debit's minute (which it must leave alone), then one
    # past it: nothing new either way.
    before = await ledger()
    await credits.settle_tenant(tenant, now)
    await credits.settle_tenant(tenant, now + M)
    assert await ledger() == before
    # Late usage before the debit: it draws first; the debit moves to the deficit.
    meter.events.append(("cus", now - 3 * M, D(15)))
    await credits.settle_tenant(tenant, now + 2 * M)
    rows = await ledger()
    fixes = [r for r in rows[len(before) :] if r["entry_key"] == entry.entry_key]
    assert [(r["revision"], r["kind"], r["amount"]) for r in fixes] == [(1, "ADJUSTED", D(0))]
    # The rolled-over 35 (drawn first: it is the older) had 15 left for the
    # debit; the late 15 took them, so 15 more of the debit is a deficit.
    grants = [g.domain() for g in await store.grants(tenant, customer_id, type_id)]
    allocations = fixes[0]["allocations"]
    allocations = json.loads(allocations) if isinstance(allocations, str) else allocations
    assert {k: D(v) for k, v in allocations.items()} == {
        f"{grants[0].id}.r": D(15),
        DEFICIT: D(-15),
    }
    until = floor_minute(now + 2 * M)
    expected = _oracle(grants, meter, meter_id, start, until, debits)
    assert expected == {DEFICIT: D(-50)}
    async with pool.acquire() as conn:
        assert await store.state_before(conn, tenant, customer_id, type_id, until) == expected
    assert rows[-1]["balance_after"] == sum(r["amount"] for r in rows) == D(-50)
    await agree(now + 2 * M, debits)


async def _drawn_days_agree(pool: Any, store: CreditStore, tenant: str, rng: random.Random) -> int:
    """credit_drawn_days holds exactly the ledger's per-day sums of its DRAWN
    and OVERAGE quantities, and quantities_per_day over ranges that start
    and end mid-day (or within one day, or at midnights) answers what a sum
    of the entries answers. Returns the days compared."""
    by_day = (
        "SELECT customer_id, credit_type_id, meter_id, date_bin('1 day', effective_at,"
        " '2000-01-01 00:00:00+00') AS day, sum(quantity) AS quantity"
        " FROM billing.credit_ledger WHERE tenant_id = $1 AND kind IN ('DRAWN', 'OVERAGE')"
        " AND ($2::timestamptz IS NULL OR effective_at >= $2)"
        " AND ($3::timestamptz IS NULL OR effective_at < $3) GROUP BY 1, 2, 3, 4"
    )
    kept = await pool.fetch(
        "SELECT customer_id, credit_type_id, meter_id, day, quantity"
        " FROM billing.credit_drawn_days WHERE tenant_id = $1",
        tenant,
    )
    summed = await pool.fetch(by_day, tenant, None, None)
    assert {tuple(r) for r in kept} == {tuple(r) for r in summed}
    assert summed
    (customer, type_id, meter_id, *_), *_ = summed
    first = min(r["day"] for r in summed) - timedelta(days=1)
    edges = [first + timedelta(hours=h) for h in (0, 24, 48, 72)]
    edges += [first + timedelta(minutes=rng.randrange(0, 4 * 24 * 60)) for _ in range(8)]
    async with pool.acquire() as conn:
        for lo in edges:
            for hi in edges:
                got = await store.quantities_per_day(
                    conn, tenant, str(customer), str(type_id), meter_id, lo, hi
                )
                rows = await conn.fetch(by_day, tenant, lo, hi) if lo < hi else []
                assert got == {r["day"]: r["quantity"] for r in rows if r["quantity"] != 0}
    return len(summed)


async def test_drawn_day_sums_equal_the_ledger_after_draws_corrections_and_a_replay(
    pool: Any,
) -> None:
    """The per-day sums reconciliation reads (migration 0011's trigger) stay
    equal to the ledger's entries through first draws, corrections of late
    events inside the recheck window (two replicas, passes killed midway),
    and a reconciliation that replays from a day settled long before."""
    rng = random.Random(7)
    tenant, customer_id, type_id, meter_id, start = await _setup(pool)
    meter = MinuteMeter()
    store = CreditStore(pool)
    billing = BillingStore(pool)
    replicas = [
        Credits(store, billing, meter, lag=timedelta(0), recheck=timedelta(hours=2))  # type: ignore[arg-type]
        for _ in range(2)
    ]
    now = datetime.now(UTC)

    def events(count: int, since: datetime) -> None:
        for _ in range(count):
            when = since + timedelta(seconds=rng.randrange(0, int((now - since).total_seconds())))
            meter.events.append(("cus", when, D(rng.choice(["0.4", "1", "2", "9"]))))

    # Draws: a day and a half, over at least two UTC days.
    events(80, start)
    await asyncio.gather(*(r.settle_tenant(tenant, now) for r in replicas))
    assert await _drawn_days_agree(pool, store, tenant, rng) >= 2
    # Corrections: late events in the recheck window, passes killed midway.
    for round_ in range(3):
        now += M
        events(10, now - timedelta(hours=1))
        task = asyncio.ensure_future(replicas[round_ % 2].settle_tenant(tenant, now))
        await asyncio.sleep(rng.random() * 0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(r.settle_tenant(tenant, now) for r in replicas))
    revised = await pool.fetchval(
        "SELECT count(*) FROM billing.credit_ledger WHERE tenant_id = $1 AND revision > 0"
        " AND kind IN ('DRAWN', 'OVERAGE')",
        tenant,
    )
    assert revised > 0
    await _drawn_days_agree(pool, store, tenant, rng)
    # A replay: late events on the first day (beyond the recheck window),
    # found by the reconciliation, which settles again from that day.
    async with pool.acquire() as conn:
        before = await store.quantities_per_day(
            conn, tenant, customer_id, type_id, meter_id, start, floor_minute(now)
        )
    meter.events += [("cus", start + timedelta(minutes=7), D(4)), ("cus", start, D(3))]
    later = now + 2 * M
    await replicas[0].settle_tenant(tenant, later)
    async with pool.acquire() as conn:
        drawn = await store.quantities_per_day(
            conn, tenant, customer_id, type_id, meter_id, start, floor_minute(later)
        )
    expected: dict[datetime, Decimal] = defaultdict(Decimal)
    for _, when, value in meter.events:
        if when < floor_minute(later):
            expected[floor_day(when)] += value
    assert drawn == {day: value for day, value in expected.items() if value}
    assert drawn[floor_day(start)] == before[floor_day(start)] + 7
    await _drawn_days_agree(pool, store, tenant, rng)


async def test_migration_0011_sums_the_days_the_ledger_holds_already(
    stack_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Upgrading a database whose ledger has entries: the migration sums them
    per day (every revision of DRAWN and OVERAGE, nothing else), and entries
    written after it add to its sums."""
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if int(path.name[:4]) < 11:
            shutil.copy(path, tmp_path)
    name = f"billing_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(stack_urls[0])
    await admin.execute(f'CREATE DATABASE "{name}"')
    pool = await db.create_pool(_with_database(stack_urls[0], name), min_size=1, max_size=2)
    try:
        assert (await db.migrate(pool, "billing", tmp_path))[-1] == 10
        customer, kind, day = uuid.uuid4(), uuid.uuid4(), datetime(2026, 3, 1, tzinfo=UTC)
        insert = (
            "INSERT INTO billing.credit_ledger (tenant_id, customer_id, credit_type_id, kind,"
            " entry_key, revision, amount, balance_after, effective_at, meter_id, quantity)"
            " VALUES ('t', $1, $2, $3, $4, $5, 0, 0, $6, $7, $8)"
        )
        entries = [
            ("DRAWN", "a", 0, day, "m1", D(5)),
            ("DRAWN", "a", 1, day, "m1", D(-2)),  # a correction
            ("OVERAGE", "b", 0, day + timedelta(hours=23, minutes=59), "m1", D("0.5")),
            ("DRAWN", "c", 0, day + timedelta(days=1), "m1", D(7)),  # the next day
            ("DRAWN", "d", 0, day, "m2", D(11)),  # another meter
            ("GRANTED", "e", 0, day, "", D(100)),  # not a draw
        ]
        await pool.executemany(insert, [(customer, kind, *e) for e in entries])
        shutil.copy(next(MIGRATIONS.glob("0011_*.sql")), tmp_path)
        assert await db.migrate(pool, "billing", tmp_path) == [11]
        sums = "SELECT meter_id, day, quantity FROM billing.credit_drawn_days ORDER BY 1, 2"
        assert [tuple(r) for r in await pool.fetch(sums)] == [
            ("m1", day, D("3.5")),
            ("m1", day + timedelta(days=1), D(7)),
            ("m2", day, D(11)),
        ]
        await pool.execute(insert, customer, kind, "DRAWN", "a", 2, day, "m1", D(1))
        assert tuple((await pool.fetch(sums))[0]) == ("m1", day, D("4.5"))
    finally:
        await pool.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_an_ended_subscription_draws_no_minute_past_its_last_grant(pool: Any) -> None:
    """A subscription that ends mid-minute: its last period's grant expires
    at the minute the period ends in (whole minutes), so its price draws no
    usage from that minute on (usage after its end would otherwise be drawn,
    or go to overage from a grant that expired), and its last invoice's credit
    figures hold the minutes drawn, no more: under BILL the rest is billed."""
    tenant, customer_id, _, meter_id, start = await _setup(pool)
    billing, store, meter = BillingStore(pool), CreditStore(pool), MinuteMeter()
    credits = Credits(store, billing, meter, lag=timedelta(0), recheck=timedelta(days=2))  # type: ignore[arg-type]
    now = datetime.now(UTC)
    (subscription,) = await billing.subscriptions(tenant, customer_id)
    last_start = start + timedelta(days=1)
    end = last_start + timedelta(minutes=20, seconds=30)  # mid-minute, before now
    subscription = await billing.cancel_subscription(tenant, subscription.id, end, now)
    meter.events += [
        ("cus", last_start + timedelta(minutes=5), D(10)),
        ("cus", end - timedelta(seconds=20), D(5)),  # the last minute, before the end
        ("cus", end + timedelta(seconds=20), D(7)),  # the same minute, after the end
    ]
    await credits.settle_tenant(tenant, now)  # grants each period's 100, draws
    entries = await pool.fetch(
        "SELECT kind, amount, effective_at FROM billing.credit_ledger"
        " WHERE kind IN ('DRAWN', 'OVERAGE') ORDER BY id"
    )
    assert [(e["kind"], e["amount"], e["effective_at"]) for e in entries] == [
        ("DRAWN", D(-10), last_start + timedelta(minutes=5))
    ]
    product = await billing.get_product(tenant, subscription.product_id)
    period = BillablePeriod(subscription, product, last_start, end)
    uses = await credits.apply_to_usage(
        tenant, [period], {(meter_id, last_start, end, "cus"): D(15)}, now
    )
    use = uses[(subscription.id, last_start, meter_id)]
    assert (use.consumed, use.drawn, use.covered, use.billable) == (D(15), D(10), D(10), D(0))
