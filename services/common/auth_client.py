"""Resolves API keys by asking billing (which owns them) over gRPC."""

from __future__ import annotations

from datetime import timedelta

import grpc

from services.common.auth import CachedKeyResolver, Principal
from services.common.errors import Unavailable
from usagebilling.billing.v1 import tenant_pb2, tenant_pb2_grpc


def billing_key_resolver(channel: grpc.aio.Channel, ttl: timedelta) -> CachedKeyResolver:
    """How ingest and meter resolve keys: ask billing, remember the answer for `ttl`."""
    return CachedKeyResolver(RemoteKeyResolver(channel), ttl=ttl.total_seconds())


class RemoteKeyResolver:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tenant_pb2_grpc.AuthServiceStub(channel)

    async def resolve(self, secret: str) -> Principal | None:
        try:
            answer = await self._stub.WhoAmI(
                tenant_pb2.WhoAmIRequest(),
                metadata=(("authorization", f"Bearer {secret}"),),
                timeout=5,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return None
            raise Unavailable(f"cannot check the API key with billing: {exc.code().name}") from exc
        return Principal(tenant_id=answer.tenant_id, api_key_id=answer.api_key_id)
