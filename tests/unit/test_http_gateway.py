"""The HTTP gateway's pure parts: plain metadata to Value (exact), request
parsing and Connect envelopes (services/common/http_gateway.py)."""

from __future__ import annotations

import struct
from decimal import Decimal

import grpc
import pytest

from services.common.http_gateway import ClientError, _envelopes, parse_request, plain_value
from usagebilling.ingest.v1 import ingest_pb2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("150", {"intValue": "150"}),
        ("-9223372036854775808", {"intValue": "-9223372036854775808"}),
        ("9223372036854775808", {"stringValue": "9223372036854775808"}),
        ("0.1", {"numberValue": 0.1}),
        ("2.5e3", {"numberValue": 2500.0}),
        ("0.10000000000000000000000000001", {"stringValue": "0.10000000000000000000000000001"}),
        ("1e400", {"stringValue": "1E+400"}),
        ("true", {"boolValue": True}),
        ('"gpt-4o"', {"stringValue": "gpt-4o"}),
        ('{"intValue": "7"}', {"intValue": "7"}),
    ],
)
def test_plain_values(text: str, expected: dict[str, object]) -> None:
    request = parse_request(
        f'{{"events": [{{"eventId": "e", "metadata": {{"k": {text}}}}}]}}'.encode(),
        ingest_pb2.IngestEventsRequest(),
    )
    value = request.events[0].metadata["k"]
    kind = value.WhichOneof("kind")
    assert kind is not None
    camel = {
        "string_value": "stringValue",
        "number_value": "numberValue",
        "int_value": "intValue",
        "bool_value": "boolValue",
    }[kind]
    got = getattr(value, kind)
    want = expected[camel]
    assert (str(got) if kind == "int_value" else got) == want


def test_ten_tenths_are_one() -> None:
    values = [plain_value(Decimal("0.1"), "k")["numberValue"] for _ in range(10)]
    assert sum(Decimal(repr(v)) for v in values) == 1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{", "not JSON"),
        (b"[]", "a JSON object"),
        (b'{"events": [{"metadata": {"k": [1]}}]}', "metadata"),
        (b'{"events": [{"metadata": {"k": NaN}}]}', "metadata"),
        (b'{"nope": 1}', "nope"),
    ],
)
def test_refused_bodies(body: bytes, needle: str) -> None:
    with pytest.raises(ClientError) as caught:
        parse_request(body, ingest_pb2.IngestEventsRequest())
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in str(caught.value)


def test_envelopes() -> None:
    frame = struct.pack(">BI", 0, 2) + b"{}"
    assert _envelopes(frame + frame) == [b"{}", b"{}"]
    with pytest.raises(ClientError):
        _envelopes(frame[:-1])
    with pytest.raises(ClientError):
        _envelopes(struct.pack(">BI", 1, 2) + b"{}")
