"""Faults of billing's prepaid credits found by an attacker's session (branch
`nu`): concurrent debits of one account stalling billing's database work, and
usage or credit rates too large for the credits' arithmetic."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from tests.client import Client, event, eventually, status_of
from tests.credit_setup import credits_of, tokens_setup
from tests.e2e.test_credits import refused
from tools.credit_setup import credit_product
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import credit_pb2, customer_pb2, product_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e


async def test_concurrent_debits_of_one_account_do_not_stall_billing(
    suite: Suite, client: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    """20 concurrent AdjustCredits debits of one account: each held a pool
    connection (pool of 10) while it waited for the account's row lock, and
    the one holding the lock then needed another connection (the prices'
    read) from the exhausted pool. All but one hung until their deadline, and
    meanwhile another tenant's GetCreditBalance waited ~28 s (found with 12
    calls under `make run`: 11 DEADLINE_EXCEEDED after 30 s). All must answer
    OK, and the other tenant's balance promptly (a generous bound)."""
    meter_id, type_id, customer_id = await tokens_setup(client, "cus_dos")
    await credit_product(
        client.channels["billing"],
        client.metadata,
        name="dos",
        meter_id=meter_id,
        type_id=type_id,
        overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
        customer_ids=[customer_id],
        start=datetime.now(UTC),
    )
    stub = credits_of(client)

    _, other_secret = new_tenant()
    other = Client({s: suite.address(s) for s in SERVICES}, other_secret)
    try:
        other_type = await other.call(
            credits_of(other).CreateCreditType,
            credit_pb2.CreateCreditTypeRequest(name="o", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM),
        )
        await other.call(
            other.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="o")
        )

        async def debit() -> Any:
            request = credit_pb2.AdjustCreditsRequest(
                customer_id="cus_dos",
                credit_type_id=type_id,
                amount="-1",
                reason="r",
                idempotency_key=uuid.uuid4().hex,
            )
            try:
                return await stub.AdjustCredits(request, metadata=client.metadata, timeout=60)
            except grpc.aio.AioRpcError as error:
                return status_of(error)

        async def other_balance() -> float:
            await asyncio.sleep(1)
            loop = asyncio.get_running_loop()
            began = loop.time()
            await credits_of(other).GetCreditBalance(
                credit_pb2.GetCreditBalanceRequest(customer_id="o", credit_type_id=other_type.id),
                metadata=other.metadata,
                timeout=60,
            )
            return loop.time() - began

        results = await asyncio.gather(*(debit() for _ in range(20)), other_balance())
    finally:
        await other.close()
    debits, waited = results[:-1], results[-1]
    failed = [r for r in debits if not isinstance(r, credit_pb2.CreditLedgerEntry)]
    assert not failed, failed
    assert waited < 20, f"another tenant's GetCreditBalance took {waited:.1f} s"


async def test_one_huge_event_does_not_stop_the_tenants_settlement(client: Client) -> None:
    """One event of tokens = 1e25 (a valid number for ingest) on an ordinary
    credit price (rate 1, a type of 3 decimals): its minute's draw cannot be
    quantized (decimal.InvalidOperation), so GetCreditBalance of that
    customer was INTERNAL and billing's settlement of the whole tenant
    failed every second (`credit_settlement_failed`): another customer of
    the tenant, with ordinary usage, never got a ledger entry."""
    stub = credits_of(client)
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="tok", event_name="llm", aggregation=meter_pb2.AGGREGATION_SUM, property="tokens"
        ),
    )
    kind = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name="t", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM, precision=3
        ),
    )
    ids = []
    for external in ("big", "ok"):
        customer = await client.call(
            client.customers.CreateCustomer,
            customer_pb2.CreateCustomerRequest(external_id=external),
        )
        ids.append(customer.id)
    await credit_product(
        client.channels["billing"],
        client.metadata,
        name="p",
        meter_id=meter.id,
        type_id=kind.id,
        overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
        customer_ids=ids,
        start=datetime.now(UTC) - timedelta(hours=1),
    )
    now = datetime.now(UTC)
    await client.send_events(
        [event("e-big", "big", "llm", now, tokens=1e25), event("e-ok", "ok", "llm", now, tokens=5)]
    )
    usage = meter_pb2.QueryUsageRequest(meter_id=meter.id, customer_id="big")
    usage.start_time.FromDatetime(now - timedelta(minutes=1))
    usage.end_time.FromDatetime(now + timedelta(minutes=1))
    counted = await eventually(
        lambda: client.call(client.meter.QueryUsage, usage),
        lambda r: any(row.value not in ("", "0") for row in r.rows),
    )
    assert any(row.value not in ("", "0") for row in counted.rows), counted
    code, message = await refused(
        client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id="big", credit_type_id=kind.id),
        )
    )
    assert code in (None, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION), (
        code,
        message,
    )

    # The other customer's minute is settled once it ends (a DEFICIT overage of 5).
    async def ledger() -> list[credit_pb2.CreditLedgerEntry]:
        page = await client.call(
            stub.ListCreditLedger,
            credit_pb2.ListCreditLedgerRequest(customer_id="ok", credit_type_id=kind.id),
        )
        return list(page.entries)

    entries = await eventually(ledger, lambda es: bool(es), timeout=150)
    assert [(e.kind, e.amount) for e in entries] == [
        (credit_pb2.CREDIT_ENTRY_KIND_OVERAGE, "-5")
    ], entries


async def test_a_credit_rate_out_of_bounds_is_refused_naming_it(client: Client) -> None:
    """CreateProduct accepted credit_rate "1e99" (one unit of usage is then
    1e99 credits: GetCreditBalance answered INTERNAL and the tenant's
    settlement failed every second) and "1e-30" (every minute's draw rounds
    to nothing). Rates are at most 1e12 with at most 12 decimals."""
    stub = credits_of(client)
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="n", event_name="n", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    kind = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name="t", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM, precision=3
        ),
    )

    def product(rate: str) -> product_pb2.CreateProductRequest:
        return product_pb2.CreateProductRequest(
            name="p",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter.id,
                    model=product_pb2.PRICE_MODEL_PER_UNIT,
                    unit_price="1",
                    credit_type_id=kind.id,
                    credit_rate=rate,
                    overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
                )
            ],
        )

    for rate in ("1e99", "1e-30"):
        code, message = await refused(client.call(client.products.CreateProduct, product(rate)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rate, code, message)
        assert "usage_prices[0].credit_rate" in message, (rate, message)
    made = await client.call(client.products.CreateProduct, product("0.000000000001"))
    assert made.usage_prices[0].credit_rate in ("1E-12", "0.000000000001"), made
