from datetime import timedelta

import pytest

from services.common.config import ConfigError, EnvReader
from services.ingest import settings as ingest_settings
from services.meter import settings as meter_settings


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        ingest_settings.load(
            {"USAGEBILLING_INGEST_PORT": "http", "USAGEBILLING_BACKDATE_WINDOW": "35 days"}
        )
    message = str(caught.value)
    for name in (
        "DATABASE_URL: required",
        "NATS_URL: required",
        "USAGEBILLING_ADMIN_TOKEN_SHA256: required",
        "USAGEBILLING_SERVICE_TOKEN: required",
        "USAGEBILLING_METER_TOKEN_SHA256: required",
        "USAGEBILLING_INGEST_PORT: 'http' is not an integer",
        "USAGEBILLING_BACKDATE_WINDOW: '35 days' is not a duration",
    ):
        assert name in message


def test_typed_values_and_defaults() -> None:
    settings = meter_settings.load(
        {
            "DATABASE_URL": "postgresql://db/x",
            "NATS_URL": "nats://n:4222",
            "USAGEBILLING_ADMIN_TOKEN": "t" * 16,
            "USAGEBILLING_SERVICE_TOKEN": "s" * 16,
            "USAGEBILLING_INGEST_TOKEN_SHA256": "a" * 64,
            "USAGEBILLING_BILLING_TOKEN_SHA256": "b" * 64,
            "USAGEBILLING_METER_DATABASE_URL": "postgresql://own/meter",
            "USAGEBILLING_BACKDATE_WINDOW": "7d",
            "USAGEBILLING_AUTO_MIGRATE": "false",
        }
    )
    assert settings.common.database_url == "postgresql://own/meter"
    assert settings.common.port == 50052
    assert settings.backdate_window == timedelta(days=7)
    assert settings.common.auto_migrate is False
    assert settings.common.auth_cache_ttl == timedelta(seconds=30)


def test_limits_and_choices() -> None:
    reader = EnvReader({"A": "70000", "B": "2m", "C": "loud", "D": "maybe", "E": "500ms"})
    assert reader.integer("A", 1, maximum=65535) == 1
    assert reader.duration("B", timedelta(0), maximum=timedelta(seconds=60)) == timedelta(0)
    assert reader.choice("C", "info", ("info", "debug")) == "info"
    assert reader.boolean("D", True) is True
    assert reader.duration("E", timedelta(0)) == timedelta(milliseconds=500)
    assert len(reader.errors) == 4
    assert reader.names == {"A", "B", "C", "D", "E"}
