"""The gRPC server every service runs: health, reflection, the interceptors,
graceful shutdown.

A call meets, in order: the observing interceptor (request id, metrics, trace
and one log line: services/common/observe.py); the auth
interceptor, which authenticates from the metadata before any of the request is
read; the request deserializer, which refuses undecodable bytes and strings
with NUL; the error interceptor, which turns those refusals and every domain
error into a status code, once; then the servicer, with the tenant bound."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import gc
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import structlog
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import context as call_context
from services.common import errors, handlers, observe
from services.common.auth import Authenticator, Principal
from services.common.logs import get_logger
from services.common.tls import TlsSettings, server_credentials

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
    errors.Aborted: grpc.StatusCode.ABORTED,
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


# Errors of concurrent work that undid the call's transaction: nothing was
# changed, and the same call may succeed when retried.
_CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind in type(exc).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind], str(exc)
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return grpc.StatusCode.UNAVAILABLE, "a dependency is unavailable; retry later"
    if isinstance(exc, _CONFLICT_ERRORS):
        return grpc.StatusCode.ABORTED, "a concurrent change conflicted; retry"
    return grpc.StatusCode.INTERNAL, "internal error"


# The largest request a service accepts; larger ones get RESOURCE_EXHAUSTED
# from gRPC itself (README, "Limits"). Half gRPC's default: serving a batch
# holds about 25 times its wire size in Python objects (events, metadata, JSON,
# the outbox payload), and a stream waiting for room holds its request's bytes,
# so this and the budget below set what a replica needs. Measured: 30
# concurrent maximum-size calls peak at about 130 MB, 30 concurrent streams of
# maximum-size requests at about 370 MB, within a 512 Mi pod
# (tests/integration/test_auth_before_body.py).
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
# At most this many bytes of large requests (BUDGETED_METHODS) are served at
# once; more calls wait, unary ones with their bodies still at their clients.
IN_FLIGHT_REQUEST_BYTES = 4 * 1024 * 1024
# Open streams of the budgeted streaming methods (StreamIngest), in all and per
# tenant (OpenStreams): each may hold a read request while it waits for room.
MAX_STREAMS = 16
MAX_STREAMS_PER_TENANT = 4
# A stream that sends no request for this long is ended (ABORTED) so that idle
# streams cannot keep the slots above from other tenants.
STREAM_IDLE_SECONDS = 30.0
# A budgeted call at least this large is followed by a full garbage collection.
COLLECT_AFTER_BYTES = 1024 * 1024
MAX_CONNECTION_AGE_MS = 5 * 60 * 1000
# A call waits in gRPC core until the event loop takes it (one at a time,
# between turns of the loop), so under load above capacity the backlog is
# there, before any interceptor. Core's default cancels a call after 30 s of
# that, with a bare CANCELLED, whatever its deadline, and unlogged (make
# bench's paced phase on a busy machine). Past any sensible deadline instead:
# the caller's deadline decides (DEADLINE_EXCEEDED); core's limits on how many
# calls wait still apply.
MAX_UNTAKEN_SECONDS = 3600

# The methods whose requests may be large (a batch of events): a unary call
# takes room in the server's RequestBudget before its request is read, a
# stream's request once read and until the next is asked for.
BUDGETED_METHODS = frozenset(
    {
        "/usagebilling.ingest.v1.IngestService/IngestEvents",
        "/usagebilling.ingest.v1.IngestService/StreamIngest",
    }
)

# Request fields whose servicer judges each element itself: a bad event is
# rejected alone, in the response, rather than failing the whole call.
SELF_CHECKED_FIELDS: dict[str, frozenset[str]] = {
    "usagebilling.ingest.v1.IngestEventsRequest": frozenset({"events"}),
}

# Health service names (grpc.health.v1): READINESS is SERVING only while this
# replica reaches PostgreSQL and NATS ("" and every registered service follow
# it); LIVENESS while the process runs and its event loop answers (the health
# service is served by that loop, so a stuck loop fails the probe by timeout).
READINESS = "readiness"
LIVENESS = "liveness"

Behavior = handlers.Behavior
Ctx = handlers.Ctx
Wrap = handlers.Wrap
Deserializer = handlers.Deserializer
_rebuild = handlers.rebuild


class _BehaviorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps each RPC's behavior so that the wrapper runs inside the call's own
    task: context variables set here are seen by the servicer, and exceptions
    raised by it (also mid-stream) come back here."""

    async def enter(self, method: str, context: Ctx) -> None:
        return None

    def admit(self, request: Any) -> Any:
        """The request (or request iterator) the servicer gets."""
        return request

    async def fail(self, method: str, exc: Exception, context: Ctx) -> None:
        raise exc

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        return _rebuild(
            handler,
            lambda behavior: self._unary(method, behavior),
            lambda behavior: self._streaming(method, behavior),
        )

    def _unary(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> Any:
            try:
                await self.enter(method, context)
                return await behavior(self.admit(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self.fail(method, exc, context)

        return wrapped

    def _streaming(self, method: str, behavior: Behavior) -> Behavior:
        async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
            try:
                await self.enter(method, context)
                async for response in behavior(self.admit(request), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await self.fail(method, exc, context)

        return wrapped


@dataclass(frozen=True)
class Refused:
    """What a checked deserializer returns for a request it refuses. It cannot
    raise: grpc answers a deserializer's exception with UNKNOWN (INTERNAL and a
    traceback mid-stream); the error interceptor raises InvalidArgument(reason)
    in the call's task instead."""

    reason: str


def request_name(method: str) -> str:
    """The full name of the request message of `method` ("/pkg.Service/Method")."""
    try:
        found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:
        return "request message"
    return str(found.input_type.full_name)


def nul_path(message: Message, skip: frozenset[str] = frozenset(), prefix: str = "") -> str | None:
    """The path of the first string in `message` (recursively: repeated
    fields, map keys and values included) that contains NUL, such as
    "event_names[2]" or 'labels["a"]'; None when there is none. PostgreSQL
    text cannot hold NUL, so such a string would fail deep inside a service.
    Only the fields that are set are visited, so this costs little."""
    for field, value in message.ListFields():
        if field.name in skip:
            continue
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_STRING:
            items = enumerate(value) if field.is_repeated else ((None, value),)
            for index, text in items:
                if "\x00" in text:
                    return path if index is None else f"{path}[{index}]"
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _nul_in_messages(field, value, path)
            if found is not None:
                return found
    return None


def _nul_in_messages(field: FieldDescriptor, value: Any, path: str) -> str | None:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value_field = entry.fields_by_name["value"]
        for key in value:
            where = f"{path}[{key!r}]"
            if isinstance(key, str) and "\x00" in key:
                return where
            item = value[key]
            if value_field.type == FieldDescriptor.TYPE_STRING and "\x00" in item:
                return where
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                found = nul_path(item, prefix=where + ".")
                if found is not None:
                    return found
        return None
    if field.is_repeated:
        for index, item in enumerate(value):
            found = nul_path(item, prefix=f"{path}[{index}].")
            if found is not None:
                return found
        return None
    return nul_path(value, prefix=path + ".")


@functools.cache
def checked_deserializer(method: str, deserializer: Deserializer) -> Deserializer:
    """`deserializer`, refusing (see Refused) bytes that are not a valid
    request message and strings that contain NUL. Made once per method and
    deserializer (the interceptors ask on every call)."""
    name = request_name(method)
    skip = SELF_CHECKED_FIELDS.get(name, frozenset())

    def parse(data: bytes) -> Any:
        try:
            request = deserializer(data)
        except Exception:  # DecodeError, or whatever else bytes make a parser raise
            return Refused(f"request: not a valid {name}")
        if isinstance(request, Message):
            path = nul_path(request, skip)
            if path is not None:
                return Refused(f"{path}: must not contain a NUL character")
        return request

    return parse


def _accepted(request: Any) -> Any:
    """`request`, or INVALID_ARGUMENT when a checked deserializer refused it."""
    if isinstance(request, Refused):
        raise errors.InvalidArgument(request.reason)
    return request


def _admit(request: Any) -> Any:
    if hasattr(_accepted(request), "__aiter__"):
        return _admit_each(request)
    return request


async def _admit_each(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A stream's requests; the first refused one fails the call when it arrives."""
    async for request in requests:
        yield _accepted(request)


class ErrorInterceptor(_BehaviorInterceptor):
    """Refuses malformed requests, and translates domain errors to status
    codes, once, by type."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method: str = details.method
        raw = handler.request_deserializer
        checked = checked_deserializer(method, raw) if raw is not None else None
        return _rebuild(
            handler,
            lambda behavior: self._unary(method, behavior),
            lambda behavior: self._streaming(method, behavior),
            checked,
        )

    def admit(self, request: Any) -> Any:
        return _admit(request)

    async def fail(self, method: str, exc: Exception, context: Ctx) -> None:
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("rpc_failed")
        elif code is grpc.StatusCode.UNAVAILABLE:
            log.warning("rpc_unavailable", error=repr(exc))
        # Trailers given to abort replace those set before (the request id).
        trailers: tuple[tuple[str, str], ...] = tuple(context.trailing_metadata() or ())
        if isinstance(exc, errors.ResourceExhausted) and exc.retry_after is not None:
            # Seconds, as in HTTP's Retry-After, but with the fraction kept.
            trailers += (("retry-after", f"{exc.retry_after:g}"),)
        await context.abort(code, message, trailers)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates each call from its metadata alone, before any of its
    request is read. A refused call gets a handler that never reads the body,
    so a caller without a valid key cannot make a service hold (or parse) what
    it sends. An accepted call runs with its principal bound."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or self._auth.is_open(details.method):
            return handler
        try:
            principal = await self._auth.authenticate(
                details.method, details.invocation_metadata or ()
            )
        except Exception as exc:  # raised again in the call, where errors are mapped
            return _refusal(exc)
        return _rebuild(
            handler,
            lambda behavior: _as_principal(principal, behavior),
            lambda behavior: _as_principal_streaming(principal, behavior),
        )


def _refusal(exc: Exception) -> Any:
    """A handler that fails at once with `exc`. It takes a request stream that
    it never reads: gRPC reads a message only when asked, so the body stays
    with the client (beyond a flow-control window), never in this process."""

    async def refuse(requests: Any, context: Ctx) -> Any:
        raise exc

    return grpc.stream_unary_rpc_method_handler(refuse)


def _bind(principal: Principal | None) -> None:
    tenant = principal.tenant_id if principal else None
    call_context.set_tenant(tenant, principal.api_key_id if principal else "")
    structlog.contextvars.bind_contextvars(tenant_id=tenant)
    if principal is not None and principal.service:
        # Which service acted for the tenant (its own token told us).
        structlog.contextvars.bind_contextvars(caller_service=principal.service)


def _as_principal(principal: Principal | None, behavior: Behavior) -> Behavior:
    async def wrapped(request: Any, context: Ctx) -> Any:
        _bind(principal)
        return await behavior(request, context)

    return wrapped


def _as_principal_streaming(principal: Principal | None, behavior: Behavior) -> Behavior:
    async def wrapped(request: Any, context: Ctx) -> AsyncIterator[Any]:
        _bind(principal)
        async for response in behavior(request, context):
            yield response

    return wrapped


class RequestBudget:
    """Bounds the bytes of requests a server holds at once. A call reserves the
    largest request before its request is read (its size is not known yet),
    gives back what its request turned out not to need once parsed, and the
    rest when it ends; calls that find no room wait, in order of arrival."""

    def __init__(self, capacity: int, largest: int) -> None:
        self.capacity = capacity
        self.largest = largest
        self._free = capacity
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> int:
        return self._free

    async def reserve(self) -> None:
        if not self._waiters and self._free >= self.largest:
            self._free -= self.largest
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # reserved for us by release()
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(self.largest)  # granted as we were cancelled
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self, size: int) -> None:
        self._free += size
        while self._waiters and self._free >= self.largest:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._free -= self.largest
                waiter.set_result(None)


async def _until_idle(requests: AsyncIterator[Any], idle: float) -> AsyncIterator[Any]:
    """A stream's requests, ending it with ABORTED when none arrives for `idle`
    seconds. The read is not cancelled at the timeout (cancelling a read of
    gRPC's request iterator could drop a message it has taken off the wire):
    it runs as a task, and a request that arrives at the boundary is served."""
    stream = aiter(requests)
    read: asyncio.Task[Any] | None = None
    try:
        while True:
            read = asyncio.ensure_future(anext(stream))
            await asyncio.wait([read], timeout=idle)
            if not read.done():
                raise errors.Aborted(
                    f"stream: no request for {idle:g} s; every request before was"
                    " answered, open a new stream to send more"
                )
            try:
                data = read.result()
            except StopAsyncIteration:
                return
            read = None
            yield data
    finally:
        if read is not None and not read.done():
            read.cancel()  # the call is ending: nothing more is read from it


class OpenStreams:
    """Counts the open streams of the budgeted streaming methods. gRPC reads a
    stream's next request as soon as the stream asks for it, for every open
    stream at once, and each holds its bytes until it has room in the budget:
    the number of open streams is what bounds a replica's memory under many
    streams (150 streams of 2 MiB requests took ingest to 650 MB). Past the
    limits (in all, or for one tenant) a new stream is refused with
    RESOURCE_EXHAUSTED and a retry hint before any of it is read."""

    def __init__(self, limit: int, per_tenant: int) -> None:
        self.limit = limit
        self.per_tenant = per_tenant
        self._total = 0
        self._by_tenant: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, tenant: str) -> AsyncIterator[None]:
        if self._total >= self.limit or self._by_tenant[tenant] >= self.per_tenant:
            raise errors.ResourceExhausted(
                f"stream: too many open streams (at most {self.limit} per server and"
                f" {self.per_tenant} per tenant); nothing of this one was read or stored,"
                " open it again later or send the batches as IngestEvents calls",
                retry_after=1.0,
            )
        self._total += 1
        self._by_tenant[tenant] += 1
        try:
            yield
        finally:
            self._total -= 1
            self._by_tenant[tenant] -= 1
            if not self._by_tenant[tenant]:
                del self._by_tenant[tenant]


def _as_bytes(data: bytes) -> bytes:
    return data


class BudgetInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Innermost: serves each BUDGETED_METHODS call through a handler that
    takes its one request off a stream, so that the request is read only once
    the call has room in the budget (after authentication: a refused call
    never waits here)."""

    def __init__(self, budget: RequestBudget) -> None:
        self._budget = budget
        self._streams = OpenStreams(MAX_STREAMS, MAX_STREAMS_PER_TENANT)

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method not in BUDGETED_METHODS:
            return handler
        if handler.stream_stream:
            # The stream's requests arrive as bytes and are parsed once they
            # have room: a stream waiting for room holds its bytes, not the
            # several times larger parsed message.
            return grpc.stream_stream_rpc_method_handler(
                self._budgeted_stream(
                    handler.stream_stream,
                    checked_deserializer(details.method, handler.request_deserializer),
                ),
                request_deserializer=_as_bytes,
                response_serializer=handler.response_serializer,
            )
        if not handler.unary_unary:
            return handler
        return grpc.stream_unary_rpc_method_handler(
            self._budgeted(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _budgeted_stream(self, behavior: Behavior, parse: Deserializer) -> Behavior:
        """A stream's requests take room one at a time, once read (reserving
        before the read would let idle streams hold the budget): each request
        holds its size from when the servicer takes it until it asks for the
        next, so the work of serving it stays within the budget."""
        budget = self._budget

        async def wrapped(requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
            held = 0
            tenant = call_context.current_tenant()

            async def metered() -> AsyncIterator[Any]:
                nonlocal held
                async for data in _until_idle(requests, STREAM_IDLE_SECONDS):
                    budget.release(held)
                    if held >= COLLECT_AFTER_BYTES:
                        gc.collect()  # see _budgeted
                    held = 0
                    await budget.reserve()
                    held = budget.largest
                    budget.release(held - len(data))
                    held = len(data)
                    yield _accepted(parse(data))

            async with self._streams.hold(tenant):
                try:
                    async for response in behavior(metered(), context):
                        yield response
                finally:
                    budget.release(held)
                    gc.collect()  # see _budgeted

        return wrapped

    def _budgeted(self, behavior: Behavior) -> Behavior:
        budget = self._budget

        async def wrapped(requests: AsyncIterator[Any], context: Ctx) -> Any:
            await budget.reserve()
            held = budget.largest
            request: Any = None
            try:
                request = await anext(aiter(requests), None)
                if request is None:
                    raise errors.InvalidArgument("request: missing")
                size = request.ByteSize() if isinstance(request, Message) else 0
                budget.release(held - size)
                held = size
                return await behavior(request, context)
            finally:
                budget.release(held)
                if held >= COLLECT_AFTER_BYTES:
                    # Something in a call's path (gRPC's call objects or the
                    # task) keeps the request in a reference cycle, and with
                    # the tuned thresholds (app._tune_garbage_collector) such
                    # garbage waits for a full collection: 30 calls of 4 MiB
                    # one after another grew ingest by 10 MB each (375 MB).
                    # A full collection costs a few ms, small beside such a call.
                    request = None
                    gc.collect()

        return wrapped


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
        self,
        host: str,
        port: int,
        registrations: list[Registration],
        auth: Authenticator,
        tls: TlsSettings | None = None,
    ) -> None:
        self.budget = RequestBudget(IN_FLIGHT_REQUEST_BYTES, MAX_MESSAGE_BYTES)
        self.server = grpc.aio.server(
            interceptors=[
                observe.ObservingInterceptor(),
                ErrorInterceptor(),
                AuthInterceptor(auth),
                BudgetInterceptor(self.budget),
            ],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.http2.bdp_probe", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Clients reconnect (and resolve again) this often, so that the
                # callers' round_robin finds replicas added since
                # (services/common/channels.py). Calls in flight finish first.
                ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
                ("grpc.server_max_unrequested_time_in_server", MAX_UNTAKEN_SECONDS),
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
        # TLS (and mTLS) when configured: then the port takes no plaintext.
        credentials = server_credentials(tls) if tls is not None else None
        if credentials is None:
            self.port = self.server.add_insecure_port(self.address)
        else:
            self.port = self.server.add_secure_port(self.address, credentials)

    def add_local_socket(self, target: str) -> None:
        """Also listens on a private Unix socket (`unix:/path`), plaintext:
        the HTTP gateway's way in (services/common/http_gateway.py)."""
        self.server.add_insecure_port(target)

    async def start(self, *, ready: bool = True) -> None:
        """Starts serving. "liveness" is SERVING from now on (until graceful
        shutdown); readiness starts as `ready` and follows set_ready."""
        await self.server.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.set_ready(ready)

    async def set_ready(self, ready: bool) -> None:
        """Sets "readiness", "" and every registered service to SERVING or
        NOT_SERVING (services/common/readiness.py calls it). Ignored once
        graceful shutdown has begun: then everything stays NOT_SERVING."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in [READINESS, "", *self._names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Stops taking calls, lets in-flight calls finish within `grace` seconds."""
        await self.health.enter_graceful_shutdown()
        started = time.monotonic()
        await self.server.stop(grace)
        log.info("grpc_stopped", seconds=round(time.monotonic() - started, 3))
