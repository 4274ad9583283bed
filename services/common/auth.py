"""Who is calling, and for which tenant.

Three kinds of bearer, each allowed one thing:

- an API key acts for its own tenant (and never names another);
- the service token (USAGEBILLING_SERVICE_TOKEN, held by the services alone)
  acts for the tenant named in the `x-usagebilling-tenant` metadata, and only
  for a tenant that exists (billing knows; the others ask it and cache);
- the admin token administers tenants and the quarantine (TenantService,
  QuarantineService) and nothing else. Services hold only its SHA-256, so a
  pod can check the token but cannot use it.

API keys and both tokens are high-entropy random secrets, so a plain SHA-256
is the right hash for them (a slow password hash buys nothing against 256
random bits and would cost a hash per call)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import NotFound, PermissionDenied, Unauthenticated
from services.common.ids import parse_uuid

KEY_PREFIX = "ubk_"
# Set by a service calling another on a tenant's behalf, with the service token.
TENANT_HEADER = "x-usagebilling-tenant"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHOD_PREFIXES = (
    "/usagebilling.billing.v1.TenantService/",
    "/usagebilling.common.v1.QuarantineService/",
)


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    # Empty when the service token acts for the tenant.
    api_key_id: str = ""


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyResolver(Protocol):
    async def resolve(self, secret: str) -> Principal | None:
        """The key's tenant, or None when the key is unknown or revoked."""

    async def tenant_exists(self, tenant_id: str) -> bool:
        """Whether a tenant with this (canonical) id exists."""


class CachedKeyResolver:
    """Caches answers briefly so that a service does not ask on every call; a
    revoked key stops working once its entry expires (well within 60 s).
    Tenants are never deleted, so a tenant found is remembered as long as a
    key; one not found only for `negative_ttl` (it may be created meanwhile)."""

    def __init__(
        self,
        inner: KeyResolver,
        *,
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        size: int = 10_000,
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._size = size
        self._entries: dict[str, tuple[float, Principal | None]] = {}
        self._tenants: dict[str, tuple[float, bool]] = {}

    async def resolve(self, secret: str) -> Principal | None:
        key = hash_secret(secret)
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await self._inner.resolve(secret)
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[key] = (now + (self._ttl if principal else self._negative_ttl), principal)
        return principal

    async def tenant_exists(self, tenant_id: str) -> bool:
        now = time.monotonic()
        hit = self._tenants.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        exists = await self._inner.tenant_exists(tenant_id)
        if len(self._tenants) >= self._size:
            self._tenants.clear()
        self._tenants[tenant_id] = (now + (self._ttl if exists else self._negative_ttl), exists)
        return exists


def bearer(metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def header(metadata: Sequence[tuple[str, str | bytes]], name: str) -> str | None:
    for key, value in metadata:
        if key == name and isinstance(value, str):
            return value
    return None


def _has(metadata: Sequence[tuple[str, str | bytes]], name: str) -> bool:
    return any(key == name for key, _ in metadata)


class Authenticator:
    """Decides who a call is from (see the module's docstring for the rules).

    `admin_token_sha256` is the hex SHA-256 of the admin token; `service_token`
    the shared service credential. Both are compared in constant time."""

    def __init__(self, admin_token_sha256: str, service_token: str, resolver: KeyResolver) -> None:
        self._admin_digest = bytes.fromhex(admin_token_sha256)
        self._service_digest = hashlib.sha256(service_token.encode()).digest()
        self._resolver = resolver

    def is_open(self, method: str) -> bool:
        return method.startswith(OPEN_METHOD_PREFIXES)

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_digest)

    def _is_service(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._service_digest)

    async def authenticate(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> Principal | None:
        """The tenant the call acts for; None for admin RPCs called by the admin.

        UNAUTHENTICATED without a bearer or with an unknown or revoked key;
        PERMISSION_DENIED when the bearer may not call this RPC or name a tenant;
        INVALID_ARGUMENT when the named tenant is not an id; NOT_FOUND (to the
        service token only) when no tenant has that id."""
        token = bearer(metadata)
        if token is None:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        if method.startswith(ADMIN_METHOD_PREFIXES):
            if not self._is_admin(token):
                raise PermissionDenied("this RPC needs the admin token as the bearer")
            return None
        if self._is_admin(token):
            raise PermissionDenied(
                "the admin token administers tenants and the quarantine only "
                "(TenantService, QuarantineService); call this RPC with an API key"
            )
        if self._is_service(token):
            return await self._for_tenant(metadata)
        if _has(metadata, TENANT_HEADER):
            # An API key acts for its own tenant; naming one is a confused or
            # hostile caller, refused before the key is even looked up.
            raise PermissionDenied(
                f"{TENANT_HEADER}: only the service token may name a tenant; "
                "an API key acts for its own tenant"
            )
        principal = await self._resolver.resolve(token)
        if principal is None:
            raise Unauthenticated("unknown or revoked API key")
        return principal

    async def _for_tenant(self, metadata: Sequence[tuple[str, str | bytes]]) -> Principal:
        tenant = header(metadata, TENANT_HEADER)
        if not tenant:
            raise PermissionDenied(
                f"the service token acts on a tenant only with the {TENANT_HEADER} metadata"
            )
        # Tenant ids reach NATS subjects and SQL: only a tenant id's
        # canonical form may pass (a space once made an unpublishable subject).
        tenant_id = parse_uuid(tenant, TENANT_HEADER)
        if not await self._resolver.tenant_exists(tenant_id):
            # NOT_FOUND, not PERMISSION_DENIED: only a holder of the service
            # token gets this far, and the services tell a tenant that is gone
            # from a refused credential by the code (auth_client).
            raise NotFound(f"{TENANT_HEADER}: no tenant {tenant_id}")
        return Principal(tenant_id=tenant_id)


def on_behalf_of(service_token: str, tenant_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata for a service-to-service call made for one tenant."""
    return (("authorization", f"Bearer {service_token}"), (TENANT_HEADER, tenant_id))
