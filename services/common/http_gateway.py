"""HTTP/JSON beside gRPC: every RPC of a service in the Connect protocol.

A unary call is `POST /<package.Service>/<Method>` with `Content-Type:
application/json` and the request message in protobuf's canonical JSON as the
body; the answer is the response message in the same JSON, or Connect's error
`{"code": "invalid_argument", "message": ...}` with Connect's HTTP status. A
streaming RPC takes Connect's enveloped form (`application/connect+json`),
half duplex: the whole request stream is read before the first answer.

Why a gateway to the service's own gRPC server (over a private Unix socket)
rather than calling the servicers: every call then meets the same
interceptors (request id, metrics, auth, validation, error mapping, budgets)
as over gRPC, so the two paths cannot drift apart. Only the bearer token and
the request id are passed on: the headers a service uses to call another for a
tenant are not accepted over HTTP.

Over HTTP an event's metadata may be plain JSON (`{"tokens": 150}`): see
`plain_value`. Ingest also answers Dodo Payments' `POST /events/ingest`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import (
    descriptor_pool,
    duration_pb2,
    field_mask_pb2,
    json_format,
    message_factory,
    timestamp_pb2,
)
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

from services.common.logs import get_logger

log = get_logger(__name__)

# Connect's codes and HTTP statuses (connectrpc.com/docs/protocol, "Error codes").
CONNECT_CODES: dict[grpc.StatusCode, tuple[str, int]] = {
    grpc.StatusCode.CANCELLED: ("canceled", 499),
    grpc.StatusCode.UNKNOWN: ("unknown", 500),
    grpc.StatusCode.INVALID_ARGUMENT: ("invalid_argument", 400),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("deadline_exceeded", 504),
    grpc.StatusCode.NOT_FOUND: ("not_found", 404),
    grpc.StatusCode.ALREADY_EXISTS: ("already_exists", 409),
    grpc.StatusCode.PERMISSION_DENIED: ("permission_denied", 403),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("resource_exhausted", 429),
    grpc.StatusCode.FAILED_PRECONDITION: ("failed_precondition", 400),
    grpc.StatusCode.ABORTED: ("aborted", 409),
    grpc.StatusCode.OUT_OF_RANGE: ("out_of_range", 400),
    grpc.StatusCode.UNIMPLEMENTED: ("unimplemented", 501),
    grpc.StatusCode.INTERNAL: ("internal", 500),
    grpc.StatusCode.UNAVAILABLE: ("unavailable", 503),
    grpc.StatusCode.DATA_LOSS: ("data_loss", 500),
    grpc.StatusCode.UNAUTHENTICATED: ("unauthenticated", 401),
}
# A JSON body is larger than the message it encodes: the gRPC server still
# refuses a message over its limit (RESOURCE_EXHAUSTED), this bounds the text.
MAX_BODY_BYTES = 8 * 1024 * 1024
# How long one call may take when the caller sets no connect-timeout-ms.
DEFAULT_TIMEOUT_S = 60.0
_ENVELOPE = struct.Struct(">BI")
_END_STREAM = 0x02
_EVENT_TYPES = frozenset({"usagebilling.ingest.v1.Event"})
_INT64 = range(-(2**63), 2**63)

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "usagebilling" / "openapi.json"


class ClientError(Exception):
    """A request the gateway refuses itself (undecodable JSON, wrong type)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_response(
    code: grpc.StatusCode, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    name, status = CONNECT_CODES.get(code, ("unknown", 500))
    return web.json_response({"code": name, "message": message}, status=status, headers=headers)


def plain_value(value: Any, path: str) -> Any:
    """One metadata value in plain JSON -> the canonical JSON of
    usagebilling.common.v1.Value. A whole number within int64 is an
    int_value; another number is a number_value when a double holds it
    exactly as written (0.1 -> 0.1: ingest keeps its shortest repr), else a
    string_value of the number as written (meter reads numeric strings as
    numbers), so no JSON number is rounded. An object is taken as the
    canonical Value form ({"intValue": "150"})."""
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)} if value in _INT64 else {"stringValue": str(value)}
    if isinstance(value, Decimal):
        as_float = float(value)
        if Decimal(repr(as_float)) == value:
            return {"numberValue": as_float}
        return {"stringValue": str(value)}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, dict):
        return value
    raise ClientError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{path}: a metadata value is a string, a number or a boolean",
    )


