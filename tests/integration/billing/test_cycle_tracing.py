"""A scheduled billing run is one trace per tenant (`billing cycle`), and every
call it makes to meter is made inside it, so the calls' CLIENT spans (and
meter's, through the gRPC metadata) join it. The propagation over gRPC itself
is tests/integration/test_tracing.py's; here the scheduler, with the spans kept
in memory."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.billing.scheduler import Scheduler
from services.common import tracing
from tests.integration.billing.builders import DAY, per_unit, tenant_with
from tests.integration.billing.conftest import Billing

D, H = timedelta(days=1), timedelta(hours=1)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing._provider, tracing._tracer = provider, provider.get_tracer("test")
    try:
        yield exporter
    finally:
        tracing._provider, tracing._tracer = None, trace.NoOpTracer()


def _record_trace_of_each_call(meters: Any) -> list[tuple[str, int]]:
    """Wraps each async method of the fake meter service to note the trace
    (and span) current when billing calls it."""
    seen: list[tuple[str, int]] = []
    for name, method in inspect.getmembers(meters, inspect.iscoroutinefunction):
        if name.startswith("_"):
            continue

        def wrap(method: Any = method, name: str = name) -> Any:
            async def called(*args: Any, **kwargs: Any) -> Any:
                seen.append((name, trace.get_current_span().get_span_context().trace_id))
                return await method(*args, **kwargs)

            return called

        setattr(meters, name, wrap())
    return seen


async def test_a_scheduled_runs_calls_to_meter_are_in_its_trace(
    billing: Billing, spans: InMemorySpanExporter
) -> None:
    now = datetime.now(UTC)
    tenant = await tenant_with(
        billing,
        interval=DAY,
        start=now - 2 * D - 3 * H,
        now=now,
        customers=["a", "b"],
        meters=("tokens",),
        prices=[per_unit("tokens", "0.01")],
    )
    billing.meters.add(tenant.id, "tokens", "a", now - 2 * D - H, "5")
    calls = _record_trace_of_each_call(billing.meters)

    scheduler = Scheduler(billing.store, billing.invoicing, timedelta(minutes=1))
    assert await scheduler.tick() == 4  # two customers, two ended days

    cycles = [
        s
        for s in spans.get_finished_spans()
        if s.name == "billing cycle"
        and (s.attributes or {}).get("usagebilling.tenant_id") == tenant.id
    ]
    assert len(cycles) == 1
    assert calls, "the run asked meter nothing"
    cycle_trace = cycles[0].context.trace_id
    assert {trace_id for _, trace_id in calls} == {cycle_trace}
