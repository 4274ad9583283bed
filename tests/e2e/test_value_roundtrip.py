"""One definition of a storable value, end to end (ingest, NATS, meter, the event
log, all real): whatever ingest accepts, meter folds (SUM and UNIQUE_COUNT),
PostgreSQL stores, and GetEvent, ListEvents and ReplayEvents return with the same
kind and value (doubles bit for bit); whatever `value_problem` refuses is
rejected per event, with a reason naming the key, beside valid events that are
accepted."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, localcontext
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.values import numeric_string, value_problem
from services.meter.convert import meta_value
from services.meter.domain.values import canonical
from tests.client import Client, eventually
from tests.values import proto_value, same_value
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(900)

EVENT = "vals"
INT64_MAX = 2**63 - 1
# The measured cases of issue 10 and the bounds on both sides of each rule.
VALID_EDGES: list[Any] = [
    1e19,
    1e16,
    -1e16,
    2.0**63,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    5e-324,
    2.2250738585072014e-308,
    -0.0,
    0.1,
    9999999999999998.0,
    INT64_MAX,
    -(2**63),
    True,
    "",
    "1e1000",
    "-9.5e1000",
    "1e-1000",
    "0e-1000",
    "9" * 500,
    "007",
]
REFUSED_EDGES: list[Any] = [
    "0e-20000",
    "1e1001",
    "-1e-1001",
    math.nan,
    math.inf,
    -math.inf,
    "nul\x00",
    "v" * 501,
]

values = st.one_of(
    st.sampled_from(VALID_EDGES + REFUSED_EDGES),
    st.integers(-(2**63), INT64_MAX),
    st.floats(),
    st.text(st.characters(codec="utf-8"), max_size=8),
    st.from_regex(r"[+-]?[0-9]{1,3}(\.[0-9]{0,2})?([eE][+-]?[0-9]{1,5})?", fullmatch=True),
    st.booleans(),
)
batches = st.lists(
    st.dictionaries(st.sampled_from(["n", "u", "k"]), values, max_size=3), max_size=6
)


def as_number(value: Any) -> Decimal | None:
    """What a SUM adds for a value (API.md): a double through its shortest
    repr, an int exactly, a string that reads as a number; never a bool."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return numeric_string(value)


def exact_sum(numbers: list[Decimal]) -> Decimal:
    with localcontext() as context:
        context.prec = 10_000  # exact for values within 1e±1000
        return sum(numbers, Decimal(0))


@dataclass
class Meters:
    client: Client
    sum_id: str
    unique_id: str


async def create_meter(client: Client, aggregation: int, prop: str) -> str:
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=f"m-{uuid.uuid4().hex[:8]}",
            event_name=EVENT,
            aggregation=aggregation,  # type: ignore[arg-type]
            property=prop,
        ),
    )
    return str(meter.id)


async def usage(client: Client, meter_id: str, customer: str = "") -> list[tuple[str, str]]:
    now = datetime.now(UTC)
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id=customer)
    request.start_time.FromDatetime(now - timedelta(hours=1))
    request.end_time.FromDatetime(now + timedelta(hours=1))
    answer = await client.call(client.meter.QueryUsage, request)
    return sorted((r.customer_id, r.value) for r in answer.rows)


@pytest.fixture(scope="module")
async def meters(suite: Suite) -> AsyncIterator[Meters]:
    _, secret = create_tenant(suite, f"values-{uuid.uuid4().hex[:8]}")
    client = Client({s: suite.address(s) for s in SERVICES}, secret)
    try:
        yield Meters(
            client,
            await create_meter(client, meter_pb2.AGGREGATION_SUM, "n"),
            await create_meter(client, meter_pb2.AGGREGATION_UNIQUE_COUNT, "u"),
        )
    finally:
        await client.close()


