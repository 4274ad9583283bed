"""Protobuf and stored JSON <-> billing's domain types."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from services.billing.domain.commitments import Commitment
from services.billing.domain.invoice import (
    LATE_USAGE,
    USAGE,
    InvoiceDraft,
    InvoiceLine,
    LateUsage,
    LineCredits,
)
from services.billing.domain.late import Billed
from services.billing.domain.periods import Interval
from services.billing.domain.pricing import (
    PriceModel,
    Tier,
    TierCharge,
    UsagePrice,
    parse_decimal,
    plain,
)
from services.billing.store import CustomerRecord, InvoiceRecord, PeriodFailure, ProductRecord
from services.common.errors import InvalidArgument
from usagebilling.billing.v1 import credit_pb2, customer_pb2, invoice_pb2, product_pb2

INTERVALS = {
    product_pb2.BILLING_INTERVAL_DAY: Interval.DAY,
    product_pb2.BILLING_INTERVAL_WEEK: Interval.WEEK,
    product_pb2.BILLING_INTERVAL_MONTH: Interval.MONTH,
    product_pb2.BILLING_INTERVAL_YEAR: Interval.YEAR,
}
MODELS = {
    product_pb2.PRICE_MODEL_PER_UNIT: PriceModel.PER_UNIT,
    product_pb2.PRICE_MODEL_GRADUATED: PriceModel.GRADUATED,
    product_pb2.PRICE_MODEL_VOLUME: PriceModel.VOLUME,
    product_pb2.PRICE_MODEL_PACKAGE: PriceModel.PACKAGE,
    product_pb2.PRICE_MODEL_PERCENTAGE: PriceModel.PERCENTAGE,
}
LINE_KINDS = {
    "fixed_fee": invoice_pb2.INVOICE_LINE_KIND_FIXED_FEE,
    "usage": invoice_pb2.INVOICE_LINE_KIND_USAGE,
    "maximum_spend": invoice_pb2.INVOICE_LINE_KIND_MAXIMUM_SPEND,
    "minimum_spend": invoice_pb2.INVOICE_LINE_KIND_MINIMUM_SPEND,
    "late_usage": invoice_pb2.INVOICE_LINE_KIND_LATE_USAGE,
}
# protobuf's bound of a Duration (about 10,000 years).
MAX_DURATION_SECONDS = 315_576_000_000
INVOICE_STATUSES = {
    "DRAFT": invoice_pb2.INVOICE_STATUS_DRAFT,
    "FINALIZED": invoice_pb2.INVOICE_STATUS_FINALIZED,
    "VOID": invoice_pb2.INVOICE_STATUS_VOID,
}


def to_datetime(ts: Timestamp, field: str = "timestamp") -> datetime:
    """A request's timestamp; InvalidArgument naming `field` when it is not a
    valid instant (seconds outside years 1..9999, nanos outside 0..999999999)."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(f"{field}: not a valid timestamp") from None


def to_timedelta(value: Duration, field: str) -> timedelta:
    """A request's Duration: seconds and nanos of one sign, nanos within
    ±999,999,999, within ±10,000 years (protobuf's own bounds); InvalidArgument
    naming `field` otherwise."""
    seconds, nanos = value.seconds, value.nanos
    if (
        abs(nanos) > 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
        or abs(seconds) > MAX_DURATION_SECONDS
    ):
        raise InvalidArgument(
            f"{field}: not a valid duration (seconds and nanos of the same sign,"
            " nanos within ±999999999)"
        )
    return value.ToTimedelta()


def to_timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def text(value: Decimal | None) -> str:
    """Plain, normalised notation ("1000", not "1E+3"; "0.01", not "0.010");
    empty for None."""
    return "" if value is None else plain(value)


def _optional(value: str | None) -> Decimal | None:
    return None if value is None or value == "" else Decimal(value)


# Usage prices: request -> domain -> stored JSON -> domain / response.


