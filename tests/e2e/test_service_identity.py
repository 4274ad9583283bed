"""Least privilege between the services, against the three running processes:
only the service token acts for a tenant (named in x-usagebilling-tenant), and
only for a tenant that exists; the admin token administers tenants and the
quarantine and nothing else; the services hold only the admin token's digest
and connect to NATS as their own users."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from tests.client import Client, event
from tools.devstack import NATS_TOOLS_USER
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import customer_pb2, tenant_pb2
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


async def test_the_service_token_acts_for_an_existing_tenant(
    suite: Suite, anonymous: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    tenant_id, _ = new_tenant()
    calls = _one_call_per_service(anonymous, _bearer(suite.service_token, tenant_id))
    for service, call in calls.items():
        assert await _error(call) == (grpc.StatusCode.OK, ""), service
    # Without naming the tenant it acts for nobody.
    for service, call in _one_call_per_service(anonymous, _bearer(suite.service_token)).items():
        code, details = await _error(call)
        assert code == DENIED and TENANT_HEADER in details, (service, details)


async def test_the_service_token_cannot_act_for_a_tenant_that_does_not_exist(
    suite: Suite, anonymous: Client
) -> None:
    nobody = str(uuid.uuid4())
    for service, call in _one_call_per_service(
        anonymous, _bearer(suite.service_token, nobody)
    ).items():
        code, details = await _error(call)
        assert (code, details) == (
            grpc.StatusCode.NOT_FOUND,
            f"{TENANT_HEADER}: no tenant {nobody}",
        ), service


async def test_an_api_key_cannot_name_a_tenant(
    suite: Suite, anonymous: Client, new_tenant: Callable[[], tuple[str, str]]
) -> None:
    own_tenant, key = new_tenant()
    other_tenant, _ = new_tenant()
    for tenant in (other_tenant, own_tenant):
        for service, call in _one_call_per_service(anonymous, _bearer(key, tenant)).items():
            code, details = await _error(call)
            assert code == DENIED, (service, code, details)
            assert "only the service token may name a tenant" in details, details


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
        code, details = await _error(
            stub.ListQuarantined(request, metadata=_bearer(suite.service_token), timeout=30)
        )
        assert code == DENIED and "needs the admin token" in details, (service, details)


async def test_the_service_token_cannot_administer_tenants(suite: Suite, anonymous: Client) -> None:
    code, details = await _error(
        anonymous.tenants.CreateTenant(
            tenant_pb2.CreateTenantRequest(name="not-by-a-service"),
            metadata=_bearer(suite.service_token),
            timeout=30,
        )
    )
    assert code == DENIED and "needs the admin token" in details, details


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def test_each_service_holds_only_its_own_credentials(suite: Suite) -> None:
    """What the suite (like the manifests) gives each process: the service
    token, the admin token's digest but not the token, its own NATS user."""
    digest = hashlib.sha256(suite.admin_token.encode()).hexdigest()
    for service in SERVICES:
        env = _environment(suite.processes[service].pid)
        assert suite.admin_token not in "\0".join(env.values()), service
        assert env["USAGEBILLING_ADMIN_TOKEN_SHA256"] == digest
        assert env["USAGEBILLING_SERVICE_TOKEN"] == suite.service_token
        if urlsplit(suite.nats_url).username == NATS_TOOLS_USER:  # a dev stack's NATS
            assert suite.nats_credentials
            assert env["USAGEBILLING_NATS_USER"] == service
            others = {p for s, (_, p) in suite.nats_credentials.items() if s != service}
            assert env["USAGEBILLING_NATS_PASSWORD"] not in others
            # Nor the all-permission user of the URL the tests use.
            assert urlsplit(env["NATS_URL"]).password is None
            assert str(urlsplit(suite.nats_url).password) not in "\0".join(env.values())
