"""ingest's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common.config import CommonSettings, EnvReader, read_common


@dataclass(frozen=True)
class IngestSettings:
    common: CommonSettings
    billing_addr: str
    backdate_window: timedelta
    # Tries of an outbox batch that fails for a reason of its own before it is
    # quarantined (NATS outages are retried without end).
    relay_max_attempts: int
    # The longest wait between two tries of a failing batch (doubling from 0.5 s).
    relay_max_backoff: timedelta


def read(reader: EnvReader) -> IngestSettings:
    return IngestSettings(
        common=read_common(reader, "ingest"),
        billing_addr=reader.text("USAGEBILLING_BILLING_ADDR", "127.0.0.1:50053"),
        backdate_window=reader.duration("USAGEBILLING_BACKDATE_WINDOW", timedelta(days=35)),
        relay_max_attempts=reader.integer(
            "USAGEBILLING_RELAY_MAX_ATTEMPTS", 5, minimum=1, maximum=1000
        ),
        relay_max_backoff=reader.duration(
            "USAGEBILLING_RELAY_MAX_BACKOFF", timedelta(seconds=10), maximum=timedelta(hours=1)
        ),
    )


def load(env: Mapping[str, str] = os.environ) -> IngestSettings:
    reader = EnvReader(env)
    settings = read(reader)
    reader.check()
    return settings
