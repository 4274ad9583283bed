"""Credits over the real services: credit types, grants, draw-down of metered
usage, the balance in (near) real time, the ledger, idempotency, validation
and tenant isolation."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import grpc
import nats
import pytest
from google.protobuf.duration_pb2 import Duration
from nats.errors import TimeoutError as NatsTimeout

from tests.client import Client, event, eventually, status_of
from tests.credit_setup import credits_of, tokens_setup
from tools.credit_setup import credit_product
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import (
    credit_pb2,
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
)
from usagebilling.ingest.v1 import ingest_pb2

pytestmark = pytest.mark.e2e

D = Decimal


async def refused(call: object) -> tuple[grpc.StatusCode | None, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return status_of(exc), exc.details() or ""
    return None, ""


async def test_credit_types_are_validated_and_isolated(
    suite: Suite, client: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    stub = credits_of(client)
    kind = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name="USD credits", kind=credit_pb2.CREDIT_UNIT_KIND_CURRENCY, currency="USD"
        ),
    )
    assert (kind.precision, kind.currency) == (2, "USD")
    assert (
        await client.call(stub.GetCreditType, credit_pb2.GetCreditTypeRequest(id=kind.id))
    ) == kind
    listed = await client.call(stub.ListCreditTypes, credit_pb2.ListCreditTypesRequest())
    assert [t.id for t in listed.credit_types] == [kind.id]
    custom, currency = credit_pb2.CREDIT_UNIT_KIND_CUSTOM, credit_pb2.CREDIT_UNIT_KIND_CURRENCY
    for request, field in (
        (credit_pb2.CreateCreditTypeRequest(name="x", kind=custom, precision=4), "precision"),
        (credit_pb2.CreateCreditTypeRequest(name="x"), "kind"),
        (credit_pb2.CreateCreditTypeRequest(kind=custom), "name"),
        (credit_pb2.CreateCreditTypeRequest(name="x", kind=currency, currency="usd"), "currency"),
    ):
        code, details = await refused(stub.CreateCreditType(request, metadata=client.metadata))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    code, _ = await refused(
        stub.CreateCreditType(
            credit_pb2.CreateCreditTypeRequest(
                name="USD credits", kind=credit_pb2.CREDIT_UNIT_KIND_CURRENCY, currency="USD"
            ),
            metadata=client.metadata,
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS
    customer = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="cus_c")
    )
    code, details = await refused(
        stub.GrantCredits(
            credit_pb2.GrantCreditsRequest(
                customer_id="cus_c", credit_type_id=kind.id, amount="1.005", idempotency_key="k"
            ),
            metadata=client.metadata,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("amount"), details

    # Another tenant sees none of it.
    other = Client({s: suite.address(s) for s in SERVICES}, new_tenant()[1])
    try:
        theirs = credits_of(other)
        for call in (
            theirs.GetCreditType(
                credit_pb2.GetCreditTypeRequest(id=kind.id), metadata=other.metadata
            ),
            theirs.GrantCredits(
                credit_pb2.GrantCreditsRequest(
                    customer_id=customer.id, credit_type_id=kind.id, amount="1", idempotency_key="k"
                ),
                metadata=other.metadata,
            ),
            theirs.GetCreditBalance(
                credit_pb2.GetCreditBalanceRequest(customer_id=customer.id, credit_type_id=kind.id),
                metadata=other.metadata,
            ),
        ):  # fmt: skip
            assert (await refused(call))[0] == grpc.StatusCode.NOT_FOUND
        listed = await other.call(theirs.ListCreditTypes, credit_pb2.ListCreditTypesRequest())
        assert not listed.credit_types
        ledger = await other.call(theirs.ListCreditLedger, credit_pb2.ListCreditLedgerRequest())
        assert not ledger.entries
    finally:
        await other.close()


async def test_usage_draws_the_balance_down_in_real_time(client: Client) -> None:
    stub = credits_of(client)
    meter_id, type_id, customer_id = await tokens_setup(client, "cus_rt")
    start = datetime.now(UTC) - timedelta(hours=1)
    product = await credit_product(
        client.channels["billing"],
        client.metadata,
        name="Tokens",
        meter_id=meter_id,
        type_id=type_id,
        overage_rule=credit_pb2.OVERAGE_RULE_FORGIVE,
        customer_ids=[customer_id],
        start=start,
        timeout=30,
    )
    assert product.usage_prices[0].credit_type_id == type_id
    grant_request = credit_pb2.GrantCreditsRequest(
        customer_id="cus_rt",
        credit_type_id=type_id,
        amount="1000",
        idempotency_key="welcome",
        expire_after=Duration(seconds=30 * 86400),
    )
    grant = await client.call(stub.GrantCredits, grant_request)
    assert await client.call(stub.GrantCredits, grant_request) == grant  # idempotent
    effective = grant.effective_time.ToDatetime(tzinfo=UTC)
    assert effective.second == 0 and effective >= datetime.now(UTC) - timedelta(minutes=1)

    async def balance() -> credit_pb2.CreditBalance:
        answer: credit_pb2.CreditBalance = await client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id="cus_rt", credit_type_id=type_id),
        )
        return answer

    # Usage before the grant is effective draws nothing from it (FORGIVE).
    before = event("e-before", "cus_rt", "llm.call", effective - timedelta(seconds=30), tokens=50)
    await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=[before]))
    # Wait for the grant to take effect, then use 300 tokens.
    while datetime.now(UTC) < effective + timedelta(seconds=1):
        await asyncio.sleep(0.5)
    assert (await balance()).available == "1000"
    used = [event(f"e-{i}", "cus_rt", "llm.call", datetime.now(UTC), tokens=100) for i in range(3)]
    await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=used))
    answer = await eventually(balance, lambda b: b.available == "700", timeout=30)
    assert answer.available == "700"
    assert [(g.grant_id, g.remaining) for g in answer.grants] == [(grant.id, "700")]
    assert answer.overage_this_period == "50"  # the 50 tokens before the grant

    # Settled within a minute or so: the ledger has the draw and the overage.
    async def ledger() -> list[credit_pb2.CreditLedgerEntry]:
        page = await client.call(
            stub.ListCreditLedger, credit_pb2.ListCreditLedgerRequest(customer_id=customer_id)
        )
        return list(page.entries)

    entries = await eventually(
        ledger,
        lambda es: (
            sum(D(e.amount) for e in es) == 700
            and any(e.kind == credit_pb2.CREDIT_ENTRY_KIND_OVERAGE for e in es)
        ),
        timeout=120,
    )
    assert sum(D(e.amount) for e in entries) == 700
    kinds = sorted(credit_pb2.CreditEntryKind.Name(e.kind) for e in entries)
    assert kinds == [
        "CREDIT_ENTRY_KIND_DRAWN",
        "CREDIT_ENTRY_KIND_GRANTED",
        "CREDIT_ENTRY_KIND_OVERAGE",
    ]
    assert entries[-1].balance_after == "700"
    assert (await balance()).available == "700"


async def test_balance_low_is_announced_once_per_fall_and_adjustments_credit(
    suite: Suite, client: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    stub = credits_of(client)
    meter_id, _, customer_id = await tokens_setup(client, "cus_low")
    kind = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name="low-tokens",
            kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM,
            precision=0,
            low_balance_threshold="50",
        ),
    )
    await credit_product(
        client.channels["billing"],
        client.metadata,
        name="Low",
        meter_id=meter_id,
        type_id=kind.id,
        overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
        unit_price="0",
        customer_ids=[customer_id],
        start=datetime.now(UTC) - timedelta(hours=1),
        timeout=30,
    )
    adjust = credit_pb2.AdjustCreditsRequest(
        customer_id="cus_low",
        credit_type_id=kind.id,
        amount="100",
        reason="goodwill",
        idempotency_key="adj-1",
    )
    entry = await client.call(stub.AdjustCredits, adjust)
    assert (entry.kind, entry.amount, entry.description) == (
        credit_pb2.CREDIT_ENTRY_KIND_ADJUSTED,
        "100",
        "goodwill",
    )
    assert (await client.call(stub.AdjustCredits, adjust)).id == entry.id  # idempotent
    code, details = await refused(
        stub.AdjustCredits(
            credit_pb2.AdjustCreditsRequest(
                customer_id="cus_low",
                credit_type_id=kind.id,
                amount="0",
                reason="x",
                idempotency_key="adj-2",
            ),
            metadata=client.metadata,
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("amount"), details
    # The same key with another amount names the key.
    code, details = await refused(
        stub.AdjustCredits(
            credit_pb2.AdjustCreditsRequest(
                customer_id="cus_low",
                credit_type_id=kind.id,
                amount="101",
                reason="goodwill",
                idempotency_key="adj-1",
            ),
            metadata=client.metadata,
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS and details.startswith("idempotency_key"), details
    effective = entry.effective_time.ToDatetime(tzinfo=UTC)
    while datetime.now(UTC) < effective + timedelta(seconds=1):
        await asyncio.sleep(0.5)

    async def available() -> str:
        answer = await client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id="cus_low", credit_type_id=kind.id),
        )
        return str(answer.available)

    # 100 -> 40: below 50, announced; -> 30: still below, not again.
    await client.call(
        client.ingest.IngestEvents,
        ingest_pb2.IngestEventsRequest(
            events=[event("l1", "cus_low", "llm.call", datetime.now(UTC), tokens=60)]
        ),
    )
    assert await eventually(available, lambda v: v == "40", timeout=30) == "40"
    await asyncio.sleep(3)
    await client.call(
        client.ingest.IngestEvents,
        ingest_pb2.IngestEventsRequest(
            events=[event("l2", "cus_low", "llm.call", datetime.now(UTC), tokens=10)]
        ),
    )
    assert await eventually(available, lambda v: v == "30", timeout=30) == "30"
    await asyncio.sleep(3)

    async def lows() -> list[str]:
        connection = await nats.connect(suite.nats_url)
        try:
            js = connection.jetstream()
            sub = await js.pull_subscribe(
                "usagebilling.billing.v1.credit.balance_low", stream="BILLING"
            )
            found = []
            while True:
                try:
                    batch = await sub.fetch(100, timeout=1)
                except (NatsTimeout, TimeoutError):
                    break
                for message in batch:
                    payload = credit_pb2.CreditEvent.FromString(message.data)
                    if payload.entry.customer_id == customer_id:
                        assert payload.threshold == "50"
                        assert message.headers is not None
                        found.append(message.headers["Nats-Msg-Id"])
                    await message.ack()
            await sub.unsubscribe()
            return found
        finally:
            await connection.close()

    first = await eventually(lows, lambda f: len(f) >= 1, timeout=30)
    assert len(first) == 1

    # Another tenant cannot adjust this customer's credits or read its ledger.
    other = Client({s: suite.address(s) for s in SERVICES}, new_tenant()[1])
    try:
        theirs = credits_of(other)
        for call in (
            theirs.AdjustCredits(adjust, metadata=other.metadata),
            theirs.ListCreditLedger(
                credit_pb2.ListCreditLedgerRequest(customer_id=customer_id),
                metadata=other.metadata,
            ),
        ):
            assert (await refused(call))[0] == grpc.StatusCode.NOT_FOUND
    finally:
        await other.close()


async def test_debits_take_from_open_grants_in_draw_order_then_leave_a_deficit(
    client: Client,
) -> None:
    """AdjustCredits with a negative amount over the real services: taken at
    its minute from the grant expiring first, then the others; beyond the
    balance a deficit (even under FORGIVE) that the next grant repays; shown
    in the balance at once; idempotent on its key; the settled ledger sums
    to the balance, with one ADJUSTED entry per debit."""
    stub = credits_of(client)
    meter_id, type_id, customer_id = await tokens_setup(client, "cus_debit")
    await credit_product(
        client.channels["billing"],
        client.metadata,
        name="Debits",
        meter_id=meter_id,
        type_id=type_id,
        overage_rule=credit_pb2.OVERAGE_RULE_FORGIVE,
        customer_ids=[customer_id],
        start=datetime.now(UTC) - timedelta(hours=1),
        timeout=30,
    )

    async def grant(key: str, amount: str, expire_after: Duration | None) -> credit_pb2.CreditGrant:
        made: credit_pb2.CreditGrant = await client.call(
            stub.GrantCredits,
            credit_pb2.GrantCreditsRequest(
                customer_id="cus_debit",
                credit_type_id=type_id,
                amount=amount,
                idempotency_key=key,
                expire_after=expire_after,
            ),
        )
        return made

    async def wait_effective(g: credit_pb2.CreditGrant) -> None:
        while datetime.now(UTC) < g.effective_time.ToDatetime(tzinfo=UTC) + timedelta(seconds=1):
            await asyncio.sleep(0.5)

    async def balance() -> credit_pb2.CreditBalance:
        answer: credit_pb2.CreditBalance = await client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id="cus_debit", credit_type_id=type_id),
        )
        return answer

    def debit(key: str, amount: str) -> credit_pb2.AdjustCreditsRequest:
        return credit_pb2.AdjustCreditsRequest(
            customer_id="cus_debit",
            credit_type_id=type_id,
            amount=amount,
            reason=f"manual debit {key}",
            idempotency_key=key,
        )

    # Two grants: "soon" (100, expires in a day) is drawn before "never" (50).
    soon = await grant("soon", "100", Duration(seconds=86400))
    never = await grant("never", "50", None)
    await wait_effective(soon)
    await client.call(
        client.ingest.IngestEvents,
        ingest_pb2.IngestEventsRequest(
            events=[event("u1", "cus_debit", "llm.call", datetime.now(UTC), tokens=30)]
        ),
    )
    assert (await eventually(balance, lambda b: b.available == "120")).available == "120"

    # Debit 80: soon's 70, then 10 of never; the balance shows it at once.
    first = await client.call(stub.AdjustCredits, debit("d1", "-80"))
    assert (first.kind, first.amount, first.description, first.credits_uncovered) == (
        credit_pb2.CREDIT_ENTRY_KIND_ADJUSTED,
        "-80",
        "manual debit d1",
        "0",
    )
    assert first.effective_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)
    now = await balance()
    assert now.available == "40"
    assert [(g.grant_id, g.remaining) for g in now.grants] == [(never.id, "40")]
    # Idempotent: the same key answers the first entry; another amount or
    # sign with it is refused naming the key.
    assert await client.call(stub.AdjustCredits, debit("d1", "-80")) == first
    for amount in ("-70", "80"):
        code, details = await refused(
            stub.AdjustCredits(debit("d1", amount), metadata=client.metadata)
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS, (amount, code, details)
        assert details.startswith("idempotency_key"), details
    assert (await balance()).available == "40"

    # Debit 60 of the 40 left: 20 is a deficit (FORGIVE is about usage).
    second = await client.call(stub.AdjustCredits, debit("d2", "-60"))
    assert (second.amount, second.credits_uncovered) == ("-60", "20")
    assert (await balance()).available == "-20"
    # A grant two minutes on; usage the minute after the debit (usage of the
    # debit's own minute would draw before it) finds no credits: forgiven.
    minute = second.effective_time.ToDatetime(tzinfo=UTC)
    topup_request = credit_pb2.GrantCreditsRequest(
        customer_id="cus_debit", credit_type_id=type_id, amount="100", idempotency_key="topup"
    )
    topup_request.effective_time.FromDatetime(minute + timedelta(minutes=2))
    topup = await client.call(stub.GrantCredits, topup_request)
    while datetime.now(UTC) < minute + timedelta(minutes=1, seconds=1):
        await asyncio.sleep(0.5)
    await client.call(
        client.ingest.IngestEvents,
        ingest_pb2.IngestEventsRequest(
            events=[event("u2", "cus_debit", "llm.call", datetime.now(UTC), tokens=10)]
        ),
    )
    answer = await eventually(balance, lambda b: b.overage_this_period == "10")
    assert (answer.available, answer.overage_this_period) == ("-20", "10")

    # The next grant repays the deficit first.
    await wait_effective(topup)
    answer = await balance()
    assert answer.available == "80"
    assert [(g.grant_id, g.remaining) for g in answer.grants] == [(topup.id, "80")]

    # Settled: the ledger sums to the balance; one ADJUSTED entry per debit.
    async def ledger() -> list[credit_pb2.CreditLedgerEntry]:
        page = await client.call(
            stub.ListCreditLedger,
            credit_pb2.ListCreditLedgerRequest(customer_id=customer_id, page_size=1000),
        )
        return list(page.entries)

    entries = await eventually(
        ledger,
        lambda es: (
            sum(D(e.amount) for e in es) == 80
            and any(e.kind == credit_pb2.CREDIT_ENTRY_KIND_OVERAGE for e in es)
            and any(e.grant_id == topup.id and e.amount == "0" for e in es)
        ),  # the repayment
        timeout=120,
    )
    assert sum(D(e.amount) for e in entries) == 80
    adjusted = [
        (e.id, e.amount) for e in entries if e.kind == credit_pb2.CREDIT_ENTRY_KIND_ADJUSTED
    ]
    assert adjusted == [(first.id, "-80"), (second.id, "-60")]
    overage = [e for e in entries if e.kind == credit_pb2.CREDIT_ENTRY_KIND_OVERAGE]
    assert sum(D(e.credits_uncovered) for e in overage) == 10
    assert entries[-1].balance_after == "80"
    assert (await balance()).available == "80"


async def test_a_late_event_beyond_the_recheck_window_is_drawn(client: Client) -> None:
    """Settle up to now, then an event 3 hours back (within ingest's
    backdating window, beyond settlement's one-hour recheck) is folded by
    meter: settlement draws it from the grant open at its time, by a new
    entry, and the balance drops."""
    stub = credits_of(client)
    meter_id, type_id, customer_id = await tokens_setup(client, "cus_late")
    now = datetime.now(UTC)
    await credit_product(
        client.channels["billing"],
        client.metadata,
        name="Late tokens",
        meter_id=meter_id,
        type_id=type_id,
        overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
        included="1000",
        customer_ids=[customer_id],
        start=now - timedelta(hours=5),
        timeout=30,
    )

    async def ledger() -> list[credit_pb2.CreditLedgerEntry]:
        page = await client.call(
            stub.ListCreditLedger,
            credit_pb2.ListCreditLedgerRequest(customer_id=customer_id, page_size=1000),
        )
        return list(page.entries)

    async def balance() -> credit_pb2.CreditBalance:
        answer: credit_pb2.CreditBalance = await client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id="cus_late", credit_type_id=type_id),
        )
        return answer

    # Settled past a first event of now: its draw is in the ledger.
    first = event("late-0", "cus_late", "llm.call", now, tokens=100)
    await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=[first]))
    drawn = await eventually(ledger, lambda es: sum(D(e.amount) for e in es) == 900, timeout=120)
    assert sum(D(e.amount) for e in drawn) == 900
    grant_id = next(e.grant_id for e in drawn if e.kind == credit_pb2.CREDIT_ENTRY_KIND_GRANTED)

    # The late event: 3 hours back, folded by meter after that settlement.
    when = now - timedelta(hours=3)
    late = event("late-1", "cus_late", "llm.call", when, tokens=200)
    await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=[late]))
    minute = when.replace(second=0, microsecond=0)
    entries = await eventually(
        ledger,
        lambda es: any(e.effective_time.ToDatetime(tzinfo=UTC) == minute for e in es),
        timeout=150,
    )
    at_minute = [e for e in entries if e.effective_time.ToDatetime(tzinfo=UTC) == minute]
    assert [(e.kind, e.amount, e.quantity) for e in at_minute] == [
        (credit_pb2.CREDIT_ENTRY_KIND_DRAWN, "-200", "200")
    ]
    assert sum(D(e.amount) for e in entries) == 700
    assert (await eventually(balance, lambda b: b.available == "700")).available == "700"
    assert [(g.grant_id, g.remaining) for g in (await balance()).grants] == [(grant_id, "700")]
    # Settled again and again after: never drawn twice.
    await asyncio.sleep(3)
    assert sum(D(e.amount) for e in await ledger()) == 700


async def test_two_subscriptions_pricing_one_meter_each_draw_their_own(client: Client) -> None:
    """Two subscriptions of one customer, over the same time, whose products
    both price the tokens meter in the same credit type (rates 1 and 2): as
    each bills the meter's usage on its own invoice line without credits,
    each draws it from the balance at its own rate. Each draw is its own
    ledger entry holding the minute's quantity once, so that reconciliation
    (which compares the ledger's quantities with meter's) finds nothing to
    correct, and each invoice line shows its own draw and the usage it covered."""
    stub = credits_of(client)
    meter_id, type_id, customer_id = await tokens_setup(client, "cus_two")

    async def product(name: str, rate: str, included: str) -> product_pb2.Product:
        return await credit_product(
            client.channels["billing"],
            client.metadata,
            name=name,
            meter_id=meter_id,
            type_id=type_id,
            overage_rule=credit_pb2.OVERAGE_RULE_BILL,
            unit_price="0.01",
            credit_rate=rate,
            included=included,
        )

    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=1)
    subscriptions = []
    for made in (await product("Base", "1", "1000"), await product("Add-on", "2", "")):
        subscribe = subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer_id, product_id=made.id
        )
        subscribe.start_time.FromDatetime(start)  # the same periods
        subscriptions.append(await client.call(client.subscriptions.CreateSubscription, subscribe))
    when = start + timedelta(minutes=20)
    used = event("two-1", "cus_two", "llm.call", when + timedelta(seconds=5), tokens=100)
    await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=[used]))

    async def ledger() -> list[credit_pb2.CreditLedgerEntry]:
        page = await client.call(
            stub.ListCreditLedger,
            credit_pb2.ListCreditLedgerRequest(customer_id=customer_id, page_size=1000),
        )
        return list(page.entries)

    def draws(entries: list[credit_pb2.CreditLedgerEntry]) -> list[tuple[str, str]]:
        return sorted(
            (e.amount, e.quantity)
            for e in entries
            if e.kind == credit_pb2.CREDIT_ENTRY_KIND_DRAWN
            and e.effective_time.ToDatetime(tzinfo=UTC) == when
        )

    entries = await eventually(ledger, lambda es: sum(D(e.amount) for e in es) == 700, 120)
    assert draws(entries) == [("-100", "100"), ("-200", "100")]
    # Reconciled since (every 5 s here): nothing more to correct.
    await asyncio.sleep(12)
    assert len(await ledger()) == len(entries)
    balance = await client.call(
        stub.GetCreditBalance,
        credit_pb2.GetCreditBalanceRequest(customer_id="cus_two", credit_type_id=type_id),
    )
    assert balance.available == "700"

    lines = []
    for subscription in subscriptions:
        preview = await client.call(
            client.invoices.PreviewInvoice,
            invoice_pb2.PreviewInvoiceRequest(subscription_id=subscription.id),
        )
        lines += [
            (line.quantity, line.credits.credits_drawn, line.credits.quantity_covered)
            for line in preview.lines
            if line.meter_id == meter_id
        ]
    assert lines == [("100", "100", "100"), ("100", "200", "100")]
