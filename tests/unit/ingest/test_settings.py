"""ingest's rate limit settings: defaults, off, and a burst below the largest call."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.ingest import settings

BASE = {
    "DATABASE_URL": "postgresql://x",
    "NATS_URL": "nats://x",
    "USAGEBILLING_ADMIN_TOKEN": "t" * 16,
    "USAGEBILLING_SERVICE_TOKEN": "s" * 16,
}


def test_defaults_are_generous() -> None:
    loaded = settings.load(BASE)
    assert (loaded.rate_limit, loaded.rate_burst) == (50_000, 100_000)


def test_zero_turns_the_limit_off() -> None:
    assert settings.load({**BASE, "USAGEBILLING_INGEST_RATE_LIMIT": "0"}).rate_limit == 0


def test_a_burst_below_the_largest_call_is_refused_at_start() -> None:
    # A call of 1000 events could never pass a smaller bucket.
    with pytest.raises(ConfigError, match="USAGEBILLING_INGEST_RATE_BURST: 999"):
        settings.load({**BASE, "USAGEBILLING_INGEST_RATE_BURST": "999"})
