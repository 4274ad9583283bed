import asyncio

import pytest

from services.common.auth import (
    Authenticator,
    CachedKeyResolver,
    Principal,
    hash_secret,
    new_secret,
)
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

ADMIN = "admin-token"


class Keys:
    def __init__(self) -> None:
        self.known = {"ubk_good": Principal("t1", "k1")}
        self.calls = 0

    async def resolve(self, secret: str) -> Principal | None:
        self.calls += 1
        return self.known.get(secret)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def test_keys_resolve_to_their_tenant() -> None:
    auth = Authenticator(ADMIN, Keys())
    principal = await auth.authenticate(
        "/usagebilling.meter.v1.MeterService/ListMeters", bearer("ubk_good")
    )
    assert principal == Principal("t1", "k1")


@pytest.mark.parametrize("metadata", [[], bearer("ubk_unknown"), [("authorization", "ubk_good")]])
async def test_missing_or_unknown_keys_are_unauthenticated(metadata: list[tuple[str, str]]) -> None:
    with pytest.raises(Unauthenticated):
        await Authenticator(ADMIN, Keys()).authenticate("/x.v1.S/M", metadata)


async def test_admin_rpcs_need_the_admin_token() -> None:
    auth = Authenticator(ADMIN, Keys())
    method = "/usagebilling.billing.v1.TenantService/CreateTenant"
    assert await auth.authenticate(method, bearer(ADMIN)) is None
    with pytest.raises(PermissionDenied):
        await auth.authenticate(method, bearer("ubk_good"))


TENANT = "0b7e2c9a-5d3f-4e61-9a0c-2f4d6b8e1a37"


async def test_admin_token_acts_for_a_tenant_only_when_named() -> None:
    auth = Authenticator(ADMIN, Keys())
    method = "/usagebilling.meter.v1.MeterService/QueryUsage"
    named = [*bearer(ADMIN), ("x-usagebilling-tenant", TENANT)]
    assert await auth.authenticate(method, named) == Principal(TENANT)
    upper = [*bearer(ADMIN), ("x-usagebilling-tenant", TENANT.upper())]
    assert await auth.authenticate(method, upper) == Principal(TENANT)
    with pytest.raises(PermissionDenied):
        await auth.authenticate(method, bearer(ADMIN))


@pytest.mark.parametrize(
    "tenant", ["t9", f"{TENANT} ", f"{{{TENANT}}}", f"urn:uuid:{TENANT}", TENANT.replace("-", "")]
)
async def test_the_tenant_header_must_be_a_canonical_tenant_id(tenant: str) -> None:
    auth = Authenticator(ADMIN, Keys())
    named = [*bearer(ADMIN), ("x-usagebilling-tenant", tenant)]
    with pytest.raises(InvalidArgument, match=r"^x-usagebilling-tenant: "):
        await auth.authenticate("/usagebilling.meter.v1.MeterService/QueryUsage", named)


async def test_cache_answers_repeats_and_expires() -> None:
    keys = Keys()
    cache = CachedKeyResolver(keys, ttl=0.05, negative_ttl=0.05)
    assert await cache.resolve("ubk_good") == Principal("t1", "k1")
    assert await cache.resolve("ubk_good") == Principal("t1", "k1")
    assert keys.calls == 1
    del keys.known["ubk_good"]  # revoked
    await asyncio.sleep(0.06)
    assert await cache.resolve("ubk_good") is None


def test_secrets_are_high_entropy_and_hashed() -> None:
    secrets = {new_secret() for _ in range(100)}
    assert len(secrets) == 100
    secret = secrets.pop()
    assert len(secret) >= 40
    assert hash_secret(secret) != secret and len(hash_secret(secret)) == 64
