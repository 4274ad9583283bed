"""Credits computed from usage of any size are exact (found by the nu session:
a minute of 1e25 tokens made to_credits raise under the default context)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.billing.domain.credits import (
    MINUTE,
    Draw,
    EntryKind,
    Grant,
    Overage,
    available,
    check_rate,
    coverage,
    replay,
    to_credits,
    total_drawn,
)
from services.common.errors import InvalidArgument


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


@pytest.mark.parametrize(
    ("rate", "error"),
    [
        ("1e99", "at most 1000000000000"),
        ("1000000000000.5", "at most 1000000000000"),
        ("1e-30", "at most 12 decimals"),
        ("0.0000000000005", "at most 12 decimals"),
        ("0", "must be positive"),
        ("-1", "must be positive"),
    ],
)
def test_a_credit_rate_out_of_bounds_is_refused_naming_it(rate: str, error: str) -> None:
    """CreateProduct took credit_rate "1e99" (every draw then failed) and
    "1e-30" (every draw rounded to nothing)."""
    with pytest.raises(InvalidArgument) as raised:
        check_rate(Decimal(rate), "usage_prices[0].credit_rate")
    assert str(raised.value) == f"usage_prices[0].credit_rate: {error}"


@pytest.mark.parametrize("rate", ["1e12", "0.000000000001", "2.5", "1"])
def test_a_credit_rate_within_bounds_is_taken(rate: str) -> None:
    assert check_rate(Decimal(rate), "r") == Decimal(rate)


@pytest.mark.parametrize(
    ("consumed", "drawn", "rate", "rule", "covered", "billable"),
    [
        # 19 tokens, 10 credits at 1 a token: 10 covered, 9 billed.
        ("19", "10", "1", Overage.BILL, "10", "9"),
        ("19", "10", "1", Overage.FORGIVE, "10", "0"),
        ("19", "10", "1", Overage.DEFICIT, "10", "0"),
        # Credits for more than was used cover what was used.
        ("5", "100", "2", Overage.BILL, "5", "0"),
        # 0.5 credits a token: 3 credits cover 6 tokens.
        ("7", "3", "0.5", Overage.BILL, "6", "1"),
        # A third of a unit: 40 digits past the larger operand's 1, not 28.
        ("1", "1", "3", Overage.BILL, "0." + "3" * 41, "0." + "6" * 40 + "7"),
        # Far past the default context's 28 digits, exact where it divides.
        ("1" + "0" * 60, "4" + "0" * 59, "8", Overage.BILL, "5" + "0" * 58, "95" + "0" * 58),
        ("0", "0", "1", Overage.BILL, "0", "0"),
    ],
)
def test_coverage(
    consumed: str, drawn: str, rate: str, rule: Overage, covered: str, billable: str
) -> None:
    got = coverage(Decimal(consumed), Decimal(drawn), Decimal(rate), rule)
    assert got == (Decimal(covered), Decimal(billable))


def test_total_drawn_is_exact_however_many_digits() -> None:
    amounts = [Decimal("-1e30"), Decimal("-0.000000000000000000000000000001"), Decimal("2")]
    assert total_drawn(amounts) == Decimal("9" * 29 + "8." + "0" * 29 + "1")
