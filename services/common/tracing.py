"""OpenTelemetry tracing, off unless an OTLP endpoint is configured.

Set OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT (OTLP
over gRPC, e.g. http://otel-collector:4317) and every service exports spans
as `usagebilling-<service>` (OTEL_SERVICE_NAME overrides; the SDK's other
OTEL_* variables apply: OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES,
OTEL_EXPORTER_OTLP_HEADERS, ...). OTEL_SDK_DISABLED=true turns it off.

What is traced: every RPC served (grpc_server) and every call made over an
internal channel (ClientInterceptor), with the W3C trace context in the gRPC
metadata; an accepted batch keeps its trace context in its outbox row, the
relay's publish joins that trace and passes it on in the NATS message headers,
and meter's fold of each message joins the message's trace. So one event's
path IngestEvents -> relay publish -> meter fold is one trace, though each hop
is asynchronous."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common import context as call_context

REQUEST_ID_HEADER = "x-request-id"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# The OTEL_* variables a deployment may set for the services (tools/k8s_check.py
# accepts these besides each service's own settings).
VARIABLES = frozenset(
    {
        *ENDPOINT_VARIABLES,
        "OTEL_SDK_DISABLED",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
        "OTEL_PROPAGATORS",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        "OTEL_EXPORTER_OTLP_INSECURE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
        "OTEL_EXPORTER_OTLP_COMPRESSION",
        "OTEL_BSP_SCHEDULE_DELAY",
        "OTEL_BSP_MAX_QUEUE_SIZE",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        "OTEL_BSP_EXPORT_TIMEOUT",
    }
)

_provider: Any = None
_tracer: trace.Tracer = trace.NoOpTracer()


def enabled() -> bool:
    return _provider is not None


def configured(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for tracing: an OTLP endpoint, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(environ.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def configure(service: str) -> bool:
    """Starts exporting spans when the environment asks for it (see
    configured); returns whether it does. Imports the SDK only then."""
    global _provider, _tracer
    if not configured():
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = (
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"usagebilling-{service}"}
    )
    # Not at exit: shutdown() below is bounded, an atexit export may not be.
    provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("usagebilling")
    return True


def shutdown(timeout: float = 2.0) -> None:
    """Exports the spans still buffered, within `timeout` seconds (a collector
    that is away must not hold up the exit)."""
    global _provider, _tracer
    if _provider is not None:
        _provider.force_flush(timeout_millis=int(timeout * 1000))
        threading.Thread(target=_provider.shutdown, daemon=True).start()
    _provider = None
    _tracer = trace.NoOpTracer()


def tracer() -> trace.Tracer:
    return _tracer


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def _carrier(metadata: Sequence[tuple[str, Any]] | None) -> dict[str, str]:
    return {k: v for k, v in metadata or () if isinstance(v, str)}


def start_server_span(method: str, metadata: Sequence[tuple[str, Any]] | None) -> Span | None:
    """The span of an RPC served, child of the caller's (traceparent in the
    metadata), not yet current; None when tracing is off."""
    if not enabled():
        return None
    parent = propagate.extract(_carrier(metadata))
    return _tracer.start_span(
        method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=_rpc_attributes(method)
    )


def end_span(span: Span | None, code: grpc.StatusCode) -> None:
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


@contextlib.contextmanager
def current(span: Span | None) -> Iterator[None]:
    """`span` is the current span within the block (calls made there are its children)."""
    if span is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """An internal span, current within the block (a billing cycle run)."""
    if not enabled():
        yield
        return
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


def traceparent() -> str | None:
    """The current trace context as a W3C traceparent (kept with an outbox row);
    None when tracing is off or nothing is being traced."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


@contextlib.contextmanager
def producing(
    name: str, parent_traceparent: str | None, **attributes: Any
) -> Iterator[dict[str, str]]:
    """A PRODUCER span (the relay's publish), child of the trace an outbox row
    came from; yields the headers that carry it to the consumer."""
    if not enabled():
        yield {}
        return
    parent = propagate.extract({"traceparent": parent_traceparent} if parent_traceparent else {})
    with _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.PRODUCER, attributes=attributes
    ):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers


@contextlib.contextmanager
def consuming(
    name: str, headers: Sequence[Mapping[str, str] | None], **attributes: Any
) -> Iterator[None]:
    """One CONSUMER span per message, each in its message's trace, all timed
    by the block (a fetched batch is folded in one transaction: each of its
    messages' span covers that fold)."""
    if not enabled():
        yield
        return
    started = time.time_ns()
    spans = [
        _tracer.start_span(
            name,
            context=propagate.extract(dict(h or {})),
            kind=SpanKind.CONSUMER,
            attributes={**attributes, "messaging.batch.message_count": len(headers)},
            start_time=started,
        )
        for h in headers
    ]
    try:
        yield
    except BaseException as exc:
        for each in spans:
            each.record_exception(exc)
            each.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        for each in spans:
            each.end()


class ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg,misc]
    """On internal channels: each call carries the request id of the call
    being served (x-request-id) and, when tracing is on, gets a CLIENT span
    whose context goes in the metadata (traceparent)."""

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        metadata = list(client_call_details.metadata or ())
        request_id = call_context.current_request_id()
        if request_id and not any(k == REQUEST_ID_HEADER for k, _ in metadata):
            metadata.append((REQUEST_ID_HEADER, request_id))
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else str(method)
        if not enabled():
            details = client_call_details._replace(metadata=grpc.aio.Metadata(*metadata))
            return await continuation(details, request)
        with _tracer.start_as_current_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes=_rpc_attributes(method),
            record_exception=False,
            set_status_on_exception=False,
        ) as client_span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            metadata.extend(carrier.items())
            details = client_call_details._replace(metadata=grpc.aio.Metadata(*metadata))
            call = await continuation(details, request)
            code = await call.code()
            client_span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                client_span.set_status(Status(StatusCode.ERROR, code.name))
            return call
