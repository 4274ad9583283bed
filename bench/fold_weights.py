"""How much a (meter, event) row costs meter to fold, by the meter's shape: the
figures behind ingest's fold weights (services/ingest/domain/fold_cost.py).

    python -m bench.fold_weights [--events N]

For each shape, a new tenant gets its meters on one event name; meter is
stopped, N events are ingested and published, then meter is started and the
time it takes to count them all, less its start-up time, (its consumer draining the backlog) is the
cost of N x meters rows. Prints rows per second and microseconds per row.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc

from tools.devstack import DEFAULT_BASE_DIR, DevStack
from tools.suite import Suite, create_tenant
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

KEYS = [f"k{i}" for i in range(10)]


def _meter(name: str, group_by: bool, filtered: bool) -> meter_pb2.CreateMeterRequest:
    request = meter_pb2.CreateMeterRequest(
        name=name, event_name="f", aggregation=meter_pb2.AGGREGATION_COUNT
    )
    if group_by:
        request.group_by.extend(KEYS)
    if filtered:
        request.filter.conjunction = meter_pb2.CONJUNCTION_AND
        for key in KEYS:
            request.filter.conditions.add(key=key, operator=meter_pb2.OPERATOR_EXISTS)
    return request


def _event(n: int, wide: bool) -> ingest_pb2.Event:
    message = ingest_pb2.Event(event_id=f"e-{n}", customer_id=f"c{n % 50}", event_name="f")
    message.timestamp.FromDatetime(datetime.now(UTC))
    if wide:
        for key in KEYS:
            message.metadata[key].string_value = (key + str(n)).ljust(100, "x")
    return message


async def startup_seconds(suite: Suite) -> float:
    suite.stop_service("meter")
    started = time.monotonic()
    suite.start_service("meter")
    suite.wait_healthy("meter")
    return time.monotonic() - started


async def shape(
    suite: Suite,
    startup: float,
    label: str,
    meters: int,
    group_by: bool,
    filtered: bool,
    events: int,
) -> dict[str, Any]:
    _, secret = create_tenant(suite, f"w-{uuid.uuid4().hex[:8]}")
    auth = (("authorization", f"Bearer {secret}"),)
    ingest_channel = grpc.aio.insecure_channel(suite.address("ingest"))
    meter_channel = grpc.aio.insecure_channel(suite.address("meter"))
    ingest = ingest_pb2_grpc.IngestServiceStub(ingest_channel)
    meter = meter_pb2_grpc.MeterServiceStub(meter_channel)
    ids = [
        (await meter.CreateMeter(_meter(f"m{i}", group_by, filtered), metadata=auth)).id
        for i in range(meters)
    ]
    await asyncio.sleep(1)  # the meters' (empty) backfills end
    suite.stop_service("meter")
    wide = group_by or filtered
    for start in range(0, events, 1000):
        batch = [_event(n, wide) for n in range(start, min(events, start + 1000))]
        await ingest.IngestEvents(
            ingest_pb2.IngestEventsRequest(events=batch), metadata=auth, timeout=60
        )
    await asyncio.sleep(3)  # the relay publishes the backlog
    started = time.monotonic()
    suite.start_service("meter")
    suite.wait_healthy("meter")
    query = meter_pb2.QueryUsageRequest(meter_id=ids[-1])
    query.start_time.FromDatetime(datetime(2000, 1, 1, tzinfo=UTC))
    query.end_time.FromDatetime(datetime(2100, 1, 1, tzinfo=UTC))
    while True:
        rows = (await meter.QueryUsage(query, metadata=auth, timeout=60)).rows
        if sum(int(r.value) for r in rows) >= events:
            break
        await asyncio.sleep(0.2)
    # Less meter's start-up (measured with nothing to fold).
    seconds = time.monotonic() - started - startup
    await ingest_channel.close(None)
    await meter_channel.close(None)
    rows_folded = events * meters
    return {
        "shape": label,
        "rows": rows_folded,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows_folded / seconds),
        "us_per_row": round(seconds / rows_folded * 1e6, 1),
    }


async def main(events: int) -> None:
    base = DEFAULT_BASE_DIR / "fold-weights"
    shutil.rmtree(base, ignore_errors=True)
    stack = DevStack(base)
    database_url, nats_url = stack.start()
    suite = Suite(
        database_url,
        nats_url,
        base / "logs",
        extra_env={
            "USAGEBILLING_SCHEDULER_ENABLED": "false",
            "USAGEBILLING_LOG_LEVEL": "warning",
            "USAGEBILLING_INGEST_RATE_LIMIT": "0",
        },
    )
    shapes = [
        ("1 plain meter", 1, False, False, events * 5),
        ("20 plain meters", 20, False, False, events),
        ("20 meters, group_by 10", 20, True, False, events),
        ("20 meters, filter 10", 20, False, True, events),
        ("20 meters, group_by 10 + filter 10", 20, True, True, events),
    ]
    try:
        suite.start()
        startup = min([await startup_seconds(suite) for _ in range(3)])
        print(f"meter starts in {startup:.2f} s", flush=True)
        for label, meters, group_by, filtered, n in shapes:
            print(await shape(suite, startup, label, meters, group_by, filtered, n), flush=True)
    finally:
        suite.stop()
        stack.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10_000)
    asyncio.run(main(parser.parse_args().events))
