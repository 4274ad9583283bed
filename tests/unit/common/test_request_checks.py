"""The checks every request passes before its servicer sees it: bytes that do
not parse, and strings with NUL anywhere in the message, are refused with a
reason naming the field."""

from __future__ import annotations

import pytest

from services.common.grpc_server import Refused, checked_deserializer, nul_path, request_name
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

INGEST = "/usagebilling.ingest.v1.IngestService/IngestEvents"
REPLAY = "/usagebilling.ingest.v1.IngestService/ReplayEvents"
QUERY = "/usagebilling.meter.v1.MeterService/QueryUsage"


def _parse(method: str, message: object) -> object:
    kind = type(message)
    parse = checked_deserializer(method, kind.FromString)  # type: ignore[attr-defined]
    return parse(message.SerializeToString())  # type: ignore[attr-defined]


def test_request_names_come_from_the_descriptors() -> None:
    assert request_name(INGEST) == "usagebilling.ingest.v1.IngestEventsRequest"
    assert request_name("/no.such.Service/Method") == "request message"


def test_clean_requests_pass_unchanged() -> None:
    request = meter_pb2.QueryUsageRequest(meter_id="m", group_by=["a"], group_filter={"a": "b"})
    assert _parse(QUERY, request) == request


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (ingest_pb2.GetEventRequest(event_id="a\x00"), "event_id"),
        (ingest_pb2.ListEventsRequest(customer_id="\x00"), "customer_id"),
        (ingest_pb2.ListEventsRequest(event_name="x\x00y"), "event_name"),
        (ingest_pb2.ReplayEventsRequest(event_names=["a", "b", "c\x00"]), "event_names[2]"),
        (meter_pb2.QueryUsageRequest(group_filter={"k": "v\x00"}), "group_filter['k']"),
        (meter_pb2.QueryUsageRequest(group_filter={"k\x00": "v"}), "group_filter['k\\x00']"),
    ],
)
def test_nul_is_found_and_named(message: object, path: str) -> None:
    assert nul_path(message) == path  # type: ignore[arg-type]


def test_nul_is_found_in_nested_and_repeated_messages() -> None:
    request = meter_pb2.CreateMeterRequest(name="m")
    inner = request.filter.filters.add()
    inner.conditions.add(key="ok")
    condition = inner.conditions.add(key="region")
    condition.values.add(string_value="eu")
    condition.values.add(string_value="u\x00s")
    assert nul_path(request) == "filter.filters[0].conditions[1].values[1].string_value"
    refused = _parse("/usagebilling.meter.v1.MeterService/CreateMeter", request)
    assert refused == Refused(
        "filter.filters[0].conditions[1].values[1].string_value: must not contain a NUL character"
    )


def test_ingest_judges_its_events_itself() -> None:
    request = ingest_pb2.IngestEventsRequest()
    request.events.add(event_id="e\x00")
    assert _parse(INGEST, request) == request


@pytest.mark.parametrize("data", [b"\xff", b"\x0a\x05ab", b"\x0a\x02\xc3\x28"])
def test_undecodable_bytes_are_refused_with_the_message_name(data: bytes) -> None:
    parse = checked_deserializer(REPLAY, ingest_pb2.ReplayEventsRequest.FromString)
    assert parse(data) == Refused("request: not a valid usagebilling.ingest.v1.ReplayEventsRequest")
