"""credit.* messages on a real JetStream: draw-downs summarized, one
credit.drawn per customer, credit type and minute of usage that a settlement
pass recorded (every meter's part in it), one more for a pass that corrects
the minute (a late event), unique Nats-Msg-Ids, and a republish after a
crash (entries not marked) absorbed by the stream; other kinds one message
per entry (see tests/unit/billing/test_credit_messages.py)."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from services.billing.credits import Credits
from services.billing.credits_store import CreditStore
from services.billing.domain.credits import floor_minute
from services.billing.store import BillingStore
from tests.integration.billing.conftest import billing_messages
from usagebilling.billing.v1 import credit_pb2

pytestmark = pytest.mark.integration

D = Decimal
M = timedelta(minutes=1)
METER_A = "00000000-0000-0000-0000-00000000000a"
METER_B = "00000000-0000-0000-0000-00000000000b"


class Meters:
    """Usage per minute of each meter, from events the test states."""

    def __init__(self) -> None:
        self.events: list[tuple[str, datetime, Decimal]] = []

    async def read(
        self, tenant_id: str, meter_id: str, customer: str, start: datetime, end: datetime
    ) -> dict[datetime, Decimal]:
        found: dict[datetime, Decimal] = defaultdict(Decimal)
        for meter, when, value in self.events:
            if meter == meter_id and start <= when < end:
                found[floor_minute(when)] += value
        return dict(found)


async def _messages(js: Any, tenant_id: str) -> list[tuple[str, str, credit_pb2.CreditEvent]]:
    """(subject, Nats-Msg-Id, payload) of the tenant's credit.drawn messages,
    in stream order."""
    found = await billing_messages(
        js, "usagebilling.billing.v1.credit.drawn", credit_pb2.CreditEvent.FromString, tenant_id
    )
    return [(m.subject, m.msg_id, m.payload) for m in found]


async def test_draw_downs_are_one_message_per_customer_type_and_minute(pool: Any, js: Any) -> None:
    billing = BillingStore(pool)
    store = CreditStore(pool)
    tenant = await billing.create_tenant("t")
    customer = await billing.create_customer(tenant, "cus", "", "")
    kind = await store.create_credit_type(tenant, "tokens", "CUSTOM", 0, "", None)
    product = await billing.create_product(
        tenant, name="p", currency="USD", billing_interval="DAY", fixed_price_minor=0,
        usage_prices=[],
    )  # fmt: skip
    price = {"credit_type_id": kind.id, "rate": "1", "overage_rule": "DEFICIT"}
    await store.set_product_credits(
        tenant,
        product.id,
        {
            "included": [
                {"credit_type_id": kind.id, "amount": "100", "rollover": None, "priority": 0}
            ],
            "prices": {METER_A: price, METER_B: price},
        },
    )
    now = floor_minute(datetime.now(UTC)) + timedelta(seconds=30)
    start = floor_minute(now) - timedelta(hours=3)
    await billing.create_subscription(tenant, customer.id, product.id, start)
    t1, t2 = start + timedelta(hours=1), start + timedelta(hours=2)
    meters = Meters()
    meters.events += [
        (METER_A, t1 + timedelta(seconds=10), D(5)),
        (METER_B, t1 + timedelta(seconds=20), D(7)),
        (METER_A, t1 + timedelta(seconds=50), D(1)),
        (METER_A, t2, D(3)),
    ]
    credits = Credits(store, billing, meters, js, lag=timedelta(0), recheck=timedelta(days=1))  # type: ignore[arg-type]
    await credits.settle_tenant(tenant, now)
    assert await credits.publish_pending() == 3  # granted, drawn at t1, drawn at t2
    # (Only the draws are read back: "credit-entry-<id>" of the grant names an
    # id of this test's own database, which another test's database may have
    # published on the shared stream within its duplicate window.)
    first = await _messages(js, tenant)
    assert [subject.rsplit(".", 1)[1] for subject, _, _ in first] == ["drawn", "drawn"]
    entries = {
        (e.meter_id, e.effective_at): e
        for e in await store.ledger_page(
            tenant, customer_id=customer.id, type_id=kind.id, kind="DRAWN", start=None,
            end=None, after=None, limit=100,
        )
    }  # fmt: skip
    _, msg_id, payload = first[0]
    down = payload.draw_down
    assert not payload.HasField("entry")
    assert (down.customer_id, down.credit_type_id, down.credits_drawn) == (
        customer.id,
        kind.id,
        "13",
    )
    assert down.window_start.ToDatetime(tzinfo=UTC) == t1
    assert down.window_end.ToDatetime(tzinfo=UTC) == t1 + M
    assert [(p.meter_id, p.credits_drawn, p.quantity, p.entry_id) for p in down.meters] == [
        (METER_A, "6", "6", entries[(METER_A, t1)].id),
        (METER_B, "7", "7", entries[(METER_B, t1)].id),
    ]
    assert down.balance_after == "87"  # 100 granted, 13 drawn at t1
    lowest = min(entries[(METER_A, t1)].id, entries[(METER_B, t1)].id, key=int)
    assert msg_id == f"credit-drawn-{customer.id}-{kind.id}-{t1:%Y%m%dT%H%MZ}-{lowest}"
    assert [(p.meter_id, p.credits_drawn) for p in first[1][2].draw_down.meters] == [(METER_A, "3")]

    # A late event of meter B at t1: the pass that corrects the minute sends
    # one more message for it, with its own id.
    meters.events.append((METER_B, t1 + timedelta(seconds=30), D(4)))
    await credits.settle_tenant(tenant, now + M)
    assert await credits.publish_pending() == 1
    late = (await _messages(js, tenant))[len(first) :]
    assert len(late) == 1
    _, _, late_payload = late[0]
    assert late_payload.draw_down.window_start.ToDatetime(tzinfo=UTC) == t1
    assert [(p.meter_id, p.credits_drawn) for p in late_payload.draw_down.meters] == [
        (METER_B, "4")
    ]
    ids = [msg_id for _, msg_id, _ in [*first, *late]]
    assert len(set(ids)) == len(ids)

    # A crash after publishing, before marking: the same messages again,
    # with the same ids, are absorbed by the stream.
    await pool.execute(
        "UPDATE billing.credit_ledger SET published_at = NULL WHERE tenant_id = $1", tenant
    )
    assert await credits.publish_pending() == 4  # as summarized before: 3 + 1
    assert await _messages(js, tenant) == [*first, *late]  # none stored again
