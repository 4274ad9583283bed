"""Billing against a real PostgreSQL: each test gets a database of its own,
copied from a template that billing's migrations built once per session (the
store hard-codes schema `billing`, so a fresh database is the clean slate).
Meter, another service, is replaced by FakeMeters (usage stated per event)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from nats.errors import TimeoutError as NatsTimeout

from services.billing.accounts import Accounts
from services.billing.catalog import Catalog
from services.billing.invoicing import Invoicing
from services.billing.store import BillingStore
from services.common import db, jetstream
from tests.unit.billing.fake_meters import FakeMeters

MIGRATIONS = Path(__file__).resolve().parents[3] / "services" / "billing" / "migrations"
GRACE = timedelta(hours=1)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
async def billing_template(stack_urls: tuple[str, str]) -> AsyncIterator[str]:
    """A database with billing's migrations applied, to copy per test."""
    name = f"billing_template_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(stack_urls[0])
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        pool = await db.create_pool(_with_database(stack_urls[0], name), min_size=1, max_size=2)
        try:
            await db.migrate(pool, "billing", MIGRATIONS)
        finally:
            await pool.close()
        yield name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def database_url(stack_urls: tuple[str, str], billing_template: str) -> AsyncIterator[str]:
    name = f"billing_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(stack_urls[0])
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{billing_template}"')
        yield _with_database(stack_urls[0], name)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    created = await db.create_pool(database_url, min_size=1, max_size=10)
    yield created
    await created.close()


@dataclass
class Billing:
    """billing's parts as __main__ wires them, minus gRPC and NATS."""

    store: BillingStore
    meters: FakeMeters
    accounts: Accounts
    catalog: Catalog
    invoicing: Invoicing


def wire(pool: Any, meters: FakeMeters, grace: timedelta = GRACE, js: Any = None) -> Billing:
    store = BillingStore(pool)
    return Billing(
        store,
        meters,
        Accounts(store),
        Catalog(store, meters),
        Invoicing(store, meters, grace, js),
    )


@pytest.fixture
def meters() -> FakeMeters:
    return FakeMeters()


@pytest.fixture
def billing(pool: Any, meters: FakeMeters) -> Billing:
    return wire(pool, meters)


@pytest.fixture
async def js(stack_urls: tuple[str, str]) -> AsyncIterator[Any]:
    """A JetStream context on the test NATS, with the suite's streams."""
    connection = await jetstream.connect(stack_urls[1], "billing-tests")
    context = connection.jetstream()
    await jetstream.ensure_streams(context, replicas=1)
    yield context
    await connection.close()


class Published(NamedTuple):
    subject: str
    sequence: int  # in the stream
    msg_id: str  # the Nats-Msg-Id header
    payload: Any


async def billing_messages(
    js: Any, subject: str, parse: Callable[[bytes], Any], tenant_id: str
) -> list[Published]:
    """The tenant's messages on `subject` (a filter: wildcards allowed) of
    the shared BILLING stream, in stream order, each payload parsed with
    `parse` (a message type's FromString; the payload's tenant_id picks the
    tenant's)."""
    subscription = await js.pull_subscribe(subject, stream=jetstream.BILLING_STREAM)
    found: list[Published] = []
    try:
        # Until the consumer has nothing left to deliver: a short fetch timeout
        # as the end marker missed messages on a loaded machine.
        while (pending := (await subscription.consumer_info()).num_pending or 0) > 0:
            try:
                batch = await subscription.fetch(min(pending, 1000), timeout=30)
            except NatsTimeout:
                continue
            for message in batch:
                payload = parse(message.data)
                if payload.tenant_id == tenant_id:
                    found.append(
                        Published(
                            message.subject,
                            message.metadata.sequence.stream,
                            message.headers["Nats-Msg-Id"],
                            payload,
                        )
                    )
                await message.ack()
    finally:
        await subscription.unsubscribe()
    return found
