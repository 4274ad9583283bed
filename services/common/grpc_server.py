"""The gRPC server every service runs: health, reflection, the auth interceptor,
the interceptor that maps domain errors to status codes, graceful shutdown."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import context as call_context
from services.common import errors, metrics
from services.common.auth import Authenticator
from services.common.logs import get_logger

log = get_logger(__name__)

STATUS_OF: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

# Errors that mean PostgreSQL cannot be reached right now: the client may retry.
_UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    TimeoutError,
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind in type(exc).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind], str(exc)
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, "a dependency is unavailable; retry later"
    return grpc.StatusCode.INTERNAL, "internal error"


MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000

Behavior = Callable[..., Any]
Ctx = grpc.aio.ServicerContext[Any, Any]


class _BehaviorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each RPC's behavior so that the wrapper runs inside the call's own
    task: context variables set here are seen by the servicer, and exceptions
    raised by it (also mid-stream) come back here."""

    async def enter(self, method: str, context: Ctx) -> None:
        return None

    async def fail(self, method: str, exc: Exception, context: Ctx) -> None:
        raise exc

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(method, handler.stream_stream),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> Any:
            try:
                await self.enter(method, context)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self.fail(method, exc, context)

        return wrapped

    def _streaming(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
            try:
                await self.enter(method, context)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self.fail(method, exc, context)

        return wrapped


class MetricsInterceptor(_BehaviorInterceptor):
    """Outermost: counts every call by method and final status code."""

    def _unary(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> Any:
            started = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                _observe(method, context, started)

        return wrapped

    def _streaming(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                _observe(method, context, started)

        return wrapped


def _observe(method: str, context: Ctx, started: float) -> None:
    code = context.code() or grpc.StatusCode.OK
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    metrics.GRPC_REQUESTS.labels(method, name).inc()
    metrics.GRPC_SECONDS.labels(method).observe(time.perf_counter() - started)


class ErrorInterceptor(_BehaviorInterceptor):
    """Translates domain errors to status codes, once, by type."""

    async def enter(self, method: str, context: Ctx) -> None:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=uuid.uuid4().hex[:16], method=method)

    async def fail(self, method: str, exc: Exception, context: Ctx) -> None:
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("rpc_failed")
        elif code is grpc.StatusCode.UNAVAILABLE:
            log.warning("rpc_unavailable", error=repr(exc))
        await context.abort(code, message)


class AuthInterceptor(_BehaviorInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if self._auth.is_open(details.method):
            return await continuation(details)
        return await super().intercept_service(continuation, details)

    async def enter(self, method: str, context: Ctx) -> None:
        metadata: Any = context.invocation_metadata() or ()
        principal = await self._auth.authenticate(method, metadata)
        tenant = principal.tenant_id if principal else None
        call_context.set_tenant(tenant)
        structlog.contextvars.bind_contextvars(tenant_id=tenant)


@dataclass(frozen=True)
class Registration:
    """One servicer: `add` is the generated add_XServicer_to_server function."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    service_name: str

    @classmethod
    def of(
        cls, module: Any, service: str, add: Callable[[Any, grpc.aio.Server], None], servicer: Any
    ) -> Registration:
        """Names the service from its generated `_pb2` module (for reflection and health)."""
        return cls(add, servicer, str(module.DESCRIPTOR.services_by_name[service].full_name))


class GrpcServer:
    def __init__(
        self, host: str, port: int, registrations: list[Registration], auth: Authenticator
    ) -> None:
        self.server = grpc.aio.server(
            interceptors=[MetricsInterceptor(), ErrorInterceptor(), AuthInterceptor(auth)],
            options=[
                ("grpc.so_reuseport", 0),
                # A full batch (1000 events, 50 keys of 500 characters) is about
                # 25 MB; larger messages get RESOURCE_EXHAUSTED from gRPC itself.
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Clients reconnect (and resolve again) this often, so that the
                # callers' round_robin finds replicas added since
                # (services/common/channels.py). Calls in flight finish first.
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
            ],
        )
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._names = [r.service_name for r in registrations]
        for registration in registrations:
            registration.add(registration.servicer, self.server)
        reflection.enable_server_reflection(
            [*self._names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.address = f"{host}:{port}"
        self.port = self.server.add_insecure_port(self.address)

    async def start(self) -> None:
        await self.server.start()
        for name in ["", *self._names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        """Stops taking calls, lets in-flight calls finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        await self.server.stop(grace)
        log.info("grpc_stopped", seconds=round(time.monotonic() - started, 3))
