"""services/billing/domain/alerts.py: quantity and amount thresholds."""

from __future__ import annotations

from decimal import Decimal

import pytest

from services.billing.domain.alerts import reached
from services.billing.domain.pricing import PriceModel, UsagePrice

PER_UNIT = UsagePrice(
    meter_id="m",
    model=PriceModel.PER_UNIT,
    unit_price=Decimal("0.02"),
    free_threshold=Decimal(1000),
)


@pytest.mark.parametrize(
    ("usage", "quantity", "amount", "expected"),
    [
        ("9", "10", None, False),
        ("10", "10", None, True),
        ("10.5", "10", None, True),
        # 0.02 per call after 1000 free: 1500 calls are 1000 minor units (USD).
        ("2499", None, 3000, False),
        ("2500", None, 3000, True),
        ("1000", None, 1, False),
        ("1001", None, 2, True),
    ],
)
def test_reached(usage: str, quantity: str | None, amount: int | None, expected: bool) -> None:
    q = Decimal(quantity) if quantity is not None else None
    assert reached(Decimal(usage), q, amount, PER_UNIT, 2) is expected


def test_amount_needs_a_usable_price() -> None:
    assert not reached(Decimal(10**9), None, 1, None, 2)
    fees = UsagePrice(
        meter_id="m", model=PriceModel.PERCENTAGE, rate=Decimal(1), transaction_key="t"
    )
    assert not reached(Decimal(10**9), None, 1, fees, 2)
