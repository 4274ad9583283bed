"""What one QueryUsage answer can make meter hold (issue 10, "limits before work").

An adversarial test once asked for 20,000 rows of 10 group keys of 500 unique
characters each (102 MB): meter built it whole before the client refused it, 493 MB
peak RSS for one call, 980 MB for three (the prod pod limit is 512 Mi). Now an
answer is counted as it is read from PostgreSQL, refused past its limits (rows,
estimated bytes; larger ones for the service token) before the rest is read, and a
replica holds at most USAGEBILLING_QUERY_BYTES_IN_FLIGHT of answers at once. meter
runs as a process here, and its peak RSS (VmHWM) is measured per phase."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from services.common import db
from services.common.auth import on_behalf_of
from services.common.context import set_tenant
from services.common.errors import ResourceExhausted
from services.meter.api import MeterServicer
from services.meter.domain.query import AnswerLimits
from services.meter.domain.windows import MAX_TIME, MIN_TIME
from services.meter.service import AnswerBudget, MeterService
from services.meter.settings import DEFAULT_SERVICE_LIMITS, DEFAULT_TENANT_LIMITS
from services.meter.store import YIELD_EVERY, MeterStore, UsageGroup
from tests.integration.meter.harness import Meters, ev
from tools.devstack import DevStack
from tools.suite import Suite, create_tenant
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

pytestmark = pytest.mark.timeout(900)

EVENTS = 20_000
KEYS = [f"k{i}" for i in range(10)]
VALUE_CHARS = 500
# The events of customer "big": its answer (one row each, ~5.1 KB) is just
# under the tenants' 16 MiB.
BIG_CUSTOMER_EVENTS = 3_000
# README "Limits": meter's peak RSS (VmHWM) while answering this many concurrent
# queries of the largest answers allowed, or of answers refused at the limit
# (the prod pod limit is 512 Mi).
PEAK_BOUND_MB = 400
RECEIVE = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]


def _megabytes(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for pid {pid}")


def _reset_peak(pid: int) -> None:
    """Sets VmHWM back to the current RSS (proc(5), clear_refs "5")."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture
def suite(process_stack: DevStack, tmp_path: Path) -> Iterator[Suite]:
    """billing (keys and tenants) and meter, as processes, on a private stack."""
    running = Suite(process_stack.database_url, process_stack.nats_url, tmp_path / "logs")
    try:
        for service in ("billing", "meter"):
            running.start_service(service)
            running.wait_healthy(service)
        yield running
    finally:
        running.stop()


async def seed(suite: Suite) -> tuple[str, str, str]:
    """A tenant with a COUNT meter grouped by k0..k9 and EVENTS events, each of
    10 unique 500-character values, over the last day (written as the fold writes
    them: sending them through ingest only takes longer). Returns (tenant_id, API
    key, meter id)."""
    tenant_id, secret = create_tenant(suite, "answers")
    async with grpc.aio.insecure_channel(suite.address("meter")) as channel:
        meter = await meter_pb2_grpc.MeterServiceStub(channel).CreateMeter(
            meter_pb2.CreateMeterRequest(
                name="wide",
                event_name="wide",
                aggregation=meter_pb2.AGGREGATION_COUNT,
                group_by=KEYS,
            ),
            metadata=(("authorization", f"Bearer {secret}"),),
        )
    dims = ", ".join(f"'{k}', left(repeat(md5(i::text || '{k}'), 16), {VALUE_CHARS})" for k in KEYS)
    conn = await asyncpg.connect(suite.database_url)
    try:
        key = await conn.fetchval("SELECT key FROM meter.meters WHERE id = $1", meter.id)
        await conn.execute(
            "INSERT INTO meter.meter_events"
            " (meter_key, customer_id, event_time, event_id, value, text_value, dims)"
            " SELECT $1, CASE WHEN i < $3 THEN 'big' ELSE 'c' || i END,"
            " date_trunc('minute', now()) - (i % 1380) * interval '1 minute',"
            f" 'e' || i, NULL, NULL, jsonb_build_object({dims})"
            " FROM generate_series(0, $2 - 1) AS i",
            key,
            EVENTS,
            BIG_CUSTOMER_EVENTS,
        )
    finally:
        await conn.close()
    # Usage reads the rollups: add the rows to them as the fold would have.
    pool = await db.create_pool(suite.database_url, min_size=1, max_size=1)
    try:
        await MeterStore(pool).roll_up_stored(key, MIN_TIME, MAX_TIME)
    finally:
        await pool.close()
    return tenant_id, secret, meter.id


