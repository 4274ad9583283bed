"""HTTP/JSON beside gRPC (services/common/http_gateway.py), over real HTTP to
the running services: the seed walkthrough as curl would send it (plain
metadata, exact decimals), Connect's error codes and statuses, the Dodo-shaped
ingest request, auth, streaming in Connect's envelopes, /openapi.json."""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from tools.suite import Suite

JSON = {"Content-Type": "application/json"}


class Http:
    """POSTs JSON to the services as curl would (no generated code)."""

    def __init__(self, suite: Suite, session: aiohttp.ClientSession, key: str) -> None:
        self.suite, self.session, self.key = suite, session, key

    async def raw(
        self, service: str, path: str, body: bytes | str, headers: dict[str, str]
    ) -> tuple[int, Any, dict[str, str]]:
        url = self.suite.http_url(service) + path
        async with self.session.post(url, data=body, headers=headers) as answer:
            text = await answer.read()
            headers = {k.lower(): v for k, v in answer.headers.items()}
            return answer.status, json.loads(text) if text else None, headers

    async def call(
        self, service: str, rpc: str, body: dict[str, Any], key: str | None = None
    ) -> tuple[int, Any]:
        headers = {**JSON, "Authorization": f"Bearer {key or self.key}"}
        status, document, _ = await self.raw(service, f"/{rpc}", json.dumps(body), headers)
        return status, document

    async def ok(self, service: str, rpc: str, body: dict[str, Any]) -> Any:
        status, document = await self.call(service, rpc, body)
        assert status == 200, (rpc, status, document)
        return document


BILLING = "usagebilling.billing.v1."
METER = "usagebilling.meter.v1.MeterService/"
INGEST = "usagebilling.ingest.v1.IngestService/"


@pytest.fixture
async def http(suite: Suite, new_tenant: Callable[[], tuple[str, str]]) -> AsyncIterator[Http]:
    _, key = new_tenant()
    async with aiohttp.ClientSession() as session:
        yield Http(suite, session, key)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _usage(http: Http, meter_id: str, customer: str, start: str, end: str, want: str) -> str:
    value = ""
    for _ in range(200):
        answer = await http.ok(
            "meter",
            METER + "QueryUsage",
            {"meterId": meter_id, "customerId": customer, "startTime": start, "endTime": end},
        )
        value = answer["rows"][0]["value"] if answer.get("rows") else ""
        if value == want:
            break
        await asyncio.sleep(0.1)
    return value


async def test_seed_walkthrough_over_http(http: Http) -> None:
    meter = await http.ok(
        "meter",
        METER + "CreateMeter",
        {"name": "api-calls", "eventName": "api.call", "aggregation": "AGGREGATION_COUNT"},
    )
    product = await http.ok(
        "billing",
        BILLING + "ProductService/CreateProduct",
        {
            "name": "API",
            "currency": "USD",
            "billingInterval": "BILLING_INTERVAL_MONTH",
            "usagePrices": [
                {
                    "meterId": meter["id"],
                    "model": "PRICE_MODEL_PER_UNIT",
                    "unitPrice": "0.02",
                    "freeThreshold": "1000",
                }
            ],
        },
    )
    # proto field names are accepted as well as lowerCamelCase (canonical JSON).
    customer = await http.ok(
        "billing",
        BILLING + "CustomerService/CreateCustomer",
        {"external_id": "cus_42", "name": "Acme"},
    )
    subscription = await http.ok(
        "billing",
        BILLING + "SubscriptionService/CreateSubscription",
        {
            "customerId": customer["id"],
            "productId": product["id"],
            "startTime": _iso(datetime.now(UTC) - timedelta(days=33)),
        },
    )
    period_end = datetime.fromisoformat(subscription["currentPeriodStart"])
    events = [
        {
            "eventId": f"call-{i}",
            "customerId": "cus_42",
            "eventName": "api.call",
            "timestamp": _iso(period_end - timedelta(days=1, seconds=i)),
            "metadata": {"endpoint": "/v1/search", "tokens": 150, "ok": True},
        }
        for i in range(2500)
    ]
    for first in range(0, 2500, 500):
        answer = await http.ok(
            "ingest", INGEST + "IngestEvents", {"events": events[first : first + 500]}
        )
        assert answer["acceptedCount"] == 500
    again = await http.ok("ingest", INGEST + "IngestEvents", {"events": events[:100]})
    assert again.get("acceptedCount", 0) == 0 and again["duplicateCount"] == 100

    stored = await http.ok("ingest", INGEST + "GetEvent", {"eventId": "call-7"})
    assert stored["metadata"] == {
        "endpoint": {"stringValue": "/v1/search"},
        "tokens": {"intValue": "150"},
        "ok": {"boolValue": True},
    }
    value = await _usage(
        http,
        meter["id"],
        "cus_42",
        subscription["startTime"],
        subscription["currentPeriodStart"],
        "2500",
    )
    assert value == "2500"
    run = await http.ok("billing", BILLING + "InvoiceService/RunBillingCycle", {})
    invoice = await http.ok(
        "billing", BILLING + "InvoiceService/GetInvoice", {"id": run["invoiceIds"][0]}
    )
    # int64 is a JSON string in canonical JSON.
    assert invoice["totalMinor"] == "3000"
    assert invoice["status"] == "INVOICE_STATUS_FINALIZED"


