"""Fixtures for tests that start and stop real processes: each test gets its
own private PostgreSQL and NATS, so killing things disturbs no other test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.client import Client
from tools.devstack import DevStack
from tools.suite import SERVICES, Suite, create_tenant


@pytest.fixture
def process_stack(tmp_path: Path) -> Iterator[DevStack]:
    own = DevStack(tmp_path / "stack")
    own.start()
    yield own
    own.stop()


@pytest.fixture
def process_suite(process_stack: DevStack, tmp_path: Path) -> Iterator[Suite]:
    running = Suite(process_stack.database_url, process_stack.nats_url, tmp_path / "logs")
    running.start()
    yield running
    running.stop()


@pytest.fixture
async def process_client(process_suite: Suite) -> AsyncIterator[tuple[str, Client]]:
    tenant_id, secret = create_tenant(process_suite, "crash")
    tenant_client = Client({s: process_suite.address(s) for s in SERVICES}, secret)
    yield tenant_id, tenant_client
    await tenant_client.close()
