"""Metadata values in tests: built from Python values, compared exactly."""

from __future__ import annotations

import struct
from typing import Any

from usagebilling.common.v1 import value_pb2


def proto_value(value: Any) -> value_pb2.Value:
    """The Value a client sends for a Python bool, int, float or str."""
    if isinstance(value, bool):
        return value_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return value_pb2.Value(int_value=value)
    if isinstance(value, float):
        return value_pb2.Value(number_value=value)
    return value_pb2.Value(string_value=value)


def same_value(a: value_pb2.Value, b: value_pb2.Value) -> bool:
    """Same kind, same value; doubles compared bit for bit (-0.0 is not 0.0)."""
    kind = a.WhichOneof("kind")
    if kind is None or kind != b.WhichOneof("kind"):
        return kind == b.WhichOneof("kind")
    if kind == "number_value":
        return struct.pack("<d", a.number_value) == struct.pack("<d", b.number_value)
    return bool(getattr(a, kind) == getattr(b, kind))
