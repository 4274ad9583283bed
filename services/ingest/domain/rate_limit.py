"""Fair share: a token bucket per tenant, in row units per second.

A unit is what meter pays to fold one plain (meter, event) row
(services.ingest.domain.fold_cost): a call costs the sum over its events of
their fold weights, at least one unit per event.

Pure: the caller passes `now` (seconds on a monotonic clock). Each tenant's
bucket holds at most `burst` tokens and refills at `rate` tokens per second; a
call costing n takes n tokens or, when fewer are there, takes none and is told
how long to wait. A call costing more than the burst (a big batch on an event
name many meters count) passes once the bucket is full and leaves it in debt:
the tenant's next call waits until the debt is paid back, so over time no
tenant gets more than `rate`, and no call is refused forever.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bucket:
    tokens: float
    at: float  # when `tokens` was counted


class RateLimiter:
    """Buckets per key (tenant). Buckets that have refilled to the brim are
    forgotten now and then, so idle tenants cost no memory."""

    def __init__(self, rate: float, burst: int, *, keep: int = 1024) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        # The part of `rate` tenants get now (domain.backpressure): below 1
        # while meter falls behind.
        self.share = 1.0
        self._buckets: dict[str, Bucket] = {}
        self._keep = keep
        self._prune_at = keep

    def _level(self, bucket: Bucket | None, now: float) -> float:
        if bucket is None:
            return float(self.burst)
        # max(): a clock that stepped back never takes tokens away.
        return min(float(self.burst), bucket.tokens + max(0.0, now - bucket.at) * self.current)

    @property
    def current(self) -> float:
        """Tokens a second now: the rate times the share."""
        return self.rate * self.share

    def acquire(self, key: str, count: int, now: float) -> float:
        """Takes `count` tokens from `key`'s bucket and returns 0.0; or, when
        the bucket holds fewer, takes none and returns the seconds after which
        it will hold `count` (the retry hint). A count above the burst needs a
        full bucket and leaves it below zero (the hint then says when it is
        full again)."""
        if count < 0:
            raise ValueError("count must not be negative")
        level = self._level(self._buckets.get(key), now)
        need = min(count, self.burst)
        if level < need:
            return (need - level) / self.current
        self._buckets[key] = Bucket(level - count, now)
        if len(self._buckets) > self._prune_at:
            self._prune(now)
        return 0.0

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if self._level(b, now) >= self.burst]
        for key in full:
            del self._buckets[key]
        self._prune_at = max(self._keep, 2 * len(self._buckets))

    def tracked(self) -> int:
        """How many buckets are held (for tests of the pruning)."""
        return len(self._buckets)
