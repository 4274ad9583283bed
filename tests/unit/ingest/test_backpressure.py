"""domain.backpressure: the share of the rate limit follows meter's backlog,
cut multiplicatively past the target, grown back additively under half of it."""

from __future__ import annotations

import pytest

from services.ingest.domain.backpressure import Backpressure
from services.ingest.domain.rate_limit import RateLimiter


def test_a_backlog_past_the_target_halves_the_share_down_to_the_floor() -> None:
    control = Backpressure()
    assert control.observe(pending=30, folded_per_s=10) == 0.5  # 3 s of backlog
    assert control.observe(pending=30, folded_per_s=10) == 0.25
    for _ in range(10):
        control.observe(pending=30, folded_per_s=10)
    assert control.share == 0.05


def test_meter_folding_nothing_is_an_endless_backlog_but_a_message_or_two_is_none() -> None:
    control = Backpressure()
    assert control.observe(pending=3, folded_per_s=0) == 0.5  # meter down
    # One message being folded and one fetched: no backlog, the share grows back.
    assert control.observe(pending=2, folded_per_s=0) == pytest.approx(0.55)


def test_an_unknown_rate_holds_the_share_unless_nothing_waits() -> None:
    control = Backpressure(share=0.5)
    assert control.observe(pending=50, folded_per_s=None) == 0.5
    assert control.observe(pending=0, folded_per_s=None) == pytest.approx(0.55)


def test_between_half_the_target_and_the_target_the_share_holds() -> None:
    control = Backpressure(share=0.5)
    assert control.observe(pending=8, folded_per_s=10) == 0.5  # 0.8 s
    assert control.observe(pending=5, folded_per_s=10) == pytest.approx(0.55)  # 0.5 s
    for _ in range(20):
        control.observe(pending=0, folded_per_s=10)
    assert control.share == 1.0  # never above the setting


def test_the_limiter_refills_at_the_share_of_its_rate_and_hints_so() -> None:
    limiter = RateLimiter(rate=1000, burst=1000)
    assert limiter.acquire("t", 1000, now=0.0) == 0.0  # the burst
    limiter.share = 0.25
    assert limiter.current == 250
    # 100 tokens take 0.4 s at 250 a second, not 0.1 s.
    assert limiter.acquire("t", 100, now=0.0) == pytest.approx(0.4)
    assert limiter.acquire("t", 100, now=0.4) == 0.0
