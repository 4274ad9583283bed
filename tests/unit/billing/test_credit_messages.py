"""The outbox's messages (pure): draw-downs of one account and minute that
one pass recorded are one credit.drawn message (parts in meter id order);
other entries, other accounts, minutes and passes are messages of their own,
in the order of each message's first entry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.billing.credits import outbox_messages
from services.billing.credits_store import LedgerRecord
from services.billing.domain.credits import EntryKind

D = Decimal
T = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
PASS1 = T + timedelta(minutes=2)
PASS2 = T + timedelta(minutes=5)


def entry(
    id_: int, kind: EntryKind, customer: str, meter: str, amount: int, created: datetime
) -> LedgerRecord:
    return LedgerRecord(
        id=str(id_), customer_id=customer, credit_type_id="tok", kind=kind, entry_key="k",
        amount=D(amount), balance_after=D(100 - id_), effective_at=T, grant_id="",
        meter_id=meter, window_start=T, window_end=T + timedelta(minutes=1),
        quantity=D(-amount), uncovered=D(0), description="", created_at=created,
    )  # fmt: skip


def test_one_drawn_message_per_account_minute_and_pass() -> None:
    drawn = EntryKind.DRAWN
    batch = [
        ("t", entry(1, EntryKind.GRANTED, "alice", "", 100, PASS1)),
        ("t", entry(2, drawn, "alice", "m-b", -7, PASS1)),
        ("t", entry(3, drawn, "bob", "m-a", -1, PASS1)),  # another account: its own
        ("t", entry(4, drawn, "alice", "m-a", -5, PASS1)),
        ("t", entry(5, EntryKind.OVERAGE, "alice", "m-a", 0, PASS1)),
        ("t", entry(6, drawn, "alice", "m-b", -4, PASS2)),  # a later pass: its own
    ]
    messages = outbox_messages(batch)
    assert [(subject.rsplit(".", 1)[1], [e.id for e in es]) for subject, _, _, es in messages] == [
        ("granted", ["1"]),
        ("drawn", ["4", "2"]),  # meter id order
        ("drawn", ["3"]),
        ("overage", ["5"]),
        ("drawn", ["6"]),
    ]
    _, payload, msg_id, _ = messages[1]
    down = payload.draw_down
    assert (down.customer_id, down.credits_drawn, down.balance_after) == ("alice", "12", "96")
    assert [(p.meter_id, p.credits_drawn, p.entry_id) for p in down.meters] == [
        ("m-a", "5", "4"),
        ("m-b", "7", "2"),
    ]
    assert msg_id == "credit-drawn-alice-tok-20260101T1000Z-2"
    ids = [m[2] for m in messages]
    assert len(set(ids)) == len(ids)
    assert ids[0] == "credit-entry-1" and not messages[0][1].HasField("draw_down")