async def ingest_and_check(
    client: Client, customer: str, batch: list[dict[str, Any]]
) -> dict[str, ingest_pb2.Event]:
    """Sends the batch; checks the verdict per event and that GetEvent,
    ListEvents and ReplayEvents give back every accepted value. Returns the
    accepted events by id."""
    now = datetime.now(UTC)
    sent = []
    for i, metadata in enumerate(batch):
        message = ingest_pb2.Event(
            event_id=f"{customer}-{i}", customer_id=customer, event_name=EVENT
        )
        message.timestamp.FromDatetime(now - timedelta(milliseconds=i))
        for key, value in metadata.items():
            message.metadata[key].CopyFrom(proto_value(value))
        sent.append(message)
    answer = await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=sent)
    )
    refused = {i for i, m in enumerate(batch) if any(value_problem(v) for v in m.values())}
    assert {r.index for r in answer.rejections} == refused
    for r in answer.rejections:
        bad = [k for k, v in batch[r.index].items() if value_problem(v)]
        assert any(r.reason.startswith(f"metadata[{k!r}] ") for k in bad), r.reason
    assert answer.accepted_count == len(batch) - len(refused)
    accepted = {m.event_id: m for i, m in enumerate(sent) if i not in refused}

    got = [
        await client.call(client.ingest.GetEvent, ingest_pb2.GetEventRequest(event_id=i))
        for i in accepted
    ]
    listed = (
        await client.call(
            client.ingest.ListEvents, ingest_pb2.ListEventsRequest(customer_id=customer)
        )
    ).events
    replay = ingest_pb2.ReplayEventsRequest(event_names=[EVENT])
    replay.start_time.FromDatetime(now - timedelta(minutes=1))
    replayed = [
        e
        async for e in client.ingest.ReplayEvents(replay, metadata=client.metadata, timeout=60)
        if e.customer_id == customer
    ]
    for source, events in (("GetEvent", got), ("ListEvents", listed), ("Replay", replayed)):
        assert sorted(e.event_id for e in events) == sorted(accepted), source
        for e in events:
            want = accepted[e.event_id].metadata
            assert set(e.metadata) == set(want), source
            for key in want:
                assert same_value(e.metadata[key], want[key]), (
                    source,
                    key,
                    e.metadata[key],
                    want[key],
                )
    return accepted


def expected_usage(accepted: dict[str, ingest_pb2.Event]) -> tuple[Decimal, int]:
    numbers = []
    uniques = set()
    for message in accepted.values():
        if "n" in message.metadata:
            kind = message.metadata["n"].WhichOneof("kind")
            number = as_number(getattr(message.metadata["n"], kind)) if kind else None
            if number is not None:
                numbers.append(number)
        if "u" in message.metadata:
            uniques.add(canonical(meta_value(message.metadata["u"])))
    return exact_sum(numbers), len(uniques)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(batch=batches)
async def test_accepted_values_are_folded_stored_and_returned_unchanged(
    meters: Meters, batch: list[dict[str, Any]]
) -> None:
    client = meters.client
    customer = f"c-{uuid.uuid4().hex[:10]}"
    # An anchor event, so that the customer has a usage row to compare.
    accepted = await ingest_and_check(client, customer, [{"n": 1, "u": "anchor"}, *batch])
    total, unique = expected_usage(accepted)

    async def folded() -> tuple[Decimal | None, int | None]:
        sums = await usage(client, meters.sum_id, customer)
        uniques = await usage(client, meters.unique_id, customer)
        return (
            Decimal(sums[0][1]) if sums else None,
            int(uniques[0][1]) if uniques else None,
        )

    got = await eventually(folded, lambda g: g == (total, unique), timeout=60)
    assert got == (total, unique)


async def test_the_measured_edges_round_trip_and_a_new_meter_backfills_them(
    client: Client,
) -> None:
    # One event per edge (1e19 made GetEvent answer INTERNAL and a new meter's
    # backfill end in FAILED), the refused edges beside them.
    customer = "edges"
    batch: list[dict[str, Any]] = [{"n": v, "u": v} for v in VALID_EDGES + REFUSED_EDGES]
    accepted = await ingest_and_check(client, customer, batch)
    assert len(accepted) == len(VALID_EDGES)
    total, unique = expected_usage(accepted)

    # Meters created after the events: they count them by replaying the log.
    sum_id = await create_meter(client, meter_pb2.AGGREGATION_SUM, "n")
    unique_id = await create_meter(client, meter_pb2.AGGREGATION_UNIQUE_COUNT, "u")

    async def states() -> list[int]:
        return [
            int(
                (
                    await client.call(client.meter.GetMeter, meter_pb2.GetMeterRequest(id=m))
                ).backfill_state
            )
            for m in (sum_id, unique_id)
        ]

    done = [meter_pb2.BACKFILL_STATE_DONE] * 2
    assert (
        await eventually(
            states, lambda s: s == done or meter_pb2.BACKFILL_STATE_FAILED in s, timeout=60
        )
        == done
    )

    async def folded() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        return await usage(client, sum_id), await usage(client, unique_id)

    got_sum, got_unique = await eventually(folded, lambda g: bool(g[0]) and bool(g[1]), timeout=60)
    assert Decimal(got_sum[0][1]) == total
    assert int(got_unique[0][1]) == unique
