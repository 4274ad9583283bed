"""Crash and outage tests with real processes: nothing acknowledged is lost or
counted twice when ingest is killed with SIGKILL mid-load, or when NATS is down
for a while (ingest keeps accepting; the outbox drains when NATS is back)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.client import Client
from tests.load import Load, check_exactly_once, count_meter
from tools.devstack import DevStack
from tools.suite import Suite

pytestmark = pytest.mark.timeout(240)


async def test_kill_9_ingest_under_load_loses_and_doubles_nothing(
    process_suite: Suite, process_client: tuple[str, Client]
) -> None:
    tenant_id, tenant_client = process_client
    suite = process_suite
    meter_id = await count_meter(tenant_client)
    load = Load(tenant_client, "k")
    senders = [asyncio.create_task(load.sender(lane)) for lane in range(2)]
    await asyncio.sleep(2)
    before = len(load.acked)
    await asyncio.to_thread(suite.stop_service, "ingest", signal.SIGKILL)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(suite.start_service, "ingest")
    await asyncio.to_thread(suite.wait_healthy, "ingest")
    await asyncio.sleep(2)
    load.stopping.set()
    await asyncio.gather(*senders)
    assert before > 0 and len(load.acked) > before
    assert load.failures > 0  # the kill really interrupted calls
    await check_exactly_once(suite, tenant_id, tenant_client, meter_id, load)


async def test_nats_outage_keeps_ingest_accepting_and_loses_nothing(
    process_stack: DevStack, process_suite: Suite, process_client: tuple[str, Client]
) -> None:
    tenant_id, tenant_client = process_client
    suite = process_suite
    meter_id = await count_meter(tenant_client)
    load = Load(tenant_client, "n")
    senders = [asyncio.create_task(load.sender(lane)) for lane in range(2)]
    await asyncio.sleep(1)
    await asyncio.to_thread(process_stack.stop_nats)
    during = len(load.acked)
    await asyncio.sleep(3)
    accepted_while_down = len(load.acked) - during
    await asyncio.to_thread(process_stack.restart_nats)
    await asyncio.sleep(2)
    load.stopping.set()
    await asyncio.gather(*senders)
    assert accepted_while_down > 0
    assert load.failures == 0  # ingest never refused a call while NATS was away
    await check_exactly_once(suite, tenant_id, tenant_client, meter_id, load)
