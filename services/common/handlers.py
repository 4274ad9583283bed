"""Rebuilding a gRPC method handler around a wrapped behavior: what every
server interceptor here (grpc_server, observe) does to run code in the call's
own task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behavior = Callable[..., Any]
Ctx = grpc.aio.ServicerContext[Any, Any]
Wrap = Callable[[Behavior], Behavior]
Deserializer = Callable[[bytes], Any]


def rebuild(
    handler: Any, unary: Wrap, streaming: Wrap, deserializer: Deserializer | None = None
) -> Any:
    """`handler` with its behavior wrapped (`unary` when it answers once,
    `streaming` when it streams answers) and, when given, another deserializer."""
    request_deserializer = deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=request_deserializer,
            response_serializer=serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary),
            request_deserializer=request_deserializer,
            response_serializer=serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream),
            request_deserializer=request_deserializer,
            response_serializer=serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream),
        request_deserializer=request_deserializer,
        response_serializer=serializer,
    )
