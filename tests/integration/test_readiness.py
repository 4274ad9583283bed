"""Health that tells the truth, with the three services as processes on a
private PostgreSQL and NATS: "readiness" (and "", and each service's own name)
is NOT_SERVING while PostgreSQL or NATS is stopped and SERVING again once it is
back, while "liveness" stays SERVING throughout and the processes keep running;
liveness fails (by timeout) only when the process does not answer.
The services run with the default settings (a check every 2 s, not ready after
2 failed rounds), so the times printed are those a deployment would see."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.devstack import DevStack
from tools.suite import SERVICES, Suite

pytestmark = pytest.mark.timeout(420)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A service name each server registers, which follows readiness.
OWN_NAME = {
    "ingest": "usagebilling.ingest.v1.IngestService",
    "meter": "usagebilling.meter.v1.MeterService",
    "billing": "usagebilling.billing.v1.TenantService",
}
# Generous for a loaded machine: the default settings flip within about 6 s.
FLIP_WITHIN = 30.0
RECOVER_WITHIN = 60.0


async def _status(suite: Suite, service: str, name: str) -> str:
    """The health status of `name` on `service`, or the RPC's error code."""
    async with grpc.aio.insecure_channel(suite.address(service)) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=name), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


async def _statuses(suite: Suite, service: str) -> dict[str, str]:
    names = ("readiness", "", OWN_NAME[service], "liveness")
    found = await asyncio.gather(*(_status(suite, service, name) for name in names))
    return dict(zip(names, found, strict=True))


def _ready_sample(suite: Suite, service: str, dependency: str) -> float | None:
    url = f"http://127.0.0.1:{suite.metrics_ports[service]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    wanted = f'usagebilling_ready{{dependency="{dependency}"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.removeprefix(wanted))
    return None


async def _until_readiness(suite: Suite, wanted: str, within: float) -> dict[str, float]:
    """Polls every service until readiness, "" and its own name are all
    `wanted`; returns the seconds each took. Liveness must be SERVING at every
    poll and no process may exit."""
    started = time.monotonic()
    took: dict[str, float] = {}
    while len(took) < len(SERVICES):
        assert suite.dead() == [], f"a service exited: {suite.dead()}"
        for service in SERVICES:
            statuses = await _statuses(suite, service)
            assert statuses["liveness"] == "SERVING", (service, statuses)
            if service not in took and {
                statuses["readiness"],
                statuses[""],
                statuses[OWN_NAME[service]],
            } == {wanted}:
                took[service] = time.monotonic() - started
        elapsed = time.monotonic() - started
        assert elapsed < within, f"not all {wanted} after {elapsed:.0f} s: only {sorted(took)}"
        await asyncio.sleep(0.25)
    print(f"readiness {wanted} after (s):", {s: round(t, 1) for s, t in took.items()})
    return took


async def _outage(
    suite: Suite, dependency: str, stop: Callable[[], None], start: Callable[[], None]
) -> None:
    await _until_readiness(suite, "SERVING", RECOVER_WITHIN)
    for service in SERVICES:
        assert await asyncio.to_thread(_ready_sample, suite, service, dependency) == 1.0

    await asyncio.to_thread(stop)
    took = await _until_readiness(suite, "NOT_SERVING", FLIP_WITHIN)
    assert all(seconds < FLIP_WITHIN for seconds in took.values())
    for service in SERVICES:
        assert await asyncio.to_thread(_ready_sample, suite, service, dependency) == 0.0
    # It stays NOT_SERVING while the dependency is away (no flapping back).
    await asyncio.sleep(5)
    for service in SERVICES:
        statuses = await _statuses(suite, service)
        assert statuses["readiness"] == "NOT_SERVING", (service, statuses)
        assert statuses["liveness"] == "SERVING", (service, statuses)

    await asyncio.to_thread(start)
    await _until_readiness(suite, "SERVING", RECOVER_WITHIN)
    for service in SERVICES:
        assert await asyncio.to_thread(_ready_sample, suite, service, dependency) == 1.0


async def _stuck_process_fails_liveness(suite: Suite) -> None:
    """What a kubelet sees of a stuck process: the probe times out. (SIGSTOP
    stops the whole process; a stuck event loop alone has the same effect,
    since the health service is served by that loop.)"""
    process = suite.processes["meter"]
    assert await _status(suite, "meter", "liveness") == "SERVING"
    os.kill(process.pid, signal.SIGSTOP)
    try:
        assert await _status(suite, "meter", "liveness") == "DEADLINE_EXCEEDED"
    finally:
        os.kill(process.pid, signal.SIGCONT)
    started = time.monotonic()
    while (status := await _status(suite, "meter", "liveness")) != "SERVING":
        assert time.monotonic() - started < FLIP_WITHIN, status
        await asyncio.sleep(0.25)
    assert await _status(suite, "meter", "readiness") == "SERVING"


async def test_readiness_follows_postgres_and_nats_liveness_only_the_process(
    process_stack: DevStack, process_suite: Suite
) -> None:
    suite = process_suite
    for service in SERVICES:
        assert await _status(suite, service, "no.such.Service") == "NOT_FOUND"

    await _outage(suite, "postgres", process_stack.stop_postgres, process_stack.restart_postgres)
    await _outage(suite, "nats", process_stack.stop_nats, process_stack.restart_nats)
    await _stuck_process_fails_liveness(suite)