async def test_plain_decimals_are_exact(http: Http) -> None:
    meter = await http.ok(
        "meter",
        METER + "CreateMeter",
        {
            "name": "tokens",
            "eventName": "llm.call",
            "aggregation": "AGGREGATION_SUM",
            "property": "tokens",
        },
    )
    now = datetime.now(UTC)
    # The body as a user writes it: JSON numbers, never floats on our side.
    body = (
        '{"events": ['
        + ",".join(
            f'{{"event_id": "d-{i}", "customer_id": "c1", "event_name": "llm.call",'
            f' "timestamp": "{_iso(now - timedelta(seconds=i + 1))}",'
            f' "metadata": {{"tokens": 0.1, "model": "gpt-4o"}}}}'
            for i in range(10)
        )
        + ', {"event_id": "d-big", "customer_id": "c1", "event_name": "llm.call",'
        f' "timestamp": "{_iso(now - timedelta(seconds=30))}",'
        ' "metadata": {"tokens": 0.10000000000000000000000000001}}]}'
    )
    status, answer, _ = await http.raw(
        "ingest",
        "/" + INGEST + "IngestEvents",
        body,
        {**JSON, "Authorization": f"Bearer {http.key}"},
    )
    assert status == 200 and answer["acceptedCount"] == 11, answer
    value = await _usage(
        http,
        meter["id"],
        "c1",
        _iso(now - timedelta(hours=1)),
        _iso(now + timedelta(hours=1)),
        "1.10000000000000000000000000001",
    )
    # 0.1 ten times is exactly 1; the long decimal is kept digit for digit.
    assert value == "1.10000000000000000000000000001"
    stored = await http.ok("ingest", INGEST + "GetEvent", {"eventId": "d-big"})
    assert stored["metadata"]["tokens"] == {"stringValue": "0.10000000000000000000000000001"}


async def test_dodo_shaped_ingest(http: Http) -> None:
    now = datetime.now(UTC)
    body = {
        "events": [
            {
                "event_id": f"dodo-{i}",
                "customer_id": "cus_dodo",
                "event_name": "api.call",
                "timestamp": _iso(now - timedelta(minutes=1)),
                "metadata": {"endpoint": "/v1/orders", "method": "POST", "tokens": 1024},
            }
            for i in range(3)
        ]
        # No timestamp: the server's time, as Dodo does.
        + [{"event_id": "dodo-now", "customer_id": "cus_dodo", "event_name": "api.call"}]
    }
    headers = {**JSON, "Authorization": f"Bearer {http.key}"}
    status, answer, _ = await http.raw("ingest", "/events/ingest", json.dumps(body), headers)
    assert status == 200, answer
    assert answer["ingested_count"] == 4
    status, answer, _ = await http.raw("ingest", "/events/ingest", json.dumps(body), headers)
    assert (status, answer["ingested_count"], answer["duplicate_count"]) == (200, 0, 4)
    stored = await http.ok("ingest", INGEST + "GetEvent", {"eventId": "dodo-1"})
    assert stored["metadata"]["tokens"] == {"intValue": "1024"}
    # The same key refused the same way as on every path.
    status, answer, _ = await http.raw(
        "ingest", "/events/ingest", json.dumps(body), {**JSON, "Authorization": "Bearer nope"}
    )
    assert (status, answer["code"]) == (401, "unauthenticated")
    status, answer, _ = await http.raw(
        "ingest",
        "/events/ingest",
        json.dumps(
            {
                "events": [
                    {
                        "event_id": "x",
                        "customer_id": "c",
                        "event_name": "e",
                        "metadata": {"bad": [1]},
                    }
                ]
            }
        ),
        headers,
    )
    assert (status, answer["code"]) == (400, "invalid_argument")
    assert "metadata" in answer["message"]


