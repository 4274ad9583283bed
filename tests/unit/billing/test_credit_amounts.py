"""Credits computed from usage of any size are exact (found by the nu session:
a minute of 1e25 tokens made to_credits raise under the default context)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from services.billing.domain.credits import (
    MINUTE,
    Draw,
    EntryKind,
    Grant,
    Overage,
    available,
    replay,
    to_credits,
)


def test_to_credits_of_a_large_quantity_is_exact() -> None:
    """A SUM meter's minute of 1e25 (one event's value; ingest takes numbers
    up to 1e1000) at rate 1 into a type of 3 decimals: quantize under the
    default 28-digit context raised decimal.InvalidOperation, which made
    GetCreditBalance INTERNAL and failed the tenant's whole settlement pass
    every second."""
    assert to_credits(Decimal("1e25"), Decimal(1), 3) == Decimal("1e25")
    assert to_credits(Decimal("123456789012345678901234567.8915"), Decimal(1), 3) == Decimal(
        "123456789012345678901234567.892"
    )
    assert to_credits(Decimal("1e1000"), Decimal("1e12"), 3) == Decimal("1e1012")


def test_a_huge_draw_replays_exactly() -> None:
    """A grant of 0.001 credits drawn by a minute of 1e25 + 0.002 credits
    under DEFICIT: the deficit is exactly what is left (no 28-digit rounding),
    and the balance sums it exactly."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    grant = Grant("g", Decimal("0.001"), at, None, 0, 1)
    credits = Decimal("10000000000000000000000000.002")
    draw = Draw("d", at, credits, Overage.DEFICIT, "m", credits)
    entries, state = replay([grant], [draw], {}, at, at + MINUTE, 3)
    over = [e for e in entries if e.kind is EntryKind.OVERAGE]
    assert [e.amount for e in over] == [Decimal("-10000000000000000000000000.001")]
    total, _ = available([grant], state, at + MINUTE)
    assert total == Decimal("-10000000000000000000000000.001")
