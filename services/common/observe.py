"""The outermost server interceptor: what an operator sees of each RPC.

For every call (refused ones included: bad credentials, invalid arguments,
budgets) it
- takes the request id from the caller's `x-request-id` metadata, or makes
  one, binds it to the call's log lines and to the calls the service makes
  (tracing.ClientInterceptor), and returns it in the trailing metadata;
- counts it in the go-grpc-prometheus series (metrics.GRPC_*);
- traces it (a SERVER span, child of the caller's trace) when tracing is on;
- writes one log line `rpc` with the method, status code, duration, tenant
  and request id.
Health checks and reflection are none of these: they are probes and tooling."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import structlog
from google.protobuf import descriptor_pool
from opentelemetry.trace import Span

from services.common import context as call_context
from services.common import metrics, tracing
from services.common.handlers import Behavior, Ctx, rebuild
from services.common.logs import get_logger

log = get_logger(__name__)

UNOBSERVED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
REQUEST_ID = tracing.REQUEST_ID_HEADER
REQUEST_ID_MAX_LENGTH = 128
# Codes that mean the service failed, not the caller: logged as errors.
SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
)
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# grpc_code label values as gRPC-Go spells them (go-grpc-prometheus, and the
# dashboards and alerts written for it): "OK", "InvalidArgument", "Canceled".
GO_CODE_NAMES = {
    code: "Canceled"
    if code is grpc.StatusCode.CANCELLED
    else "OK"
    if code is grpc.StatusCode.OK
    else code.name.title().replace("_", "")
    for code in grpc.StatusCode
}
_KINDS = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}


def request_id_of(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The caller's x-request-id when it is a sensible one (printable ASCII,
    at most 128 characters), else a new one."""
    for key, value in metadata or ():
        if key == REQUEST_ID and isinstance(value, str):
            if 0 < len(value) <= REQUEST_ID_MAX_LENGTH and value.isascii() and value.isprintable():
                return value
            break
    return uuid.uuid4().hex


@functools.cache
def rpc_labels(method: str) -> tuple[str, str, str]:
    """(grpc_service, grpc_method, grpc_type) of "/pkg.Service/Method"."""
    service, _, name = method.lstrip("/").partition("/")
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return service, name, "unary"
    return service, name, _KINDS[(found.client_streaming, found.server_streaming)]


@functools.cache
def _started(method: str) -> Any:
    """The grpc_server_started_total series of `method` (made once a method:
    `.labels()` looks its child up under a lock on every call)."""
    return metrics.GRPC_STARTED.labels(*rpc_labels(method))


@functools.cache
def _seconds(method: str) -> Any:
    return metrics.GRPC_SECONDS.labels(*rpc_labels(method))


@functools.cache
def _handled(method: str, code: grpc.StatusCode) -> Any:
    return metrics.GRPC_HANDLED.labels(*rpc_labels(method), GO_CODE_NAMES[code])


def code_of(context: Ctx, otherwise: grpc.StatusCode) -> grpc.StatusCode:
    """The status the call ended with: the one set on the context (abort), else `otherwise`."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _CODES.get(code, grpc.StatusCode.UNKNOWN)
    return otherwise


class _Call:
    """One RPC being observed."""

    def __init__(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> None:
        self.method = method
        self.request_id = request_id_of(metadata)
        self.span: Span | None = tracing.start_server_span(method, metadata)
        self.started = time.perf_counter()

    def bind(self) -> None:
        """This call's request id for its log lines and outgoing calls (in
        the call's own task: a new call starts with nothing bound)."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=self.request_id, method=self.method)
        call_context.set_request_id(self.request_id)

    def start(self, context: Ctx) -> None:
        self.bind()
        context.set_trailing_metadata(((REQUEST_ID, self.request_id),))

    def finish(self, code: grpc.StatusCode, counted: bool = True) -> None:
        seconds = time.perf_counter() - self.started
        if counted:
            _handled(self.method, code).inc()
            _seconds(self.method).observe(seconds)
        tracing.end_span(self.span, code)
        level = log.error if code in SERVER_FAULTS else log.info
        level(
            "rpc",
            method=self.method[:200],
            code=code.name,
            duration_ms=round(seconds * 1000, 3),
            tenant_id=call_context.current_tenant_or_none(),
            request_id=self.request_id,
        )

    def unary(self, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> Any:
            otherwise = grpc.StatusCode.OK
            try:
                self.start(context)
                with tracing.current(self.span):
                    return await behavior(request, context)
            except asyncio.CancelledError:
                otherwise = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except BaseException:
                otherwise = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self.finish(code_of(context, otherwise))

        return wrapped

    def streaming(self, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
            otherwise = grpc.StatusCode.OK
            try:
                self.start(context)
                with tracing.current(self.span):
                    async for response in behavior(request, context):
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                otherwise = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                raise
            except BaseException:
                otherwise = grpc.StatusCode.UNKNOWN
                raise
            finally:
                self.finish(code_of(context, otherwise))

        return wrapped


class ObservingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method: str = details.method
        if method.lstrip("/").partition("/")[0] in UNOBSERVED_SERVICES:
            return await continuation(details)
        call = _Call(method, details.invocation_metadata)
        # The inner interceptors run now, in the call's task: what they call
        # (auth's key check with billing) carries the request id and trace.
        call.bind()
        with tracing.current(call.span):
            handler = await continuation(details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            call.finish(grpc.StatusCode.UNIMPLEMENTED, counted=False)
            return None
        _started(method).inc()
        return rebuild(handler, call.unary, call.streaming)
