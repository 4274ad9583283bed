"""The three services started as processes against the test stack."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.client import Client
from tools.suite import SERVICES, Suite, create_tenant


@pytest.fixture(scope="session")
def suite(stack_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    database_url, nats_url = stack_urls
    running = Suite(
        database_url,
        nats_url,
        Path(tmp_path_factory.mktemp("suite-logs")),
        # Short enough that the revocation test (the auth cache) and the late
        # credits test (the reconciliation of settled days) need not wait long.
        extra_env={
            "USAGEBILLING_AUTH_CACHE_TTL": "1s",
            "USAGEBILLING_SCHEDULER_ENABLED": "false",
            "USAGEBILLING_CREDITS_RECONCILE": "5s",
        },
    )
    try:
        running.start()
        yield running
    finally:
        running.stop()
        for service in SERVICES:
            log = running.log_dir / f"{service}.log"
            if log.exists() and b'"level": "error"' in log.read_bytes():
                print(f"--- errors in {service}.log ---")
                print(log.read_text()[-4000:])


@pytest.fixture
def new_tenant(suite: Suite) -> Callable[[], tuple[str, str]]:
    def make() -> tuple[str, str]:
        return create_tenant(suite, f"tenant-{uuid.uuid4().hex[:8]}")

    return make


@pytest.fixture
async def client(suite: Suite, new_tenant: Callable[[], tuple[str, str]]) -> AsyncIterator[Client]:
    _, secret = new_tenant()
    tenant_client = Client({s: suite.address(s) for s in SERVICES}, secret)
    yield tenant_client
    await tenant_client.close()