async def test_error_codes_mapped(http: Http, suite: Suite) -> None:
    """Each status a client can meet, as Connect's code and HTTP status."""
    cases: list[tuple[str, str, dict[str, Any], str | None, str, int]] = [
        (
            "billing",
            BILLING + "CustomerService/GetCustomer",
            {"id": "nope"},
            None,
            "invalid_argument",
            400,
        ),
        (
            "billing",
            BILLING + "CustomerService/GetCustomer",
            {"id": str(uuid.uuid4())},
            None,
            "not_found",
            404,
        ),
        (
            "billing",
            BILLING + "AuthService/WhoAmI",
            {},
            "wrong-key-0123456789",
            "unauthenticated",
            401,
        ),
        (
            "billing",
            BILLING + "TenantService/CreateTenant",
            {"name": "x"},
            None,
            "permission_denied",
            403,
        ),
        (
            "meter",
            METER + "CreateMeter",
            {"name": "m", "eventName": "e", "aggregation": "AGGREGATION_COUNT"},
            None,
            "ok",
            200,
        ),
        (
            "meter",
            METER + "CreateMeter",
            {"name": "m", "eventName": "e", "aggregation": "AGGREGATION_COUNT"},
            None,
            "already_exists",
            409,
        ),
        ("meter", METER + "GetMeter", {"noSuchField": 1}, None, "invalid_argument", 400),
        ("meter", METER + "GetMeter", {"id": 5}, None, "invalid_argument", 400),
    ]
    meter_id = ""
    for service, rpc, body, key, code, status in cases:
        got_status, answer = await http.call(service, rpc, body, key)
        assert got_status == status, (rpc, body, answer)
        if code == "ok":
            meter_id = answer["id"]
        else:
            assert answer["code"] == code and answer["message"], (rpc, answer)
    # FAILED_PRECONDITION: cancelling a subscription that already ended.
    product = await http.ok(
        "billing",
        BILLING + "ProductService/CreateProduct",
        {"name": "flat", "currency": "USD", "billingInterval": "BILLING_INTERVAL_MONTH"},
    )
    customer = await http.ok(
        "billing", BILLING + "CustomerService/CreateCustomer", {"externalId": "fp", "name": "F"}
    )
    subscription = await http.ok(
        "billing",
        BILLING + "SubscriptionService/CreateSubscription",
        {"customerId": customer["id"], "productId": product["id"]},
    )
    cancel = {"id": subscription["id"], "immediately": True}
    await http.ok("billing", BILLING + "SubscriptionService/CancelSubscription", cancel)
    status, answer = await http.call(
        "billing", BILLING + "SubscriptionService/CancelSubscription", cancel
    )
    assert (status, answer["code"]) == (400, "failed_precondition"), answer
    # RESOURCE_EXHAUSTED: more than 100,000 minute windows in one query.
    status, answer = await http.call(
        "meter",
        METER + "QueryUsage",
        {
            "meterId": meter_id,
            "startTime": "2020-01-01T00:00:00Z",
            "endTime": "2024-01-01T00:00:00Z",
            "windowSize": "WINDOW_SIZE_MINUTE",
        },
    )
    assert (status, answer["code"]) == (429, "resource_exhausted"), answer
    # DEADLINE_EXCEEDED: Connect's connect-timeout-ms becomes the gRPC deadline.
    # A call to a tenant with nothing to bill can finish within 1 ms on a
    # quiet machine (seen once in CI): then it is a plain answer, and the
    # next try (of up to 20) runs out of time.
    for _ in range(20):
        status, answer, _ = await http.raw(
            "billing",
            "/" + BILLING + "InvoiceService/RunBillingCycle",
            "{}",
            {**JSON, "Authorization": f"Bearer {http.key}", "connect-timeout-ms": "1"},
        )
        if status != 200:
            break
    assert (status, answer["code"]) == (504, "deadline_exceeded"), answer
    # No Authorization header: refused before the body is read.
    status, answer, _ = await http.raw("billing", "/" + BILLING + "AuthService/WhoAmI", "{", JSON)
    assert (status, answer["code"]) == (401, "unauthenticated")
    # Not JSON, a JSON array, an unknown RPC, a wrong content type.
    auth = {**JSON, "Authorization": f"Bearer {http.key}"}
    status, answer, _ = await http.raw("billing", "/" + BILLING + "AuthService/WhoAmI", "{", auth)
    assert (status, answer["code"]) == (400, "invalid_argument")
    status, answer, _ = await http.raw("billing", "/" + BILLING + "AuthService/WhoAmI", "[]", auth)
    assert (status, answer["code"]) == (400, "invalid_argument")
    status, _, _ = await http.raw("billing", "/" + BILLING + "AuthService/Nope", "{}", auth)
    assert status == 404
    status, _, _ = await http.raw(
        "billing",
        "/" + BILLING + "AuthService/WhoAmI",
        "{}",
        {"Content-Type": "text/plain", "Authorization": f"Bearer {http.key}"},
    )
    assert status == 415
    # The caller's request id comes back.
    status, answer, headers = await http.raw(
        "billing", "/" + BILLING + "AuthService/WhoAmI", "{}", {**auth, "x-request-id": "req-h9"}
    )
    assert status == 200 and headers.get("x-request-id") == "req-h9"