def _plain_event(event: Any, path: str) -> None:
    if isinstance(event, dict) and isinstance(event.get("metadata"), dict):
        event["metadata"] = {
            key: plain_value(value, f"{path}.metadata[{key!r}]")
            for key, value in event["metadata"].items()
        }


def _json_numbers(value: Any) -> Any:
    """Decimals left outside metadata (double fields) as floats for ParseDict."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (range(-(2**31), 2**31), "a 32-bit integer"),
    FieldDescriptor.CPPTYPE_UINT32: (range(0, 2**32), "an unsigned 32-bit integer"),
    FieldDescriptor.CPPTYPE_INT64: (_INT64, "a 64-bit integer"),
    FieldDescriptor.CPPTYPE_UINT64: (range(0, 2**64), "an unsigned 64-bit integer"),
}
_DIGITS = re.compile(r"-?[0-9]+")


# Well-known types whose JSON is a string, and an example of it.
def _timestamp(text: str) -> None:
    timestamp_pb2.Timestamp().FromJsonString(text)


def _duration(text: str) -> None:
    duration_pb2.Duration().FromJsonString(text)


def _field_mask(text: str) -> None:
    field_mask_pb2.FieldMask().FromJsonString(text)


_STRING_MESSAGES: dict[str, tuple[Callable[[str], None], str]] = {
    "google.protobuf.Timestamp": (_timestamp, 'an RFC 3339 time such as "2025-01-01T00:00:00Z"'),
    "google.protobuf.Duration": (_duration, 'a duration such as "3600s"'),
    "google.protobuf.FieldMask": (_field_mask, 'field paths such as "name,description"'),
}
_ANY_JSON = frozenset({"google.protobuf.Value"})
_WRAPPERS = frozenset(
    f"google.protobuf.{n}Value"
    for n in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | Decimal | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _refuse(path: str, expected: str, value: Any) -> ClientError:
    return ClientError(
        grpc.StatusCode.INVALID_ARGUMENT, f"{path}: expected {expected}, got {_json_kind(value)}"
    )


def _check_scalar(field: FieldDescriptor, value: Any, path: str) -> None:
    cpp = field.cpp_type
    if cpp in _INT_RANGES:
        valid, name = _INT_RANGES[cpp]
        expected = f"{name} (a JSON number, or a string of digits)"
        if isinstance(value, bool):
            raise _refuse(path, expected, value)
        if isinstance(value, str):
            if not _DIGITS.fullmatch(value.strip()):
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{path}: expected {expected}, got a string that is not an integer",
                )
            number = int(value)
        elif isinstance(value, int):
            number = value
        elif (
            isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value()
        ):
            number = int(value)
        elif isinstance(value, Decimal):
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{path}: expected {expected}, got {value}"
            )
        else:
            raise _refuse(path, expected, value)
        if number not in valid:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {number} is out of range for {name}"
            )
    elif cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
            raise _refuse(path, "a JSON number", value)
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise _refuse(path, "a JSON boolean (true or false)", value)
    elif cpp == FieldDescriptor.CPPTYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        names = [v.name for v in enum.values]
        if isinstance(value, str):
            if value not in enum.values_by_name:
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise ClientError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"{path}: {value[:64]!r} is not one of {shown}",
                )
        elif isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(path, f"a JSON string naming a {enum.name} value", value)
    elif cpp == FieldDescriptor.CPPTYPE_STRING and not isinstance(value, str):
        kind = "base64 bytes" if field.type == FieldDescriptor.TYPE_BYTES else "text"
        raise _refuse(path, f"a JSON string ({kind})", value)


def _check_value(field: FieldDescriptor, value: Any, path: str) -> None:
    """One (non-repeated) value of `field` as JSON."""
    if value is None:
        return  # null: the field's default, as protobuf's JSON mapping says
    if field.cpp_type != FieldDescriptor.CPPTYPE_MESSAGE:
        _check_scalar(field, value, path)
        return
    message_type = field.message_type
    assert message_type is not None
    name = message_type.full_name
    if name in _ANY_JSON:
        return
    if name in _STRING_MESSAGES:
        parse, example = _STRING_MESSAGES[name]
        if not isinstance(value, str):
            raise _refuse(path, f"a JSON string, {example}", value)
        try:
            parse(value)
        except (ValueError, TypeError, OverflowError):
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{path}: expected {example}"
            ) from None
        return
    if name in _WRAPPERS:
        _check_value(message_type.fields_by_name["value"], value, path)
        return
    if name == "google.protobuf.ListValue":
        if not isinstance(value, list):
            raise _refuse(path, "a JSON array", value)
        return
    if not isinstance(value, dict):
        raise _refuse(path, "a JSON object", value)
    if name in ("google.protobuf.Struct", "google.protobuf.Any"):
        return
    check_json_types(value, message_type, path)


def check_json_types(document: dict[str, Any], descriptor: Any, path: str = "") -> None:
    """Every field of `document` is one of `descriptor`'s with the JSON type
    protobuf's JSON mapping gives it; else INVALID_ARGUMENT naming the field
    (as sent, with its path from the request) and the JSON type expected.
    Checked before json_format parses the document, whose own messages name
    Python's types and functions ("expected string or bytes-like object")."""
    fields = {f.json_name: f for f in descriptor.fields}
    fields.update({f.name: f for f in descriptor.fields})
    for key, value in document.items():
        where = f"{path}.{key}" if path else str(key)
        field = fields.get(key)
        if field is None:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{where}: no such field in {descriptor.name}"
            )
        if value is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise _refuse(where, "a JSON object", value)
            entry = field.message_type.fields_by_name["value"]
            for k, v in value.items():
                _check_value(entry, v, f"{where}[{k!r}]")
        elif field.is_repeated:
            if not isinstance(value, list):
                raise _refuse(where, "a JSON array", value)
            for i, item in enumerate(value):
                _check_value(field, item, f"{where}[{i}]")
        else:
            _check_value(field, value, where)


