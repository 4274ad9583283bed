"""NATS least privilege in the dev stack (the same permission table a deployment
must configure, services/common/nats_permissions.py): anonymous clients are
refused, and each service's user can do its own work and nothing else."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from services.common import jetstream
from services.common.jetstream import (
    BILLING_STREAM,
    BILLING_SUBJECT_PREFIX,
    EVENTS_STREAM,
    EVENTS_SUBJECT_PREFIX,
)
from tools.devstack import service_nats_credentials

pytestmark = pytest.mark.timeout(180)

# How long a refused request is given before it counts as unanswered (a
# permission violation drops the message, so no answer ever comes).
REFUSED_WAIT = 3.0


def _anonymous(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class Connection:
    """A NATS connection as one user, recording the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Any = None

    async def open(self, url: str, user: str, password: str) -> Connection:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            _anonymous(url),
            user=user,
            password=password,
            inbox_prefix=jetstream.inbox_prefix(user),
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=10,
        )
        return self

    async def violation(self, fragment: str, timeout: float = 30) -> str:
        """The permissions violation naming `fragment` (waits for the server's -ERR)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for error in self.errors:
                if "permissions violation" in error.lower() and fragment.lower() in error.lower():
                    return error
            await asyncio.sleep(0.05)
        raise AssertionError(f"no permissions violation for {fragment!r}: {self.errors}")


@pytest.fixture
async def as_user(stack_urls: tuple[str, str]) -> AsyncIterator[Callable[[str], Awaitable[Any]]]:
    url = stack_urls[1]
    credentials = service_nats_credentials(url)
    if not credentials:
        pytest.skip("NATS_URL is not a dev stack's: its users are not known here")
    # The streams as the services make them, by the all-permission user.
    tools = await nats.connect(url)
    await jetstream.ensure_streams(tools.jetstream(), replicas=1)
    opened: list[Connection] = []

    async def connect(user: str) -> Connection:
        connection = await Connection().open(url, *credentials[user])
        opened.append(connection)
        return connection

    yield connect
    for connection in opened:
        await connection.nc.close()
    await tools.close()


async def _stored(stack_urls: tuple[str, str], stream: str, subject: str) -> bool:
    """Whether `stream` holds a message on `subject` (asked as the tools user)."""
    tools = await nats.connect(stack_urls[1])
    try:
        await tools.jetstream().get_last_msg(stream, subject)
    except NotFoundError:
        return False
    finally:
        await tools.close()
    return True


async def test_an_anonymous_client_is_refused(stack_urls: tuple[str, str]) -> None:
    url = stack_urls[1]
    assert urlsplit(url).password, "the dev stack's URL carries the tools user's password"
    for refused in (_anonymous(url), url.replace(f":{urlsplit(url).password}@", ":wrong@")):
        with pytest.raises(nats.errors.Error) as caught:
            client = await nats.connect(
                refused, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=10
            )
            await client.close()
        assert "authorization" in str(caught.value).lower() or isinstance(
            caught.value, nats.errors.NoServersError
        ), repr(caught.value)


async def test_ingest_publishes_events_and_cannot_publish_billing_messages(
    stack_urls: tuple[str, str], as_user: Callable[[str], Awaitable[Connection]]
) -> None:
    ingest = await as_user("ingest")
    tenant = str(uuid.uuid4())
    events = f"{EVENTS_SUBJECT_PREFIX}.{tenant}"
    ack = await ingest.nc.jetstream().publish(events, b"batch", timeout=30)
    assert ack.stream == EVENTS_STREAM  # its own work still works

    forged = f"{BILLING_SUBJECT_PREFIX}.{tenant}.invoice.finalized"
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await ingest.nc.jetstream().publish(forged, b"forged invoice", timeout=REFUSED_WAIT)
    await ingest.violation(f'Publish to "{forged}"')
    assert not await _stored(stack_urls, BILLING_STREAM, forged)


async def test_ingest_cannot_consume_the_events_stream_as_meter(
    stack_urls: tuple[str, str], as_user: Callable[[str], Awaitable[Connection]]
) -> None:
    ingest, meter = await as_user("ingest"), await as_user("meter")
    durable = f"least-privilege-{uuid.uuid4().hex[:8]}"
    await meter.nc.jetstream().pull_subscribe(
        f"{EVENTS_SUBJECT_PREFIX}.>", durable=durable, stream=EVENTS_STREAM
    )
    # ingest reads a consumer's info (meter's backlog cuts its rate limit)...
    info = await ingest.nc.jetstream().consumer_info(EVENTS_STREAM, durable)
    assert info.name == durable
    # ...but cannot fetch from it,
    consumer = await ingest.nc.jetstream(timeout=REFUSED_WAIT).pull_subscribe(
        f"{EVENTS_SUBJECT_PREFIX}.>", durable=durable, stream=EVENTS_STREAM
    )
    with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
        await consumer.fetch(1, timeout=REFUSED_WAIT)
    await ingest.violation(f"$JS.API.CONSUMER.MSG.NEXT.{EVENTS_STREAM}.{durable}")
    # nor make a consumer of its own.
    with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
        await ingest.nc.jetstream(timeout=REFUSED_WAIT).pull_subscribe(
            f"{EVENTS_SUBJECT_PREFIX}.>", durable=f"{durable}-ingest", stream=EVENTS_STREAM
        )
    await ingest.violation(f"{EVENTS_STREAM}.{durable}-ingest")
    # Nor read events with a plain subscription, nor meter's replies.
    for subject in (f"{EVENTS_SUBJECT_PREFIX}.>", f"{jetstream.inbox_prefix('meter')}.>"):
        await ingest.nc.subscribe(subject)
        await ingest.violation(f'Subscription to "{subject}"')


async def test_meter_consumes_events_and_publishes_nothing(
    stack_urls: tuple[str, str], as_user: Callable[[str], Awaitable[Connection]]
) -> None:
    meter, ingest = await as_user("meter"), await as_user("ingest")
    tenant = str(uuid.uuid4())
    subject = f"{EVENTS_SUBJECT_PREFIX}.{tenant}"
    await ingest.nc.jetstream().publish(subject, b"for meter", timeout=30)
    durable = f"least-privilege-{uuid.uuid4().hex[:8]}"
    subscription = await meter.nc.jetstream().pull_subscribe(
        subject,
        durable=durable,
        stream=EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )
    [message] = await subscription.fetch(1, timeout=30)
    assert message.data == b"for meter"
    await message.ack_sync(timeout=30)

    forged = f"{EVENTS_SUBJECT_PREFIX}.{tenant}"
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await meter.nc.jetstream().publish(forged, b"forged usage", timeout=REFUSED_WAIT)
    await meter.violation(f'Publish to "{forged}"')
    tools = await nats.connect(stack_urls[1])
    try:
        last = await tools.jetstream().get_last_msg(EVENTS_STREAM, forged)
        assert last.data == b"for meter"  # the forged one was never stored
        await tools.jetstream().delete_consumer(EVENTS_STREAM, durable)
    finally:
        await tools.close()


async def test_billing_publishes_billing_messages_and_cannot_publish_events(
    stack_urls: tuple[str, str], as_user: Callable[[str], Awaitable[Connection]]
) -> None:
    billing = await as_user("billing")
    tenant = str(uuid.uuid4())
    own = f"{BILLING_SUBJECT_PREFIX}.{tenant}.invoice.finalized"
    ack = await billing.nc.jetstream().publish(own, b"invoice", timeout=30)
    assert ack.stream == BILLING_STREAM

    forged = f"{EVENTS_SUBJECT_PREFIX}.{tenant}"
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await billing.nc.jetstream().publish(forged, b"usage", timeout=REFUSED_WAIT)
    await billing.violation(f'Publish to "{forged}"')
    assert not await _stored(stack_urls, EVENTS_STREAM, forged)
    # Nor change the stream it does not use.
    with pytest.raises((nats.errors.TimeoutError, asyncio.TimeoutError)):
        await billing.nc.jetstream(timeout=REFUSED_WAIT).purge_stream(EVENTS_STREAM)
    await billing.violation(f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}")