def test_every_grpc_code_has_a_connect_mapping() -> None:
    import grpc

    from services.common.http_gateway import CONNECT_CODES

    statuses = {
        "canceled": 499,
        "unknown": 500,
        "invalid_argument": 400,
        "deadline_exceeded": 504,
        "not_found": 404,
        "already_exists": 409,
        "permission_denied": 403,
        "resource_exhausted": 429,
        "failed_precondition": 400,
        "aborted": 409,
        "out_of_range": 400,
        "unimplemented": 501,
        "internal": 500,
        "unavailable": 503,
        "data_loss": 500,
        "unauthenticated": 401,
    }
    assert {c for c in grpc.StatusCode if c is not grpc.StatusCode.OK} == set(CONNECT_CODES)
    assert dict(CONNECT_CODES.values()) == statuses


async def test_streaming_in_connect_envelopes(http: Http) -> None:
    def envelope(document: dict[str, Any]) -> bytes:
        data = json.dumps(document).encode()
        return struct.pack(">BI", 0, len(data)) + data

    now = _iso(datetime.now(UTC) - timedelta(minutes=1))
    batches = [
        {
            "events": [
                {
                    "eventId": f"s-{b}-{i}",
                    "customerId": "c",
                    "eventName": "e",
                    "timestamp": now,
                    "metadata": {"n": i},
                }
                for i in range(3)
            ]
        }
        for b in range(2)
    ]
    status, _, _ = 0, None, None
    url = http.suite.http_url("ingest") + "/" + INGEST + "StreamIngest"
    headers = {"Content-Type": "application/connect+json", "Authorization": f"Bearer {http.key}"}
    async with http.session.post(
        url, data=b"".join(envelope(b) for b in batches), headers=headers
    ) as answer:
        status, body = answer.status, await answer.read()
    assert status == 200
    frames = []
    at = 0
    while at < len(body):
        flags, size = struct.unpack_from(">BI", body, at)
        frames.append((flags, json.loads(body[at + 5 : at + 5 + size])))
        at += 5 + size
    assert [f[1].get("acceptedCount") for f in frames[:-1]] == [3, 3]
    assert frames[-1][0] == 2 and "error" not in frames[-1][1]


async def test_openapi_served(http: Http) -> None:
    async with http.session.get(http.suite.http_url("billing") + "/openapi.json") as answer:
        assert answer.status == 200
        document = await answer.json()
    assert document["openapi"].startswith("3.1")
    assert "/usagebilling.ingest.v1.IngestService/IngestEvents" in document["paths"]
    assert "/events/ingest" in document["paths"]