def usage_price(message: product_pb2.UsagePrice, index: int) -> UsagePrice:
    at = f"usage_prices[{index}]"
    if message.model not in MODELS:
        raise InvalidArgument(f"{at}.model: a PRICE_MODEL_* value is required")
    return UsagePrice(
        meter_id=message.meter_id,
        model=MODELS[message.model],
        unit_price=parse_decimal(message.unit_price, f"{at}.unit_price")
        if message.unit_price
        else None,
        free_threshold=parse_decimal(message.free_threshold, f"{at}.free_threshold"),
        tiers=tuple(
            Tier(
                up_to=parse_decimal(t.up_to, f"{at}.tiers[{i}].up_to") if t.up_to else None,
                unit_price=parse_decimal(t.unit_price, f"{at}.tiers[{i}].unit_price"),
                flat_price=parse_decimal(t.flat_price, f"{at}.tiers[{i}].flat_price"),
            )
            for i, t in enumerate(message.tiers)
        ),
        package_size=parse_decimal(message.package_size, f"{at}.package_size")
        if message.package_size
        else None,
        package_price=parse_decimal(message.package_price, f"{at}.package_price"),
        rate=parse_decimal(message.rate, f"{at}.rate"),
        fixed_fee=parse_decimal(message.fixed_fee, f"{at}.fixed_fee"),
        min_fee=parse_decimal(message.min_fee, f"{at}.min_fee") if message.min_fee else None,
        max_fee=parse_decimal(message.max_fee, f"{at}.max_fee") if message.max_fee else None,
        transaction_key=message.transaction_key,
        free_transactions=message.free_transactions,
    )


def price_json(price: UsagePrice, meter_name: str) -> dict[str, Any]:
    return {
        "meter_id": price.meter_id,
        "meter_name": meter_name,
        "model": price.model.name,
        "unit_price": text(price.unit_price) or None,
        "free_threshold": text(price.free_threshold),
        "tiers": [
            {
                "up_to": text(t.up_to) or None,
                "unit_price": text(t.unit_price),
                "flat_price": text(t.flat_price),
            }
            for t in price.tiers
        ],
        "package_size": text(price.package_size) or None,
        "package_price": text(price.package_price),
        "rate": text(price.rate),
        "fixed_fee": text(price.fixed_fee),
        "min_fee": text(price.min_fee) or None,
        "max_fee": text(price.max_fee) or None,
        "transaction_key": price.transaction_key,
        "free_transactions": price.free_transactions,
    }


def price_from_json(data: dict[str, Any]) -> UsagePrice:
    return UsagePrice(
        meter_id=data["meter_id"],
        model=PriceModel[data["model"]],
        unit_price=_optional(data["unit_price"]),
        free_threshold=Decimal(data["free_threshold"]),
        tiers=tuple(
            Tier(_optional(t["up_to"]), Decimal(t["unit_price"]), Decimal(t["flat_price"]))
            for t in data["tiers"]
        ),
        package_size=_optional(data["package_size"]),
        package_price=Decimal(data["package_price"]),
        # Prices stored before PERCENTAGE existed have none of these.
        rate=Decimal(data.get("rate") or 0),
        fixed_fee=Decimal(data.get("fixed_fee") or 0),
        min_fee=_optional(data.get("min_fee")),
        max_fee=_optional(data.get("max_fee")),
        transaction_key=data.get("transaction_key", ""),
        free_transactions=data.get("free_transactions", 0),
    )


# Commitments: request -> domain -> stored JSON -> domain / response.


def commitment(message: product_pb2.Commitment) -> Commitment:
    return Commitment(message.minimum_spend_minor, message.maximum_spend_minor)


def commitment_json(value: Commitment) -> dict[str, int]:
    return {
        "minimum_spend_minor": value.minimum_minor,
        "maximum_spend_minor": value.maximum_minor,
    }


def commitment_from_json(data: dict[str, int] | None) -> Commitment | None:
    if data is None:
        return None
    return Commitment(data["minimum_spend_minor"], data["maximum_spend_minor"])


def proto_commitment(data: dict[str, int]) -> product_pb2.Commitment:
    return product_pb2.Commitment(
        minimum_spend_minor=data["minimum_spend_minor"],
        maximum_spend_minor=data["maximum_spend_minor"],
    )


