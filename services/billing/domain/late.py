"""Late usage: usage of a period that arrived after its invoice was finalized.

Once no event can still arrive for a period (its end, plus the backdating
window ingest accepts, plus the grace period, have passed), the period is
re-priced once, by the same build as its invoice; the difference between that
total and the total its invoice billed is billed as one LATE_USAGE line on the
subscription's next invoice. Tiers, commitments and credits are therefore
charged on the whole period's quantity (charge(new) - charge(old)), never as a
unit price times the quantity that came late."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import Any

from services.billing.domain.invoice import (
    LATE_USAGE,
    USAGE,
    InvoiceDraft,
    InvoiceLine,
    LateUsage,
    MeterChange,
)
from services.billing.domain.money import from_minor
from services.billing.domain.pricing import plain

# How far back ingest accepts events unless configured (billing reads the same
# USAGEBILLING_BACKDATE_WINDOW: for late usage and credits' reconciliation).
BACKDATE_WINDOW = timedelta(days=35)


def closed_by(as_of: datetime, backdate_window: timedelta, grace: timedelta) -> datetime:
    """The periods that ended at or before this instant can get no more usage
    at `as_of`: ingest refuses events older than the backdating window, and
    the grace covers those accepted at its edge but not yet metered."""
    return as_of - backdate_window - grace


@dataclass(frozen=True)
class Billed:
    """What a period's current (non-void) invoice billed: its total, and each
    meter's quantity (one per meter, in line order)."""

    invoice_id: str
    invoice_number: str
    total_minor: int
    quantities: tuple[tuple[str, str, Decimal], ...]  # (meter id, meter name, quantity)


def _quantities(lines: tuple[InvoiceLine, ...]) -> dict[str, tuple[str, Decimal]]:
    # Two prices on one meter show the same quantity: the first line's stands.
    found: dict[str, tuple[str, Decimal]] = {}
    for line in lines:
        if line.kind == USAGE and line.meter_id and line.meter_id not in found:
            found[line.meter_id] = (line.meter_name, line.quantity)
    return found


def _day(when: datetime) -> str:
    return when.date().isoformat() if when.time() == time(0) else when.isoformat()


def _quantity(value: Decimal) -> str:
    # "1,450.5": thousands grouped, as people read an invoice.
    text = plain(value)
    whole, dot, fraction = text.partition(".")
    return f"{int(whole):,}{dot}{fraction}" if whole.lstrip("-").isdigit() else text


def late_usage_line(billed: Billed, repriced: InvoiceDraft) -> InvoiceLine | None:
    """The LATE_USAGE line of a period re-priced after its window closed, for
    the next invoice: repriced total - billed total in minor units (negative
    when a MAX, LATEST or AVG meter went down); None when they are equal."""
    amount = repriced.total_minor - billed.total_minor
    if amount == 0:
        return None
    now = _quantities(repriced.lines)
    changes = []
    for meter_id, name, quantity in billed.quantities:
        new = now.get(meter_id, (name, quantity))[1]
        if new != quantity:
            changes.append(MeterChange(meter_id, name, quantity, new))
    what = "; ".join(
        f"{c.meter_name or c.meter_id} {_quantity(c.billed_quantity)} → {_quantity(c.quantity)}"
        for c in changes
    )
    if not what:  # the same quantities, priced differently (credits drawn, transactions)
        what = (
            f"billed {_money(billed.total_minor, repriced.currency)}, "
            f"now {_money(repriced.total_minor, repriced.currency)}"
        )
    period = f"{_day(repriced.period_start)} to {_day(repriced.period_end)}"
    return InvoiceLine(
        description=(
            f"Late usage, {period} (invoice {billed.invoice_number or billed.invoice_id}): {what}"
        ),
        meter_id="",
        meter_name="",
        quantity=Decimal(1),
        free_quantity=Decimal(0),
        billable_quantity=Decimal(1),
        unit_price=from_minor(amount, repriced.currency),
        amount_minor=amount,
        tiers=(),
        kind=LATE_USAGE,
        late_usage=LateUsage(
            period_start=repriced.period_start,
            period_end=repriced.period_end,
            invoice_id=billed.invoice_id,
            invoice_number=billed.invoice_number,
            billed_total_minor=billed.total_minor,
            repriced_total_minor=repriced.total_minor,
            meters=tuple(changes),
        ),
    )


def taken_back(line: dict[str, Any], carrier_number: str) -> dict[str, Any]:
    """For the reissue of a period whose LATE_USAGE line (JSON, as stored) is
    already billed on invoice `carrier_number`: the same line negated. The
    reissue prices the period in full, late usage included, so without it the
    late usage would be billed twice (once on the carrier, once here)."""
    amount = -int(line["amount_minor"])
    return line | {
        "description": (
            f"Late usage of this period already billed on invoice {carrier_number},"
            f" taken back: {line['description']}"
        ),
        "unit_price": plain(-Decimal(line["unit_price"])),
        "amount_minor": amount,
    }


def _money(minor: int, currency: str) -> str:
    return f"{from_minor(minor, currency):f} {currency}"