async def test_customer_by_external_id(http: Http) -> None:
    customer = await http.ok(
        "billing", BILLING + "CustomerService/CreateCustomer", {"externalId": "ext-7", "name": "E"}
    )
    product = await http.ok(
        "billing",
        BILLING + "ProductService/CreateProduct",
        {"name": "flat", "currency": "USD", "billingInterval": "BILLING_INTERVAL_MONTH"},
    )
    await http.ok(
        "billing",
        BILLING + "SubscriptionService/CreateSubscription",
        {"customerId": customer["id"], "productId": product["id"]},
    )
    rpc = BILLING + "CustomerService/GetCustomer"
    assert await http.ok("billing", rpc, {"externalId": "ext-7"}) == customer
    assert await http.ok("billing", rpc, {"id": customer["id"]}) == customer
    status, answer = await http.call("billing", rpc, {"id": customer["id"], "externalId": "ext-7"})
    assert (status, answer["code"]) == (400, "invalid_argument")
    assert answer["message"].startswith("id, external_id:")
    status, answer = await http.call("billing", rpc, {})
    assert (status, answer["code"]) == (400, "invalid_argument")
    assert answer["message"].startswith("id, external_id:")
    status, answer = await http.call("billing", rpc, {"externalId": "nobody"})
    assert (status, answer["code"]) == (404, "not_found")
    assert answer["message"].startswith("external_id:")

    usage_rpc = BILLING + "InvoiceService/GetCustomerUsage"
    by_external = await http.ok("billing", usage_rpc, {"externalId": "ext-7"})
    by_id = await http.ok("billing", usage_rpc, {"customerId": customer["id"]})
    assert by_external == by_id and by_external["customerId"] == customer["id"]
    status, answer = await http.call("billing", usage_rpc, {})
    assert (status, answer["code"]) == (400, "invalid_argument")
    assert answer["message"].startswith("customer_id, external_id:")
    status, answer = await http.call(
        "billing", usage_rpc, {"customerId": customer["id"], "externalId": "ext-7"}
    )
    assert (status, answer["code"]) == (400, "invalid_argument")


async def test_request_faults_name_the_field_and_the_json_type(http: Http) -> None:
    """A wrong Content-Type was {"code": "unknown"} (415), and a field of the
    wrong JSON type answered protobuf's Python messages ("expected string or
    bytes-like object, got 'int'", "invalid literal for int() with base
    10"). Now invalid_argument naming Content-Type, or the field and the JSON
    type it takes."""
    auth = {"Authorization": f"Bearer {http.key}"}
    status, answer, _ = await http.raw(
        "billing",
        "/" + BILLING + "AuthService/WhoAmI",
        "{}",
        {**auth, "Content-Type": "text/plain"},
    )
    assert status == 415, answer
    assert answer["code"] == "invalid_argument" and "Content-Type" in answer["message"], answer
    credits = BILLING + "CreditService/"
    cases = [
        (
            credits + "GrantCredits",
            {"customerId": "c", "creditTypeId": str(uuid.uuid4()), "amount": 5},
            "amount: expected a JSON string",
        ),
        (credits + "ListCreditLedger", {"pageSize": "abc"}, "pageSize: expected a 32-bit integer"),
        (credits + "ListCreditLedger", {"pageSize": 1.5}, "pageSize: expected a 32-bit integer"),
        (credits + "ListCreditLedger", {"startTime": 5}, "startTime: expected a JSON string"),
        (credits + "ListCreditLedger", {"startTime": "May 1"}, "startTime: expected an RFC 3339"),
        (credits + "ListCreditLedger", {"kind": "GRANTED"}, "kind: 'GRANTED' is not one of"),
        (credits + "ListCreditLedger", {"pageToken": 7}, "pageToken: expected a JSON string"),
        (credits + "ListCreditLedger", {"nope": 1}, "nope: no such field"),
        (
            BILLING + "ProductService/CreateProduct",
            {"name": "p", "usagePrices": [{"unitPrice": 0.02}]},
            "usagePrices[0].unitPrice: expected a JSON string",
        ),
    ]
    for rpc, body, starts in cases:
        status, answer = await http.call("billing", rpc, body)
        assert (status, answer["code"]) == (400, "invalid_argument"), (body, answer)
        assert answer["message"].startswith(starts), (body, answer)
        for leak in ("bytes-like", "int()", "literal", "Failed to parse", "google."):
            assert leak not in answer["message"], (body, answer)
    # What protobuf's JSON mapping allows still works: an int32 as a string,
    # a whole number as 7.0, null for a field's default.
    for body in ({"pageSize": "7"}, {"pageSize": 7.0}, {"customerId": None}):
        status, answer = await http.call("billing", credits + "ListCreditLedger", body)
        assert status == 200, (body, answer)
