"""billing's configuration, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from services.billing.domain import webhooks as webhook_rules
from services.billing.domain.late import BACKDATE_WINDOW
from services.billing.domain.webhooks import Network, Policy
from services.common.config import CommonSettings, EnvReader, read_common


def _webhooks(reader: EnvReader) -> Policy:
    schedule = webhook_rules.DEFAULT_SCHEDULE
    allowlist: tuple[Network, ...] = ()
    if text := reader.text("USAGEBILLING_WEBHOOK_SCHEDULE"):
        try:
            schedule = webhook_rules.parse_schedule(text)
        except webhook_rules.WebhookRuleError as exc:
            reader.errors.append(f"USAGEBILLING_WEBHOOK_SCHEDULE: {exc}")
    try:
        allowlist = webhook_rules.parse_allowlist(reader.text("USAGEBILLING_WEBHOOK_ALLOWED_CIDRS"))
    except webhook_rules.WebhookRuleError as exc:
        reader.errors.append(f"USAGEBILLING_WEBHOOK_ALLOWED_CIDRS: {exc}")
    return Policy(
        schedule=schedule,
        timeout=reader.duration(
            "USAGEBILLING_WEBHOOK_TIMEOUT", timedelta(seconds=15), maximum=timedelta(minutes=5)
        ),
        disable_after=reader.duration("USAGEBILLING_WEBHOOK_DISABLE_AFTER", timedelta(days=5)),
        allow_private=reader.boolean("USAGEBILLING_WEBHOOK_ALLOW_PRIVATE", False),
        allowlist=allowlist,
        max_in_flight=reader.integer(
            "USAGEBILLING_WEBHOOK_MAX_IN_FLIGHT", 64, minimum=1, maximum=10_000
        ),
    )


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
    # Webhook deliveries (services/billing/webhooks.py) and usage alerts.
    webhooks: Policy
    alert_interval: timedelta
    # Credits' settlement (services/billing/credits.py): how far back each pass
    # reads meter again, how often an account's older days are compared with
    # meter's day totals, and how far back events may be (ingest's
    # USAGEBILLING_BACKDATE_WINDOW: the same variable, the same default). The
    # billing cycle also re-prices a finalized period once this (and the
    # invoice grace) has passed since its end, to bill its late usage.
    credits_recheck: timedelta
    credits_reconcile: timedelta
    backdate_window: timedelta


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
        webhooks=_webhooks(reader),
        alert_interval=reader.duration(
            "USAGEBILLING_ALERT_INTERVAL", timedelta(seconds=1), maximum=timedelta(minutes=10)
        ),
        credits_recheck=reader.duration(
            "USAGEBILLING_CREDITS_RECHECK", timedelta(hours=1), maximum=timedelta(days=7)
        ),
        credits_reconcile=reader.duration(
            "USAGEBILLING_CREDITS_RECONCILE", timedelta(minutes=1), maximum=timedelta(days=1)
        ),
        backdate_window=reader.duration("USAGEBILLING_BACKDATE_WINDOW", BACKDATE_WINDOW),
    )


def load(env: Mapping[str, str] = os.environ) -> BillingSettings:
    reader = EnvReader(env)
    settings = read(reader)
    reader.check()
    return settings
