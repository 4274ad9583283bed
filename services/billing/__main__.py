"""`python -m services.billing [serve|migrate]`: wires billing's parts together."""

from __future__ import annotations

import sys
from pathlib import Path

from services.billing import api
from services.billing import settings as billing_settings
from services.billing.accounts import Accounts
from services.billing.alerts import Alerts
from services.billing.alerts_api import UsageAlertServicer
from services.billing.alerts_store import AlertStore
from services.billing.credits import Credits, MinuteUsage
from services.billing.credits_api import CreditCatalog, CreditProductServicer, CreditServicer
from services.billing.credits_store import CreditStore
from services.billing.invoicing import Invoicing
from services.billing.meter_client import CHANNEL_OPTIONS, MeterClient
from services.billing.open_periods import OpenPeriodsReporter
from services.billing.scheduler import Scheduler
from services.billing.store import BillingStore
from services.billing.webhooks import Webhooks
from services.billing.webhooks_api import WebhookServicer
from services.billing.webhooks_store import WebhookStore
from services.common import app, db
from services.common.channels import internal_channel
from services.common.grpc_server import Registration
from usagebilling.billing.v1 import (
    alert_pb2,
    alert_pb2_grpc,
    credit_pb2,
    credit_pb2_grpc,
    customer_pb2,
    customer_pb2_grpc,
    invoice_pb2,
    invoice_pb2_grpc,
    product_pb2,
    product_pb2_grpc,
    subscription_pb2,
    subscription_pb2_grpc,
    tenant_pb2,
    tenant_pb2_grpc,
    webhook_pb2,
    webhook_pb2_grpc,
)

MIGRATIONS = Path(__file__).parent / "migrations"


def wiring(settings: billing_settings.BillingSettings) -> app.Wire:
    async def wire(runtime: app.Runtime) -> app.Wiring:
        # A few connections for the request path's one-statement lookups (API
        # keys, customers, a balance's inputs): no reset round trip on release.
        reads = await db.create_pool(
            settings.common.database_url, min_size=1, max_size=4, plain_reads=True
        )
        store = BillingStore(runtime.pool, reads)
        meter_channel = internal_channel(
            settings.meter_addr, CHANNEL_OPTIONS, tls=settings.common.tls
        )
        meters = MeterClient(meter_channel, settings.common.service_token)
        accounts = Accounts(store)
        credit_store = CreditStore(runtime.pool, reads)
        catalog = CreditCatalog(store, meters, credit_store)
        credits = Credits(
            credit_store,
            store,
            MinuteUsage(meter_channel, settings.common.service_token),
            runtime.js,
            recheck=settings.credits_recheck,
            reconcile=settings.credits_reconcile,
            backdate=settings.backdate_window,
        )
        invoicing = Invoicing(
            store,
            meters,
            settings.invoice_grace,
            runtime.js,
            catchup_periods=settings.catchup_periods,
            run_budget=settings.run_budget,
            credits=credits,
            backdate_window=settings.backdate_window,
        )
        reporter = OpenPeriodsReporter(store, meter_channel, settings.common.service_token)
        scheduler = Scheduler(store, invoicing, settings.scheduler_interval)
        webhook_store = WebhookStore(runtime.pool)
        webhooks = Webhooks(webhook_store, runtime.js, settings.webhooks)
        alert_store = AlertStore(runtime.pool)
        alerts = Alerts(alert_store, store, meters, runtime.js, settings.alert_interval)
        return app.Wiring(
            registrations=[
                Registration.of(
                    tenant_pb2,
                    "TenantService",
                    tenant_pb2_grpc.add_TenantServiceServicer_to_server,
                    api.TenantServicer(accounts, store),
                ),
                Registration.of(
                    tenant_pb2,
                    "AuthService",
                    tenant_pb2_grpc.add_AuthServiceServicer_to_server,
                    api.AuthServicer(),
                ),
                Registration.of(
                    customer_pb2,
                    "CustomerService",
                    customer_pb2_grpc.add_CustomerServiceServicer_to_server,
                    api.CustomerServicer(accounts, store),
                ),
                Registration.of(
                    product_pb2,
                    "ProductService",
                    product_pb2_grpc.add_ProductServiceServicer_to_server,
                    CreditProductServicer(catalog, store, credit_store),
                ),
                Registration.of(
                    credit_pb2,
                    "CreditService",
                    credit_pb2_grpc.add_CreditServiceServicer_to_server,
                    CreditServicer(credits, credit_store),
                ),
                Registration.of(
                    subscription_pb2,
                    "SubscriptionService",
                    subscription_pb2_grpc.add_SubscriptionServiceServicer_to_server,
                    api.SubscriptionServicer(catalog, invoicing, store),
                ),
                Registration.of(
                    invoice_pb2,
                    "InvoiceService",
                    invoice_pb2_grpc.add_InvoiceServiceServicer_to_server,
                    api.InvoiceServicer(invoicing, store),
                ),
                Registration.of(
                    webhook_pb2,
                    "WebhookService",
                    webhook_pb2_grpc.add_WebhookServiceServicer_to_server,
                    WebhookServicer(webhook_store, settings.webhooks),
                ),
                Registration.of(
                    alert_pb2,
                    "UsageAlertService",
                    alert_pb2_grpc.add_UsageAlertServiceServicer_to_server,
                    UsageAlertServicer(alert_store, store, meters),
                ),
            ],
            # billing owns the keys: it reads them from its own schema.
            resolver=accounts,
            # Credits settle every second whatever the scheduler does: balances are real time.
            background=([scheduler.run] if settings.scheduler_enabled else [])
            + [credits.run, reporter.run, webhooks.run, alerts.run],
            cleanup=[lambda: meter_channel.close(None), reads.close],
        )

    return wire


def main() -> None:
    settings = app.load_or_exit(billing_settings.load)
    app.main(sys.argv, settings.common, MIGRATIONS, wiring(settings))


if __name__ == "__main__":
    main()
