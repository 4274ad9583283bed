"""List RPCs and their filters (faults #9, #10 of the `nu` session): a page
token answers only the request it was made for, a time range cannot end
before it starts, and GetCreditBalance answers canonical ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from tests.client import Client, event
from tests.e2e.test_credits import credits_of, refused
from usagebilling.billing.v1 import credit_pb2, customer_pb2
from usagebilling.ingest.v1 import ingest_pb2

pytestmark = pytest.mark.e2e


async def _type_and_customers(client: Client, *externals: str) -> str:
    kind = await client.call(
        credits_of(client).CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(name="t", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM),
    )
    for external in externals:
        await client.call(
            client.customers.CreateCustomer,
            customer_pb2.CreateCustomerRequest(external_id=external),
        )
    return str(kind.id)


async def test_a_ledger_page_token_is_bound_to_its_filters(client: Client) -> None:
    """A ListCreditLedger token of customer c passed with customer d answered
    d's entries after c's position; now INVALID_ARGUMENT naming page_token.
    The same token with the same filters and another page_size still pages."""
    type_id = await _type_and_customers(client, "c", "d")
    stub = credits_of(client)
    for who, key in (("c", "a"), ("c", "b"), ("d", "c")):
        await client.call(
            stub.GrantCredits,
            credit_pb2.GrantCreditsRequest(
                customer_id=who, credit_type_id=type_id, amount="1", idempotency_key=key
            ),
        )
    page = await client.call(
        stub.ListCreditLedger, credit_pb2.ListCreditLedgerRequest(customer_id="c", page_size=1)
    )
    assert page.next_page_token
    token = page.next_page_token
    for other in (
        credit_pb2.ListCreditLedgerRequest(customer_id="d", page_size=1, page_token=token),
        credit_pb2.ListCreditLedgerRequest(page_size=1, page_token=token),
        credit_pb2.ListCreditLedgerRequest(
            customer_id="c", kind=credit_pb2.CREDIT_ENTRY_KIND_GRANTED, page_token=token
        ),
    ):
        code, message = await refused(client.call(stub.ListCreditLedger, other))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
        assert message.startswith("page_token: made for another request"), message
    rest = await client.call(
        stub.ListCreditLedger,
        credit_pb2.ListCreditLedgerRequest(customer_id="c", page_size=10, page_token=token),
    )
    entries = list(page.entries) + list(rest.entries)
    assert len({e.id for e in entries}) == 2  # c's two grants, once each
    assert {e.customer_id for e in entries} == {page.entries[0].customer_id}
    assert not rest.next_page_token


async def test_an_events_page_token_is_bound_to_its_filters(client: Client) -> None:
    """The same fault on ListEvents (customer_id filter): refused now."""
    base = datetime.now(UTC) - timedelta(hours=1)
    await client.send_events(
        [
            event(f"e-{i}", "cus-a" if i < 3 else "cus-b", "x", base + timedelta(minutes=i))
            for i in range(5)
        ]
    )
    page = await client.call(
        client.ingest.ListEvents, ingest_pb2.ListEventsRequest(customer_id="cus-a", page_size=1)
    )
    assert page.next_page_token
    code, message = await refused(
        client.call(
            client.ingest.ListEvents,
            ingest_pb2.ListEventsRequest(
                customer_id="cus-b", page_size=1, page_token=page.next_page_token
            ),
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert message.startswith("page_token: "), message


async def test_a_time_range_that_ends_before_it_starts_is_invalid(client: Client) -> None:
    """ListCreditLedger and ListEvents with start_time > end_time answered OK
    with an empty page; now INVALID_ARGUMENT naming end_time."""
    now = datetime.now(UTC).replace(microsecond=0)
    ledger = credit_pb2.ListCreditLedgerRequest()
    ledger.start_time.FromDatetime(now)
    ledger.end_time.FromDatetime(now - timedelta(hours=1))
    events = ingest_pb2.ListEventsRequest()
    events.start_time.FromDatetime(now)
    events.end_time.FromDatetime(now - timedelta(hours=1))
    for call in (
        client.call(credits_of(client).ListCreditLedger, ledger),
        client.call(client.ingest.ListEvents, events),
    ):
        code, message = await refused(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
        assert message.startswith("end_time: "), message
    ledger.end_time.FromDatetime(now)  # an empty range is a valid (empty) filter
    page = await client.call(credits_of(client).ListCreditLedger, ledger)
    assert not page.entries


async def test_balance_answers_the_canonical_credit_type_id(client: Client) -> None:
    """GetCreditBalance with an upper-case credit_type_id echoed it as sent,
    while customer_id came back canonical."""
    type_id = await _type_and_customers(client, "c")
    balance = await client.call(
        credits_of(client).GetCreditBalance,
        credit_pb2.GetCreditBalanceRequest(customer_id="c", credit_type_id=type_id.upper()),
    )
    assert balance.credit_type_id == type_id.lower() == type_id
