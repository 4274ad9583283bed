"""Who is calling: API keys resolve to one tenant; the admin token guards the
tenant-admin RPCs and lets services call each other on a tenant's behalf.

API keys are high-entropy random secrets, so a plain SHA-256 is the right hash
for them (a slow password hash buys nothing against 256 random bits and would
cost a hash per call)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.ids import parse_uuid

KEY_PREFIX = "ubk_"
# Set by a service calling another on a tenant's behalf, with the admin token.
TENANT_HEADER = "x-usagebilling-tenant"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHOD_PREFIXES = (
    "/usagebilling.billing.v1.TenantService/",
    "/usagebilling.common.v1.QuarantineService/",
)


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    api_key_id: str = ""


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyResolver(Protocol):
    async def resolve(self, secret: str) -> Principal | None:
        """The key's tenant, or None when the key is unknown or revoked."""


class CachedKeyResolver:
    """Caches answers briefly so that a service does not ask on every call; a
    revoked key stops working once its entry expires (well within 60 s)."""

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


class Authenticator:
    def __init__(self, admin_token: str, resolver: KeyResolver) -> None:
        self._admin_token = admin_token
        self._resolver = resolver

    def is_open(self, method: str) -> bool:
        return method.startswith(OPEN_METHOD_PREFIXES)

    def _is_admin(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self._admin_token.encode())

    async def authenticate(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]]
    ) -> Principal | None:
        """The tenant the call acts for; None for admin RPCs called by the admin."""
        token = bearer(metadata)
        if token is None:
            raise Unauthenticated("missing 'authorization: Bearer <api key>' metadata")
        if method.startswith(ADMIN_METHOD_PREFIXES):
            if not self._is_admin(token):
                raise PermissionDenied("this RPC needs the admin token as the bearer")
            return None
        if self._is_admin(token):
            tenant = header(metadata, TENANT_HEADER)
            if not tenant:
                raise PermissionDenied(
                    f"the admin token acts on a tenant only with the {TENANT_HEADER} metadata"
                )
            # Tenant ids reach NATS subjects and SQL: only a tenant id's
            # canonical form may pass (a space once made an unpublishable subject).
            return Principal(tenant_id=parse_uuid(tenant, TENANT_HEADER))
        principal = await self._resolver.resolve(token)
        if principal is None:
            raise Unauthenticated("unknown or revoked API key")
        return principal


def on_behalf_of(admin_token: str, tenant_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata for a service-to-service call made for one tenant."""
    return (("authorization", f"Bearer {admin_token}"), (TENANT_HEADER, tenant_id))
