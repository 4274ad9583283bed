"""Webhooks against a real HTTP receiver started by the test: Standard
Webhooks signatures (checked with the standardwebhooks package), retries with
the same webhook-id, a receiver down then up, 500 then 200, kill -9 of
billing mid-delivery, a slow receiver beside a fast one, private addresses
refused, an endpoint disabled after failing. Its own stack, with a short
retry schedule."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import grpc
import nats
import pytest
from aiohttp import ClientSession, web
from standardwebhooks.webhooks import Webhook

from tests.client import Client, event, eventually, status_of
from tests.private_suite import private_suite
from tools.devstack import free_port
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.billing.v1 import (
    alert_pb2,
    alert_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    invoice_pb2,
    product_pb2,
    subscription_pb2,
    webhook_pb2_grpc,
)
from usagebilling.billing.v1 import webhook_pb2 as pb
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(300)

# 15 attempts over ~27 s; disabled after 15 s of failures.
SCHEDULE = "0s,1s,1s,2s,2s,2s,2s,2s,2s,2s,2s,2s,2s,2s,2s"


@pytest.fixture(scope="module")
def hooks_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    env = {
        "USAGEBILLING_WEBHOOK_SCHEDULE": SCHEDULE,
        "USAGEBILLING_WEBHOOK_TIMEOUT": "2s",
        "USAGEBILLING_WEBHOOK_DISABLE_AFTER": "15s",
    }
    with private_suite(tmp_path_factory, "webhook", env) as suite:
        yield suite


@dataclass
class Tenant:
    id: str
    client: Client
    hooks: webhook_pb2_grpc.WebhookServiceStub

    async def call(self, method: str, request: Any) -> Any:
        return await self.client.call(getattr(self.hooks, method), request)


@pytest.fixture
async def tenant(hooks_suite: Suite) -> AsyncIterator[Tenant]:
    tenant_id, secret = create_tenant(hooks_suite, f"hooks-{uuid.uuid4().hex[:8]}")
    client = Client({s: hooks_suite.address(s) for s in SERVICES}, secret)
    yield Tenant(tenant_id, client, webhook_pb2_grpc.WebhookServiceStub(client.channels["billing"]))
    await client.close()


@dataclass
class Received:
    webhook_id: str
    body: bytes
    headers: dict[str, str]
    at: float


@dataclass
class Receiver:
    """An HTTP receiver on 127.0.0.1: answers `statuses` in turn (then 200),
    after `delay` seconds; can be stopped and started on the same port."""

    port: int = field(default_factory=free_port)
    statuses: list[int] = field(default_factory=list)
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(headers["webhook-id"], body, headers, time.monotonic()))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text=f"answer {status}")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> set[str]:
        return {r.webhook_id for r in self.received}


@pytest.fixture
async def receivers() -> AsyncIterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        await receiver.stop()


async def receiver(made: list[Receiver], **kwargs: Any) -> Receiver:
    r = Receiver(**kwargs)
    await r.start()
    made.append(r)
    return r


async def endpoint(tenant: Tenant, url: str, *types: str) -> pb.CreateWebhookEndpointResponse:
    answer: pb.CreateWebhookEndpointResponse = await tenant.call(
        "CreateWebhookEndpoint",
        pb.CreateWebhookEndpointRequest(
            url=url, event_types=list(types or ("invoice.finalized",)), description="test"
        ),
    )
    return answer


async def publish_invoices(suite: Suite, tenant: Tenant, count: int) -> list[str]:
    """invoice.finalized messages on BILLING, as billing's outbox sends them."""
    nc = await nats.connect(suite.nats_url)
    js = nc.jetstream()
    ids = []
    try:
        for _ in range(count):
            invoice_id = str(uuid.uuid4())
            message = invoice_pb2.InvoiceFinalized(
                tenant_id=tenant.id, invoice=invoice_pb2.Invoice(id=invoice_id, total_minor=3000)
            )
            await js.publish(
                "usagebilling.billing.v1.invoice.finalized",
                message.SerializeToString(),
                headers={"Nats-Msg-Id": invoice_id},
            )
            ids.append(invoice_id)
    finally:
        await nc.close()
    return ids


