"""ingest against a real PostgreSQL: every metadata value it accepts comes back
from the event log with the same kind and the same value (doubles bit for bit),
rows written before the encoding kept kinds still read, and a call over the
tenant's rate stores nothing."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common import db
from services.common.errors import ResourceExhausted
from services.common.values import value_problem
from services.ingest import convert
from services.ingest.__main__ import MIGRATIONS
from services.ingest.domain.rate_limit import RateLimiter
from services.ingest.service import Ingestor
from services.ingest.store import IngestStore
from tests.values import proto_value, same_value
from usagebilling.common.v1 import value_pb2
from usagebilling.ingest.v1 import ingest_pb2

EDGES: list[Any] = [
    1e16,
    -1e16,
    1e19,
    2.0**63,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    5e-324,
    2.2250738585072014e-308,
    -0.0,
    0.0,
    0.1,
    9999999999999998.0,
    2**63 - 1,
    -(2**63),
    0,
    True,
    False,
    "",
    "1e1000",
    "-1e-1000",
    "0e-1000",
    "9" * 500,
    "0e-20000",  # refused
    "1e1001",  # refused
    math.nan,  # refused
    math.inf,  # refused
    "nul\x00",  # refused
]

values = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(),
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.from_regex(r"[+-]?[0-9]{1,4}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,5})?", fullmatch=True),
    st.booleans(),
)


@pytest.fixture(scope="module")
async def store(stack_urls: tuple[str, str]) -> AsyncIterator[IngestStore]:
    pool = await db.create_pool(stack_urls[0], min_size=1, max_size=4)
    try:
        await db.migrate(pool, "ingest", MIGRATIONS)
        yield IngestStore(pool)
    finally:
        await pool.close()


def _ingestor(store: IngestStore, **kwargs: Any) -> Ingestor:
    return Ingestor(store, lambda: None, timedelta(days=35), **kwargs)


def _events(batch: list[dict[str, Any]]) -> list[ingest_pb2.Event]:
    now = datetime.now(UTC)
    events = []
    for i, metadata in enumerate(batch):
        message = ingest_pb2.Event(event_id=f"e{i}", customer_id="c1", event_name="vals")
        message.timestamp.FromDatetime(now - timedelta(seconds=i))
        for key, value in metadata.items():
            message.metadata[key].CopyFrom(proto_value(value))
        events.append(message)
    return events


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=st.lists(st.dictionaries(st.sampled_from("nuk"), values, max_size=3), max_size=8))
async def test_what_is_accepted_comes_back_with_its_kind_and_value(
    store: IngestStore, batch: list[dict[str, Any]]
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    sent = _events(batch)
    result = await _ingestor(store).ingest(tenant, sent, datetime.now(UTC))
    refused = {i for i, m in enumerate(batch) if any(value_problem(v) for v in m.values())}
    assert {r.index for r in result.rejections} == refused
    for r in result.rejections:
        # The reason names one key at fault (a protobuf map has no order).
        at_fault = [k for k, v in batch[r.index].items() if value_problem(v)]
        assert any(r.reason.startswith(f"metadata[{key!r}] ") for key in at_fault), r.reason
    assert result.accepted == len(batch) - len(refused)

    accepted = {f"e{i}": sent[i] for i in range(len(batch)) if i not in refused}
    listed, cut = await store.list_events(
        tenant,
        customer_id="",
        event_name="",
        start=None,
        end=None,
        after=None,
        limit=100,
        max_bytes=1 << 20,
    )
    assert not cut
    replayed = [
        e
        async for e in store.replay(
            tenant, ["vals"], datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC)
        )
    ]
    for rows in (listed, replayed, [await store.get_event(tenant, i) for i in accepted]):
        assert sorted(r.event_id for r in rows) == sorted(accepted)
        for row in rows:
            back = convert.proto_event(row)
            want = accepted[row.event_id].metadata
            assert set(back.metadata) == set(want)
            for key in want:
                assert same_value(back.metadata[key], want[key]), (
                    key,
                    back.metadata[key],
                    want[key],
                )


async def test_rows_written_before_kinds_were_kept_still_read(store: IngestStore) -> None:
    # What the old encoding left behind: number_value 1e19 stored as the jsonb
    # integer 10000000000000000000 (GetEvent answered INTERNAL for it), and
    # 1e16 stored as an integer inside int64 (it reads back as int_value, as before).
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    await store.pool.execute(
        "WITH k AS (INSERT INTO ingest.event_ids VALUES ($1, 'old', now()))"
        " INSERT INTO ingest.events (tenant_id, event_id, customer_id, event_name, event_time,"
        " metadata) VALUES ($1, 'old', 'c1', 'vals', now(), $2::text::jsonb)",
        tenant,
        '{"big": 1e19, "huge": 1.7976931348623157e308, "int": 1e16, "f": 0.5, "s": "x"}',
    )
    back = convert.proto_event(await store.get_event(tenant, "old")).metadata
    assert back["big"] == value_pb2.Value(number_value=1e19)
    assert back["huge"] == value_pb2.Value(number_value=1.7976931348623157e308)
    assert back["int"] == value_pb2.Value(int_value=10**16)
    assert back["f"] == value_pb2.Value(number_value=0.5)
    assert back["s"] == value_pb2.Value(string_value="x")


async def test_a_call_over_the_rate_is_refused_whole_before_anything_is_stored(
    store: IngestStore,
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    clock = [100.0]
    tick: Callable[[], float] = lambda: clock[0]  # noqa: E731
    ingestor = _ingestor(store, limiter=RateLimiter(rate=100, burst=1000), clock=tick)
    first = await ingestor.ingest(tenant, _events([{}] * 8)[:8], datetime.now(UTC))
    assert first.accepted == 8
    big = [
        ingest_pb2.Event(event_id=f"b{i}", customer_id="c1", event_name="vals") for i in range(993)
    ]
    with pytest.raises(ResourceExhausted) as refused:
        await ingestor.ingest(tenant, big, datetime.now(UTC))
    # 992 tokens left, 993 wanted: 1 token at 100/s.
    assert refused.value.retry_after == pytest.approx(0.01)
    assert "retry after" in str(refused.value)
    count = await store.pool.fetchval(
        "SELECT count(*) FROM ingest.events WHERE tenant_id = $1", tenant
    )
    assert count == 8
    assert refused.value.retry_after is not None
    clock[0] += refused.value.retry_after
    assert (await ingestor.ingest(tenant, big, datetime.now(UTC))).accepted == 993
