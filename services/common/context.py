"""The caller of the call being served, set by the auth interceptor, and the
call's request id, set by the observing interceptor (grpc_server)."""

from __future__ import annotations

from contextvars import ContextVar

from services.common.errors import Unauthenticated

_tenant: ContextVar[str | None] = ContextVar("tenant_id", default=None)
_api_key_id: ContextVar[str] = ContextVar("api_key_id", default="")
_request_id: ContextVar[str] = ContextVar("request_id", default="")


def set_tenant(tenant_id: str | None, api_key_id: str = "") -> None:
    """`api_key_id` is empty when the service token acts for the tenant."""
    _tenant.set(tenant_id)
    _api_key_id.set(api_key_id)


def current_tenant() -> str:
    tenant = _tenant.get()
    if tenant is None:
        raise Unauthenticated("this RPC needs an API key")
    return tenant


def current_api_key_id() -> str:
    """The id of the API key the call came with ("" for the service token)."""
    return _api_key_id.get()


def set_request_id(request_id: str) -> None:
    _request_id.set(request_id)


def current_request_id() -> str:
    """The id of the call being served ("" outside one): passed on to the
    services it calls (x-request-id)."""
    return _request_id.get()


def current_tenant_or_none() -> str | None:
    """The tenant of the call being served, None before (or without) authentication."""
    return _tenant.get()
