"""Who is calling, and for which tenant.

Three kinds of bearer, each allowed one thing:

- an API key acts for its own tenant (and never names another);
- a service's token (each service has its own USAGEBILLING_SERVICE_TOKEN;
  the services it calls hold only its SHA-256) acts for the tenant named in
  the `x-usagebilling-tenant` metadata, only for a tenant that exists (billing
  knows; the others ask it and cache), and only on the methods that service
  is listed for in services/common/service_identity.py;
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import NotFound, PermissionDenied, Unauthenticated
from services.common.ids import parse_uuid
from services.common.service_identity import may_call

KEY_PREFIX = "ubk_"
# Set by a service calling another on a tenant's behalf, with its service token.
TENANT_HEADER = "x-usagebilling-tenant"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHOD_PREFIXES = (
    "/usagebilling.billing.v1.TenantService/",
    "/usagebilling.common.v1.QuarantineService/",
)


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    # Empty when a service acts for the tenant (meter tells service callers
    # by it: their QueryUsage answers have larger limits).
    api_key_id: str = ""
    # The service acting for the tenant ("ingest", "meter", "billing"); empty
    # for an API key.
    service: str = ""


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

    `admin_token_sha256` is the hex SHA-256 of the admin token;
    `caller_token_sha256` maps each service that may call this one for a
    tenant to the hex SHA-256 of its token. Digests are compared in constant
    time."""

    def __init__(
        self,
        admin_token_sha256: str,
        caller_token_sha256: Mapping[str, str],
        resolver: KeyResolver,
    ) -> None:
        self._admin_digest = bytes.fromhex(admin_token_sha256)
        self._callers = {s: bytes.fromhex(d) for s, d in caller_token_sha256.items()}
        self._resolver = resolver

    def is_open(self, method: str) -> bool:
        return method.startswith(OPEN_METHOD_PREFIXES)

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._admin_digest)

    def _service_of(self, token: str) -> str | None:
        """The calling service whose token this is, or None. Every digest is
        compared (no early exit), so the time says nothing about which."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for service, known in self._callers.items():
            if hmac.compare_digest(digest, known):
                found = service
        return found

    async def authenticate(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> Principal | None:
        """The tenant the call acts for; None for admin RPCs called by the admin.

        UNAUTHENTICATED without a bearer or with an unknown or revoked key;
        PERMISSION_DENIED when the bearer may not call this RPC or name a tenant
        (a service token on a method its service is not listed for names the
        service and the method); INVALID_ARGUMENT when the named tenant is not
        an id; NOT_FOUND (to a service token only) when no tenant has that id."""
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
        service = self._service_of(token)
        if service is not None:
            if not may_call(service, method):
                raise PermissionDenied(
                    f"the {service} service may not call {method} "
                    "(services/common/service_identity.py lists what each service may call)"
                )
            return await self._for_tenant(metadata, service)
        if _has(metadata, TENANT_HEADER):
            # An API key acts for its own tenant; naming one is a confused or
            # hostile caller (or a service token this service does not
            # know), refused before the key is even looked up.
            known = ", ".join(self._callers) or "none"
            raise PermissionDenied(
                f"{TENANT_HEADER}: only a service token may name a tenant (this service "
                f"takes those of: {known}); an API key acts for its own tenant"
            )
        principal = await self._resolver.resolve(token)
        if principal is None:
            raise Unauthenticated("unknown or revoked API key")
        return principal

    async def _for_tenant(
        self, metadata: Sequence[tuple[str, str | bytes]], service: str
    ) -> Principal:
        tenant = header(metadata, TENANT_HEADER)
        if not tenant:
            raise PermissionDenied(
                f"a service token acts on a tenant only with the {TENANT_HEADER} metadata"
            )
        # Tenant ids reach NATS subjects and SQL: only a tenant id's
        # canonical form may pass (a space once made an unpublishable subject).
        tenant_id = parse_uuid(tenant, TENANT_HEADER)
        if not await self._resolver.tenant_exists(tenant_id):
            # NOT_FOUND, not PERMISSION_DENIED: only a holder of a service
            # token gets this far, and the services tell a tenant that is gone
            # from a refused credential by the code (auth_client).
            raise NotFound(f"{TENANT_HEADER}: no tenant {tenant_id}")
        return Principal(tenant_id=tenant_id, service=service)


def on_behalf_of(service_token: str, tenant_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata for a service-to-service call made for one tenant, with the
    calling service's own token."""
    return (("authorization", f"Bearer {service_token}"), (TENANT_HEADER, tenant_id))
