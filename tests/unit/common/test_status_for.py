"""How services.common.grpc_server maps what a call raised to a gRPC status:
never INTERNAL for what concurrent work or an outage causes."""

from __future__ import annotations

import asyncpg
import grpc

from services.common import errors
from services.common.grpc_server import status_for


def test_domain_errors_keep_their_status_and_message() -> None:
    assert status_for(errors.InvalidArgument("name: required")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "name: required",
    )


def test_a_deadlock_or_serialization_failure_is_aborted_and_retryable() -> None:
    for exc in (
        asyncpg.DeadlockDetectedError("deadlock detected"),
        asyncpg.SerializationError("x"),
    ):
        code, message = status_for(exc)
        assert code == grpc.StatusCode.ABORTED
        assert "retry" in message


def test_an_unreachable_database_is_unavailable_and_anything_else_internal() -> None:
    assert status_for(ConnectionRefusedError())[0] == grpc.StatusCode.UNAVAILABLE
    assert status_for(RuntimeError("bug")) == (grpc.StatusCode.INTERNAL, "internal error")
