"""ingest's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common.config import CommonSettings, EnvReader, read_common
from services.ingest.domain.validation import MAX_BATCH


@dataclass(frozen=True)
class IngestSettings:
    common: CommonSettings
    billing_addr: str
    # meter's address: ingest asks it for each tenant's fold weights.
    meter_addr: str
    backdate_window: timedelta
    # Row units (services.ingest.domain.fold_cost) per second per tenant and
    # replica; 0: no limit.
    rate_limit: int
    # The bucket's size in row units: at least the largest call's event count
    # (a call costing more passes on a full bucket and leaves a debt).
    rate_burst: int
    # meter's durable consumer of EVENTS (USAGEBILLING_METER_CONSUMER, as meter
    # reads it): its backlog cuts the rate limit (services/ingest/meter_backlog.py).
    meter_consumer: str
    # How long a tenant's fold weights are used before meter is asked again.
    weights_refresh: timedelta
    # Tries of an outbox batch that fails for a reason of its own before it is
    # quarantined (NATS outages are retried without end).
    relay_max_attempts: int
    # The longest wait between two tries of a failing batch (doubling from 0.5 s).
    relay_max_backoff: timedelta


def read(reader: EnvReader) -> IngestSettings:
    return IngestSettings(
        common=read_common(reader, "ingest"),
        billing_addr=reader.text("USAGEBILLING_BILLING_ADDR", "127.0.0.1:50053"),
        meter_addr=reader.text("USAGEBILLING_METER_ADDR", "127.0.0.1:50052"),
        backdate_window=reader.duration("USAGEBILLING_BACKDATE_WINDOW", timedelta(days=35)),
        rate_limit=reader.integer("USAGEBILLING_INGEST_RATE_LIMIT", 15_000, maximum=10**9),
        rate_burst=reader.integer(
            "USAGEBILLING_INGEST_RATE_BURST", 30_000, minimum=MAX_BATCH, maximum=10**9
        ),
        meter_consumer=reader.text("USAGEBILLING_METER_CONSUMER", "meter"),
        weights_refresh=reader.duration(
            "USAGEBILLING_INGEST_WEIGHTS_REFRESH",
            timedelta(seconds=5),
            maximum=timedelta(hours=1),
        ),
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
