"""Validation of CreditService's requests (faults #4, #5, #6, #8, #11, #12,
#13, #15 of branch `nu`'s session): each test is the smallest request that
showed the fault, or one of its class."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from tests.client import Client
from tests.e2e.test_credits import credits_of, refused
from usagebilling.billing.v1 import credit_pb2, customer_pb2, product_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.e2e


async def _type_and_customer(client: Client) -> tuple[str, str]:
    stub = credits_of(client)
    kind = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(name="t", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM),
    )
    await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="c")
    )
    return kind.id, "c"


def _grant(type_id: str, customer: str = "c", **fields: object) -> credit_pb2.GrantCreditsRequest:
    values: dict[str, object] = {"amount": "1", "idempotency_key": "k"}
    values.update(fields)
    return credit_pb2.GrantCreditsRequest(
        customer_id=customer,
        credit_type_id=type_id,
        **values,  # type: ignore[arg-type]
    )


# --- #5, #12: times are bounded ---


async def test_grant_effective_at_the_last_minute_of_time_is_invalid_argument(
    client: Client,
) -> None:
    """effective_time 9999-12-31T23:59:30Z: rounding it up to the next minute
    overflowed (INTERNAL)."""
    type_id, _ = await _type_and_customer(client)
    request = _grant(type_id)
    request.effective_time.FromDatetime(datetime(9999, 12, 31, 23, 59, 30, tzinfo=UTC))
    code, message = await refused(client.call(credits_of(client).GrantCredits, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert "effective_time" in message


async def test_grant_expiring_after_the_end_of_time_is_invalid_argument(client: Client) -> None:
    """effective_time 9999-12-31T23:58Z with expire_after 120 s: INTERNAL
    (OverflowError in effective + after)."""
    type_id, _ = await _type_and_customer(client)
    request = _grant(type_id, expire_after=Duration(seconds=120))
    request.effective_time.FromDatetime(datetime(9999, 12, 31, 23, 58, tzinfo=UTC))
    code, message = await refused(client.call(credits_of(client).GrantCredits, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert "effective_time" in message or "expire" in message


async def test_grant_times_far_ahead_are_refused_naming_the_field(client: Client) -> None:
    """Year 9000 was accepted as an effective time, and as an expiry."""
    type_id, _ = await _type_and_customer(client)
    stub = credits_of(client)
    far = datetime(9000, 1, 1, tzinfo=UTC)
    request = _grant(type_id)
    request.effective_time.FromDatetime(far)
    code, message = await refused(client.call(stub.GrantCredits, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "effective_time" in message, message
    assert "days" in message, message  # states the bound

    request = _grant(type_id)
    request.expire_time.FromDatetime(far)
    code, message = await refused(client.call(stub.GrantCredits, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expire_time" in message, message

    # Inside the bounds: a grant effective in a year, expiring a year later.
    request = _grant(type_id, idempotency_key="ok")
    request.effective_time.FromDatetime(datetime.now(UTC) + timedelta(days=365))
    request.expire_time.FromDatetime(datetime.now(UTC) + timedelta(days=730))
    grant = await client.call(stub.GrantCredits, request)
    assert grant.expire_time.ToDatetime(tzinfo=UTC).year >= datetime.now(UTC).year + 1


async def test_ledger_at_the_ends_of_time_answers(client: Client) -> None:
    """start_time year 1 and end_time 9999-12-31T23:59:59Z are valid
    Timestamps: the ledger answers (empty), never INTERNAL."""
    await _type_and_customer(client)
    request = credit_pb2.ListCreditLedgerRequest(customer_id="c")
    request.start_time.FromDatetime(datetime(1, 1, 1, tzinfo=UTC))
    request.end_time.FromDatetime(datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC))
    page = await client.call(credits_of(client).ListCreditLedger, request)
    assert list(page.entries) == []


# --- #8: a Duration's signs ---


async def test_grant_expire_after_with_mixed_signs_is_invalid_argument(client: Client) -> None:
    """Duration{seconds: 100, nanos: -5} is not a valid Duration: it was OK."""
    type_id, _ = await _type_and_customer(client)
    for after in (Duration(seconds=100, nanos=-5), Duration(seconds=-100, nanos=5)):
        code, message = await refused(
            client.call(credits_of(client).GrantCredits, _grant(type_id, expire_after=after))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "expire_after" in message, (
            code,
            message,
        )


# --- #4: an idempotency key reused for another grant ---


async def test_grant_key_reused_with_another_body_is_refused(client: Client) -> None:
    """A reused key with another grant answered the first grant with OK."""
    type_id, _ = await _type_and_customer(client)
    stub = credits_of(client)
    first = await client.call(stub.GrantCredits, _grant(type_id, amount="100"))
    again = await client.call(stub.GrantCredits, _grant(type_id, amount="100"))
    assert again.id == first.id  # the same body: the first grant, as documented
    code, message = await refused(
        client.call(
            stub.GrantCredits,
            _grant(type_id, amount="7", price_minor=500, price_currency="USD"),
        )
    )
    assert code == grpc.StatusCode.ALREADY_EXISTS, (code, message)
    assert "idempotency_key" in message


async def test_grant_key_reused_differing_in_any_field_is_refused(client: Client) -> None:
    type_id, _ = await _type_and_customer(client)
    stub = credits_of(client)
    other_type = await client.call(
        stub.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(name="u", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM),
    )
    other = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="d")
    )
    first = await client.call(
        stub.GrantCredits, _grant(type_id, amount="5", expire_after=Duration(seconds=3600))
    )
    # The same request again (by the customer's id this time): the first grant.
    same = await client.call(
        stub.GrantCredits,
        _grant(type_id, first.customer_id, amount="5", expire_after=Duration(seconds=3600)),
    )
    assert same.id == first.id
    variants = [
        _grant(type_id, amount="6", expire_after=Duration(seconds=3600)),
        _grant(type_id, amount="5", priority=3, expire_after=Duration(seconds=3600)),
        _grant(type_id, amount="5", expire_after=Duration(seconds=7200)),
        _grant(type_id, amount="5"),
        _grant(type_id, "d", amount="5", expire_after=Duration(seconds=3600)),
        _grant(other_type.id, amount="5", expire_after=Duration(seconds=3600)),
        _grant(type_id, amount="5", expire_after=Duration(seconds=3600), description="x"),
    ]
    for variant in variants:
        code, message = await refused(client.call(stub.GrantCredits, variant))
        assert code == grpc.StatusCode.ALREADY_EXISTS and "idempotency_key" in message, (
            variant,
            code,
            message,
        )
    assert other.id


# --- #6: an external id that is another customer's id ---


async def test_an_external_id_that_is_another_customers_id_is_refused(client: Client) -> None:
    """CreditService resolves customer_id as an id first: an external_id equal
    to X's id (in any letter case) would make Y's events and Y's grants reach
    different customers. CreateCustomer refuses it."""
    await _type_and_customer(client)
    x = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="x")
    )
    for external in (x.id, x.id.upper()):
        code, message = await refused(
            client.call(
                client.customers.CreateCustomer,
                customer_pb2.CreateCustomerRequest(external_id=external),
            )
        )
        assert code == grpc.StatusCode.ALREADY_EXISTS and "external_id" in message, (
            code,
            message,
        )
    # A UUID that is no customer's id remains a valid external id.
    y = await client.call(
        client.customers.CreateCustomer,
        customer_pb2.CreateCustomerRequest(external_id="6f1c1a52-3c4e-4f7a-9d43-0c1b2a3d4e5f"),
    )
    assert y.external_id == "6f1c1a52-3c4e-4f7a-9d43-0c1b2a3d4e5f"


# --- #11: ids' lengths ---


async def test_a_huge_customer_id_is_invalid_argument_and_not_echoed(client: Client) -> None:
    type_id, _ = await _type_and_customer(client)
    stub = credits_of(client)
    huge = "z" * 10_000
    calls = [
        stub.GrantCredits(_grant(type_id, huge), metadata=client.metadata),
        stub.GetCreditBalance(
            credit_pb2.GetCreditBalanceRequest(customer_id=huge, credit_type_id=type_id),
            metadata=client.metadata,
        ),
        stub.ListCreditLedger(
            credit_pb2.ListCreditLedgerRequest(customer_id=huge), metadata=client.metadata
        ),
        stub.AdjustCredits(
            credit_pb2.AdjustCreditsRequest(
                customer_id=huge,
                credit_type_id=type_id,
                amount="1",
                reason="r",
                idempotency_key="a",
            ),
            metadata=client.metadata,
        ),
    ]
    for call in calls:
        code, message = await refused(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "customer_id" in message, (
            code,
            message[:200],
        )
        assert len(message) < 200, message[:200]
    # An unknown id of an allowed length: NOT_FOUND echoing at most a short prefix.
    code, message = await refused(
        client.call(
            stub.GetCreditBalance,
            credit_pb2.GetCreditBalanceRequest(customer_id="q" * 255, credit_type_id=type_id),
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND and "customer_id" in message, (code, message)
    assert "q" * 100 not in message, message


# --- #13: blank names ---


async def test_a_blank_credit_type_name_is_refused(client: Client) -> None:
    for name in ("   ", "\t\n"):
        code, message = await refused(
            client.call(
                credits_of(client).CreateCreditType,
                credit_pb2.CreateCreditTypeRequest(
                    name=name, kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM
                ),
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "name" in message, (code, message)


# --- #15: messages say what is wrong and what is needed ---


async def test_an_amount_out_of_range_states_the_range(client: Client) -> None:
    type_id, _ = await _type_and_customer(client)
    code, message = await refused(
        client.call(credits_of(client).GrantCredits, _grant(type_id, amount="1e30"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "amount" in message, (code, message)
    assert "10^24" in message or "1e24" in message.lower(), message


async def test_an_overage_rule_without_a_credit_type_says_what_is_needed(
    client: Client,
) -> None:
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="n", event_name="n", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    request = product_pb2.CreateProductRequest(
        name="p",
        currency="USD",
        billing_interval=product_pb2.BILLING_INTERVAL_DAY,
        usage_prices=[
            product_pb2.UsagePrice(
                meter_id=meter.id,
                model=product_pb2.PRICE_MODEL_PER_UNIT,
                unit_price="1",
                overage_rule=credit_pb2.OVERAGE_RULE_DEFICIT,
            )
        ],
    )
    code, message = await refused(client.call(client.products.CreateProduct, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, message)
    assert "usage_prices[0].credit_type_id" in message and "overage_rule" in message, message
    assert "with credit_rate" not in message, message


async def test_an_expiry_in_the_past_says_effective_time_defaults_to_now(client: Client) -> None:
    type_id, _ = await _type_and_customer(client)
    request = _grant(type_id)
    request.expire_time.FromDatetime(datetime.now(UTC) - timedelta(hours=1))
    code, message = await refused(client.call(credits_of(client).GrantCredits, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expire_time" in message, (code, message)
    assert "now" in message, message


async def test_a_grant_repeated_after_its_effective_time_answers_the_first(
    client: Client,
) -> None:
    """A retry is compared with the first grant before the checks that depend
    on now: an effective_time that has passed since is no reason to refuse it."""
    type_id, _ = await _type_and_customer(client)
    stub = credits_of(client)
    request = _grant(type_id, expire_after=Duration(seconds=3600))
    request.effective_time.FromDatetime(datetime.now(UTC) - timedelta(seconds=2))
    first = await client.call(stub.GrantCredits, request)
    await asyncio.sleep(6)  # the effective time is now more than 5 s past
    again = await client.call(stub.GrantCredits, request)
    assert again.id == first.id
    assert again.expire_time == first.expire_time
