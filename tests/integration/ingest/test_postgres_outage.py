"""PostgreSQL down: ingest answers UNAVAILABLE (a client may retry) and writes
nothing half; once PostgreSQL is back the retried batch is accepted whole and
counted once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc
import pytest

from tests.client import Client, event, eventually
from tests.load import count, count_meter
from tools.devstack import DevStack
from tools.suite import Suite
from usagebilling.ingest.v1 import ingest_pb2

pytestmark = pytest.mark.timeout(180)


async def test_postgres_down_is_unavailable_and_nothing_half_written(
    process_stack: DevStack, process_suite: Suite, process_client: tuple[str, Client]
) -> None:
    _, client = process_client
    meter_id = await count_meter(client)
    now = datetime.now(UTC)
    before = ingest_pb2.IngestEventsRequest(
        events=[event(f"b{i}", "cus_1", "load", now) for i in range(50)]
    )
    assert (await client.call(client.ingest.IngestEvents, before)).accepted_count == 50

    await asyncio.to_thread(process_stack.stop_postgres)
    during = ingest_pb2.IngestEventsRequest(
        events=[event(f"d{i}", "cus_1", "load", now) for i in range(50)]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.call(client.ingest.IngestEvents, during)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    await asyncio.to_thread(process_stack.restart_postgres)

    async def retry() -> int:
        try:
            answer = await client.call(client.ingest.IngestEvents, during)
        except grpc.aio.AioRpcError:
            return -1
        assert answer.duplicate_count == 0  # nothing of the failed call was stored
        return int(answer.accepted_count)

    assert await eventually(retry, lambda n: n >= 0, timeout=60) == 50
    assert await eventually(lambda: count(client, meter_id), lambda n: n >= 100, 60) == 100
