"""Least privilege between the services, against the three running processes:
only a service token acts for a tenant (named in x-usagebilling-tenant), only
for a tenant that exists, and each service's token only on the methods that
service calls (services/common/service_identity.py); the admin token
administers tenants and the quarantine and nothing else; the services hold
only their own token, the digests of their callers' and of the admin token,
and connect to NATS as their own users."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from services.common.service_identity import callers_of, digest_setting
from tests.client import Client, event
from tools.devstack import NATS_TOOLS_USER
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import customer_pb2, invoice_pb2, tenant_pb2
from usagebilling.common.v1 import quarantine_pb2, quarantine_pb2_grpc
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

TENANT_HEADER = "x-usagebilling-tenant"
DENIED = grpc.StatusCode.PERMISSION_DENIED


async def _error(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _bearer(token: str, tenant: str | None = None) -> tuple[tuple[str, str], ...]:
    auth = (("authorization", f"Bearer {token}"),)
    return auth if tenant is None else (*auth, (TENANT_HEADER, tenant))


def _one_call_per_service(
    client: Client, metadata: tuple[tuple[str, str], ...]
) -> dict[str, Awaitable[Any]]:
    """A tenant RPC of each service (ingest's with one valid event)."""
    when = datetime.now(UTC).replace(microsecond=0)
    one = ingest_pb2.IngestEventsRequest(
        events=[event(f"id-{uuid.uuid4().hex}", "cus_1", "api.call", when)]
    )
    return {
        "ingest": client.ingest.IngestEvents(one, metadata=metadata, timeout=30),
        "meter": client.meter.ListMeters(
            meter_pb2.ListMetersRequest(), metadata=metadata, timeout=30
        ),
        "billing": client.customers.ListCustomers(
            customer_pb2.ListCustomersRequest(), metadata=metadata, timeout=30
        ),
    }


@pytest.fixture
async def anonymous(suite: Suite) -> Any:
    client = Client({s: suite.address(s) for s in SERVICES}, "unused")
    yield client
    await client.close()


async def _drain(call: Any) -> int:
    """Reads a server stream to its end; the number of messages."""
    return len([message async for message in call])


async def _stream_error(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await _drain(call)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_each_service_token_acts_for_a_tenant_on_its_own_calls_only(
    suite: Suite, anonymous: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    tenant_id, key = new_tenant()
    meter = await anonymous.meter.CreateMeter(
        meter_pb2.CreateMeterRequest(
            name="calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
        metadata=_bearer(key),
        timeout=30,
    )
    as_ingest = _bearer(suite.service_tokens["ingest"], tenant_id)
    as_meter = _bearer(suite.service_tokens["meter"], tenant_id)
    as_billing = _bearer(suite.service_tokens["billing"], tenant_id)

    # What each service really calls works.
    listed = await anonymous.meter.ListMeters(
        meter_pb2.ListMetersRequest(), metadata=as_ingest, timeout=30
    )
    assert [m.id for m in listed.meters] == [meter.id]
    for metadata in (as_ingest, as_meter):
        who = await anonymous.auth.WhoAmI(tenant_pb2.WhoAmIRequest(), metadata=metadata, timeout=30)
        assert (who.tenant_id, who.api_key_id) == (tenant_id, "")
    replay = anonymous.ingest.ReplayEvents(
        ingest_pb2.ReplayEventsRequest(event_names=["api.call"]), metadata=as_meter, timeout=30
    )
    assert await _drain(replay) == 0  # the tenant has no events yet
    got = await anonymous.meter.GetMeter(
        meter_pb2.GetMeterRequest(id=meter.id), metadata=as_billing, timeout=30
    )
    assert got.id == meter.id
    query = meter_pb2.QueryUsageRequest(meter_id=meter.id, window_size=meter_pb2.WINDOW_SIZE_NONE)
    now = datetime.now(UTC).replace(microsecond=0)
    query.start_time.FromDatetime(now - timedelta(days=30))
    query.end_time.FromDatetime(now)
    await anonymous.meter.QueryUsage(query, metadata=as_billing, timeout=30)

    # A known caller on a method its service does not call: refused, naming both.
    void = invoice_pb2.VoidInvoiceRequest(id=str(uuid.uuid4()))
    refused: dict[tuple[str, str], Awaitable[Any]] = {
        ("ingest", "/usagebilling.billing.v1.CustomerService/ListCustomers"): (
            anonymous.customers.ListCustomers(
                customer_pb2.ListCustomersRequest(), metadata=as_ingest, timeout=30
            )
        ),
        ("ingest", "/usagebilling.billing.v1.InvoiceService/VoidInvoice"): (
            anonymous.invoices.VoidInvoice(void, metadata=as_ingest, timeout=30)
        ),
        ("ingest", "/usagebilling.meter.v1.MeterService/QueryUsage"): (
            anonymous.meter.QueryUsage(query, metadata=as_ingest, timeout=30)
        ),
        ("billing", "/usagebilling.meter.v1.MeterService/ListMeters"): (
            anonymous.meter.ListMeters(
                meter_pb2.ListMetersRequest(), metadata=as_billing, timeout=30
            )
        ),
        ("meter", "/usagebilling.billing.v1.InvoiceService/VoidInvoice"): (
            anonymous.invoices.VoidInvoice(void, metadata=as_meter, timeout=30)
        ),
    }
    for (service, method), call in refused.items():
        code, details = await _error(call)
        assert code == DENIED, (service, method, code, details)
        assert details.startswith(f"the {service} service may not call {method} "), details

    # A token of a service that never calls this one is no service token here:
    # billing's at ingest (ReplayEvents is meter's alone), ingest's own at ingest.
    for metadata in (as_billing, as_ingest):
        replay = anonymous.ingest.ReplayEvents(
            ingest_pb2.ReplayEventsRequest(), metadata=metadata, timeout=30
        )
        code, details = await _stream_error(replay)
        assert code == DENIED, (code, details)
        assert "only a service token may name a tenant (this service takes those of: meter)" in (
            details
        ), details
    code, details = await _error(
        anonymous.ingest.IngestEvents(
            ingest_pb2.IngestEventsRequest(
                events=[event(f"id-{uuid.uuid4().hex}", "cus_1", "api.call", datetime.now(UTC))]
            ),
            metadata=as_meter,
            timeout=30,
        )
    )
    assert code == DENIED and details.startswith(
        "the meter service may not call /usagebilling.ingest.v1.IngestService/IngestEvents "
    ), details

    # Without naming the tenant a service token acts for nobody.
    code, details = await _error(
        anonymous.meter.ListMeters(
            meter_pb2.ListMetersRequest(),
            metadata=_bearer(suite.service_tokens["ingest"]),
            timeout=30,
        )
    )
    assert code == DENIED and TENANT_HEADER in details, details


async def test_an_unknown_service_token_acts_for_nobody(
    suite: Suite, anonymous: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    tenant_id, _ = new_tenant()
    stranger = "not-a-service-token-" + uuid.uuid4().hex
    for service, call in _one_call_per_service(anonymous, _bearer(stranger, tenant_id)).items():
        code, details = await _error(call)
        assert code == DENIED and "only a service token may name a tenant" in details, (
            service,
            details,
        )
    for service, call in _one_call_per_service(anonymous, _bearer(stranger)).items():
        code, _ = await _error(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED, service


async def test_a_service_token_cannot_act_for_a_tenant_that_does_not_exist(
    suite: Suite, anonymous: Client
) -> None:
    nobody = str(uuid.uuid4())
    for metadata, call_of in (
        (
            _bearer(suite.service_tokens["ingest"], nobody),
            lambda md: anonymous.meter.ListMeters(meter_pb2.ListMetersRequest(), metadata=md),
        ),
        (
            _bearer(suite.service_tokens["meter"], nobody),
            lambda md: anonymous.auth.WhoAmI(tenant_pb2.WhoAmIRequest(), metadata=md),
        ),
        (
            _bearer(suite.service_tokens["billing"], nobody),
            lambda md: anonymous.meter.GetMeter(meter_pb2.GetMeterRequest(id="m"), metadata=md),
        ),
    ):
        assert await _error(call_of(metadata)) == (
            grpc.StatusCode.NOT_FOUND,
            f"{TENANT_HEADER}: no tenant {nobody}",
        )


async def test_an_api_key_cannot_name_a_tenant(
    suite: Suite, anonymous: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    own_tenant, key = new_tenant()
    other_tenant, _ = new_tenant()
    for tenant in (other_tenant, own_tenant):
        for service, call in _one_call_per_service(anonymous, _bearer(key, tenant)).items():
            code, details = await _error(call)
            assert code == DENIED, (service, code, details)
            assert "only a service token may name a tenant" in details, details


async def test_the_admin_token_administers_tenants_and_nothing_else(
    suite: Suite, anonymous: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    tenant_id, _ = new_tenant()
    for metadata in (_bearer(suite.admin_token), _bearer(suite.admin_token, tenant_id)):
        for service, call in _one_call_per_service(anonymous, metadata).items():
            code, details = await _error(call)
            assert code == DENIED, (service, code, details)
            assert "administers tenants and the quarantine only" in details, details
    # What it is for still works, on billing and on the quarantine of ingest
    # and meter (which hold only the token's SHA-256).
    created = await anonymous.tenants.CreateTenant(
        tenant_pb2.CreateTenantRequest(name="admin-still-works"),
        metadata=_bearer(suite.admin_token),
        timeout=30,
    )
    assert created.id
    for service in ("ingest", "meter"):
        stub = quarantine_pb2_grpc.QuarantineServiceStub(anonymous.channels[service])
        request = quarantine_pb2.ListQuarantinedRequest()
        await stub.ListQuarantined(request, metadata=_bearer(suite.admin_token), timeout=30)
        for token in suite.service_tokens.values():
            code, details = await _error(
                stub.ListQuarantined(request, metadata=_bearer(token), timeout=30)
            )
            assert code == DENIED and "needs the admin token" in details, (service, details)


async def test_no_service_token_administers_tenants(suite: Suite, anonymous: Client) -> None:
    for service, token in suite.service_tokens.items():
        code, details = await _error(
            anonymous.tenants.CreateTenant(
                tenant_pb2.CreateTenantRequest(name="not-by-a-service"),
                metadata=_bearer(token),
                timeout=30,
            )
        )
        assert code == DENIED and "needs the admin token" in details, (service, details)


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def test_each_service_holds_only_its_own_credentials(suite: Suite) -> None:
    """What the suite (like the manifests) gives each process: its own token
    (no other service's), the digests of its callers' tokens, the admin
    token's digest but not the token, its own NATS user."""
    digest = hashlib.sha256(suite.admin_token.encode()).hexdigest()
    for service in SERVICES:
        env = _environment(suite.processes[service].pid)
        assert suite.admin_token not in "\0".join(env.values()), service
        assert env["USAGEBILLING_ADMIN_TOKEN_SHA256"] == digest
        assert env["USAGEBILLING_SERVICE_TOKEN"] == suite.service_tokens[service]
        everything = "\0".join(env.values())
        for other in SERVICES:
            if other != service:
                assert suite.service_tokens[other] not in everything, (service, other)
            digest_of = hashlib.sha256(suite.service_tokens[other].encode()).hexdigest()
            if other in callers_of(service):
                assert env[digest_setting(other)] == digest_of, (service, other)
            else:
                assert digest_setting(other) not in env, (service, other)
        if urlsplit(suite.nats_url).username == NATS_TOOLS_USER:  # a dev stack's NATS
            assert suite.nats_credentials
            assert env["USAGEBILLING_NATS_USER"] == service
            others = {p for s, (_, p) in suite.nats_credentials.items() if s != service}
            assert env["USAGEBILLING_NATS_PASSWORD"] not in others
            # Nor the all-permission user of the URL the tests use.
            assert urlsplit(env["NATS_URL"]).password is None
            assert str(urlsplit(suite.nats_url).password) not in "\0".join(env.values())
