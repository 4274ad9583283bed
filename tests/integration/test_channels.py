"""Calls between services spread over every address their target resolves to
(in Kubernetes: every ready pod behind a headless Service)."""

from __future__ import annotations

from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.channels import internal_channel


class CountingHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, name: str, calls: Counter[str]) -> None:
        self._name = name
        self._calls = calls

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._calls[self._name] += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def test_an_internal_channel_spreads_calls_over_every_address() -> None:
    calls: Counter[str] = Counter()
    servers, ports = [], []
    for name in ("a", "b", "c"):
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(CountingHealth(name, calls), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
    try:
        async with internal_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(30):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        for server in servers:
            await server.stop(None)
    # A plain channel (pick_first) would send all 30 to one server.
    assert sorted(calls) == ["a", "b", "c"]
    assert sum(calls.values()) == 30
    assert min(calls.values()) >= 5
