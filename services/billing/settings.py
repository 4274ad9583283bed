"""billing's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common.config import CommonSettings, EnvReader, read_common


@dataclass(frozen=True)
class BillingSettings:
    common: CommonSettings
    meter_addr: str
    invoice_grace: timedelta
    scheduler_interval: timedelta
    scheduler_enabled: bool
    # Ended periods one run builds per subscription at most (oldest first).
    catchup_periods: int
    # How long one run for one tenant works before it stops at a batch boundary.
    run_budget: timedelta


def read(reader: EnvReader) -> BillingSettings:
    return BillingSettings(
        common=read_common(reader, "billing"),
        meter_addr=reader.text("USAGEBILLING_METER_ADDR", "127.0.0.1:50052"),
        # At most a year: as_of - grace must stay far from datetime's year 1.
        invoice_grace=reader.duration(
            "USAGEBILLING_INVOICE_GRACE", timedelta(hours=1), maximum=timedelta(days=366)
        ),
        scheduler_interval=reader.duration("USAGEBILLING_SCHEDULER_INTERVAL", timedelta(minutes=1)),
        scheduler_enabled=reader.boolean("USAGEBILLING_SCHEDULER_ENABLED", True),
        catchup_periods=reader.integer(
            "USAGEBILLING_BILLING_CATCHUP_PERIODS", 31, minimum=1, maximum=10_000
        ),
        run_budget=reader.duration(
            "USAGEBILLING_BILLING_RUN_BUDGET", timedelta(seconds=10), maximum=timedelta(minutes=10)
        ),
    )


def load(env: Mapping[str, str] = os.environ) -> BillingSettings:
    reader = EnvReader(env)
    settings = read(reader)
    reader.check()
    return settings
