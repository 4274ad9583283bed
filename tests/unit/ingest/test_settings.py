"""ingest's rate limit settings: defaults, off, and a burst below the largest call."""

from __future__ import annotations

from datetime import timedelta

import pytest

from services.common.config import ConfigError
from services.ingest import settings

BASE = {
    "DATABASE_URL": "postgresql://x",
    "NATS_URL": "nats://x",
    "USAGEBILLING_ADMIN_TOKEN": "t" * 16,
    "USAGEBILLING_SERVICE_TOKEN": "s" * 16,
    # meter's token's digest: meter calls ingest's ReplayEvents.
    "USAGEBILLING_METER_TOKEN_SHA256": "a" * 64,
}


def test_defaults_are_generous() -> None:
    loaded = settings.load(BASE)
    # Row units (events x the weights of the meters that fold them).
    assert (loaded.rate_limit, loaded.rate_burst) == (15_000, 30_000)
    assert loaded.weights_refresh == timedelta(seconds=5)
    assert loaded.meter_addr == "127.0.0.1:50052"


def test_meter_address_and_refresh_are_read() -> None:
    loaded = settings.load(
        {
            **BASE,
            "USAGEBILLING_METER_ADDR": "meter:50052",
            "USAGEBILLING_INGEST_WEIGHTS_REFRESH": "30s",
        }
    )
    assert loaded.meter_addr == "meter:50052"
    assert loaded.weights_refresh == timedelta(seconds=30)
    with pytest.raises(ConfigError, match="USAGEBILLING_INGEST_WEIGHTS_REFRESH"):
        settings.load({**BASE, "USAGEBILLING_INGEST_WEIGHTS_REFRESH": "2h"})


def test_zero_turns_the_limit_off() -> None:
    assert settings.load({**BASE, "USAGEBILLING_INGEST_RATE_LIMIT": "0"}).rate_limit == 0


def test_a_burst_below_the_largest_call_is_refused_at_start() -> None:
    # A call of 1000 events could never pass a smaller bucket.
    with pytest.raises(ConfigError, match="USAGEBILLING_INGEST_RATE_BURST: 999"):
        settings.load({**BASE, "USAGEBILLING_INGEST_RATE_BURST": "999"})
