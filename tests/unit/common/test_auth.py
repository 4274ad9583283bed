import asyncio

import pytest

from services.common.auth import (
    Authenticator,
    CachedKeyResolver,
    Principal,
    hash_secret,
    new_secret,
)
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated

ADMIN = "admin-token"
# billing's token (meter's callers: billing, for QueryUsage, and ingest).
SERVICE = "billing-service-token"
INGEST = "ingest-service-token"
TENANT = "0b7e2c9a-5d3f-4e61-9a0c-2f4d6b8e1a37"
QUERY = "/usagebilling.meter.v1.MeterService/QueryUsage"


class Keys:
    def __init__(self) -> None:
        self.known = {"ubk_good": Principal("t1", "k1")}
        self.tenants = {TENANT}
        self.calls = 0
        self.tenant_calls = 0

    async def resolve(self, secret: str) -> Principal | None:
        self.calls += 1
        return self.known.get(secret)

    async def tenant_exists(self, tenant_id: str) -> bool:
        self.tenant_calls += 1
        return tenant_id in self.tenants


def authenticator(keys: Keys | None = None) -> Authenticator:
    callers = {"billing": hash_secret(SERVICE), "ingest": hash_secret(INGEST)}
    return Authenticator(hash_secret(ADMIN), callers, keys or Keys())


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_keys_resolve_to_their_tenant() -> None:
    auth = authenticator()
    principal = await auth.authenticate(
        "/usagebilling.meter.v1.MeterService/ListMeters", bearer("ubk_good")
    )
    assert principal == Principal("t1", "k1")


