"""Resolves API keys and checks tenants by asking billing (which owns both) over gRPC."""

from __future__ import annotations

from datetime import timedelta

import grpc

from services.common.auth import CachedKeyResolver, Principal, on_behalf_of
from services.common.errors import Unavailable
from usagebilling.billing.v1 import tenant_pb2, tenant_pb2_grpc


def billing_key_resolver(
    channel: grpc.aio.Channel, service_token: str, ttl: timedelta
) -> CachedKeyResolver:
    """How ingest and meter resolve keys and tenants: ask billing, remember the
    answer for `ttl`."""
    return CachedKeyResolver(RemoteKeyResolver(channel, service_token), ttl=ttl.total_seconds())


class RemoteKeyResolver:
    def __init__(self, channel: grpc.aio.Channel, service_token: str) -> None:
        self._stub = tenant_pb2_grpc.AuthServiceStub(channel)
        self._service_token = service_token

    async def _who_am_i(
        self, metadata: tuple[tuple[str, str], ...], absent: grpc.StatusCode, what: str
    ) -> tenant_pb2.WhoAmIResponse | None:
        """billing's WhoAmI answer for `metadata`; None when it answers
        `absent`; Unavailable, naming `what`, for any other failure."""
        try:
            answer: tenant_pb2.WhoAmIResponse = await self._stub.WhoAmI(
                tenant_pb2.WhoAmIRequest(),
                metadata=metadata,
                timeout=5,
                # A peer that just restarted: wait for the reconnect (within
                # the timeout) rather than fail while the channel backs off.
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == absent:
                return None
            raise Unavailable(f"cannot check {what} with billing: {exc.code().name}") from exc
        return answer

    async def resolve(self, secret: str) -> Principal | None:
        answer = await self._who_am_i(
            (("authorization", f"Bearer {secret}"),),
            grpc.StatusCode.UNAUTHENTICATED,
            "the API key",
        )
        if answer is None:
            return None
        return Principal(tenant_id=answer.tenant_id, api_key_id=answer.api_key_id)

    async def tenant_exists(self, tenant_id: str) -> bool:
        """Asks WhoAmI as the service acting for `tenant_id`: billing answers
        only for a tenant in its table (NOT_FOUND otherwise). UNAUTHENTICATED
        here means billing has another service token: a deployment error, not
        an unknown tenant, so Unavailable (never cached)."""
        answer = await self._who_am_i(
            on_behalf_of(self._service_token, tenant_id), grpc.StatusCode.NOT_FOUND, "the tenant"
        )
        return answer is not None and answer.tenant_id == tenant_id
