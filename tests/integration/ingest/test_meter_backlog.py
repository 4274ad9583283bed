"""ingest's view of meter's backlog, on real JetStream: messages that wait in
meter's consumer cut the share of the rate limit; once folded (acked), the
share grows back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import nats
import pytest

from services.common import jetstream
from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
from services.ingest.domain.rate_limit import RateLimiter
from services.ingest.meter_backlog import MeterBacklog


async def test_a_backlog_cuts_the_share_and_folding_it_restores_it(
    stack_urls: tuple[str, str],
) -> None:
    nc = await nats.connect(stack_urls[1])
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, replicas=1)
        subject = f"{EVENTS_SUBJECT_PREFIX}.{uuid.uuid4()}"  # this test's messages only
        durable = f"backlog-{uuid.uuid4().hex[:8]}"
        consumer = await js.pull_subscribe(subject, durable=durable, stream=EVENTS_STREAM)
        limiter = RateLimiter(rate=1000, burst=1000)
        backlog = MeterBacklog(js, limiter, durable)
        assert await MeterBacklog(js, limiter, "no-such-consumer").observe() is None
        assert await backlog.observe() == 1.0  # nothing waits

        for i in range(20):
            await js.publish(subject, f"batch {i}".encode(), timeout=30)
        # 20 waiting: how fast meter takes them is not known yet, the share holds;
        assert await backlog.observe() == 1.0
        assert await backlog.observe() == 0.5  # none taken since: cut
        for _ in range(8):
            await backlog.observe()
        assert limiter.share == 0.05  # the floor: 50 row units/s of 1000

        folded = await consumer.fetch(20, timeout=30)
        assert len(folded) == 20
        for message in folded:
            await message.ack_sync(timeout=30)
        for _ in range(4):
            await backlog.observe()
        assert limiter.share == pytest.approx(0.25)  # 0.05 + 4 x 0.05
    finally:
        await nc.close()


async def _keep_up(js: Any, consumer: Any, subject: str, backlog: MeterBacklog) -> float:
    """meter takes and acks what waits; then four messages arrive; one look."""
    taken = []
    with contextlib.suppress(nats.errors.TimeoutError, TimeoutError):
        taken = await consumer.fetch(100, timeout=1)
    for message in taken:
        await message.ack_sync(timeout=30)
    for i in range(4):
        await js.publish(subject, f"batch {i}".encode(), timeout=30)
    share = await backlog.observe()
    assert share is not None
    await asyncio.sleep(0.1)
    return share


async def test_a_message_retried_later_does_not_cut_the_share_while_meter_keeps_up(
    stack_urls: tuple[str, str],
) -> None:
    """Found by attack: one message meter naks with a delay (its retry of a
    transient failure) held the ack floor, the measured rate fell to nothing
    and every tenant's share to 5% though meter kept up."""
    nc = await nats.connect(stack_urls[1])
    try:
        js = nc.jetstream()
        await jetstream.ensure_streams(js, replicas=1)
        subject = f"{EVENTS_SUBJECT_PREFIX}.{uuid.uuid4()}"
        durable = f"backlog-{uuid.uuid4().hex[:8]}"
        consumer = await js.pull_subscribe(subject, durable=durable, stream=EVENTS_STREAM)
        limiter = RateLimiter(rate=1000, burst=1000)
        backlog = MeterBacklog(js, limiter, durable)
        await js.publish(subject, b"retried later", timeout=30)
        (stuck,) = await consumer.fetch(1, timeout=30)
        await stuck.nak(delay=30)
        shares = [await _keep_up(js, consumer, subject, backlog) for _ in range(20)]
        assert min(shares) == 1.0, shares
        # After idle looks, a few messages arriving are no backlog either.
        for message in await consumer.fetch(100, timeout=5):
            await message.ack_sync(timeout=30)
        for _ in range(20):
            await backlog.observe()
        for i in range(3):
            await js.publish(subject, f"after idle {i}".encode(), timeout=30)
        assert await backlog.observe() == 1.0
    finally:
        await nc.close()
