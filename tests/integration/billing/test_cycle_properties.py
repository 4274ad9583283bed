"""Property tests of the billing cycle against a real PostgreSQL: running it
again changes nothing, and running it in steps gives the invoices one run gives."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.billing.builders import (
    DAY,
    WEEK,
    graduated,
    invoices_of,
    package,
    tenant_with,
)
from tests.integration.billing.conftest import Billing
from usagebilling.billing.v1 import product_pb2

pytestmark = pytest.mark.integration


NOW = datetime(2024, 6, 1, tzinfo=UTC)
H = timedelta(hours=1)

subscriptions = st.lists(
    st.tuples(st.sampled_from([DAY, WEEK]), st.integers(min_value=1, max_value=20 * 24)),
    min_size=1,
    max_size=4,
)
# (customer index, hours before NOW, calls, gigabytes)
events = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=3),
        st.integers(min_value=0, max_value=20 * 24),
        st.integers(min_value=0, max_value=3000),
        st.decimals(min_value=0, max_value=50, places=3),
    ),
    max_size=25,
)


def _content(invoice: Any, customers: dict[str, str]) -> tuple[Any, ...]:
    """What an invoice bills, without its id and number (sortable)."""
    return (
        customers[invoice.subscription_id],
        invoice.period_start,
        invoice.period_end,
        invoice.status,
        json.dumps(invoice.lines, sort_keys=True),
        invoice.total_minor,
    )


async def _tenant(
    billing: Billing,
    plan: list[tuple[product_pb2.BillingInterval.ValueType, int]],
    usage: list[tuple[int, int, int, Any]],
) -> tuple[str, dict[str, str]]:
    """One tenant, a product per interval, a customer per subscription."""
    tenant_id = ""
    customers: dict[str, str] = {}
    for i, (interval, hours_ago) in enumerate(plan):
        made = await tenant_with(
            billing,
            interval=interval,
            start=NOW - hours_ago * H,
            now=NOW,
            customers=[f"c{i}"],
            fixed_price_minor=999,
            meters=("calls", "gb"),
            prices=[
                graduated("calls", ("100", "0.02"), ("1000", "0.015"), ("", "0.001")),
                package("gb", "2.5", "0.33"),
            ],
            tenant_id=tenant_id,
        )
        tenant_id = made.id
        customers[made.subscriptions[0].id] = f"c{i}"
    for customer, hours_ago, calls, gigabytes in usage:
        when = NOW - hours_ago * H - timedelta(minutes=1)
        billing.meters.add(tenant_id, "calls", f"c{customer}", when, calls)
        billing.meters.add(tenant_id, "gb", f"c{customer}", when, gigabytes)
    return tenant_id, customers


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    plan=subscriptions,
    usage=events,
    steps=st.lists(st.integers(min_value=0, max_value=20 * 24), min_size=1, max_size=3),
)
async def test_the_cycle_is_idempotent_and_steps_add_up_to_one_run(
    billing: Billing,
    plan: list[tuple[product_pb2.BillingInterval.ValueType, int]],
    usage: list[tuple[int, int, int, Any]],
    steps: list[int],
) -> None:
    stepped, customers = await _tenant(billing, plan, usage)
    at_once, customers_too = await _tenant(billing, plan, usage)

    # `stepped` runs the cycle at several earlier times, then now; `at_once` only now.
    for hours_ago in sorted(steps, reverse=True):
        await billing.invoicing.run_cycle(stepped, NOW - hours_ago * H, NOW)
    await billing.invoicing.run_cycle(stepped, NOW, NOW)
    built = await billing.invoicing.run_cycle(at_once, NOW, NOW)

    first = await invoices_of(billing, at_once)
    assert len(built) == len(first)
    assert sorted(_content(i, customers_too) for i in first) == sorted(
        _content(i, customers) for i in await invoices_of(billing, stepped)
    )
    # Each tenant's numbers have no gap.
    for tenant_id in (stepped, at_once):
        numbers = [i.number for i in await invoices_of(billing, tenant_id) if i.number]
        assert sorted(numbers) == [f"INV-{n:06d}" for n in range(1, len(numbers) + 1)]

    # Running it again changes nothing.
    assert await billing.invoicing.run_cycle(at_once, NOW, NOW) == []
    assert await invoices_of(billing, at_once) == first