def proto_product(record: ProductRecord) -> product_pb2.Product:
    interval = Interval[record.billing_interval]
    return product_pb2.Product(
        id=record.id,
        name=record.name,
        currency=record.currency,
        billing_interval=next(k for k, v in INTERVALS.items() if v is interval),
        fixed_price_minor=record.fixed_price_minor,
        usage_prices=[
            product_pb2.UsagePrice(
                meter_id=p["meter_id"],
                model=next(k for k, v in MODELS.items() if v.name == p["model"]),
                unit_price=p["unit_price"] or "",
                free_threshold=p["free_threshold"],
                tiers=[
                    product_pb2.PriceTier(
                        up_to=t["up_to"] or "",
                        unit_price=t["unit_price"],
                        flat_price=t["flat_price"],
                    )
                    for t in p["tiers"]
                ],
                package_size=p["package_size"] or "",
                package_price=p["package_price"],
                rate=_shown(p.get("rate")),
                fixed_fee=_shown(p.get("fixed_fee")),
                min_fee=p.get("min_fee") or "",
                max_fee=p.get("max_fee") or "",
                transaction_key=p.get("transaction_key", ""),
                free_transactions=p.get("free_transactions", 0),
            )
            for p in record.usage_prices
        ],
        commitment=None if record.commitment is None else proto_commitment(record.commitment),
    )


def _shown(value: str | None) -> str:
    # A percentage field that is 0 (or absent) is shown empty, as it was sent.
    return "" if not value or Decimal(value).is_zero() else value


def proto_customer(record: CustomerRecord) -> customer_pb2.Customer:
    return customer_pb2.Customer(
        id=record.id, external_id=record.external_id, name=record.name, email=record.email
    )


# Invoices: domain draft -> stored JSON -> response.


def _tier_json(tier: TierCharge) -> dict[str, str]:
    return {
        "up_to": text(tier.up_to),
        "quantity": text(tier.quantity),
        "unit_price": text(tier.unit_price),
        "flat_price": text(tier.flat_price),
        "amount": text(tier.amount),
    }


def line_json(line: InvoiceLine) -> dict[str, Any]:
    return {
        "description": line.description,
        "meter_id": line.meter_id,
        "meter_name": line.meter_name,
        "quantity": text(line.quantity),
        "free_quantity": text(line.free_quantity),
        "billable_quantity": text(line.billable_quantity),
        "unit_price": text(line.unit_price),
        "amount_minor": line.amount_minor,
        "tiers": [_tier_json(t) for t in line.tiers],
        "kind": line.kind,
        **({"credits": _credits_json(line.credits)} if line.credits else {}),
        **({"late_usage": _late_json(line.late_usage)} if line.late_usage else {}),
    }


def _late_json(late: LateUsage) -> dict[str, Any]:
    return {
        "period_start": late.period_start.isoformat(),
        "period_end": late.period_end.isoformat(),
        "invoice_id": late.invoice_id,
        "invoice_number": late.invoice_number,
        "billed_total_minor": late.billed_total_minor,
        "repriced_total_minor": late.repriced_total_minor,
        "meters": [
            {
                "meter_id": m.meter_id,
                "meter_name": m.meter_name,
                "billed_quantity": text(m.billed_quantity),
                "quantity": text(m.quantity),
            }
            for m in late.meters
        ],
    }


def _proto_late(data: dict[str, Any]) -> invoice_pb2.InvoiceLineLateUsage:
    return invoice_pb2.InvoiceLineLateUsage(
        period_start=to_timestamp(datetime.fromisoformat(data["period_start"])),
        period_end=to_timestamp(datetime.fromisoformat(data["period_end"])),
        invoice_id=data["invoice_id"],
        invoice_number=data["invoice_number"],
        billed_total_minor=data["billed_total_minor"],
        repriced_total_minor=data["repriced_total_minor"],
        meters=[invoice_pb2.LateUsageMeter(**m) for m in data["meters"]],
    )


def billed(record: InvoiceRecord) -> Billed:
    """What a stored invoice billed for its own period, for domain.late: its
    total less the LATE_USAGE lines it carries for earlier periods, and each
    meter's quantity (the first usage line of each meter)."""
    quantities: dict[str, tuple[str, str, Decimal]] = {}
    total = record.total_minor
    for line in record.lines:
        if _kind(line) == LATE_USAGE:
            total -= int(line["amount_minor"])
        elif _kind(line) == USAGE and line["meter_id"] not in quantities:
            quantities[line["meter_id"]] = (
                line["meter_id"],
                line["meter_name"],
                Decimal(line["quantity"]),
            )
    return Billed(record.id, record.number, total, tuple(quantities.values()))


