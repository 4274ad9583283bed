"""The largest calls ingest accepts flow through the relay and meter (issue 10's
measured cases): a call over NATS's max_payload is published in parts and every
event is counted."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import nats
import pytest

from tests.client import Client, event, eventually
from tools.suite import Suite
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(240)


async def test_the_test_stack_runs_nats_with_the_default_max_payload(suite: Suite) -> None:
    # So that the cases below really go through the relay's split.
    nc = await nats.connect(suite.nats_url)
    try:
        assert nc.max_payload == 1024 * 1024
    finally:
        await nc.close()


def _keys(count: int) -> dict[str, str]:
    """`count` metadata keys of 100 characters, each with a 500-character value."""
    return {f"k{n:02d}".ljust(100, "x"): chr(ord("a") + n % 26) * 500 for n in range(count)}


def _wide_events(name: str) -> list[ingest_pb2.Event]:
    when = datetime.now(UTC)
    return [event(f"w-{n}", "c", name, when, **_keys(50)) for n in range(40)]


def _long_events(name: str) -> list[ingest_pb2.Event]:
    when = datetime.now(UTC)
    return [event(f"l-{n}", "c", name, when, a="a" * 500, b="b" * 500) for n in range(1000)]


@pytest.mark.parametrize(
    ("build", "expected"),
    [(_wide_events, 40), (_long_events, 1000)],
    ids=["40-events-50-keys", "1000-events-two-strings"],
)
async def test_a_call_over_max_payload_is_accepted_and_every_event_counted(
    client: Client, build: Callable[[str], list[ingest_pb2.Event]], expected: int
) -> None:
    name = f"big.{uuid.uuid4().hex[:8]}"
    meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=name, event_name=name, aggregation=meter_pb2.AGGREGATION_COUNT
        ),
    )
    request = ingest_pb2.IngestEventsRequest(events=build(name))
    assert request.ByteSize() > 1024 * 1024  # more than one NATS message may hold
    answer = await client.call(client.ingest.IngestEvents, request)
    assert not answer.rejections
    assert answer.accepted_count == expected
    accepted = time.monotonic()

    usage = meter_pb2.QueryUsageRequest(meter_id=meter.id, customer_id="c")
    now = datetime.now(UTC)
    usage.start_time.FromDatetime(now - timedelta(hours=1))
    usage.end_time.FromDatetime(now + timedelta(hours=1))

    async def counted() -> int:
        rows = (await client.call(client.meter.QueryUsage, usage)).rows
        return int(rows[0].value) if rows else 0

    total = await eventually(counted, lambda n: n >= expected, 90)
    delay = time.monotonic() - accepted
    print(
        f"\n{request.ByteSize()} bytes, {expected} events: all counted {delay:.2f} s after the ack"
    )
    assert total == expected
