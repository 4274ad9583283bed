from datetime import UTC, datetime
from decimal import Decimal

from services.meter.domain.aggregation import Aggregation, MeterSpec
from services.meter.domain.filters import Condition, Conjunction, Filter, Operator
from services.meter.domain.matching import Matcher, filter_keys, read_keys

WHEN = datetime(2026, 1, 1, tzinfo=UTC)
NESTED = Filter(
    Conjunction.OR,
    (Condition("region", Operator.EQUALS, "eu"),),
    (Filter(conditions=(Condition("tier", Operator.IN, None, ("pro", "team")),)),),
)
TOKENS = MeterSpec("api.call", Aggregation.SUM, "tokens", NESTED, ("model",))
CALLS = MeterSpec("api.call", Aggregation.COUNT)
OTHER = MeterSpec("storage", Aggregation.MAX, "gb")


def test_keys_read_by_a_meter() -> None:
    assert filter_keys(NESTED) == ("region", "tier")
    assert read_keys(TOKENS) == {"region", "tier", "tokens", "model"}
    assert read_keys(CALLS) == set()


def test_matcher_finds_meters_by_name_and_names_the_keys_to_read() -> None:
    matcher = Matcher([(1, TOKENS), (2, CALLS), (3, OTHER)])
    assert matcher.keys_for("api.call") == {"region", "tier", "tokens", "model"}
    assert matcher.keys_for("storage") == {"gb"}
    assert matcher.keys_for("unknown") is None


def test_matcher_folds_what_each_meter_counts() -> None:
    matcher = Matcher([(1, TOKENS), (2, CALLS)])

    def fold(metadata: dict[str, str | Decimal]) -> dict[int, tuple[object, ...]]:
        rows = matcher.fold(
            event_id="e",
            customer_id="c1",
            event_name="api.call",
            event_time=WHEN,
            metadata=metadata,
        )
        assert {(r.customer_id, r.event_time, r.event_id) for r in rows} <= {("c1", WHEN, "e")}
        return {r.meter_key: (r.value, r.dims, r.skip_reason) for r in rows}

    assert fold({"region": "us", "tier": "pro", "tokens": Decimal(5), "model": "m"}) == {
        1: (Decimal(5), {"model": "m"}, None),
        2: (Decimal(1), None, None),
    }
    # Neither branch of the OR holds: only the unfiltered meter counts it.
    assert fold({"region": "us", "tier": "free", "tokens": Decimal(5)}) == {
        2: (Decimal(1), None, None)
    }
    # Passes the filter but lacks the property: recorded as skipped.
    assert fold({"region": "eu"})[1] == (None, {"model": ""}, "missing_property")
