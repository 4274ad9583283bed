"""A call's cost in row units: what its events cost meter to fold."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ingest.domain.fold_cost import (
    CONDITION_UNITS,
    GROUP_BY_KEY_UNITS,
    MeterShape,
    call_cost,
    meter_units,
    weights,
)
from services.ingest.meter_weights import conditions, shape
from usagebilling.meter.v1 import meter_pb2


def test_a_plain_meter_is_one_unit_and_width_costs_more() -> None:
    assert meter_units(MeterShape("f")) == 1.0
    wide = MeterShape("f", group_by_keys=10, conditions=10)
    assert meter_units(wide) == pytest.approx(1 + 10 * GROUP_BY_KEY_UNITS + 10 * CONDITION_UNITS)
    assert meter_units(MeterShape("f", group_by_keys=10)) > meter_units(
        MeterShape("f", conditions=10)
    )


def test_weights_sum_the_meters_on_each_name() -> None:
    meters = [MeterShape("f")] * 20 + [MeterShape("g", group_by_keys=2), MeterShape("g")]
    assert weights(meters) == {"f": 20.0, "g": 2.0 + 2 * GROUP_BY_KEY_UNITS}
    assert weights([]) == {}


def test_a_call_costs_its_events_weights_and_at_least_one_per_event() -> None:
    w = {"f": 20.0, "g": 2.5, "tiny": 0.2}
    # Unknown names (no meter) and names lighter than one unit cost one each:
    # ingest stores and publishes them all the same.
    assert call_cost(["x", "y", "tiny"], w) == 3
    assert call_cost(["f"] * 1000, w) == 20_000
    assert call_cost(["g", "f"], w) == 23  # 22.5 rounded up
    assert call_cost([], w) == 0
    assert call_cost(["f"] * 3, {}) == 3  # weights unknown: one per event


def test_conditions_count_nested_filters() -> None:
    f = meter_pb2.Filter(
        conditions=[meter_pb2.Condition(key="a"), meter_pb2.Condition(key="b")],
        filters=[
            meter_pb2.Filter(
                conditions=[meter_pb2.Condition(key="c")],
                filters=[meter_pb2.Filter(conditions=[meter_pb2.Condition(key="d")] * 3)],
            )
        ],
    )
    assert conditions(f) == 6
    meter = meter_pb2.Meter(event_name="f", group_by=["a", "b"], filter=f)
    assert shape(meter) == MeterShape("f", group_by_keys=2, conditions=6)


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.sampled_from(["a", "b", "c", "d"]), max_size=50),
    st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(0, 100), max_size=3),
)
def test_the_cost_is_at_least_the_event_count_and_at_least_the_weights(
    names: list[str], w: dict[str, float]
) -> None:
    cost = call_cost(names, w)
    assert cost >= len(names)
    assert cost >= sum(w.get(n, 0.0) for n in names) - 1e-6
    assert cost <= sum(max(1.0, w.get(n, 0.0)) for n in names) + 1
