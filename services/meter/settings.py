"""meter's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.common.config import CommonSettings, EnvReader, read_common
from services.meter.domain.query import AnswerLimits

MIB = 1024 * 1024
# The most one QueryUsage answer holds for an API key (README "Limits"): a day of
# minutes for 69 customers, or 100,000 small rows in about 5 MiB.
DEFAULT_TENANT_LIMITS = AnswerLimits(max_rows=100_000, max_bytes=16 * MIB)
# For the service token (billing's read of every customer's usage of a meter, one
# row per customer): 500,000 customers of ids up to ~40 characters.
DEFAULT_SERVICE_LIMITS = AnswerLimits(max_rows=500_000, max_bytes=48 * MIB)
# Usage answers one replica holds at once: encoded bytes plus 160 bytes per row
# (services.meter.service.AnswerBudget); the largest service answer fits alone.
DEFAULT_ANSWER_BUDGET_BYTES = 128 * MIB


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
    # QueryUsage answer limits (README "Limits"), checked as the answer is built.
    tenant_answer_limits: AnswerLimits
    service_answer_limits: AnswerLimits
    answer_budget_bytes: int
    # Per-event rows older than this may be dropped (services.meter.retention),
    # never what an open period, the backdating window or a backfill needs;
    # None (USAGEBILLING_METER_RETENTION_DAYS=0, the default): kept forever.
    retention: timedelta | None = None


def read(reader: EnvReader) -> MeterSettings:
    tenant = AnswerLimits(
        max_rows=reader.integer(
            "USAGEBILLING_QUERY_MAX_ROWS",
            DEFAULT_TENANT_LIMITS.max_rows,
            minimum=1,
            maximum=10_000_000,
        ),
        max_bytes=reader.integer(
            "USAGEBILLING_QUERY_MAX_BYTES",
            DEFAULT_TENANT_LIMITS.max_bytes,
            minimum=64 * 1024,
            maximum=1024 * MIB,
        ),
    )
    service = AnswerLimits(
        max_rows=reader.integer(
            "USAGEBILLING_QUERY_SERVICE_MAX_ROWS",
            DEFAULT_SERVICE_LIMITS.max_rows,
            minimum=1,
            maximum=10_000_000,
        ),
        max_bytes=reader.integer(
            "USAGEBILLING_QUERY_SERVICE_MAX_BYTES",
            DEFAULT_SERVICE_LIMITS.max_bytes,
            minimum=64 * 1024,
            maximum=1024 * MIB,
        ),
    )
    budget = reader.integer(
        "USAGEBILLING_QUERY_BYTES_IN_FLIGHT",
        DEFAULT_ANSWER_BUDGET_BYTES,
        minimum=1 * MIB,
        maximum=16 * 1024 * MIB,
    )
    retention_days = reader.integer(
        "USAGEBILLING_METER_RETENTION_DAYS", 0, minimum=0, maximum=36_500
    )
    return MeterSettings(
        retention=timedelta(days=retention_days) if retention_days else None,
        tenant_answer_limits=tenant,
        service_answer_limits=service,
        answer_budget_bytes=budget,
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
