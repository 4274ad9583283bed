"""Backpressure for the rate limit: watches meter's durable consumer of the
EVENTS stream (its consumer info: read-only, the one JetStream API ingest may
call on a consumer) and sets the share of the rate limit tenants get
(domain.backpressure)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats.js.errors

from services.common import metrics
from services.common.jetstream import EVENTS_STREAM
from services.common.logs import get_logger
from services.ingest.domain.backpressure import Backpressure
from services.ingest.domain.rate_limit import RateLimiter

log = get_logger(__name__)


class MeterBacklog:
    def __init__(
        self,
        js: Any,
        limiter: RateLimiter,
        durable: str,
        *,
        every: float = 0.5,
        control: Backpressure | None = None,
    ) -> None:
        self._js = js
        self._limiter = limiter
        self._durable = durable
        self._every = every
        self.control = control or Backpressure()
        self._floor: tuple[int, float] | None = None  # (ack floor, when seen)
        self._folding = 0.0  # messages a second, smoothed

    async def observe(self) -> float | None:
        """One look at the consumer; the share it leads to, or None when
        there is nothing to see (no consumer yet: meter has not started)."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            return None
        now = time.monotonic()
        floor = info.ack_floor.stream_seq
        if self._floor is not None and now > self._floor[1]:
            rate = max(0, floor - self._floor[0]) / (now - self._floor[1])
            # Smoothed over a few looks: one fetch acks several messages at once.
            self._folding = rate if self._folding == 0 else 0.5 * self._folding + 0.5 * rate
        self._floor = (floor, now)
        share = self.control.observe(info.num_pending + info.num_ack_pending, self._folding)
        if share != self._limiter.share:
            log.info("ingest_rate_share", share=round(share, 3), pending=info.num_pending)
        self._limiter.share = share
        metrics.RATE_SHARE.set(share)
        return share

    async def run(self) -> None:
        metrics.RATE_SHARE.set(self._limiter.share)
        failing = False
        while True:
            try:
                await self.observe()
                failing = False
            except Exception as exc:  # NATS away: keep the share, look again
                if not failing:  # once per outage, not every look
                    log.warning("meter_backlog_unavailable", error=repr(exc))
                failing = True
            await asyncio.sleep(self._every)
