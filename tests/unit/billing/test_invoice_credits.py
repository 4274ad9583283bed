"""A usage line that draws credits carries them in its own fields
(InvoiceLineCredits): annotate_lines fills them from what credits did, the
stored JSON keeps them, and the message shows them; a line stored before the
fields existed, or one that draws nothing, has none."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from services.billing.convert import draft_json, preview_invoice
from services.billing.credits import CreditUse, annotate_lines
from services.billing.domain.credits import Overage
from services.billing.domain.invoice import FIXED_FEE, InvoiceDraft, InvoiceLine
from usagebilling.billing.v1 import credit_pb2

D = Decimal
START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 2, 1, tzinfo=UTC)


def _draft(billable: int = 10_500_000, amount: int = 5250) -> InvoiceDraft:
    fee = InvoiceLine("Pro", "", "", D(1), D(0), D(1), D(99), 9900, (), FIXED_FEE)
    # What pricing made of the billable overage alone (10,500,000 x 0.000005).
    usage = InvoiceLine(
        "tokens", "m1", "tokens", D(billable), D(0), D(billable), D("0.000005"), amount, ()
    )
    other = InvoiceLine("calls", "m2", "calls", D(7), D(0), D(7), D(1), 700, ())
    return InvoiceDraft("USD", START, END, (fee, usage, other), 15850, 15850)


def test_a_line_that_drew_credits_shows_drawn_covered_overage_and_its_amount() -> None:
    drafts = {("sub", START): _draft()}
    # Pro: 70,000,000 consumed, 59,500,000 credits drawn (rate 1) and covered, BILL.
    use = CreditUse(
        "tokens", D(70_000_000), D(59_500_000), D(59_500_000), D(10_500_000), Overage.BILL,
        "type-1", D(1),
    )  # fmt: skip
    annotate_lines(drafts, {("sub", START, "m1"): use})
    fee, line, other = drafts[("sub", START)].lines
    assert fee.credits is None and other.credits is None
    assert (line.quantity, line.free_quantity, line.billable_quantity, line.amount_minor) == (
        D(70_000_000),
        D(59_500_000),
        D(10_500_000),
        5250,
    )
    message = preview_invoice(drafts[("sub", START)], "cus", "sub")
    credits = message.lines[1].credits
    assert (
        credits.credit_type_id,
        credits.credit_type_name,
        credits.credit_rate,
        credits.credits_drawn,
        credits.quantity_covered,
        credits.overage_quantity,
        credits.overage_rule,
        credits.billable_overage_quantity,
        credits.overage_amount_minor,
    ) == (
        "type-1",
        "tokens",
        "1",
        "59500000",
        "59500000",
        "10500000",
        credit_pb2.OVERAGE_RULE_BILL,
        "10500000",
        5250,
    )
    assert not message.lines[0].HasField("credits") and not message.lines[2].HasField("credits")


def test_forgiven_overage_is_not_billable_and_credits_at_a_rate_cover_their_units() -> None:
    drafts = {("sub", START): _draft(0, 0)}
    # Rate 2 credits per token: 30 credits drawn cover 15 of 20 tokens; FORGIVE.
    use = CreditUse("c", D(20), D(15), D(30), D(0), Overage.FORGIVE, "type-2", D(2))
    annotate_lines(drafts, {("sub", START, "m1"): use})
    stored = draft_json(drafts[("sub", START)])["lines"][1]
    assert stored["credits"] == {
        "credit_type_id": "type-2",
        "credit_type_name": "c",
        "credit_rate": "2",
        "credits_drawn": "30",
        "quantity_covered": "15",
        "overage_quantity": "5",
        "overage_rule": "FORGIVE",
        "billable_overage_quantity": "0",
        "overage_amount_minor": 0,
    }
    assert "credits" not in draft_json(_draft())["lines"][1]  # nothing drawn: no field


def test_a_credit_lines_description_prices_the_overage_without_contradicting_the_line() -> None:
    # Pricing saw only the billed overage (9 at 0.1), and said so in its words.
    priced = InvoiceLine(
        "tokens: 9 consumed, 0 free, 9 billable × 0.1", "m1", "tokens",
        D(9), D(0), D(9), D("0.1"), 90, (),
    )  # fmt: skip
    draft = InvoiceDraft("USD", START, END, (priced,), 90, 90)
    drafts = {("sub", START): draft}
    use = CreditUse("TOKENS", D(19), D(10), D(10), D(9), Overage.BILL, "type-1", D(1))
    annotate_lines(drafts, {("sub", START, "m1"): use})
    (line,) = drafts[("sub", START)].lines
    assert line.description == (
        "tokens: 19 consumed, 10 covered by 10 TOKENS credits, 9 beyond them (BILL: 9 billed × 0.1)"
    )
    assert (line.quantity, line.free_quantity, line.billable_quantity) == (D(19), D(10), D(9))
