"""The tenant of the call being served, set by the auth interceptor."""

from __future__ import annotations

from contextvars import ContextVar

from services.common.errors import Unauthenticated

_tenant: ContextVar[str | None] = ContextVar("tenant_id", default=None)


def set_tenant(tenant_id: str | None) -> None:
    _tenant.set(tenant_id)


def current_tenant() -> str:
    tenant = _tenant.get()
    if tenant is None:
        raise Unauthenticated("this RPC needs an API key")
    return tenant
