"""Stored prices and commitments <-> domain: prices stored before PERCENTAGE
existed still load, and decimals are stored and answered normalised."""

from decimal import Decimal
from typing import Any

from services.billing import convert
from services.billing.domain.commitments import Commitment
from services.billing.domain.pricing import PriceModel, Tier, UsagePrice
from usagebilling.billing.v1 import invoice_pb2

D = Decimal


def test_a_price_stored_before_percentage_fields_existed_still_loads() -> None:
    old: dict[str, Any] = {
        "meter_id": "m",
        "meter_name": "calls",
        "model": "PER_UNIT",
        "unit_price": "0.02",
        "free_threshold": "1000",
        "tiers": [],
        "package_size": None,
        "package_price": "0",
    }
    price = convert.price_from_json(old)
    assert price == UsagePrice(
        "m", PriceModel.PER_UNIT, unit_price=D("0.02"), free_threshold=D(1000)
    )
    assert not price.per_transaction


def test_a_percentage_price_round_trips_normalised() -> None:
    price = UsagePrice(
        "m",
        PriceModel.PERCENTAGE,
        rate=D("2.90"),
        fixed_fee=D("0.30"),
        min_fee=D("0.50"),
        transaction_key="payment_id",
        free_transactions=0,
    )
    stored = convert.price_json(price, "payments")
    assert (stored["rate"], stored["fixed_fee"], stored["min_fee"], stored["max_fee"]) == (
        "2.9",
        "0.3",
        "0.5",
        None,
    )
    assert convert.price_from_json(stored) == price


def test_tiers_are_stored_normalised() -> None:
    price = UsagePrice(
        "m", PriceModel.GRADUATED, tiers=(Tier(D("1E+3"), D("0.010")), Tier(None, D("0.50")))
    )
    assert convert.price_json(price, "calls")["tiers"] == [
        {"up_to": "1000", "unit_price": "0.01", "flat_price": "0"},
        {"up_to": None, "unit_price": "0.5", "flat_price": "0"},
    ]


def test_commitments_round_trip() -> None:
    stored = convert.commitment_json(Commitment(10000, 50000))
    assert stored == {"minimum_spend_minor": 10000, "maximum_spend_minor": 50000}
    assert convert.commitment_from_json(stored) == Commitment(10000, 50000)
    assert convert.commitment_from_json(None) is None


def test_lines_stored_before_kinds_existed_get_one_from_meter_id() -> None:
    old = {
        "description": "Pro: fixed fee",
        "meter_id": "",
        "meter_name": "",
        "quantity": "1",
        "free_quantity": "0",
        "billable_quantity": "1",
        "unit_price": "19.99",
        "amount_minor": 1999,
        "tiers": [],
    }
    usage = {**old, "meter_id": "m", "description": "calls: ..."}
    assert convert._proto_line(old).kind == invoice_pb2.INVOICE_LINE_KIND_FIXED_FEE
    assert convert._proto_line(usage).kind == invoice_pb2.INVOICE_LINE_KIND_USAGE
    assert (
        convert._proto_line({**old, "kind": "minimum_spend"}).kind
        == invoice_pb2.INVOICE_LINE_KIND_MINIMUM_SPEND
    )