def _credits_json(credits: LineCredits) -> dict[str, Any]:
    return {
        "credit_type_id": credits.credit_type_id,
        "credit_type_name": credits.credit_type_name,
        "credit_rate": text(credits.credit_rate),
        "credits_drawn": text(credits.credits_drawn),
        "quantity_covered": text(credits.quantity_covered),
        "overage_quantity": text(credits.overage_quantity),
        "overage_rule": credits.overage_rule,
        "billable_overage_quantity": text(credits.billable_overage_quantity),
        "overage_amount_minor": credits.overage_amount_minor,
    }


def _proto_credits(data: dict[str, Any]) -> invoice_pb2.InvoiceLineCredits:
    return invoice_pb2.InvoiceLineCredits(
        credit_type_id=data["credit_type_id"],
        credit_type_name=data["credit_type_name"],
        credit_rate=data["credit_rate"],
        credits_drawn=data["credits_drawn"],
        quantity_covered=data["quantity_covered"],
        overage_quantity=data["overage_quantity"],
        overage_rule=credit_pb2.OverageRule.Value(f"OVERAGE_RULE_{data['overage_rule']}"),
        billable_overage_quantity=data["billable_overage_quantity"],
        overage_amount_minor=data["overage_amount_minor"],
    )


def draft_json(draft: InvoiceDraft) -> dict[str, Any]:
    return {
        "period_start": draft.period_start,
        "period_end": draft.period_end,
        "currency": draft.currency,
        "lines": [line_json(line) for line in draft.lines],
        "subtotal_minor": draft.subtotal_minor,
        "total_minor": draft.total_minor,
    }


def _proto_line(line: dict[str, Any]) -> invoice_pb2.InvoiceLine:
    message = invoice_pb2.InvoiceLine(
        description=line["description"],
        meter_id=line["meter_id"],
        meter_name=line["meter_name"],
        quantity=line["quantity"],
        free_quantity=line["free_quantity"],
        billable_quantity=line["billable_quantity"],
        unit_price=line["unit_price"],
        amount_minor=line["amount_minor"],
        tiers=[invoice_pb2.InvoiceLineTier(**t) for t in line["tiers"]],
        kind=LINE_KINDS.get(_kind(line), invoice_pb2.INVOICE_LINE_KIND_UNSPECIFIED),
    )
    if line.get("credits"):  # lines stored before the field have none
        message.credits.CopyFrom(_proto_credits(line["credits"]))
    if line.get("late_usage"):
        message.late_usage.CopyFrom(_proto_late(line["late_usage"]))
    return message


def _kind(line: dict[str, Any]) -> str:
    # Lines stored before kinds existed were a fixed fee (no meter) or usage.
    return str(line.get("kind") or ("usage" if line["meter_id"] else "fixed_fee"))


def proto_invoice(record: InvoiceRecord) -> invoice_pb2.Invoice:
    invoice = invoice_pb2.Invoice(
        id=record.id,
        number=record.number,
        customer_id=record.customer_id,
        subscription_id=record.subscription_id,
        period_start=to_timestamp(record.period_start),
        period_end=to_timestamp(record.period_end),
        currency=record.currency,
        status=INVOICE_STATUSES[record.status],
        lines=[_proto_line(line) for line in record.lines],
        subtotal_minor=record.subtotal_minor,
        total_minor=record.total_minor,
    )
    if record.finalized_at:
        invoice.finalize_time.CopyFrom(to_timestamp(record.finalized_at))
    if record.voided_at:
        invoice.void_time.CopyFrom(to_timestamp(record.voided_at))
    invoice.replaces_invoice_id = record.replaces_id
    invoice.replaced_by_invoice_id = record.replaced_by_id
    return invoice


def preview_invoice(
    draft: InvoiceDraft, customer_id: str, subscription_id: str
) -> invoice_pb2.Invoice:
    data = draft_json(draft)
    return invoice_pb2.Invoice(
        customer_id=customer_id,
        subscription_id=subscription_id,
        period_start=to_timestamp(draft.period_start),
        period_end=to_timestamp(draft.period_end),
        currency=draft.currency,
        status=invoice_pb2.INVOICE_STATUS_DRAFT,
        lines=[_proto_line(line) for line in data["lines"]],
        subtotal_minor=draft.subtotal_minor,
        total_minor=draft.total_minor,
    )


def proto_failure(failure: PeriodFailure) -> invoice_pb2.BillingFailure:
    return invoice_pb2.BillingFailure(
        subscription_id=failure.subscription_id,
        period_start=to_timestamp(failure.period_start),
        period_end=to_timestamp(failure.period_end),
        reason=failure.reason,
    )
