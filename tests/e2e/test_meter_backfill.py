"""Backfill: a new meter counts what ingest already holds for its event name,
replayed over gRPC, and the events that arrive while it backfills count once."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from tests.client import Client, event, eventually
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2


async def _create(
    client: Client, aggregation: meter_pb2.Aggregation.ValueType, prop: str = ""
) -> meter_pb2.Meter:
    meter: meter_pb2.Meter = await client.call(
        client.meter.CreateMeter,
        meter_pb2.CreateMeterRequest(
            name=f"m-{uuid.uuid4().hex[:8]}",
            event_name="api.call",
            aggregation=aggregation,
            property=prop,
        ),
    )
    return meter


async def _ingest(client: Client, events: list[ingest_pb2.Event]) -> None:
    answer = await client.call(
        client.ingest.IngestEvents, ingest_pb2.IngestEventsRequest(events=events)
    )
    assert answer.accepted_count == len(events), answer


async def _usage(client: Client, meter_id: str, start: datetime, end: datetime) -> dict[str, str]:
    request = meter_pb2.QueryUsageRequest(meter_id=meter_id)
    request.start_time.FromDatetime(start)
    request.end_time.FromDatetime(end)
    response = await client.call(client.meter.QueryUsage, request)
    return {r.customer_id: r.value for r in response.rows}


async def _backfill_state(client: Client, meter_id: str) -> int:
    meter = await client.call(client.meter.GetMeter, meter_pb2.GetMeterRequest(id=meter_id))
    return int(meter.backfill_state)


async def test_a_meter_created_after_its_events_counts_them(client: Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now - timedelta(days=31), now + timedelta(minutes=5)
    # A witness meter that exists before the events: once it has counted them, the
    # consumer is done with them, and only the backfill can count them again.
    witness = await _create(client, meter_pb2.AGGREGATION_COUNT)
    events = [
        event(f"e-{i}", f"cus-{i % 3}", "api.call", now - timedelta(days=30, seconds=-i), n=i)
        for i in range(2500)
    ]
    events += [event(f"other-{i}", "cus-0", "api.other", now, n=1) for i in range(10)]
    for i in range(0, len(events), 1000):
        await _ingest(client, events[i : i + 1000])
    want_counts = {"cus-0": "834", "cus-1": "833", "cus-2": "833"}

    async def witness_usage() -> dict[str, str]:
        return await _usage(client, witness.id, start, end)

    assert await eventually(witness_usage, lambda u: u == want_counts) == want_counts

    late = await _create(client, meter_pb2.AGGREGATION_SUM, prop="n")
    summed = await _create(client, meter_pb2.AGGREGATION_COUNT)
    assert late.backfill_state in (
        meter_pb2.BACKFILL_STATE_RUNNING,
        meter_pb2.BACKFILL_STATE_DONE,
    )
    for meter in (late, summed):

        async def state(meter_id: str = meter.id) -> int:
            return await _backfill_state(client, meter_id)

        assert await eventually(state, lambda s: s == meter_pb2.BACKFILL_STATE_DONE) == (
            meter_pb2.BACKFILL_STATE_DONE
        )
    sums = {f"cus-{c}": str(sum(i for i in range(2500) if i % 3 == c)) for c in range(3)}
    assert await _usage(client, late.id, start, end) == sums
    assert await _usage(client, summed.id, start, end) == want_counts


async def test_a_meter_created_during_a_stream_counts_each_event_once(client: Client) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start, end = now - timedelta(days=1), now + timedelta(minutes=5)
    batches = [
        [
            event(f"b{b}-{i}", "cus", "api.call", now - timedelta(minutes=b, seconds=i), n=1)
            for i in range(100)
        ]
        for b in range(40)
    ]
    created: list[meter_pb2.Meter] = []

    async def stream() -> None:
        for b, batch in enumerate(batches):
            if b == 15:
                # Created mid-stream, without waiting: the stream goes on meanwhile.
                created.append(await _create(client, meter_pb2.AGGREGATION_SUM, prop="n"))
            await _ingest(client, batch)
            await asyncio.sleep(0.02)

    await stream()
    [meter] = created
    want = {"cus": str(sum(len(b) for b in batches))}

    async def settled() -> tuple[int, dict[str, str]]:
        return await _backfill_state(client, meter.id), await _usage(client, meter.id, start, end)

    done = (meter_pb2.BACKFILL_STATE_DONE, want)
    assert await eventually(settled, lambda s: s == done) == done
    # And it stays exact: nothing redelivered or replayed counts twice later.
    await asyncio.sleep(1)
    assert await _usage(client, meter.id, start, end) == want
