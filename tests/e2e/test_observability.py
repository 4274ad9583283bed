"""What an operator sees of the running services (issue 12): one JSON log line
per RPC, rejected calls included, with the request id that the caller gets
back in the trailing metadata and that goes on to the services called; and
each service's /metrics, scraped over HTTP, with only its own series."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics
from tests.client import Client
from tools.suite import SERVICES, Suite
from usagebilling.billing.v1 import customer_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

GRPC_LABELS = {"grpc_service", "grpc_method", "grpc_type"}


def _log_lines(suite: Suite, service: str) -> list[dict[str, Any]]:
    lines = []
    for raw in (suite.log_dir / f"{service}.log").read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


async def _rpc_line(suite: Suite, service: str, request_id: str) -> dict[str, Any]:
    """The `rpc` log line of `service` with `request_id` (logged as the call ends)."""
    for _ in range(100):
        found = [
            line
            for line in _log_lines(suite, service)
            if line.get("event") == "rpc" and line.get("request_id") == request_id
        ]
        if found:
            assert len(found) == 1, found
            return found[0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service} logged no rpc line with request_id {request_id}")


def _trailer(error: grpc.aio.AioRpcError) -> str:
    metadata: Any = error.trailing_metadata() or ()
    found = [value for key, value in metadata if key == "x-request-id"]
    return str(found[0]) if found else ""


async def test_each_rpc_logs_one_line_with_the_callers_request_id(
    suite: Suite, client: Client
) -> None:
    request_id = f"req-{uuid.uuid4().hex}"
    call = client.customers.CreateCustomer(
        customer_pb2.CreateCustomerRequest(external_id="c-1", name="C"),
        metadata=(*client.metadata, ("x-request-id", request_id)),
        timeout=30,
    )
    customer = await call
    assert customer.external_id == "c-1"
    assert dict(await call.trailing_metadata())["x-request-id"] == request_id

    line = await _rpc_line(suite, "billing", request_id)
    assert line["method"] == "/usagebilling.billing.v1.CustomerService/CreateCustomer"
    assert line["code"] == "OK"
    assert line["tenant_id"] and isinstance(line["duration_ms"], float)
    assert line["level"] == "info"


async def test_rejected_calls_are_logged_and_get_a_request_id(suite: Suite, client: Client) -> None:
    # Bad credentials: refused before the request is read.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.meter.ListMeters(
            meter_pb2.ListMetersRequest(), metadata=(("authorization", "Bearer nope"),), timeout=30
        )
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    generated = _trailer(refused.value)
    assert len(generated) == 32
    line = await _rpc_line(suite, "meter", generated)
    assert (line["code"], line["tenant_id"]) == ("UNAUTHENTICATED", None)

    # An invalid argument, with a retry-after-less trailer: the request id is kept.
    request_id = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await client.meter.GetMeter(
            meter_pb2.GetMeterRequest(id="not-a-uuid"),
            metadata=(*client.metadata, ("x-request-id", request_id)),
            timeout=30,
        )
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _trailer(invalid.value) == request_id
    line = await _rpc_line(suite, "meter", request_id)
    assert line["code"] == "INVALID_ARGUMENT" and line["tenant_id"]

    # An unusable request id (too long) is replaced, not echoed.
    with pytest.raises(grpc.aio.AioRpcError) as long_id:
        await client.meter.GetMeter(
            meter_pb2.GetMeterRequest(id="not-a-uuid"),
            metadata=(*client.metadata, ("x-request-id", "x" * 500)),
            timeout=30,
        )
    assert len(_trailer(long_id.value)) == 32


async def test_the_request_id_goes_on_to_the_services_called(suite: Suite, new_tenant: Any) -> None:
    """A new key's first call to meter makes meter ask billing who it is
    (WhoAmI): billing's line for that call has the caller's request id."""
    _, secret = new_tenant()
    fresh = Client({s: suite.address(s) for s in SERVICES}, secret)
    request_id = f"chain-{uuid.uuid4().hex[:8]}"
    try:
        await fresh.meter.ListMeters(
            meter_pb2.ListMetersRequest(),
            metadata=(*fresh.metadata, ("x-request-id", request_id)),
            timeout=30,
        )
    finally:
        await fresh.close()
    assert (await _rpc_line(suite, "meter", request_id))["code"] == "OK"
    inner = await _rpc_line(suite, "billing", request_id)
    assert inner["method"] == "/usagebilling.billing.v1.AuthService/WhoAmI"
    assert inner["code"] == "OK"


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return str(answer.read().decode())


async def test_each_service_exports_only_its_own_series(suite: Suite, client: Client) -> None:
    # Traffic on every service, health checks and reflection included.
    await client.call(client.meter.ListMeters, meter_pb2.ListMetersRequest())
    await client.call(client.customers.ListCustomers, customer_pb2.ListCustomersRequest())
    await client.call(client.ingest.ListEvents, ingest_pb2.ListEventsRequest(customer_id="nobody"))
    for service in SERVICES:
        async with grpc.aio.insecure_channel(suite.address(service)) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    own_names = {
        service: {c._name for c in metrics.OWN[service]}  # type: ignore[attr-defined]
        for service in SERVICES
    }
    for service in SERVICES:
        port = suite.metrics_ports[service]
        text = await asyncio.to_thread(_scrape, f"http://127.0.0.1:{port}/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        ours = {name for name in families if name.startswith("usagebilling_")}
        others = set().union(*(own_names[s] for s in SERVICES if s != service))
        wanted = own_names[service] | {"usagebilling_build_info", "usagebilling_ready"}
        assert not ours & (others - own_names[service]), f"{service} exports others' series"
        assert ours <= wanted, f"{service}: unexpected {ours - wanted}"
        assert {"usagebilling_build_info", "usagebilling_ready"} <= ours

        samples = [s for f in families.values() for s in f.samples]
        assert not [s.name for s in samples if s.name.endswith("_created")]
        build = [s for s in samples if s.name == "usagebilling_build_info"]
        assert len(build) == 1 and build[0].value == 1
        assert set(build[0].labels) == {"version", "revision", "python"}

        handled = [s for s in samples if s.name == "grpc_server_handled_total"]
        assert handled, f"{service} counted no RPC"
        for sample in handled:
            assert set(sample.labels) == GRPC_LABELS | {"grpc_code"}
            assert sample.labels["grpc_service"].startswith("usagebilling."), sample
            assert not sample.labels["grpc_method"].startswith("/")
        started = [s for s in samples if s.name == "grpc_server_started_total"]
        assert started and all(set(s.labels) == GRPC_LABELS for s in started)
        seconds = [s for s in samples if s.name == "grpc_server_handling_seconds_bucket"]
        assert seconds and all(set(s.labels) == GRPC_LABELS | {"le"} for s in seconds)
        assert "process_resident_memory_bytes" in families

    # The suite binds USAGEBILLING_HOST=127.0.0.1: metrics too, not every address.
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_scrape, f"http://127.0.0.2:{suite.metrics_ports['meter']}/metrics")


async def test_grpc_type_is_the_methods_kind(suite: Suite, client: Client) -> None:
    """StreamIngest is counted as bidi_stream, IngestEvents as unary (though
    the server reads it as a stream internally, for its byte budget)."""
    await client.call(client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest())
    text = await asyncio.to_thread(
        _scrape, f"http://127.0.0.1:{suite.metrics_ports['ingest']}/metrics"
    )
    kinds = {
        s.labels["grpc_method"]: s.labels["grpc_type"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "grpc_server_started_total"
    }
    assert kinds["IngestEvents"] == "unary"
