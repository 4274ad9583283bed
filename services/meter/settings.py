"""meter's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common.config import CommonSettings, EnvReader, read_common


@dataclass(frozen=True)
class MeterSettings:
    common: CommonSettings
    billing_addr: str
    ingest_addr: str
    backdate_window: timedelta
    consumer_name: str
    fetch_batch: int
    # A message whose fold keeps failing is quarantined after this many deliveries.
    max_deliveries: int
    # Quotas on active meters, checked at CreateMeter.
    max_meters_per_tenant: int
    max_meters_per_event: int
    max_filter_conditions_per_event: int


def read(reader: EnvReader) -> MeterSettings:
    return MeterSettings(
        common=read_common(reader, "meter"),
        billing_addr=reader.text("USAGEBILLING_BILLING_ADDR", "127.0.0.1:50053"),
        ingest_addr=reader.text("USAGEBILLING_INGEST_ADDR", "127.0.0.1:50051"),
        backdate_window=reader.duration("USAGEBILLING_BACKDATE_WINDOW", timedelta(days=35)),
        consumer_name=reader.text("USAGEBILLING_METER_CONSUMER", "meter"),
        fetch_batch=reader.integer("USAGEBILLING_METER_FETCH_BATCH", 16, minimum=1, maximum=1000),
        max_deliveries=reader.integer(
            "USAGEBILLING_METER_MAX_DELIVERIES", 10, minimum=1, maximum=1000
        ),
        max_meters_per_tenant=reader.integer(
            "USAGEBILLING_MAX_METERS_PER_TENANT", 100, minimum=1, maximum=100_000
        ),
        max_meters_per_event=reader.integer(
            "USAGEBILLING_MAX_METERS_PER_EVENT", 20, minimum=1, maximum=1000
        ),
        max_filter_conditions_per_event=reader.integer(
            "USAGEBILLING_MAX_FILTER_CONDITIONS_PER_EVENT", 200, minimum=100, maximum=100_000
        ),
    )


def load(env: Mapping[str, str] = os.environ) -> MeterSettings:
    reader = EnvReader(env)
    settings = read(reader)
    reader.check()
    return settings
