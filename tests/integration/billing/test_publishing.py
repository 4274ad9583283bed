"""invoice.finalized and invoice.voided on a real JetStream: one message per
finalized (voided) invoice, Nats-Msg-Id = invoice id (+ ".voided"), published
after the transaction, retried after a failure, deduplicated when sent twice;
an invoice's voided message never comes before its finalized one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.billing import convert
from services.billing.invoicing import FINALIZED_SUBJECT, VOIDED_SUBJECT
from tests.integration.billing.builders import DAY, invoices_of, tenant_with
from tests.integration.billing.conftest import Billing, billing_messages, wire
from tests.unit.billing.fake_meters import FakeMeters
from usagebilling.billing.v1 import invoice_pb2

pytestmark = pytest.mark.integration

MAY1 = datetime(2024, 5, 1, tzinfo=UTC)
AFTER_THREE_DAYS = MAY1 + timedelta(days=3, hours=2)


async def _stream(js: Any, subject: str, tenant_id: str) -> list[tuple[int, str, Any]]:
    """(stream sequence, Nats-Msg-Id, payload) of the tenant's messages on
    `subject` of the shared BILLING stream."""
    message_type = {
        FINALIZED_SUBJECT: invoice_pb2.InvoiceFinalized,
        VOIDED_SUBJECT: invoice_pb2.InvoiceVoided,
    }[subject]
    found = await billing_messages(js, subject, message_type.FromString, tenant_id)
    return [(m.sequence, m.msg_id, m.payload) for m in found]


async def _messages(js: Any, tenant_id: str) -> list[tuple[str, invoice_pb2.InvoiceFinalized]]:
    """(Nats-Msg-Id, payload) of the tenant's invoice.finalized messages."""
    return [
        (msg_id, payload) for _, msg_id, payload in await _stream(js, FINALIZED_SUBJECT, tenant_id)
    ]


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
    # In number order, as they were finalized.
    assert [p.invoice.number for _, p in messages] == [f"INV-{n:06}" for n in range(1, 7)]
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


async def test_a_voided_invoice_is_announced_once_after_its_finalized_message(
    billing: Billing, js: Any
) -> None:
    up = wire(billing.store.pool, billing.meters, js=js)
    tenant = await tenant_with(billing, interval=DAY, start=MAY1, now=MAY1, fixed_price_minor=7)
    first, second, _ = sorted(
        await up.invoicing.run_cycle(tenant.id, AFTER_THREE_DAYS, AFTER_THREE_DAYS)
    )
    voided = await up.invoicing.void(tenant.id, first, reissue=True, now=AFTER_THREE_DAYS)
    # Voided again (with a reissue asked twice): still one message.
    await up.invoicing.void(tenant.id, first, reissue=True, now=AFTER_THREE_DAYS)
    [(_, msg_id, payload)] = await _stream(js, VOIDED_SUBJECT, tenant.id)
    assert msg_id == f"{first}.voided"
    assert payload.invoice == convert.proto_invoice(voided)
    assert payload.invoice.status == invoice_pb2.INVOICE_STATUS_VOID
    assert payload.invoice.replaced_by_invoice_id == voided.replaced_by_id != ""

    # With NATS down, a void waits; when it is back its finalized message goes
    # out first, even when the invoice was finalized during the outage.
    down = wire(billing.store.pool, billing.meters, js=_Failing())
    await billing.store.pool.execute(
        "UPDATE billing.invoices SET published_at = NULL WHERE id = $1", second
    )
    await down.invoicing.void(tenant.id, second, reissue=False, now=AFTER_THREE_DAYS)
    assert [i.id for i in await billing.store.unpublished(tenant.id, message="voided")] == []
    assert await up.invoicing.publish_pending(tenant.id) == 2
    finalized = {m: seq for seq, m, _ in await _stream(js, FINALIZED_SUBJECT, tenant.id)}
    voids = {m: seq for seq, m, _ in await _stream(js, VOIDED_SUBJECT, tenant.id)}
    assert set(voids) == {f"{first}.voided", f"{second}.voided"}
    assert voids[f"{second}.voided"] > finalized[second]
    assert await billing.store.unpublished(tenant.id, message="voided") == []
