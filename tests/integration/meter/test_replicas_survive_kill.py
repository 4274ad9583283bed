"""Two meter processes share the durable consumer of one event stream while one of
them is killed with SIGKILL (mid-fold, most likely) and restarted, twice: every
event still counts exactly once.

This test runs its own PostgreSQL, NATS and services (not the session's), since it
kills processes. The durable consumer is created before the meters start, with a
3-second ack wait instead of meter's own (consumer.ACK_WAIT_SECONDS), so that the
messages a killed replica held are redelivered soon; meter binds to an existing
durable consumer as it is.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX, ensure_streams
from tests.client import Client, event
from tools.devstack import REPO_ROOT, DevStack, free_port
from tools.suite import SERVICES, Suite, create_tenant
from usagebilling.ingest.v1 import ingest_pb2
from usagebilling.meter.v1 import meter_pb2

pytestmark = pytest.mark.timeout(180)

EVENTS = 20_000
PER_CALL = 500
CONSUMER = "meter"  # meter's default USAGEBILLING_METER_CONSUMER
REPLICA = "meter-2"


# Runs in the replica's own interpreter: die with the test (as tools.suite's
# services do), then become meter. Not a preexec_fn: forking a process whose gRPC
# threads are busy and then running Python before exec can crash the child.
_DIE_WITH_PARENT_THEN_METER = (
    "import ctypes, os, signal, sys;"
    " ctypes.CDLL(None).prctl(1, signal.SIGTERM);"
    " os.execv(sys.executable, [sys.executable, '-m', 'services.meter'])"
)


class TwoMeters(Suite):
    """The suite plus a second meter process on its own port, same settings."""

    def spawn_replica(self) -> None:
        """Starts it without waiting: call from the event loop's thread (the parent
        thread whose exit would stop it), then `wait_healthy(REPLICA)`."""
        self.ports.setdefault(REPLICA, free_port())
        env = self.service_env("meter")
        env["USAGEBILLING_METER_PORT"] = str(self.ports[REPLICA])
        # Not the default 9092: another process on this machine may hold it.
        env["USAGEBILLING_METRICS_PORT"] = str(free_port())
        env["USAGEBILLING_HTTP_PORT"] = str(free_port())
        log = self._logs.get(REPLICA) or open(self.log_dir / f"{REPLICA}.log", "ab")  # noqa: SIM115
        self._logs[REPLICA] = log
        self.processes[REPLICA] = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT_THEN_METER],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def start_replica(self) -> None:
        self.spawn_replica()
        await asyncio.to_thread(self.wait_healthy, REPLICA)

    def kill(self, service: str) -> None:
        process = self.processes[service]
        process.send_signal(signal.SIGKILL)
        assert process.wait(10) == -signal.SIGKILL


async def _consumer_info(nats_url: str) -> Any:
    nc = await nats.connect(nats_url)
    try:
        return await nc.jetstream().consumer_info(EVENTS_STREAM, CONSUMER)
    finally:
        await nc.close()


@pytest.fixture
async def two_meters(tmp_path: Path) -> AsyncIterator[TwoMeters]:
    stack = DevStack(tmp_path / "stack")
    database_url, nats_url = await stack.astart()
    suite = TwoMeters(
        database_url,
        nats_url,
        tmp_path / "logs",
        extra_env={
            "USAGEBILLING_SCHEDULER_ENABLED": "false",
            # Small fetches, so that both replicas get work and a kill hits a fold.
            "USAGEBILLING_METER_FETCH_BATCH": "1",
        },
    )
    try:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        await ensure_streams(js, replicas=1)
        await js.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                filter_subject=f"{EVENTS_SUBJECT_PREFIX}.>",
                ack_wait=3,
                max_ack_pending=20_000,
            ),
        )
        await nc.close()
        suite.start()  # blocks the loop: nothing else runs yet
        await suite.start_replica()
        yield suite
    finally:
        # In parallel: each service may take its shutdown grace to stop.
        await asyncio.gather(
            *(asyncio.to_thread(suite.stop_service, s) for s in [REPLICA, *SERVICES])
        )
        suite.stop()
        await stack.astop()


async def test_totals_stay_exact_when_a_replica_is_killed_and_restarted(
    two_meters: TwoMeters,
) -> None:
    suite = two_meters
    _, secret = await asyncio.to_thread(create_tenant, suite, "kill-9")
    client = Client({s: suite.address(s) for s in SERVICES}, secret)
    try:
        count = await client.call(
            client.meter.CreateMeter,
            meter_pb2.CreateMeterRequest(
                name="count", event_name="api.call", aggregation=meter_pb2.AGGREGATION_COUNT
            ),
        )
        total = await client.call(
            client.meter.CreateMeter,
            meter_pb2.CreateMeterRequest(
                name="sum",
                event_name="api.call",
                aggregation=meter_pb2.AGGREGATION_SUM,
                property="n",
            ),
        )
        now = datetime.now(UTC).replace(microsecond=0)
        rng = random.Random(4)
        values = [rng.randint(1, 1000) for _ in range(EVENTS)]
        events = [
            event(f"e-{i}", "cus", "api.call", now - timedelta(seconds=i % 3600), n=v)
            for i, v in enumerate(values)
        ]
        calls = [events[i : i + PER_CALL] for i in range(0, EVENTS, PER_CALL)]
        kills = 0
        sent = 0

        async def sender(mine: list[list[ingest_pb2.Event]]) -> None:
            nonlocal sent
            for batch in mine:
                # While a replica is down meter falls behind, and ingest then
                # cuts the tenant's rate (backpressure): the sender waits and
                # sends again, as a client should.
                answer = await client.send_events(batch)
                assert answer.accepted_count == len(batch)
                sent += len(batch)

        async def killer() -> None:
            # Twice: once a quarter and a half of the stream is in, wait for a
            # backlog (both replicas busy), then kill the replica and start it again.
            nonlocal kills
            for fraction in (1 / 4, 1 / 2):
                while sent < EVENTS * fraction:
                    await asyncio.sleep(0.005)
                for _ in range(200):
                    info = await _consumer_info(suite.nats_url)
                    if info.num_pending and info.num_ack_pending:
                        break
                    await asyncio.sleep(0.005)
                suite.kill(REPLICA)
                kills += 1
                await suite.start_replica()

        await asyncio.gather(killer(), *(sender(calls[k::8]) for k in range(8)))
        assert kills == 2

        async def usage(meter_id: str) -> str:
            request = meter_pb2.QueryUsageRequest(meter_id=meter_id, customer_id="cus")
            request.start_time.FromDatetime(now - timedelta(hours=2))
            request.end_time.FromDatetime(now + timedelta(minutes=5))
            response = await client.call(client.meter.QueryUsage, request)
            return str(response.rows[0].value)

        want = (str(EVENTS), str(sum(values)))
        deadline = asyncio.get_running_loop().time() + 90
        got = ("", "")
        while asyncio.get_running_loop().time() < deadline:
            got = (await usage(count.id), await usage(total.id))
            if got == want:
                break
            await asyncio.sleep(0.25)
        assert got == want
        # Past another ack wait, redeliveries of the killed replica's messages (if
        # any were still due) have changed nothing.
        await asyncio.sleep(4)
        assert (await usage(count.id), await usage(total.id)) == want
        info = await _consumer_info(suite.nats_url)
        assert info.num_ack_pending == 0
        # The kills hit folds in flight: their messages were delivered again.
        assert info.delivered.consumer_seq > info.delivered.stream_seq, info.delivered
        assert suite.dead() == []
    finally:
        await client.close()
