"""Fair share: a token bucket per tenant, in events per second.

Pure: the caller passes `now` (seconds on a monotonic clock). Each tenant's
bucket holds at most `burst` tokens and refills at `rate` tokens per second; a
call of n events takes n tokens or, when fewer are there, takes none and is told
how long to wait. The burst is never below the largest call ingest accepts, so
every valid call passes once its tenant has been quiet long enough.
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
        self._buckets: dict[str, Bucket] = {}
        self._keep = keep
        self._prune_at = keep

    def _level(self, bucket: Bucket | None, now: float) -> float:
        if bucket is None:
            return float(self.burst)
        # max(): a clock that stepped back never takes tokens away.
        return min(float(self.burst), bucket.tokens + max(0.0, now - bucket.at) * self.rate)

    def acquire(self, key: str, count: int, now: float) -> float:
        """Takes `count` tokens from `key`'s bucket and returns 0.0; or, when
        the bucket holds fewer, takes none and returns the seconds after which
        it will hold `count` (the retry hint). A count above the burst can
        never pass: ValueError (the caller bounds calls below the burst)."""
        if count > self.burst:
            raise ValueError(f"a call of {count} exceeds the burst of {self.burst}")
        level = self._level(self._buckets.get(key), now)
        if level < count:
            return (count - level) / self.rate
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
