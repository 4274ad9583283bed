"""Backpressure for the rate limit: watches meter's durable consumer of the
EVENTS stream (its consumer info: read-only, the one JetStream API ingest may
call on a consumer) and sets the share of the rate limit tenants get
(domain.backpressure).

The backlog is the messages not yet delivered to meter (num_pending), over
the rate meter has been taking them (the advance of the consumer's delivered
stream sequence: meter fetches its next batch when it has folded the last).
Not the ack floor, nor the messages out for acknowledgement: one message meter
retries later (nak with a delay) holds those for minutes while meter folds
everything else. The rate is learnt only while messages wait: idle looks say
nothing of it, and before any is learnt the share holds."""

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
        # The last look: (delivered stream sequence, messages waiting, when).
        self._last: tuple[int, int, float] | None = None
        self._taking: float | None = None  # messages a second meter takes, smoothed
        self._missing = False

    async def observe(self) -> float | None:
        """One look at the consumer; the share it leads to, or None when
        there is no such consumer (meter has not started, or
        USAGEBILLING_METER_CONSUMER differs from meter's: logged once)."""
        try:
            info = await self._js.consumer_info(EVENTS_STREAM, self._durable)
        except nats.js.errors.NotFoundError:
            if not self._missing:
                log.warning("meter_consumer_not_found", consumer=self._durable)
            self._missing = True
            return None
        self._missing = False
        now = time.monotonic()
        delivered, waiting = info.delivered.stream_seq, info.num_pending
        if self._last is not None and now > self._last[2]:
            last_delivered, last_waiting, at = self._last
            taken = max(0, delivered - last_delivered)  # 0 when the consumer was made anew
            if last_waiting > 0 or taken:  # messages waited: the look measures meter
                rate = taken / (now - at)
                # Smoothed over a few looks: meter takes a batch at a time.
                self._taking = rate if self._taking is None else 0.5 * self._taking + 0.5 * rate
        self._last = (delivered, waiting, now)
        share = self.control.observe(waiting, self._taking)
        if share != self._limiter.share:
            log.info("ingest_rate_share", share=round(share, 3), waiting=waiting)
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