def parse_request(body: bytes, message: Message) -> Message:
    """The JSON body -> `message`; plain metadata of every Event converted."""
    try:
        document = json.loads(body or b"{}", parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"body: not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "body: a JSON object")
    descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.full_name in _EVENT_TYPES:
            for name in (field.json_name, field.name):
                events = document.get(name)
                if isinstance(events, list):
                    for i, event in enumerate(events):
                        _plain_event(event, f"{field.name}[{i}]")
    if descriptor.full_name in _EVENT_TYPES:
        _plain_event(document, "event")
    check_json_types(document, descriptor)
    try:
        json_format.ParseDict(_json_numbers(document), message)
    except (json_format.ParseError, ValueError, TypeError) as exc:
        raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, f"body: {exc}") from exc
    return message


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Route:
    path: str
    method: MethodDescriptor
    request: type[Message]
    response: type[Message]

    @property
    def streaming(self) -> bool:
        return bool(self.method.client_streaming or self.method.server_streaming)


def routes_of(service_names: list[str]) -> list[Route]:
    pool = descriptor_pool.Default()
    routes = []
    for name in service_names:
        for method in pool.FindServiceByName(name).methods:
            routes.append(
                Route(
                    f"/{name}/{method.name}",
                    method,
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                )
            )
    return routes


