"""Every client mistake gets INVALID_ARGUMENT naming what is wrong, never
INTERNAL or UNKNOWN: one regression per input that once did (issue 10), sent
over gRPC to the running services, with no traceback in their logs."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import grpc
import pytest

from tests.client import Client
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import (
    customer_pb2,
    invoice_pb2,
    product_pb2,
    tenant_pb2,
    tenant_pb2_grpc,
)
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT
SOME_ID = "0b7e2c9a-5d3f-4e61-9a0c-2f4d6b8e1a37"


async def _error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


async def _stream_error(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), str(error.details())
    return grpc.StatusCode.OK, ""


@pytest.fixture
def quiet_logs(suite: Suite) -> Iterator[None]:
    """Fails the test when a service logged a traceback or an error meanwhile."""
    sizes = {s: (suite.log_dir / f"{s}.log").stat().st_size for s in SERVICES}
    yield
    for service in SERVICES:
        with open(suite.log_dir / f"{service}.log", "rb") as log:
            log.seek(sizes[service])
            new = log.read().decode(errors="replace")
        assert "Traceback" not in new, f"{service} logged a traceback:\n{new[-3000:]}"
        assert '"level": "error"' not in new, f"{service} logged an error:\n{new[-3000:]}"


async def test_nul_characters_are_invalid_and_named(
    suite: Suite, client: Client, quiet_logs: None
) -> None:
    md = client.metadata
    cases: list[tuple[Any, str]] = [
        (
            client.ingest.GetEvent(ingest_pb2.GetEventRequest(event_id="e\x00"), metadata=md),
            "event_id: must not contain a NUL character",
        ),
        (
            client.ingest.ListEvents(
                ingest_pb2.ListEventsRequest(customer_id="c\x00"), metadata=md
            ),
            "customer_id: must not contain a NUL character",
        ),
        (
            client.ingest.ListEvents(ingest_pb2.ListEventsRequest(event_name="\x00"), metadata=md),
            "event_name: must not contain a NUL character",
        ),
        (
            client.tenants.CreateApiKey(
                tenant_pb2.CreateApiKeyRequest(tenant_id=f"{SOME_ID}\x00"),
                metadata=(("authorization", f"Bearer {suite.admin_token}"),),
            ),
            "tenant_id: must not contain a NUL character",
        ),
        (
            client.meter.QueryUsage(
                meter_pb2.QueryUsageRequest(meter_id=SOME_ID, group_filter={"region": "e\x00"}),
                metadata=md,
            ),
            "group_filter['region']: must not contain a NUL character",
        ),
    ]
    for call, message in cases:
        assert await _error(call) == (INVALID, message)
    replay = client.ingest.ReplayEvents(
        ingest_pb2.ReplayEventsRequest(event_names=["a", "b", "c\x00"]), metadata=md
    )
    assert await _stream_error(replay) == (
        INVALID,
        "event_names[2]: must not contain a NUL character",
    )


def _forged(cursor: list[str]) -> str:
    """A page token as the API used to make them: base64 of the JSON cursor."""
    return base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        _forged(["0001-01-01T00:00:00+14:00", SOME_ID]),
        _forged(["2025-01-01T00:00:00+00:00", "\ud800"]),
        _forged(["2025-01-01T00:00:00+00:00", SOME_ID]),
        "not a token",
    ],
    ids=["out-of-range-date", "lone-surrogate", "unsigned", "garbage"],
)
async def test_forged_page_tokens_are_invalid_on_every_list(
    client: Client, token: str, quiet_logs: None
) -> None:
    md = client.metadata
    calls: list[Any] = [
        client.ingest.ListEvents(ingest_pb2.ListEventsRequest(page_token=token), metadata=md),
        client.meter.ListMeters(meter_pb2.ListMetersRequest(page_token=token), metadata=md),
        client.customers.ListCustomers(
            customer_pb2.ListCustomersRequest(page_token=token), metadata=md
        ),
        client.products.ListProducts(
            product_pb2.ListProductsRequest(page_token=token), metadata=md
        ),
        client.invoices.ListInvoices(
            invoice_pb2.ListInvoicesRequest(page_token=token), metadata=md
        ),
    ]
    for call in calls:
        code, details = await _error(call)
        assert code == INVALID and details.startswith("page_token: "), (code, details)


async def test_page_tokens_made_by_one_replica_work_on_another(client: Client) -> None:
    """Tokens are signed with a key derived from the admin token, which every
    replica shares; here: a token survives a restart of the service."""
    md = client.metadata
    for i in range(3):
        await client.call(
            client.customers.CreateCustomer,
            customer_pb2.CreateCustomerRequest(external_id=f"paged-{i}"),
        )
    first = await client.call(
        client.customers.ListCustomers, customer_pb2.ListCustomersRequest(page_size=2)
    )
    assert len(first.customers) == 2 and first.next_page_token
    second = await client.customers.ListCustomers(
        customer_pb2.ListCustomersRequest(page_size=2, page_token=first.next_page_token),
        metadata=md,
    )
    assert [c.external_id for c in second.customers] == ["paged-2"]
    assert not second.next_page_token


@pytest.mark.parametrize(
    "meter_id",
    [f"{{{SOME_ID}}}", f"urn:uuid:{SOME_ID}", SOME_ID.replace("-", ""), "nope"],
    ids=["braced", "urn", "dashless", "word"],
)
async def test_malformed_ids_are_invalid_not_missing(
    client: Client, meter_id: str, quiet_logs: None
) -> None:
    md = client.metadata
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=f"m-{uuid.uuid4().hex[:8]}",
            event_name="api.call",
            aggregation=meter_pb2.AGGREGATION_COUNT,
        ),
    )
    written = meter_id.replace(SOME_ID, meter.id).replace(
        SOME_ID.replace("-", ""), meter.id.replace("-", "")
    )
    product = product_pb2.CreateProductRequest(
        name="p",
        currency="EUR",
        billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
        usage_prices=[
            product_pb2.UsagePrice(
                meter_id=written, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="1"
            )
        ],
    )
    code, details = await _error(client.products.CreateProduct(product, metadata=md))
    assert code == INVALID and details.startswith("usage_prices[0].meter_id: "), details
    code, details = await _error(
        client.meter.GetMeter(meter_pb2.GetMeterRequest(id=written), metadata=md)
    )
    assert code == INVALID and details.startswith("meter_id: "), details
    # billing names the id after what it is (GetCustomer's `id` is a customer_id).
    for call, field in (
        (
            client.customers.GetCustomer(customer_pb2.GetCustomerRequest(id=written), metadata=md),
            "customer_id",
        ),
        (
            client.products.GetProduct(product_pb2.GetProductRequest(id=written), metadata=md),
            "product_id",
        ),
        (client.invoices.GetInvoice(invoice_pb2.GetInvoiceRequest(id=written), metadata=md), "id"),
        (
            client.invoices.PreviewInvoice(
                invoice_pb2.PreviewInvoiceRequest(subscription_id=written), metadata=md
            ),
            "subscription_id",
        ),
    ):
        code, details = await _error(call)
        assert code == INVALID and details.startswith(f"{field}: "), (field, code, details)


TRUNCATED = b"\xff"  # a tag with no value
BAD_UTF8 = b"\x0a\x02\xc3\x28"  # field 1, two bytes that are not UTF-8
UNDECODABLE = [
    ("ingest", "IngestService/IngestEvents", "ingest.v1.IngestEventsRequest", TRUNCATED),
    ("ingest", "IngestService/GetEvent", "ingest.v1.GetEventRequest", TRUNCATED),
    ("ingest", "IngestService/GetEvent", "ingest.v1.GetEventRequest", BAD_UTF8),
    ("meter", "MeterService/CreateMeter", "meter.v1.CreateMeterRequest", BAD_UTF8),
    ("meter", "MeterService/QueryUsage", "meter.v1.QueryUsageRequest", TRUNCATED),
    ("billing", "InvoiceService/RunBillingCycle", "billing.v1.RunBillingCycleRequest", TRUNCATED),
    ("billing", "CustomerService/GetCustomer", "billing.v1.GetCustomerRequest", BAD_UTF8),
    ("billing", "AuthService/WhoAmI", "billing.v1.WhoAmIRequest", TRUNCATED),
]


@pytest.mark.parametrize(("service", "method", "name", "data"), UNDECODABLE)
async def test_undecodable_bytes_are_invalid_on_unary_calls(
    client: Client, service: str, method: str, name: str, data: bytes, quiet_logs: None
) -> None:
    package = name.split(".")[0]
    method = f"/usagebilling.{package}.v1.{method}"
    call = client.channels[service].unary_unary(method, None, None)
    code, details = await _error(call(data, metadata=client.metadata, timeout=30))
    assert (code, details) == (INVALID, f"request: not a valid usagebilling.{name}")


async def test_undecodable_bytes_fail_a_stream_when_they_arrive(
    client: Client, quiet_logs: None
) -> None:
    good = ingest_pb2.IngestEventsRequest().SerializeToString()

    async def requests() -> AsyncIterator[bytes]:
        yield good
        yield b"\xff"

    call = client.channels["ingest"].stream_stream(
        "/usagebilling.ingest.v1.IngestService/StreamIngest", None, None
    )(requests(), metadata=client.metadata, timeout=30)
    answers: list[bytes] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in call:
            answers.append(answer)
    assert len(answers) == 1
    assert caught.value.code() == INVALID
    assert (
        caught.value.details() == "request: not a valid usagebilling.ingest.v1.IngestEventsRequest"
    )
    replay = client.channels["ingest"].unary_stream(
        "/usagebilling.ingest.v1.IngestService/ReplayEvents", None, None
    )(b"\xff", metadata=client.metadata, timeout=30)
    assert await _stream_error(replay) == (
        INVALID,
        "request: not a valid usagebilling.ingest.v1.ReplayEventsRequest",
    )


@pytest.mark.parametrize("tenant", [f"{SOME_ID} x", "t 1", f"{{{SOME_ID}}}"])
async def test_the_tenant_header_must_be_a_tenant_id(
    suite: Suite, client: Client, tenant: str, quiet_logs: None
) -> None:
    def metadata(service: str) -> tuple[tuple[str, str], ...]:
        """As `service` (its token) would call, on a method it may call."""
        return (
            ("authorization", f"Bearer {suite.service_tokens[service]}"),
            ("x-usagebilling-tenant", tenant),
        )

    for call in (
        client.auth.WhoAmI(tenant_pb2.WhoAmIRequest(), metadata=metadata("meter")),
        client.meter.ListMeters(meter_pb2.ListMetersRequest(), metadata=metadata("ingest")),
    ):
        code, details = await _error(call)
        assert code == INVALID and details.startswith("x-usagebilling-tenant: "), details


async def test_who_am_i_names_the_key(suite: Suite) -> None:
    admin = (("authorization", f"Bearer {suite.admin_token}"),)
    async with grpc.aio.insecure_channel(suite.address("billing")) as channel:
        tenants = tenant_pb2_grpc.TenantServiceStub(channel)
        tenant = await tenants.CreateTenant(
            tenant_pb2.CreateTenantRequest(name="who"), metadata=admin
        )
        key = await tenants.CreateApiKey(
            tenant_pb2.CreateApiKeyRequest(tenant_id=tenant.id), metadata=admin
        )
        auth = tenant_pb2_grpc.AuthServiceStub(channel)
        me = await auth.WhoAmI(
            tenant_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {key.secret}"),)
        )
    assert (me.tenant_id, me.api_key_id) == (tenant.id, key.id)
    assert key.id