def query(meter_id: str, customer_id: str, group_by: Sequence[str]) -> meter_pb2.QueryUsageRequest:
    now = datetime.now(UTC)
    request = meter_pb2.QueryUsageRequest(
        meter_id=meter_id,
        customer_id=customer_id,
        group_by=list(group_by),
        window_size=meter_pb2.WINDOW_SIZE_MINUTE if group_by else meter_pb2.WINDOW_SIZE_NONE,
    )
    request.start_time.FromDatetime(now - timedelta(days=1))
    request.end_time.FromDatetime(now + timedelta(hours=1))
    return request


async def concurrently(
    suite: Suite,
    request: meter_pb2.QueryUsageRequest,
    metadata: Sequence[tuple[str, str]],
    calls: int,
) -> tuple[Counter[str], list[str], float, float]:
    """`calls` concurrent QueryUsage calls: their outcomes ("OK <rows>" or the
    code), the details of the refusals with a retry-after noted, meter's peak RSS
    in MB over the calls and the seconds they took."""
    pid = suite.processes["meter"].pid
    _reset_peak(pid)
    details: list[str] = []
    channels = [
        grpc.aio.insecure_channel(suite.address("meter"), options=RECEIVE) for _ in range(3)
    ]

    async def call(n: int) -> str:
        stub = meter_pb2_grpc.MeterServiceStub(channels[n % len(channels)])
        try:
            answer = await stub.QueryUsage(request, metadata=tuple(metadata), timeout=300)
        except grpc.aio.AioRpcError as error:
            trailers: Any = error.trailing_metadata() or ()
            retry = [v for k, v in trailers if k == "retry-after"]
            details.append(f"{error.details()} [retry-after {retry[0] if retry else None}]")
            return error.code().name
        return f"OK {len(answer.rows)}"

    started = time.monotonic()
    outcomes = Counter(await asyncio.gather(*(call(n) for n in range(calls))))
    seconds = time.monotonic() - started
    peak = _megabytes(pid, "VmHWM")
    for channel in channels:
        await channel.close(None)
    return outcomes, details, peak, seconds


def _report(label: str, outcomes: Counter[str], peak: float, seconds: float) -> None:
    print(f"\n{label}: {dict(outcomes)} in {seconds:.1f} s; meter peak RSS {peak:.0f} MB")


async def test_an_answer_over_the_tenant_limits_is_refused_before_it_is_built(
    suite: Suite,
) -> None:
    _, secret, meter_id = await seed(suite)
    as_tenant = (("authorization", f"Bearer {secret}"),)
    wide = query(meter_id, "", KEYS)  # 20,000 rows, ~102 MB
    pid = suite.processes["meter"].pid
    idle = _megabytes(pid, "VmRSS")
    for calls in (1, 3, 10):
        outcomes, details, peak, seconds = await concurrently(suite, wide, as_tenant, calls)
        _report(f"{calls} concurrent 102 MB queries with an API key", outcomes, peak, seconds)
        assert outcomes == Counter({"RESOURCE_EXHAUSTED": calls}), details
        assert peak < PEAK_BOUND_MB
    # The refusal names the figure, the limit and what to narrow.
    sizes = [d for d in details if "bytes per QueryUsage answer" in d]
    assert sizes, details
    assert f"{DEFAULT_TENANT_LIMITS.max_bytes:,} bytes" in sizes[0]
    for field in ("start_time", "window_size", "group_by", "customer_id"):
        assert field in sizes[0]
    # Every refusal is on the answer's size, or (replica busy) has a retry-after.
    assert all("bytes per QueryUsage" in d or "retry-after 1" in d for d in details), details
    print(f"idle RSS {idle:.0f} MB; refusal: {sizes[0]}")


