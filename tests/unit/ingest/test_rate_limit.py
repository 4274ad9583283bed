"""The per-tenant token bucket: burst, refill, the retry hint, isolation of
tenants, a clock that steps back, and forgetting idle tenants."""

from __future__ import annotations

import pytest

from services.ingest.domain.rate_limit import RateLimiter


def test_a_full_bucket_takes_a_burst_then_refuses_with_the_time_to_wait() -> None:
    limiter = RateLimiter(rate=100, burst=1000)
    assert limiter.acquire("a", 1000, now=10.0) == 0.0
    # Empty: 250 events need 2.5 s of refill at 100/s.
    assert limiter.acquire("a", 250, now=10.0) == pytest.approx(2.5)
    # A refusal takes nothing: after 1 s there are 100 tokens, not 100 - 250.
    assert limiter.acquire("a", 100, now=11.0) == 0.0
    assert limiter.acquire("a", 1, now=11.0) == pytest.approx(0.01)


def test_waiting_the_hint_is_enough() -> None:
    limiter = RateLimiter(rate=7, burst=1000)
    limiter.acquire("a", 1000, now=0.0)
    wait = limiter.acquire("a", 999, now=0.0)
    assert wait > 0
    assert limiter.acquire("a", 999, now=wait * 0.99) > 0
    assert limiter.acquire("a", 999, now=wait) == 0.0


def test_refill_stops_at_the_burst() -> None:
    limiter = RateLimiter(rate=1000, burst=1000)
    limiter.acquire("a", 1000, now=0.0)
    # An hour idle refills to the burst, never beyond.
    assert limiter.acquire("a", 1000, now=3600.0) == 0.0
    assert limiter.acquire("a", 1, now=3600.0) > 0


def test_tenants_have_their_own_buckets() -> None:
    limiter = RateLimiter(rate=10, burst=1000)
    assert limiter.acquire("flooder", 1000, now=0.0) == 0.0
    assert limiter.acquire("flooder", 1, now=0.0) > 0
    assert limiter.acquire("quiet", 1000, now=0.0) == 0.0


def test_a_clock_that_steps_back_takes_no_tokens() -> None:
    limiter = RateLimiter(rate=10, burst=1000)
    limiter.acquire("a", 500, now=100.0)
    assert limiter.acquire("a", 500, now=50.0) == 0.0
    assert limiter.acquire("a", 1, now=50.0) > 0


def test_a_call_above_the_burst_passes_on_a_full_bucket_and_leaves_a_debt() -> None:
    # A call can cost more row units than the burst (many meters on its event
    # name): it is never refused forever, it waits for a full bucket.
    limiter = RateLimiter(rate=10, burst=1000)
    assert limiter.acquire("a", 10, now=0.0) == 0.0
    # Not full: the hint is the time to fill it (10 tokens at 10/s).
    assert limiter.acquire("a", 3000, now=0.0) == pytest.approx(1.0)
    assert limiter.acquire("a", 3000, now=1.0) == 0.0
    # 2000 tokens of debt: the next call of 1 waits for 2001 tokens' refill.
    assert limiter.acquire("a", 1, now=1.0) == pytest.approx(200.1)
    assert limiter.acquire("a", 1, now=201.0) > 0
    assert limiter.acquire("a", 1, now=201.1) == 0.0
    # Other tenants are untouched by a's debt.
    assert limiter.acquire("b", 1000, now=1.0) == 0.0
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1000)
    with pytest.raises(ValueError):
        limiter.acquire("a", -1, now=300.0)


def test_idle_tenants_are_forgotten() -> None:
    limiter = RateLimiter(rate=1000, burst=1000, keep=10)
    for i in range(11):
        limiter.acquire(f"t{i}", 1000, now=0.0)
    # Eleven buckets, all empty at t=0: none can be forgotten yet.
    assert limiter.tracked() == 11
    for i in range(11, 40):
        limiter.acquire(f"t{i}", 1000, now=5.0)
    # By t=5 the first eleven have refilled (1 s at 1000/s): forgotten, and
    # forgetting a full bucket changes nothing for its tenant.
    assert limiter.tracked() < 40
    assert limiter.acquire("t0", 1000, now=5.0) == 0.0
