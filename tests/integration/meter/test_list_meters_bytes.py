"""A meter's filter is bounded in bytes, and ListMeters pages in bytes too: the
adversarial "ballast" meters (38 IN conditions of 100 values of 500 characters,
1.9 MB each) are refused, and a tenant's full quota of the largest meters allowed
lists in pages under MAX_LIST_METERS_BYTES, every meter once (real PostgreSQL)."""

from __future__ import annotations

import pytest

from services.common.context import set_tenant
from services.common.errors import InvalidArgument
from services.meter.api import MAX_LIST_METERS_BYTES
from services.meter.domain.filters import MAX_FILTER_BYTES
from tests.integration.meter.harness import Meters
from usagebilling.common.v1 import value_pb2
from usagebilling.meter.v1 import meter_pb2


def _in_filter(conditions: int, values: int, length: int) -> meter_pb2.Filter:
    f = meter_pb2.Filter(conjunction=meter_pb2.CONJUNCTION_OR)
    for i in range(conditions):
        f.conditions.add(
            key=f"k{i}",
            operator=meter_pb2.OPERATOR_IN,
            values=[
                value_pb2.Value(string_value=f"{j:04d}".ljust(length, "x")) for j in range(values)
            ],
        )
    return f


async def test_the_ballast_meter_is_refused_naming_filter_and_the_limit(meters: Meters) -> None:
    tenant = meters.new_tenant()
    ballast = _in_filter(38, 100, 500)
    assert ballast.ByteSize() > 1_900_000
    with pytest.raises(InvalidArgument) as refused:
        await meters.create(tenant, filter=ballast)
    assert str(refused.value).startswith(f"filter: at most {MAX_FILTER_BYTES} bytes")
    # Exactly at the limit is taken: key "k0" (2 bytes) and values of the rest.
    at_limit = meter_pb2.Filter()
    values = [value_pb2.Value(string_value="é" * 250) for _ in range(32)]  # 500 bytes each
    rest = MAX_FILTER_BYTES - 2 - 32 * 500
    values.append(value_pb2.Value(string_value="y" * rest))
    at_limit.conditions.add(key="k0", operator=meter_pb2.OPERATOR_IN, values=values)
    created = await meters.create(tenant, filter=at_limit)
    assert len(created.filter.conditions[0].values) == 33
    at_limit.conditions[0].values[-1].string_value += "y"
    with pytest.raises(InvalidArgument, match=r"^filter: at most 16384 bytes"):
        await meters.create(tenant, filter=at_limit)


async def test_list_meters_pages_by_bytes_and_paging_returns_every_meter(
    meters: Meters,
) -> None:
    tenant = meters.new_tenant()
    ids = set()
    for i in range(100):  # the tenant quota, each meter near its size limit
        f = _in_filter(1, 33, 490)  # 33 x 490 + 2 bytes: just under 16 KiB
        made = await meters.create(
            tenant, event_name=f"e{i % 10}", filter=f, description="d" * 4096
        )
        ids.add(made.id)
    set_tenant(tenant)
    seen: list[str] = []
    token = ""
    sizes: list[int] = []
    for _ in range(20):
        page = await meters.servicer.ListMeters(
            meter_pb2.ListMetersRequest(page_size=1000, page_token=token), None
        )
        sizes.append(page.ByteSize())
        seen += [m.id for m in page.meters]
        token = page.next_page_token
        if not token:
            break
    print("ListMeters page sizes (bytes):", sizes)
    assert len(sizes) >= 2  # 100 meters of ~20 KiB do not fit one page
    assert all(size <= MAX_LIST_METERS_BYTES for size in sizes)
    assert sizes[0] > MAX_LIST_METERS_BYTES // 2  # pages are filled, not tiny
    assert len(seen) == len(set(seen)) == 100
    assert set(seen) == ids