async def test_maximum_size_answers_stay_within_the_pod_limit(suite: Suite) -> None:
    tenant_id, secret, meter_id = await seed(suite)
    as_tenant = (("authorization", f"Bearer {secret}"),)
    largest = query(meter_id, "big", KEYS)  # 3,000 rows, just under 16 MiB
    for calls in (1, 3, 10):
        outcomes, details, peak, seconds = await concurrently(suite, largest, as_tenant, calls)
        _report(
            f"{calls} concurrent maximum-size tenant answers (~16 MiB)", outcomes, peak, seconds
        )
        assert outcomes[f"OK {BIG_CUSTOMER_EVENTS}"] >= 1
        # Those not answered were refused for the replica's budget, with a retry-after.
        assert outcomes[f"OK {BIG_CUSTOMER_EVENTS}"] + outcomes["RESOURCE_EXHAUSTED"] == calls
        assert all("answers in flight" in d and "retry-after 1" in d for d in details), details
        assert peak < PEAK_BOUND_MB
    # The service token: billing's read of every customer (one row each), and the
    # wide query refused at the service's larger byte limit.
    as_service = on_behalf_of(suite.service_tokens["billing"], tenant_id)
    customers = 1 + EVENTS - BIG_CUSTOMER_EVENTS
    outcomes, _, peak, seconds = await concurrently(suite, query(meter_id, "", ()), as_service, 3)
    _report("3 concurrent bulk reads of every customer (service token)", outcomes, peak, seconds)
    assert outcomes == Counter({f"OK {customers}": 3})
    outcomes, details, peak, seconds = await concurrently(
        suite, query(meter_id, "", KEYS), as_service, 3
    )
    _report("3 concurrent 102 MB queries with the service token", outcomes, peak, seconds)
    assert outcomes == Counter({"RESOURCE_EXHAUSTED": 3}), details
    # Refused at the service's limit, or (another answer holding the replica's
    # budget) for the budget, with a retry-after.
    service_limit = f"at most {DEFAULT_SERVICE_LIMITS.max_bytes:,} bytes per QueryUsage answer"
    assert all(service_limit in d or "retry-after 1" in d for d in details), details
    assert peak < PEAK_BOUND_MB


class CountingStore(MeterStore):
    """The real store, counting the slices of aggregated rows it has read."""

    slices = 0

    async def usage(self, *args: Any, **kwargs: Any) -> AsyncGenerator[list[UsageGroup], None]:
        async with contextlib.aclosing(super().usage(*args, **kwargs)) as slices:
            async for groups in slices:
                self.slices += 1
                yield groups


async def test_each_caller_kind_has_its_limits_checked_as_rows_are_read(meters: Meters) -> None:
    """In-process, with small limits: an API key's answer over its row limit is
    refused after reading about that many rows (not all of them); the service
    token's larger limits answer the same query whole."""
    store = CountingStore(meters.store.pool)
    servicer = MeterServicer(
        MeterService(store),
        store,
        tenant_limits=AnswerLimits(max_rows=1_000, max_bytes=10 * 2**20),
        service_limits=AnswerLimits(max_rows=10_000, max_bytes=10 * 2**20),
        budget=AnswerBudget(64 * 2**20),
    )
    tenant = meters.new_tenant()
    meter = await meters.create(tenant, group_by=["k"])
    start = datetime(2024, 5, 1, tzinfo=UTC)
    await meters.send(
        tenant,
        [ev(f"e{i}", f"c{i}", start + timedelta(seconds=i), k=f"v{i}") for i in range(5_000)],
    )
    request = meter_pb2.QueryUsageRequest(
        meter_id=meter.id, group_by=["k"], window_size=meter_pb2.WINDOW_SIZE_HOUR
    )
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(start + timedelta(days=1))
    set_tenant(tenant, "an-api-key")
    with pytest.raises(ResourceExhausted, match=r"more than 1,000 rows") as caught:
        await servicer.QueryUsage(request, None)
    assert "customer_id" in str(caught.value)
    # 1,001 rows read in slices of YIELD_EVERY: three slices, not all ten.
    assert store.slices == -(-1_001 // YIELD_EVERY)
    set_tenant(tenant)  # the service token acts for the tenant
    answer = await servicer.QueryUsage(request, None)
    assert len(answer.rows) == 5_000
    assert {r.group["k"] for r in answer.rows} == {f"v{i}" for i in range(5_000)}
    # Nothing stays reserved once the calls are over.
    assert servicer._budget.held == 0
    # A narrowed query fits the API key's limits.
    request.customer_id = "c42"
    set_tenant(tenant, "an-api-key")
    answer = await servicer.QueryUsage(request, None)
    assert [(r.customer_id, dict(r.group), r.value) for r in answer.rows] == [
        ("c42", {"k": "v42"}, "1")
    ]


async def test_a_query_that_fits_is_still_answered_whole(suite: Suite) -> None:
    """The limits refuse only what is over them: a wide query of one ordinary
    customer answers its one row, and the same for the row limit's edge is shown
    by the maximum-size test above."""
    _, secret, meter_id = await seed(suite)
    async with grpc.aio.insecure_channel(suite.address("meter"), options=RECEIVE) as channel:
        answer = await meter_pb2_grpc.MeterServiceStub(channel).QueryUsage(
            query(meter_id, "c5000", KEYS), metadata=(("authorization", f"Bearer {secret}"),)
        )
    assert len(answer.rows) == 1
    assert answer.rows[0].value == "1"
    assert len(answer.rows[0].group["k3"]) == VALUE_CHARS
