"""domain/late.py: when a period's window has closed, and the LATE_USAGE line
of a period re-priced against what its invoice billed."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.billing.domain.commitments import Commitment
from services.billing.domain.invoice import LATE_USAGE, InvoiceDraft, MeterChange, build_invoice
from services.billing.domain.late import Billed, closed_by, late_usage_line
from services.billing.domain.pricing import PriceModel, Tier, UsagePrice

D = Decimal
OCT1, NOV1 = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)
# Graduated: the first 1,000 at 0.02, the rest at 0.01.
CALLS = UsagePrice(
    "m-calls",
    PriceModel.GRADUATED,
    tiers=(Tier(D(1000), D("0.02")), Tier(None, D("0.01"))),
)
MAXIMUM = UsagePrice("m-seats", PriceModel.PER_UNIT, unit_price=D(5))


def _draft(calls: int, seats: int = 0, commitment: Commitment | None = None) -> InvoiceDraft:
    return build_invoice(
        "USD",
        1000,
        "Pro",
        [(CALLS, "api calls", D(calls)), (MAXIMUM, "seats", D(seats))],
        OCT1,
        NOV1,
        commitment=commitment,
    )


def _billed(draft: InvoiceDraft, number: str = "INV-000042") -> Billed:
    quantities = tuple(
        (line.meter_id, line.meter_name, line.quantity) for line in draft.lines if line.meter_id
    )
    return Billed("inv-1", number, draft.total_minor, quantities)


def test_a_window_closes_after_the_backdating_window_and_the_grace() -> None:
    as_of = datetime(2026, 12, 6, 2, tzinfo=UTC)
    assert closed_by(as_of, timedelta(days=35), timedelta(hours=1)) == datetime(
        2026, 11, 1, 1, tzinfo=UTC
    )


def test_tiered_late_usage_is_the_charge_of_the_new_quantity_less_the_old() -> None:
    billed, now = _draft(1200), _draft(1450)
    assert (billed.total_minor, now.total_minor) == (1000 + 2000 + 200, 1000 + 2000 + 450)
    line = late_usage_line(_billed(billed), now)
    assert line is not None
    # 250 more calls, all in the 0.01 tier: 2.50, not 250 × 0.02 = 5.00.
    assert (line.kind, line.amount_minor, line.unit_price) == (LATE_USAGE, 250, D("2.5"))
    assert line.description == (
        "Late usage, 2026-10-01 to 2026-11-01 (invoice INV-000042): api calls 1,200 → 1,450"
    )
    late = line.late_usage
    assert late is not None
    assert (late.period_start, late.period_end, late.invoice_id) == (OCT1, NOV1, "inv-1")
    assert (late.billed_total_minor, late.repriced_total_minor) == (3200, 3450)
    assert late.meters == (MeterChange("m-calls", "api calls", D(1200), D(1450)),)


def test_across_tiers_the_amount_is_not_a_unit_price_times_the_difference() -> None:
    line = late_usage_line(_billed(_draft(900)), _draft(1100))
    assert line is not None
    assert line.amount_minor == 100 * 2 + 100 * 1  # 100 at 0.02, then 100 at 0.01


def test_nothing_changed_gives_no_line() -> None:
    assert late_usage_line(_billed(_draft(1200, 3)), _draft(1200, 3)) is None


def test_a_meter_that_went_down_gives_a_negative_line_naming_it() -> None:
    line = late_usage_line(_billed(_draft(1200, 4)), _draft(1200, 3))
    assert line is not None
    assert line.amount_minor == -500
    assert line.description.endswith(": seats 4 → 3")


def test_a_commitment_is_applied_to_the_whole_period_again() -> None:
    # Usage capped at 25.00: 3200 billed (fixed fee 1000 + usage 2200); 3000
    # calls come to 40.00 of usage, capped: the late calls bill up to the cap.
    cap = Commitment(0, 2500)
    billed, now = _draft(1200, commitment=cap), _draft(3000, commitment=cap)
    assert (billed.total_minor, now.total_minor) == (3200, 3500)
    line = late_usage_line(_billed(billed), now)
    assert line is not None and line.amount_minor == 300


def test_the_same_quantities_priced_differently_say_the_totals() -> None:
    billed = Billed(
        "inv-1", "", 3000, (("m-calls", "api calls", D(1200)), ("m-seats", "seats", D(0)))
    )
    line = late_usage_line(billed, _draft(1200))
    assert line is not None and line.amount_minor == 200
    assert line.description == (
        "Late usage, 2026-10-01 to 2026-11-01 (invoice inv-1): billed 30.00 USD, now 32.00 USD"
    )