def invoice_ids(r: Receiver) -> set[str]:
    return {json.loads(x.body)["data"]["invoice"]["id"] for x in r.received}


async def test_signed_delivery_of_a_real_credit_grant(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    r = await receiver(receivers)
    created = await endpoint(tenant, r.url, "credit.granted")
    assert created.secret.startswith("whsec_")
    assert created.endpoint.enabled and list(created.endpoint.event_types) == ["credit.granted"]
    # The secret is shown once: Get and List do not carry it.
    got = await tenant.call(
        "GetWebhookEndpoint", pb.GetWebhookEndpointRequest(id=created.endpoint.id)
    )
    assert got == created.endpoint
    # A grant goes through billing's ledger outbox to the BILLING stream.
    customer = await tenant.client.call(
        tenant.client.customers.CreateCustomer,
        customer_pb2.CreateCustomerRequest(external_id="c1", name="C"),
    )
    credits = credit_pb2_grpc.CreditServiceStub(tenant.client.channels["billing"])
    kind = await tenant.client.call(
        credits.CreateCreditType,
        credit_pb2.CreateCreditTypeRequest(
            name="tokens", kind=credit_pb2.CREDIT_UNIT_KIND_CUSTOM, precision=0
        ),
    )
    await tenant.client.call(
        credits.GrantCredits,
        credit_pb2.GrantCreditsRequest(
            customer_id=customer.id, credit_type_id=kind.id, amount="100", idempotency_key="g1"
        ),
    )
    await eventually(lambda: asyncio.sleep(0, r.received), lambda got: len(got) >= 1, 30)
    assert len(r.received) == 1
    hit = r.received[0]
    data = Webhook(created.secret).verify(hit.body, hit.headers)
    assert data["type"] == "credit.granted"
    assert data["data"]["tenant_id"] == tenant.id
    assert data["data"]["entry"]["customer_id"] == customer.id
    # A wrong secret does not verify.
    other = "whsec_" + "QUJD" * 8
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(other).verify(hit.body, hit.headers)
    deliveries = await tenant.call(
        "ListWebhookDeliveries", pb.ListWebhookDeliveriesRequest(endpoint_id=created.endpoint.id)
    )
    [delivery] = deliveries.deliveries
    assert delivery.status == pb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED
    assert delivery.message_id == hit.webhook_id and delivery.attempt == 1
    assert delivery.response_status_code == 200 and delivery.response_body == "answer 200"


async def test_rules_and_isolation(hooks_suite: Suite, tenant: Tenant) -> None:
    cases = [
        ("http://10.1.2.3/hook", ["invoice.finalized"], "url"),
        ("http://169.254.169.254/latest", ["invoice.finalized"], "url"),
        ("http://192.168.1.1/", ["invoice.finalized"], "url"),
        ("http://[fe80::1]/", ["invoice.finalized"], "url"),
        ("ftp://example.com/", ["invoice.finalized"], "url"),
        ("http://127.0.0.1:9/", ["invoice.paid"], "event_types"),
        ("http://127.0.0.1:9/", [], "event_types"),
    ]
    for url, types, field_name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await tenant.call(
                "CreateWebhookEndpoint", pb.CreateWebhookEndpointRequest(url=url, event_types=types)
            )
        assert status_of(error.value) == grpc.StatusCode.INVALID_ARGUMENT, url
        details = error.value.details() or ""
        assert details.startswith(f"{field_name}:"), details
    created = await endpoint(tenant, "http://127.0.0.1:9/hook")
    _, other_secret = create_tenant(hooks_suite, "other")
    other = Client({s: hooks_suite.address(s) for s in SERVICES}, other_secret)
    try:
        stub = webhook_pb2_grpc.WebhookServiceStub(other.channels["billing"])
        calls: list[tuple[Any, Any]] = [
            (stub.GetWebhookEndpoint, pb.GetWebhookEndpointRequest(id=created.endpoint.id)),
            (stub.DeleteWebhookEndpoint, pb.DeleteWebhookEndpointRequest(id=created.endpoint.id)),
            (stub.RotateWebhookSecret, pb.RotateWebhookSecretRequest(id=created.endpoint.id)),
            (
                stub.ListWebhookDeliveries,
                pb.ListWebhookDeliveriesRequest(endpoint_id=created.endpoint.id),
            ),
        ]
        for call, request in calls:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await other.call(call, request)
            assert status_of(error.value) == grpc.StatusCode.NOT_FOUND
        listed = await other.call(stub.ListWebhookEndpoints, pb.ListWebhookEndpointsRequest())
        assert not listed.endpoints
    finally:
        await other.close()
    rotated = await tenant.call(
        "RotateWebhookSecret", pb.RotateWebhookSecretRequest(id=created.endpoint.id)
    )
    assert rotated.secret.startswith("whsec_") and rotated.secret != created.secret
    disabled = await tenant.call(
        "DisableWebhookEndpoint", pb.DisableWebhookEndpointRequest(id=created.endpoint.id)
    )
    assert not disabled.enabled and disabled.disabled_reason == "disabled by request"
    enabled = await tenant.call(
        "EnableWebhookEndpoint", pb.EnableWebhookEndpointRequest(id=created.endpoint.id)
    )
    assert enabled.enabled
    await tenant.call(
        "DeleteWebhookEndpoint", pb.DeleteWebhookEndpointRequest(id=created.endpoint.id)
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await tenant.call(
            "GetWebhookEndpoint", pb.GetWebhookEndpointRequest(id=created.endpoint.id)
        )
    assert status_of(error.value) == grpc.StatusCode.NOT_FOUND


async def test_500_then_200_and_a_manual_retry(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    r = await receiver(receivers, statuses=[500, 500])
    created = await endpoint(tenant, r.url)
    [invoice_id] = await publish_invoices(hooks_suite, tenant, 1)
    await eventually(lambda: asyncio.sleep(0, r.received), lambda got: len(got) >= 3, 30)
    assert len(r.received) == 3
    assert len(r.ids()) == 1  # the same webhook-id on every attempt
    for hit in r.received:
        Webhook(created.secret).verify(hit.body, hit.headers)
    assert invoice_ids(r) == {invoice_id}

    async def deliveries() -> list[pb.WebhookDelivery]:
        answer = await tenant.call(
            "ListWebhookDeliveries",
            pb.ListWebhookDeliveriesRequest(endpoint_id=created.endpoint.id),
        )
        return list(answer.deliveries)

    [d] = await eventually(
        deliveries, lambda ds: ds[0].status == pb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED, 10
    )
    assert d.attempt == 3 and d.response_status_code == 200
    retried = await tenant.call("RetryWebhookDelivery", pb.RetryWebhookDeliveryRequest(id=d.id))
    assert retried.status == pb.WEBHOOK_DELIVERY_STATUS_PENDING
    await eventually(lambda: asyncio.sleep(0, r.received), lambda got: len(got) >= 4, 30)
    assert r.received[3].webhook_id == d.message_id
    [d] = await eventually(deliveries, lambda ds: ds[0].attempt == 4, 10)
    assert d.status == pb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED


async def test_receiver_down_then_up(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    r = await receiver(receivers)
    created = await endpoint(tenant, r.url)
    await r.stop()
    sent = await publish_invoices(hooks_suite, tenant, 5)
    await asyncio.sleep(4)  # several refused attempts each
    assert not r.received
    await r.start()
    await eventually(lambda: asyncio.sleep(0, r.received), lambda got: len(got) >= 5, 30)
    assert invoice_ids(r) == set(sent)
    assert len(r.received) == 5
    for hit in r.received:
        Webhook(created.secret).verify(hit.body, hit.headers)
    answer = await tenant.call(
        "ListWebhookDeliveries", pb.ListWebhookDeliveriesRequest(endpoint_id=created.endpoint.id)
    )
    assert all(d.attempt > 1 for d in answer.deliveries)
    assert {d.message_id for d in answer.deliveries} == r.ids()
    assert all(d.status == pb.WEBHOOK_DELIVERY_STATUS_SUCCEEDED for d in answer.deliveries)


async def test_a_slow_receiver_does_not_hold_up_another(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    slow = await receiver(receivers, delay=10)  # past the 2 s timeout
    fast = await receiver(receivers)
    await endpoint(tenant, slow.url)
    await endpoint(tenant, fast.url)
    started = time.monotonic()
    sent = await publish_invoices(hooks_suite, tenant, 5)
    await eventually(lambda: asyncio.sleep(0, fast.received), lambda got: len(got) >= 5, 30)
    took = time.monotonic() - started
    print(
        f"fast endpoint: 5 deliveries in {took:.2f} s beside a receiver that never answers in time"
    )
    assert invoice_ids(fast) == set(sent)
    assert took < 10


async def test_kill_9_of_billing_during_delivery_loses_nothing(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    r = await receiver(receivers, delay=0.5)  # one at a time per endpoint: ~10 s for 20
    created = await endpoint(tenant, r.url)
    sent = await publish_invoices(hooks_suite, tenant, 20)
    await eventually(lambda: asyncio.sleep(0, r.received), lambda got: len(got) >= 3, 30)
    await asyncio.to_thread(hooks_suite.stop_service, "billing", signal.SIGKILL)
    assert len(r.received) < 20
    # Published while billing is down: the durable consumer keeps them.
    sent += await publish_invoices(hooks_suite, tenant, 5)
    hooks_suite.start_service("billing")
    await asyncio.to_thread(hooks_suite.wait_healthy, "billing")
    await eventually(
        lambda: asyncio.sleep(0, r.received), lambda _: invoice_ids(r) >= set(sent), 90
    )
    assert invoice_ids(r) == set(sent)
    for hit in r.received:
        Webhook(created.secret).verify(hit.body, hit.headers)
    # At least once: a delivery in flight at the kill may come twice, with its one webhook-id.
    assert len(r.ids()) == len(sent)
    print(f"kill -9: {len(sent)} messages, {len(r.received)} requests, {len(r.ids())} webhook-ids")


async def test_an_endpoint_failing_too_long_is_disabled_and_announced(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    watcher = await receiver(receivers)
    await endpoint(tenant, watcher.url, "webhook.endpoint_disabled")
    dead = await endpoint(tenant, f"http://127.0.0.1:{free_port()}/nobody")
    await publish_invoices(hooks_suite, tenant, 1)

    async def probe() -> pb.WebhookEndpoint:
        got: pb.WebhookEndpoint = await tenant.call(
            "GetWebhookEndpoint", pb.GetWebhookEndpointRequest(id=dead.endpoint.id)
        )
        return got

    got = await eventually(probe, lambda e: not e.enabled, 60)
    assert not got.enabled and got.disabled_reason.startswith("failing since")
    await eventually(lambda: asyncio.sleep(0, watcher.received), lambda x: len(x) >= 1, 30)
    message = json.loads(watcher.received[0].body)
    assert message["type"] == "webhook.endpoint_disabled"
    assert message["data"]["endpoint"]["id"] == dead.endpoint.id


async def test_an_alert_fires_once_per_period_within_seconds(
    hooks_suite: Suite, tenant: Tenant, receivers: list[Receiver]
) -> None:
    c = tenant.client
    alerts = alert_pb2_grpc.UsageAlertServiceStub(c.channels["billing"])
    meter = await c.call(
        c.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name="calls", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    product = await c.call(
        c.products.CreateProduct,
        product_pb2.CreateProductRequest(
            name="API",
            currency="USD",
            billing_interval=product_pb2.BILLING_INTERVAL_MONTH,
            usage_prices=[
                product_pb2.UsagePrice(
                    meter_id=meter.id, model=product_pb2.PRICE_MODEL_PER_UNIT, unit_price="0.02"
                )
            ],
        ),
    )
    customer = await c.call(
        c.customers.CreateCustomer,
        customer_pb2.CreateCustomerRequest(external_id="cus_a", name="A"),
    )
    request = subscription_pb2.CreateSubscriptionRequest(
        customer_id=customer.id, product_id=product.id
    )
    request.start_time.FromDatetime(datetime.now(UTC) - timedelta(days=1))
    await c.call(c.subscriptions.CreateSubscription, request)
    for bad, field_name in [
        (alert_pb2.CreateUsageAlertRequest(meter_id=meter.id), "threshold"),
        (alert_pb2.CreateUsageAlertRequest(meter_id=meter.id, quantity="-1"), "quantity"),
        (alert_pb2.CreateUsageAlertRequest(meter_id=meter.id, quantity="x"), "quantity"),
        (alert_pb2.CreateUsageAlertRequest(meter_id=str(uuid.uuid4()), quantity="1"), "meter_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await c.call(alerts.CreateUsageAlert, bad)
        assert status_of(error.value) == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.value.details() or "").startswith(f"{field_name}:")
    r = await receiver(receivers)
    hook = await endpoint(tenant, r.url, "usage.threshold_reached")
    alert = await c.call(
        alerts.CreateUsageAlert,
        alert_pb2.CreateUsageAlertRequest(
            meter_id=meter.id, customer_id=customer.id, quantity="10"
        ),
    )
    # 0.02 USD per call: 10 calls are 20 minor units. For every customer.
    by_amount = await c.call(
        alerts.CreateUsageAlert,
        alert_pb2.CreateUsageAlertRequest(meter_id=meter.id, amount_minor=20),
    )
    listed = await c.call(alerts.ListUsageAlerts, alert_pb2.ListUsageAlertsRequest())
    assert [a.id for a in listed.alerts] == [alert.id, by_amount.id]

    async def send(first: int, count: int) -> None:
        now = datetime.now(UTC)
        answer = await c.call(
            c.ingest.IngestEvents,
            ingest_pb2.IngestEventsRequest(
                events=[event(f"e{first + i}", "cus_a", "api.call", now) for i in range(count)]
            ),
        )
        assert answer.accepted_count == count

    await send(0, 9)
    await asyncio.sleep(4)
    assert not r.received  # 9 < 10
    await send(9, 1)  # the crossing event
    acked = time.monotonic()
    await eventually(lambda: asyncio.sleep(0, r.received), lambda got: len(got) >= 2, 30)
    took = [x.at - acked for x in r.received]
    print(
        "usage.threshold_reached delivered "
        + ", ".join(f"{t:.2f}" for t in took)
        + " s after the crossing event's ack (quantity alert, amount alert)"
    )
    assert max(took) < 15
    await send(10, 5)  # over it again in the same period: no second message
    await asyncio.sleep(4)
    assert len(r.received) == 2
    messages = [Webhook(hook.secret).verify(x.body, x.headers) for x in r.received]
    assert {m["type"] for m in messages} == {"usage.threshold_reached"}
    assert {m["data"]["alert"]["id"] for m in messages} == {alert.id, by_amount.id}
    for m in messages:
        data = m["data"]
        assert data["customer_id"] == customer.id and data["customer_external_id"] == "cus_a"
        assert Decimal(data["usage"]) >= 10
    for a in (alert, by_amount):
        await c.call(alerts.DeleteUsageAlert, alert_pb2.DeleteUsageAlertRequest(id=a.id))
    listed = await c.call(alerts.ListUsageAlerts, alert_pb2.ListUsageAlertsRequest())
    assert not listed.alerts


async def test_webhook_endpoints_over_http_json(hooks_suite: Suite, tenant: Tenant) -> None:
    _, secret = create_tenant(hooks_suite, "http")
    base = hooks_suite.http_url("billing") + "/usagebilling.billing.v1.WebhookService/"
    headers = {"authorization": f"Bearer {secret}", "content-type": "application/json"}
    async with ClientSession() as session:
        async with session.post(
            base + "CreateWebhookEndpoint",
            json={"url": "http://127.0.0.1:9/hook", "eventTypes": ["invoice.finalized"]},
            headers=headers,
        ) as answer:
            assert answer.status == 200, await answer.text()
            created = await answer.json()
        assert created["secret"].startswith("whsec_")
        async with session.post(
            base + "CreateWebhookEndpoint",
            json={"url": "http://10.0.0.1/", "eventTypes": ["invoice.finalized"]},
            headers=headers,
        ) as answer:
            error = await answer.json()
        assert error["code"] == "invalid_argument" and error["message"].startswith("url:")
        async with session.post(base + "ListWebhookEndpoints", json={}, headers=headers) as answer:
            listed = await answer.json()
        assert [e["id"] for e in listed["endpoints"]] == [created["endpoint"]["id"]]
