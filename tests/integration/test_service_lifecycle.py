"""Each service started as the container image starts it (`python -m
services.<name>`, configured by the environment): answers its health probe,
serves /metrics with the named series, and exits cleanly within 10 s of SIGTERM
while under load, with nothing acknowledged lost."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request

import pytest

from tests.client import Client
from tests.load import Load, check_exactly_once, count_meter
from tools.suite import Suite

pytestmark = pytest.mark.timeout(240)

SERIES = {
    "ingest": [
        "grpc_server_handled_total",
        "usagebilling_events_total",
        "usagebilling_outbox_depth",
    ],
    "meter": [
        "grpc_server_handled_total",
        "usagebilling_consumer_lag_messages",
        "usagebilling_consumer_batch_seconds",
    ],
    "billing": ["grpc_server_handled_total", "usagebilling_invoices_total"],
}


def _metrics(suite: Suite, service: str) -> str:
    url = f"http://127.0.0.1:{suite.metrics_ports[service]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


async def test_health_metrics_and_graceful_stop_under_load(
    process_suite: Suite, process_client: tuple[str, Client]
) -> None:
    suite = process_suite
    tenant_id, client = process_client
    meter_id = await count_meter(client)
    load = Load(client, "g")
    senders = [asyncio.create_task(load.sender(lane)) for lane in range(2)]
    await asyncio.sleep(1.5)

    for service, names in SERIES.items():
        text = await asyncio.to_thread(_metrics, suite, service)
        for name in names:
            assert name in text, f"{service} /metrics lacks {name}"
    ingest_metrics = await asyncio.to_thread(_metrics, suite, "ingest")
    assert 'usagebilling_events_total{result="accepted"}' in ingest_metrics
    assert 'grpc_method="IngestEvents"' in ingest_metrics

    for service in ("meter", "ingest", "billing"):
        started = time.monotonic()
        code = await asyncio.to_thread(suite.stop_service, service, signal.SIGTERM, 15)
        assert code == 0, f"{service} exited with {code}"
        assert time.monotonic() - started < 10, f"{service} took too long to stop"
        await asyncio.to_thread(suite.start_service, service)
        await asyncio.to_thread(suite.wait_healthy, service)
        await asyncio.sleep(1)

    load.stopping.set()
    await asyncio.gather(*senders)
    await check_exactly_once(suite, tenant_id, client, meter_id, load)
