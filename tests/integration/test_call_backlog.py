"""A backlog of calls the server has not taken yet is answered, not cancelled.

The asyncio server takes calls from gRPC core one at a time, between turns of
its event loop: under a load above capacity (the bench's paced phase on a busy
machine) calls wait in core, not yet seen by any interceptor. Core cancels a
call that waits there 30 s (its default), with a bare CANCELLED, whatever the
caller's deadline, and without a log line or a metric. Here the event loop is
held past those 30 s while calls arrive; every one must still be answered."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import Authenticator, Principal
from services.common.grpc_server import GrpcServer

# Longer than gRPC core's default limit on a call's wait for the server (30 s).
LOOP_HELD_SECONDS = 33
CALLS = 20


class _NoKeys:
    async def resolve(self, secret: str) -> Principal | None:
        return None

    async def tenant_exists(self, tenant_id: str) -> bool:
        return False


async def test_calls_waiting_for_the_server_past_30_s_are_answered() -> None:
    server = GrpcServer("127.0.0.1", 0, [], Authenticator("00" * 32, {}, _NoKeys()))
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="liveness")
        await stub.Check(request, timeout=30)  # connected
        calls: list[Any] = [
            asyncio.ensure_future(stub.Check(request, timeout=LOOP_HELD_SECONDS + 60))
            for _ in range(CALLS)
        ]
        # Let each call start (core sends it on its own threads from then on).
        for _ in range(3):
            await asyncio.sleep(0)
        # A busy event loop, as under overload: the server takes no call meanwhile.
        time.sleep(LOOP_HELD_SECONDS)
        answers = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await channel.close(None)
        await server.stop(0)
    failed = [a for a in answers if isinstance(a, BaseException)]
    assert not failed, f"{len(failed)} of {CALLS} calls failed, first: {failed[0]!r}"
    statuses = {a.status for a in answers if not isinstance(a, BaseException)}
    assert statuses == {health_pb2.HealthCheckResponse.SERVING}
