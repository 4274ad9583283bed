"""invoice.finalized on a real JetStream: one message per finalized invoice,
Nats-Msg-Id = invoice id, published after the finalizing transaction, retried
after a failure, deduplicated when sent twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeout

from services.billing import convert
from services.billing.invoicing import FINALIZED_SUBJECT
from services.common import jetstream
from tests.integration.billing.builders import DAY, invoices_of, tenant_with
from tests.integration.billing.conftest import Billing, wire
from tests.unit.billing.fake_meters import FakeMeters
from usagebilling.billing.v1 import invoice_pb2

pytestmark = pytest.mark.integration

MAY1 = datetime(2024, 5, 1, tzinfo=UTC)
AFTER_THREE_DAYS = MAY1 + timedelta(days=3, hours=2)


@pytest.fixture
async def js(stack_urls: tuple[str, str]) -> AsyncIterator[Any]:
    connection = await jetstream.connect(stack_urls[1], "billing-tests")
    context = connection.jetstream()
    await jetstream.ensure_streams(context, replicas=1)
    yield context
    await connection.close()


async def _messages(js: Any, tenant_id: str) -> list[tuple[str, invoice_pb2.InvoiceFinalized]]:
    """(Nats-Msg-Id, payload) of the tenant's messages on the shared BILLING stream."""
    subscription = await js.pull_subscribe(FINALIZED_SUBJECT, stream=jetstream.BILLING_STREAM)
    found: list[tuple[str, invoice_pb2.InvoiceFinalized]] = []
    try:
        while True:
            try:
                batch = await subscription.fetch(1000, timeout=0.5)
            except NatsTimeout:
                return found
            for message in batch:
                payload = invoice_pb2.InvoiceFinalized.FromString(message.data)
                if payload.tenant_id == tenant_id:
                    found.append((message.headers["Nats-Msg-Id"], payload))
                await message.ack()
    finally:
        await subscription.unsubscribe()


class _Failing:
    """A JetStream that refuses every publish, as when NATS is down."""

    def __init__(self) -> None:
        self.attempts = 0

    async def publish_async(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        raise ConnectionError("nats: connection closed")


async def test_one_message_per_finalized_invoice(billing: Billing, js: Any) -> None:
    published = wire(billing.store.pool, billing.meters, js=js)
    tenant = await tenant_with(
        billing, interval=DAY, start=MAY1, now=MAY1, fixed_price_minor=250, customers=["a", "b"]
    )
    # Three days ended for two customers; the third day's grace has passed too.
    ids = await published.invoicing.run_cycle(tenant.id, AFTER_THREE_DAYS, AFTER_THREE_DAYS)
    assert len(ids) == 6
    messages = await _messages(js, tenant.id)
    assert sorted(msg_id for msg_id, _ in messages) == sorted(ids)
    stored = {i.id: i for i in await invoices_of(billing, tenant.id)}
    for msg_id, payload in messages:
        assert payload.invoice == convert.proto_invoice(stored[msg_id])
        assert (payload.invoice.status, payload.invoice.total_minor) == (
            invoice_pb2.INVOICE_STATUS_FINALIZED,
            250,
        )
    assert await billing.store.unpublished(tenant.id) == []


async def test_a_failed_publish_is_retried_and_a_repeat_is_absorbed(
    billing: Billing, js: Any
) -> None:
    failing = _Failing()
    down = wire(billing.store.pool, billing.meters, js=failing)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, fixed_price_minor=1)
    ids = await down.invoicing.run_cycle(tenant.id, AFTER_THREE_DAYS, AFTER_THREE_DAYS)
    # The invoices are final (numbers taken) even though NATS is down...
    assert [i.status for i in await invoices_of(billing, tenant.id)] == ["FINALIZED"] * 3
    assert failing.attempts == 1  # it stopped at the first failure
    # ...and wait, unpublished, for a later run (here the scheduler's pass over all tenants).
    assert sorted(i.id for i in await billing.store.unpublished(tenant.id)) == sorted(ids)
    up = wire(billing.store.pool, FakeMeters(), js=js)
    assert await up.invoicing.publish_pending() >= 3
    assert await billing.store.unpublished(tenant.id) == []
    assert sorted(m for m, _ in await _messages(js, tenant.id)) == sorted(ids)

    # Published again (as after a crash before the mark): JetStream drops the repeats.
    await billing.store.pool.execute(
        "UPDATE billing.invoices SET published_at = NULL WHERE tenant_id = $1", tenant.id
    )
    assert await up.invoicing.publish_pending(tenant.id) == 3
    assert sorted(m for m, _ in await _messages(js, tenant.id)) == sorted(ids)
