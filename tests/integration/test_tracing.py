"""Tracing across the services (issue 12), with the three services running as
processes on a private stack and exporting over OTLP/gRPC to a collector in
this test process that keeps the spans in memory.

- One event's path is one trace: ingest's IngestEvents span, the relay's
  publish (child of it, though the relay runs later, from the outbox row's
  stored traceparent) and meter's fold of the message (child of the publish,
  through the NATS message headers).
- A billing cycle's calls to meter join the cycle's trace (client spans in
  billing, server spans in meter)."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.client import Client, event
from tests.private_suite import private_suite
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.billing.v1 import customer_pb2, invoice_pb2, product_pb2, subscription_pb2
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(240)


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps every span in memory."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    received.append(
                        Span(
                            attributes.get("service.name", ""),
                            span.name,
                            span.kind,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                        )
                    )
        with self._lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    received = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(None)


@pytest.fixture(scope="module")
def traced_suite(
    collector: tuple[Collector, int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Suite]:
    """The services on their own stack (another meter must not fold these
    events), exporting spans to the collector every 100 ms."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with private_suite(tmp_path_factory, "traced", env) as suite:
        yield suite


@pytest.fixture
async def traced_client(traced_suite: Suite) -> AsyncIterator[Client]:
    _, secret = create_tenant(traced_suite, f"traced-{secrets.token_hex(4)}")
    client = Client({s: traced_suite.address(s) for s in SERVICES}, secret)
    yield client
    await client.close()


def _traceparent() -> tuple[str, str]:
    """A new trace started by the test: (trace id, traceparent header)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return trace_id, f"00-{trace_id}-{span_id}-01"


async def _spans_until(
    received: Collector, trace_id: str, wanted: set[tuple[str, str]], timeout: float = 60
) -> list[Span]:
    """The trace's spans once it has every (service, span name) in `wanted`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        spans = received.of_trace(trace_id)
        if wanted <= {(s.service, s.name) for s in spans}:
            return spans
        if asyncio.get_running_loop().time() > deadline:
            have = sorted({(s.service, s.name) for s in spans})
            raise AssertionError(f"trace {trace_id} lacks {wanted}; has {have}")
        await asyncio.sleep(0.2)


def _one(spans: list[Span], service: str, name: str) -> Span:
    found = [s for s in spans if (s.service, s.name) == (service, name)]
    assert len(found) == 1, found
    return found[0]


def _ts(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


async def test_one_events_path_from_ingest_to_the_meter_fold_is_one_trace(
    collector: tuple[Collector, int], traced_client: Client
) -> None:
    received, _ = collector
    client = traced_client
    await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    trace_id, traceparent = _traceparent()
    answer = await client.ingest.IngestEvents(
        ingest_pb2.IngestEventsRequest(
            events=[event("e-1", "cus-1", "api.call", datetime.now(UTC))]
        ),
        metadata=(*client.metadata, ("traceparent", traceparent)),
        timeout=30,
    )
    assert answer.accepted_count == 1

    spans = await _spans_until(
        received,
        trace_id,
        {
            ("usagebilling-ingest", "usagebilling.ingest.v1.IngestService/IngestEvents"),
            ("usagebilling-ingest", "publish EVENTS"),
            ("usagebilling-meter", "process EVENTS"),
        },
    )
    served = _one(spans, "usagebilling-ingest", "usagebilling.ingest.v1.IngestService/IngestEvents")
    published = _one(spans, "usagebilling-ingest", "publish EVENTS")
    folded = _one(spans, "usagebilling-meter", "process EVENTS")
    assert served.parent_span_id == traceparent.split("-")[2]  # the test's own span
    assert published.parent_span_id == served.span_id  # through the outbox row
    assert folded.parent_span_id == published.span_id  # through the NATS headers
    # SERVER, PRODUCER, CONSUMER (OTLP's span kinds).
    assert (served.kind, published.kind, folded.kind) == (2, 4, 5)


async def test_a_billing_cycles_calls_to_meter_join_its_trace(
    collector: tuple[Collector, int], traced_client: Client
) -> None:
    received, _ = collector
    client = traced_client
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="sms", event_name="sms.sent", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    product = await client.call(
        client.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="SMS",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_DAY,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter.id, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="0.01"
                )
            ],
        ),
    )
    customer = await client.call(
        client.customers.CreateCustomer, customer_pb2.CreateCustomerRequest(external_id="cus-1")
    )
    await client.call(
        client.subscriptions.CreateSubscription,
        subscription_pb2.CreateSubscriptionRequest(
            customer_id=customer.id,
            product_id=product.id,
            start_time=_ts(datetime.now(UTC) - timedelta(days=1, hours=2)),
        ),
    )

    trace_id, traceparent = _traceparent()
    run = await client.invoices.RunBillingCycle(
        invoice_pb2.RunBillingCycleRequest(),
        metadata=(*client.metadata, ("traceparent", traceparent)),
        timeout=60,
    )
    assert len(run.invoice_ids) == 1

    query = "usagebilling.meter.v1.MeterService/QueryUsage"
    cycle_name = "usagebilling.billing.v1.InvoiceService/RunBillingCycle"
    spans = await _spans_until(
        received,
        trace_id,
        {
            ("usagebilling-billing", cycle_name),
            ("usagebilling-billing", query),
            ("usagebilling-meter", query),
        },
    )
    cycle = _one(spans, "usagebilling-billing", cycle_name)
    calls = [s for s in spans if (s.service, s.name) == ("usagebilling-billing", query)]
    served = [s for s in spans if (s.service, s.name) == ("usagebilling-meter", query)]
    assert calls and all(c.kind == 3 for c in calls)  # CLIENT
    # Each client span is in the cycle's span; each of meter's is a child of one of them.
    ids = {s.span_id: s for s in spans}
    for call in calls:
        parent = ids.get(call.parent_span_id)
        while parent is not None and parent is not cycle:
            parent = ids.get(parent.parent_span_id)
        assert parent is cycle, call
    assert {s.parent_span_id for s in served} <= {c.span_id for c in calls}
    assert len(served) == len(calls)
