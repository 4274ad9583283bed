"""ingest's view of meter's backlog, on real JetStream: messages that wait in
meter's consumer cut the share of the rate limit; once folded (acked), the
share grows back."""

from __future__ import annotations

import uuid

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
        assert await backlog.observe() == 0.5  # 20 waiting, none folded: cut
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