@pytest.mark.parametrize("metadata", [[], bearer("ubk_unknown"), [("authorization", "ubk_good")]])
async def test_missing_or_unknown_keys_are_unauthenticated(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(Unauthenticated):
        await authenticator().authenticate("/x.v1.S/M", metadata)


async def test_admin_rpcs_need_the_admin_token() -> None:
    auth = authenticator()
    method = "/usagebilling.billing.v1.TenantService/CreateTenant"
    assert await auth.authenticate(method, bearer(ADMIN)) is None
    with pytest.raises(PermissionDenied):
        await auth.authenticate(method, bearer("ubk_good"))


async def test_the_service_token_acts_for_a_tenant_only_when_named() -> None:
    auth = authenticator()
    named = [*bearer(SERVICE), ("x-usagebilling-tenant", TENANT)]
    assert await auth.authenticate(QUERY, named) == Principal(TENANT, service="billing")
    upper = [*bearer(SERVICE), ("x-usagebilling-tenant", TENANT.upper())]
    assert await auth.authenticate(QUERY, upper) == Principal(TENANT, service="billing")
    with pytest.raises(PermissionDenied, match="x-usagebilling-tenant"):
        await auth.authenticate(QUERY, bearer(SERVICE))


async def test_the_service_token_acts_only_for_a_tenant_that_exists() -> None:
    keys = Keys()
    auth = authenticator(keys)
    unknown = "6a1f3c5e-0000-4000-8000-000000000001"
    with pytest.raises(NotFound, match=f"^x-usagebilling-tenant: no tenant {unknown}$"):
        await auth.authenticate(QUERY, [*bearer(SERVICE), ("x-usagebilling-tenant", unknown)])
    assert keys.tenant_calls == 1


async def test_the_admin_token_administers_and_nothing_else() -> None:
    auth = authenticator()
    for metadata in ([*bearer(ADMIN), ("x-usagebilling-tenant", TENANT)], bearer(ADMIN)):
        with pytest.raises(PermissionDenied, match="administers tenants and the quarantine only"):
            await auth.authenticate(QUERY, metadata)
    quarantine = "/usagebilling.common.v1.QuarantineService/ListQuarantined"
    assert await auth.authenticate(quarantine, bearer(ADMIN)) is None
    with pytest.raises(PermissionDenied, match="needs the admin token"):
        await auth.authenticate(quarantine, bearer(SERVICE))


async def test_an_api_key_cannot_name_a_tenant() -> None:
    keys = Keys()
    auth = authenticator(keys)
    for tenant in (TENANT, "t1"):
        named = [*bearer("ubk_good"), ("x-usagebilling-tenant", tenant)]
        with pytest.raises(PermissionDenied, match="only a service token may name a tenant"):
            await auth.authenticate(QUERY, named)
    assert keys.calls == 0  # refused before the key was looked up


@pytest.mark.parametrize(
    "tenant", ["t9", f"{TENANT} ", f"{{{TENANT}}}", f"urn:uuid:{TENANT}", TENANT.replace("-", "")]
)
async def test_the_tenant_header_must_be_a_canonical_tenant_id(tenant: str) -> None:
    auth = authenticator()
    named = [*bearer(SERVICE), ("x-usagebilling-tenant", tenant)]
    with pytest.raises(InvalidArgument, match=r"^x-usagebilling-tenant: "):
        await auth.authenticate(QUERY, named)


async def test_cache_answers_repeats_and_expires() -> None:
    keys = Keys()
    cache = CachedKeyResolver(keys, ttl=0.05, negative_ttl=0.05)
    assert await cache.resolve("ubk_good") == Principal("t1", "k1")
    assert await cache.resolve("ubk_good") == Principal("t1", "k1")
    assert keys.calls == 1
    del keys.known["ubk_good"]  # revoked
    await asyncio.sleep(0.06)
    assert await cache.resolve("ubk_good") is None


async def test_cache_remembers_tenants_found_and_forgets_those_not_found() -> None:
    keys = Keys()
    cache = CachedKeyResolver(keys, ttl=60, negative_ttl=0.05)
    other = "6a1f3c5e-0000-4000-8000-000000000002"
    assert await cache.tenant_exists(TENANT) and await cache.tenant_exists(TENANT)
    assert not await cache.tenant_exists(other) and not await cache.tenant_exists(other)
    assert keys.tenant_calls == 2
    keys.tenants.add(other)  # created meanwhile
    await asyncio.sleep(0.06)
    assert await cache.tenant_exists(other)
    assert keys.tenant_calls == 3


def test_secrets_are_high_entropy_and_hashed() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    secret = secrets.pop()
    assert len(secret) >= 40
    assert hash_secret(secret) != secret and len(hash_secret(secret)) == 64


async def test_a_service_token_opens_only_the_methods_of_its_service() -> None:
    keys = Keys()
    auth = authenticator(keys)
    list_meters = "/usagebilling.meter.v1.MeterService/ListMeters"
    as_ingest = [*bearer(INGEST), ("x-usagebilling-tenant", TENANT)]
    as_billing = [*bearer(SERVICE), ("x-usagebilling-tenant", TENANT)]
    assert await auth.authenticate(list_meters, as_ingest) == Principal(TENANT, service="ingest")
    # Each refusal names the calling service and the method, before any lookup.
    refused = [
        (QUERY, as_ingest, "ingest"),
        (list_meters, as_billing, "billing"),
        ("/usagebilling.billing.v1.InvoiceService/VoidInvoice", as_ingest, "ingest"),
        ("/usagebilling.ingest.v1.IngestService/IngestEvents", as_billing, "billing"),
    ]
    for method, metadata, service in refused:
        with pytest.raises(
            PermissionDenied, match=f"^the {service} service may not call {method} "
        ):
            await auth.authenticate(method, metadata)
    assert keys.tenant_calls == 1 and keys.calls == 0


async def test_a_token_this_service_does_not_know_is_no_service_token() -> None:
    keys = Keys()
    auth = authenticator(keys)
    # meter's own token, say: meter never calls itself, so it is not a caller's.
    stranger = "meter-service-token"
    with pytest.raises(PermissionDenied, match="only a service token may name a tenant"):
        await auth.authenticate(QUERY, [*bearer(stranger), ("x-usagebilling-tenant", TENANT)])
    with pytest.raises(Unauthenticated):
        await auth.authenticate(QUERY, bearer(stranger))
    assert keys.tenant_calls == 0