def forwarded_metadata(request: web.Request) -> list[tuple[str, str]]:
    metadata = []
    for header in ("authorization", "x-request-id"):
        if value := request.headers.get(header):
            metadata.append((header, value))
    return metadata


def _timeout(request: web.Request) -> float:
    raw = request.headers.get("connect-timeout-ms", "")
    if raw.isdigit() and 0 < int(raw) <= 10**10:
        return int(raw) / 1000
    return DEFAULT_TIMEOUT_S


def _rpc_headers(error: grpc.aio.AioRpcError | None, trailing: Any) -> dict[str, str]:
    """x-request-id and retry-after of the gRPC answer, as HTTP headers."""
    headers = {}
    for key, value in trailing or ():
        if key in ("x-request-id", "retry-after") and isinstance(value, str):
            headers[key] = value
    return headers


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """The HTTP server of one service."""

    def __init__(
        self,
        service_names: list[str],
        host: str,
        port: int,
    ) -> None:
        self._dir = tempfile.mkdtemp(prefix="ub-gateway-")
        os.chmod(self._dir, 0o700)
        # The gRPC server listens here too (GrpcServer.add_local_socket).
        self.grpc_target = f"unix:{self._dir}/grpc.sock"
        self.host, self.port = host, port
        self.routes = routes_of(service_names)
        self._channel: grpc.aio.Channel | None = None
        self._runner: web.AppRunner | None = None
        self._extra: dict[str, Handler] = {}
        self.bound_port = 0

    def add_routes(self, factories: dict[str, Callable[[Gateway], Handler]]) -> None:
        """More POST routes, each made from this gateway (to call the RPCs)."""
        for path, factory in factories.items():
            self._extra[path] = factory(self)

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.grpc_target, options=[("grpc.max_receive_message_length", MAX_BODY_BYTES)]
            )
        return self._channel

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        for route in self.routes:
            app.router.add_post(route.path, self._handler(route))
        for path, handler in self._extra.items():
            app.router.add_post(path, handler)
        app.router.add_get("/openapi.json", self._openapi)
        app.router.add_route("*", "/{path:.*}", _unknown)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        log.info("http_serving", address=f"{self.host}:{self.bound_port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._channel is not None:
            await self._channel.close(None)
        for leftover in Path(self._dir).glob("*"):
            leftover.unlink(missing_ok=True)
        os.rmdir(self._dir)

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        if not OPENAPI_PATH.exists():
            return error_response(grpc.StatusCode.NOT_FOUND, "no openapi.json in this build")
        return web.FileResponse(OPENAPI_PATH, headers={"Content-Type": "application/json"})

    def _handler(self, route: Route) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            if route.streaming:
                return await self._stream(route, request)
            return await self._unary(route, request)

        return handle

    async def call_unary(self, route_path: str, message: Message, request: web.Request) -> Message:
        """Calls one unary RPC of this service as the HTTP caller (raises
        AioRpcError); for routes built on the RPCs (Dodo's ingest)."""
        route = next(r for r in self.routes if r.path == route_path)
        call = self.channel.unary_unary(
            route.path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=route.response.FromString,
        )
        answer: Message = await call(
            message, metadata=forwarded_metadata(request), timeout=_timeout(request)
        )
        return answer

    async def _unary(self, route: Route, request: web.Request) -> web.StreamResponse:
        content_type = request.content_type
        if content_type != "application/json":
            # Connect answers a codec it does not speak with 415; the code
            # names the fault (the client's request), never "unknown".
            return web.json_response(
                {
                    "code": "invalid_argument",
                    "message": f"Content-Type {content_type!r}: send application/json",
                },
                status=415,
            )
        if not request.headers.get("authorization"):
            # Refused before the body is read, as over gRPC.
            return error_response(
                grpc.StatusCode.UNAUTHENTICATED, "missing 'Authorization: Bearer <api key>' header"
            )
        try:
            message = parse_request(await request.read(), route.request())
        except ClientError as exc:
            return error_response(exc.code, str(exc))
        call = self.channel.unary_unary(
            route.path,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=route.response.FromString,
        )
        try:
            answer, trailing = await _with_trailers(
                call(message, metadata=forwarded_metadata(request), timeout=_timeout(request))
            )
        except grpc.aio.AioRpcError as exc:
            return error_response(
                exc.code(), exc.details() or "", _rpc_headers(exc, exc.trailing_metadata())
            )
        return web.json_response(to_json(answer), headers=_rpc_headers(None, trailing))

    async def _stream(self, route: Route, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/connect+json":
            return web.json_response(
                {
                    "code": "invalid_argument",
                    "message": f"Content-Type {request.content_type!r}: a streaming RPC takes"
                    " application/connect+json",
                },
                status=415,
            )
        response = web.StreamResponse(headers={"Content-Type": "application/connect+json"})
        end: dict[str, Any] = {}
        try:
            if not request.headers.get("authorization"):
                raise ClientError(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing 'Authorization: Bearer <api key>' header",
                )
            messages = [
                parse_request(data, route.request()) for data in _envelopes(await request.read())
            ]
            if not route.method.client_streaming and len(messages) != 1:
                raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "body: exactly one message")
            metadata, timeout = forwarded_metadata(request), _timeout(request)
            serialize = lambda m: m.SerializeToString()  # noqa: E731
            call: Any
            if route.method.client_streaming:
                call = self.channel.stream_stream(
                    route.path,
                    request_serializer=serialize,
                    response_deserializer=route.response.FromString,
                )(iter(messages), metadata=metadata, timeout=timeout)
            else:
                call = self.channel.unary_stream(
                    route.path,
                    request_serializer=serialize,
                    response_deserializer=route.response.FromString,
                )(messages[0], metadata=metadata, timeout=timeout)
            await response.prepare(request)
            async for answer in call:
                await response.write(_envelope(0, to_json(answer)))
            trailing = await call.trailing_metadata()
            end = {"metadata": {k: [v] for k, v in _rpc_headers(None, trailing).items()}}
        except ClientError as exc:
            end = {"error": {"code": CONNECT_CODES[exc.code][0], "message": str(exc)}}
        except grpc.aio.AioRpcError as exc:
            name = CONNECT_CODES.get(exc.code(), ("unknown", 500))[0]
            end = {"error": {"code": name, "message": exc.details() or ""}}
        if not response.prepared:
            await response.prepare(request)
        await response.write(_envelope(_END_STREAM, end))
        await response.write_eof()
        return response


async def _unknown(request: web.Request) -> web.StreamResponse:
    # Connect's unknown procedure: 404, here with its JSON error body too.
    return web.json_response(
        {"code": "unimplemented", "message": f"no RPC {request.method} {request.path}"},
        status=404,
    )


async def _with_trailers(call: Any) -> tuple[Any, Any]:
    answer = await call
    return answer, await call.trailing_metadata()


def _envelope(flags: int, document: dict[str, Any]) -> bytes:
    data = json.dumps(document, separators=(",", ":")).encode()
    return _ENVELOPE.pack(flags, len(data)) + data


def _envelopes(body: bytes) -> list[bytes]:
    messages, at = [], 0
    while at < len(body):
        if len(body) - at < _ENVELOPE.size:
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "body: a truncated envelope")
        flags, size = _ENVELOPE.unpack_from(body, at)
        at += _ENVELOPE.size
        if at + size > len(body):
            raise ClientError(grpc.StatusCode.INVALID_ARGUMENT, "body: a truncated envelope")
        if flags & 0x01:
            raise ClientError(
                grpc.StatusCode.INVALID_ARGUMENT, "body: compression is not supported"
            )
        messages.append(body[at : at + size])
        at += size
    return messages
