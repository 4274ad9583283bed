"""The filter byte limit (MAX_FILTER_BYTES): keys and values of the whole tree,
strings in UTF-8 bytes, measured on the protobuf request and on the domain filter
alike, and refused in bounded time."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from services.common.errors import InvalidArgument
from services.meter.domain.filters import (
    MAX_FILTER_BYTES,
    Condition,
    Filter,
    Operator,
    check_filter_size,
    filter_bytes,
    validate_filter,
)
from usagebilling.common.v1 import value_pb2
from usagebilling.meter.v1 import meter_pb2


def _proto(values: list[str], key: str = "k") -> meter_pb2.Filter:
    f = meter_pb2.Filter()
    f.conditions.add(
        key=key,
        operator=meter_pb2.OPERATOR_IN,
        values=[value_pb2.Value(string_value=v) for v in values],
    )
    return f


def test_bytes_count_utf8_keys_values_and_nested_filters() -> None:
    # "é" is 2 bytes, "€" 3, a number or a bool 8; nested filters count.
    domain = Filter(
        conditions=(Condition("ké", Operator.IN, values=("€", Decimal(1), True)),),
        filters=(Filter(conditions=(Condition("a", Operator.EQUALS, value="bc"),)),),
    )
    assert filter_bytes(domain) == 3 + 3 + 8 + 8 + 1 + 2
    proto = meter_pb2.Filter()
    proto.conditions.add(
        key="ké",
        operator=meter_pb2.OPERATOR_IN,
        values=[
            value_pb2.Value(string_value="€"),
            value_pb2.Value(number_value=1),
            value_pb2.Value(bool_value=True),
        ],
    )
    proto.filters.add().conditions.add(
        key="a", operator=meter_pb2.OPERATOR_EQUALS, value=value_pb2.Value(string_value="bc")
    )
    proto.filters[0].conditions.add(key="e", operator=meter_pb2.OPERATOR_EXISTS)
    assert filter_bytes(proto) == filter_bytes(domain) + 1  # and the EXISTS key


def test_at_the_limit_passes_one_byte_over_is_invalid_argument_naming_filter() -> None:
    values = ["é" * 250] * 32 + ["y" * (MAX_FILTER_BYTES - 1 - 32 * 500)]
    check_filter_size(_proto(values))
    validate_filter(Filter(conditions=(Condition("k", Operator.IN, values=tuple(values)),)))
    over = [*values[:-1], values[-1] + "y"]
    with pytest.raises(InvalidArgument) as refused:
        check_filter_size(_proto(over))
    assert str(refused.value) == (
        "filter: at most 16384 bytes of condition keys and values in a filter"
        " (strings in UTF-8), nested filters included"
    )
    with pytest.raises(InvalidArgument, match=r"^meter\.filter: at most 16384 bytes"):
        validate_filter(
            Filter(conditions=(Condition("k", Operator.IN, values=tuple(over)),)), "meter.filter"
        )


def test_the_ballast_filter_is_refused_cheaply() -> None:
    # The adversarial filter: 38 IN conditions of 100 values of 500 characters
    # (4-byte characters here: some 7.6 MB of strings), under the count limits.
    f = meter_pb2.Filter()
    for i in range(38):
        f.conditions.add(
            key=f"k{i}",
            operator=meter_pb2.OPERATOR_IN,
            values=[value_pb2.Value(string_value="😀" * 500)] * 100,
        )
    begin = time.process_time()
    with pytest.raises(InvalidArgument, match=r"^filter: at most 16384 bytes"):
        check_filter_size(f)
    spent = time.process_time() - begin
    print(f"ballast refused in {spent * 1000:.2f} ms of CPU")
    assert spent < 0.5  # counting stops at the first byte over the limit
