"""The credits example of issue 13 end to end, over the real services.

A Starter plan ($29 per period, 10,000,000 tokens included, FORGIVE: the
application stops serving at zero by reading the balance) and a Pro plan ($99,
40,000,000 tokens included, overage billed at $0.005 per 1,000 tokens), both
rolling 50 % of unused included tokens (capped at 20,000,000, once) into the
next period; a $19 top-up of 5,000,000 tokens that expires after 30 days.
Periods are days here (the issue's months would put the first period beyond
ingest's 35-day backdating window); nothing in credits depends on the length.

Time line (S = the last whole minute, less 2 days and 2 hours):
    P1 = [S, S+1d), P2 = [S+1d, S+2d) (ended 2 h ago), P3 = [S+2d, S+3d) (now).
Usage (sent before the subscriptions exist, so the first settlement sees it all):
    alice (Starter)  S+1h: 6,000,000      S+1d+1h: 13,000,000   now: 12,000,000
    bob   (Pro)      S+2h: 1,000,000      S+1d+3h: 70,000,000

By hand, alice:
    P1: 10,000,000 granted; 6,000,000 drawn; 4,000,000 left at S+1d: 50 % =
        2,000,000 rolls over (a new grant expiring with P2's), 2,000,000 forfeited.
    P2: 10,000,000 granted; 13,000,000 used: 2,000,000 from the rolled-over
        grant (older: drawn first), 10,000,000 from P2's, 1,000,000 uncovered
        (FORGIVE: an OVERAGE entry of 0, not billed). Balance 0 at the end.
    P3: 10,000,000 granted. Top-up +5,000,000 (invoice $19.00) = 15,000,000;
        then 12,000,000 used: P3's grant first (it expires first), then
        2,000,000 of the top-up: 3,000,000 left.
    Invoices: P1 $29.00 (6,000,000 consumed, all covered); P2 $29.00
        (13,000,000 consumed, 12,000,000 covered, 1,000,000 forgiven).
bob:
    P1: 40,000,000 granted; 1,000,000 drawn; 39,000,000 left: 19,500,000 rolls
        over (under the cap), 19,500,000 forfeited.
    P2: 40,000,000 granted; 70,000,000 used: 19,500,000 + 40,000,000 covered,
        10,500,000 billed: 10,500,000 x 0.000005 = $52.50.
    P3: 40,000,000 granted: balance 40,000,000.
    Invoices: P1 $99.00; P2 $99.00 + $52.50 = $151.50.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aiohttp
import nats
import pytest
from google.protobuf.duration_pb2 import Duration
from nats.errors import TimeoutError as NatsTimeout

from tests.client import Client, event, eventually
from tests.e2e.test_billing_scenario import ingest, run_cycle, settled
from tools.suite import Suite
from usagebilling.billing.v1 import (
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
)
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e

D = Decimal
M = 1_000_000
K = credit_pb2.CreditEntryKind


def kinds_amounts(entries: list[credit_pb2.CreditLedgerEntry]) -> list[tuple[str, int, int]]:
    return [
        (K.Name(e.kind).removeprefix("CREDIT_ENTRY_KIND_"), int(e.amount), int(e.balance_after))
        for e in entries
    ]


async def test_credits_scenario(suite: Suite, client: Client) -> None:
    stub = credit_pb2_grpc.CreditServiceStub(client.channels["billing"])
    now = datetime.now(UTC)
    s = now.replace(second=0, microsecond=0) - timedelta(days=2, hours=2)
    day = timedelta(days=1)

    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="tokens",
            event_name="llm.call",
            aggregation=meter_pb2.AGGREGATION_SUM,
            property="tokens",
        ),
    )
    tokens = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name="tokens", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM, precision=0
        ),
    )
    customers = {}
    for name in ("alice", "bob"):
        customers[name] = await client.call(
            client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id=name)
        )

    usage = [
        ("alice", s + timedelta(hours=1), 6 * M),
        ("alice", s + day + timedelta(hours=1), 13 * M),
        ("bob", s + timedelta(hours=2), 1 * M),
        ("bob", s + day + timedelta(hours=3), 70 * M),
    ]
    await ingest(
        client,
        [event(f"u{i}", who, "llm.call", when, tokens=n) for i, (who, when, n) in enumerate(usage)],
    )
    await settled(client, meter.id, "alice", s, s + 2 * day, str(19 * M))
    await settled(client, meter.id, "bob", s, s + 2 * day, str(71 * M))

    rollover = credit_pb2.RolloverPolicy(percent="50", cap=str(20 * M), max_rollovers=1)

    async def plan(name: str, fee: int, included: int, rule: int) -> product_pb2.Product:
        product: product_pb2.Product = await client.call(
            client.products.CreateProduct,
            product_pb2.CreateProductRequest(
                name=name,
                currency="USD",
                billing_interval=product_pb2.BILLING_INTERVAL_DAY,
                fixed_price_minor=fee,
                usage_prices=[
                    product_pb2.UsagePrice(
                        meter_id=meter.id,
                        model=product_pb2.PRICE_MODEL_PER_UNIT,
                        unit_price="0.000005",  # $0.005 per 1,000 tokens
                        credit_type_id=tokens.id,
                        credit_rate="1",
                        overage_rule=rule,  # type: ignore[arg-type]
                    )
                ],
                included_credits=[
                    product_pb2.IncludedCredits(
                        credit_type_id=tokens.id, amount=str(included), rollover=rollover
                    )
                ],
            ),
        )
        return product

    starter = await plan("Starter", 2900, 10 * M, credit_pb2.OVERAGE_RULE_FORGIVE)
    pro = await plan("Pro", 9900, 40 * M, credit_pb2.OVERAGE_RULE_BILL)
    assert starter.included_credits[0].rollover.percent == "50"
    assert pro.usage_prices[0].overage_rule == credit_pb2.OVERAGE_RULE_BILL
    for name, product in (("alice", starter), ("bob", pro)):
        subscribe = subscription_pb2.CreateSubscriptionRequest(
            customer_id=customers[name].id, product_id=product.id
        )
        subscribe.start_time.FromDatetime(s)
        await client.call(client.subscriptions.CreateSubscription, subscribe)

    async def ledger(name: str) -> list[credit_pb2.CreditLedgerEntry]:
        entries: list[credit_pb2.CreditLedgerEntry] = []
        token = ""
        while True:
            page = await client.call(
                stub.ListCreditLedger,
                credit_pb2.ListCreditLedgerRequest(
                    customer_id=name, credit_type_id=tokens.id, page_size=4, page_token=token
                ),
            )
            entries += page.entries
            if not (token := page.next_page_token):
                return entries

    async def balance(name: str) -> credit_pb2.CreditBalance:
        answer: credit_pb2.CreditBalance = await client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id=name, credit_type_id=tokens.id),
        )
        return answer

    # Settled by billing's credit task (every second): the ledgers by hand.
    alice_ledger = [
        ("GRANTED", 10 * M, 10 * M),  # P1
        ("GRANTED", 10 * M, 20 * M),  # P2
        ("GRANTED", 10 * M, 30 * M),  # P3
        ("DRAWN", -6 * M, 24 * M),  # S+1h
        ("FORFEITED", -2 * M, 22 * M),  # S+1d: half of P1's 4,000,000 ...
        ("ROLLED_OVER", 0, 22 * M),  # ... and the other half rolls over
        ("DRAWN", -12 * M, 10 * M),  # S+1d+1h: 2,000,000 rolled + 10,000,000
        ("OVERAGE", 0, 10 * M),  # 1,000,000 forgiven
    ]
    bob_ledger = [
        ("GRANTED", 40 * M, 40 * M),
        ("GRANTED", 40 * M, 80 * M),
        ("GRANTED", 40 * M, 120 * M),
        ("DRAWN", -1 * M, 119 * M),
        ("FORFEITED", -19_500_000, 99_500_000),
        ("ROLLED_OVER", 0, 99_500_000),
        ("DRAWN", -59_500_000, 40 * M),
        ("OVERAGE", 0, 40 * M),
    ]

    async def ledger_is(name: str, expected: list[tuple[str, int, int]]) -> None:
        async def probe() -> list[credit_pb2.CreditLedgerEntry]:
            return await ledger(name)

        entries = await eventually(probe, lambda es: kinds_amounts(es) == expected, timeout=120)
        assert kinds_amounts(entries) == expected

    await ledger_is("alice", alice_ledger)
    await ledger_is("bob", bob_ledger)
    alice_entries = await ledger("alice")
    assert [int(e.credits_uncovered) for e in alice_entries][-1] == 1 * M
    drawn = alice_entries[6]
    assert drawn.window_start.ToDatetime(tzinfo=UTC) == s + day + timedelta(hours=1)
    assert drawn.window_end.ToDatetime(tzinfo=UTC) == s + day + timedelta(hours=1, minutes=1)
    assert (await balance("alice")).available == str(10 * M)
    bob_balance = await balance("bob")
    assert bob_balance.available == str(40 * M)
    assert bob_balance.overage_this_period == "0"  # P2's overage was last period

    # The period invoices: credits cover what they drew; only Pro's overage is billed.
    invoice_ids = await run_cycle(client, now)
    assert len(invoice_ids) == 4
    listed = {}
    for name in ("alice", "bob"):
        answer = await client.call(
            client.invoices.ListInvoices,
            invoice_pb2.ListInvoicesRequest(customer_id=customers[name].id),
        )
        listed[name] = [
            (
                i.total_minor,
                [(line.quantity, line.free_quantity, line.billable_quantity, line.amount_minor)
                 for line in i.lines if line.meter_id],
            )
            for i in answer.invoices  # newest period first
        ]  # fmt: skip
    assert listed["alice"] == [
        (2900, [(str(13 * M), str(13 * M), "0", 0)]),
        (2900, [(str(6 * M), str(6 * M), "0", 0)]),
    ]
    assert listed["bob"] == [
        (15150, [(str(70 * M), str(59_500_000), str(10_500_000), 5250)]),
        (9900, [(str(1 * M), str(1 * M), "0", 0)]),
    ]
    # Each usage line's credit fields (InvoiceLineCredits): quantity, credits
    # drawn, quantity covered, overage, billable overage and its amount.
    figures: dict[str, list[tuple[str, ...]]] = {}
    invoices: dict[str, list[invoice_pb2.Invoice]] = {}
    for name in ("alice", "bob"):
        answer = await client.call(
            client.invoices.ListInvoices,
            invoice_pb2.ListInvoicesRequest(customer_id=customers[name].id),
        )
        invoices[name] = list(answer.invoices)
        figures[name] = [
            (
                line.quantity,
                line.credits.credit_type_id,
                line.credits.credit_rate,
                line.credits.credits_drawn,
                line.credits.quantity_covered,
                line.credits.overage_quantity,
                credit_pb2.OverageRule.Name(line.credits.overage_rule),
                line.credits.billable_overage_quantity,
                str(line.credits.overage_amount_minor),
                str(line.amount_minor),
            )
            for i in answer.invoices
            for line in i.lines
            if line.meter_id
        ]
    t = tokens.id
    assert figures["alice"] == [
        # P2: 13,000,000 consumed, 12,000,000 drawn and covered, 1,000,000 forgiven.
        (str(13 * M), t, "1", str(12 * M), str(12 * M), str(1 * M), "OVERAGE_RULE_FORGIVE",
         "0", "0", "0"),
        # P1: 6,000,000 consumed, all covered.
        (str(6 * M), t, "1", str(6 * M), str(6 * M), "0", "OVERAGE_RULE_FORGIVE", "0", "0", "0"),
    ]  # fmt: skip
    assert figures["bob"] == [
        # P2: 70,000,000 consumed, 59,500,000 covered, 10,500,000 billed: $52.50.
        (str(70 * M), t, "1", "59500000", "59500000", "10500000", "OVERAGE_RULE_BILL",
         "10500000", "5250", "5250"),
        (str(1 * M), t, "1", str(1 * M), str(1 * M), "0", "OVERAGE_RULE_BILL", "0", "0", "0"),
    ]  # fmt: skip
    # The fixed fee draws no credits: no credit fields.
    assert not any(line.HasField("credits") for line in invoices["bob"][0].lines[:1])
    # The same fields over HTTP/JSON (proto JSON names).
    async with aiohttp.ClientSession() as session:
        url = suite.http_url("billing") + "/usagebilling.billing.v1.InvoiceService/GetInvoice"
        headers = {"Content-Type": "application/json", client.metadata[0][0]: client.metadata[0][1]}
        body = json.dumps({"id": invoices["bob"][0].id})
        async with session.post(url, data=body, headers=headers) as http_answer:
            assert http_answer.status == 200
            document = await http_answer.json()
    usage_line = next(line for line in document["lines"] if line.get("meterId"))
    assert usage_line["credits"] == {
        "creditTypeId": t,
        "creditTypeName": "tokens",
        "creditRate": "1",
        "creditsDrawn": "59500000",
        "quantityCovered": "59500000",
        "overageQuantity": "10500000",
        "overageRule": "OVERAGE_RULE_BILL",
        "billableOverageQuantity": "10500000",
        "overageAmountMinor": "5250",
    }

    # Alice buys a $19 top-up of 5,000,000 tokens expiring after 30 days.
    top_up = await client.call(
        stub.GrantCredits,
        credit_pb2.GrantCreditsRequest(
            customer_id="alice",
            credit_type_id=tokens.id,
            amount=str(5 * M),
            idempotency_key="top-up-1",
            description="5M tokens pack",
            expire_after=Duration(seconds=30 * 86400),
            price_minor=1900,
            price_currency="USD",
        ),
    )
    effective = top_up.effective_time.ToDatetime(tzinfo=UTC)
    assert top_up.expire_time.ToDatetime(tzinfo=UTC) == effective + timedelta(days=30)
    invoice = await client.call(
        client.invoices.GetInvoice, invoice_pb2.GetInvoiceRequest(id=top_up.invoice_id)
    )
    assert invoice.status == invoice_pb2.INVOICE_STATUS_FINALIZED
    assert (invoice.total_minor, invoice.currency, invoice.subscription_id) == (1900, "USD", "")
    assert invoice.number.startswith("INV-")
    assert [line.description for line in invoice.lines] == [
        "Credits top-up: 5000000 tokens credits (5M tokens pack)"
    ]
    while datetime.now(UTC) < effective + timedelta(seconds=1):
        await asyncio.sleep(0.5)
    assert (await balance("alice")).available == str(15 * M)
    await ingest(client, [event("u-now", "alice", "llm.call", datetime.now(UTC), tokens=12 * M)])
    answer = await eventually(
        lambda: balance("alice"), lambda b: b.available == str(3 * M), timeout=30
    )
    assert answer.available == str(3 * M)
    assert [(g.grant_id, g.remaining) for g in answer.grants] == [(top_up.id, str(3 * M))]
    assert answer.next_expire_time == top_up.expire_time
    alice_after = [*alice_ledger, ("GRANTED", 5 * M, 15 * M), ("DRAWN", -12 * M, 3 * M)]
    entries = await eventually(
        lambda: ledger("alice"), lambda es: kinds_amounts(es) == alice_after, timeout=120
    )
    assert kinds_amounts(entries) == alice_after

    # Every entry is announced once on the BILLING stream: one message per
    # entry (Nats-Msg-Id: the entry), but draws summarized per customer, type
    # and minute (one meter here: one part each).
    ids = {e.id for e in entries}
    draws = {e.id: e for e in entries if e.kind == K.CREDIT_ENTRY_KIND_DRAWN}

    async def announced() -> dict[str, str]:
        connection = await nats.connect(suite.nats_url)
        try:
            js = connection.jetstream()
            sub = await js.pull_subscribe("usagebilling.billing.v1.credit.>", stream="BILLING")
            found: dict[str, str] = {}
            while True:
                try:
                    batch = await sub.fetch(500, timeout=1)
                except (NatsTimeout, TimeoutError):
                    break
                for message in batch:
                    payload = credit_pb2.CreditEvent.FromString(message.data)
                    assert message.headers is not None
                    msg_id = message.headers["Nats-Msg-Id"]
                    if payload.entry.id in ids:
                        assert msg_id == f"credit-entry-{payload.entry.id}"
                        found[payload.entry.id] = message.subject
                    parts = payload.draw_down.meters
                    if parts and parts[0].entry_id in draws:
                        entry = draws[parts[0].entry_id]
                        assert len(parts) == 1 and parts[0].meter_id == meter.id
                        assert payload.draw_down.credits_drawn == str(-int(entry.amount))
                        assert parts[0].quantity == entry.quantity
                        assert payload.draw_down.window_start == entry.window_start
                        assert payload.draw_down.balance_after == entry.balance_after
                        minute = entry.window_start.ToDatetime(tzinfo=UTC)
                        assert msg_id == (
                            f"credit-drawn-{customers['alice'].id}-{tokens.id}-"
                            f"{minute:%Y%m%dT%H%MZ}-{entry.id}"
                        )
                        found[entry.id] = message.subject
                    await message.ack()
            await sub.unsubscribe()
            return found
        finally:
            await connection.close()

    messages = await eventually(announced, lambda f: set(f) == ids, timeout=30)
    assert set(messages) == ids
    assert sorted(set(messages.values())) == [
        f"usagebilling.billing.v1.credit.{k}"
        for k in ("drawn", "forfeited", "granted", "overage", "rolled_over")
    ]
