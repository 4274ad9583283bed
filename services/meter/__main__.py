"""`python -m services.meter [serve|migrate]`: wires meter's parts together."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common import app, db, partitions, quarantine
from services.common.auth_client import billing_key_resolver
from services.common.channels import internal_channel
from services.common.grpc_server import Registration
from services.meter import settings as meter_settings
from services.meter.api import MeterServicer
from services.meter.backfill import Backfiller
from services.meter.consumer import EventConsumer
from services.meter.domain.aggregation import MeterQuotas
from services.meter.quarantine import FoldQuarantine
from services.meter.retention import (
    METER_EVENTS,
    RetainingMeterStore,
    Retention,
    RetentionServicer,
    RetentionStore,
)
from services.meter.service import AnswerBudget, MeterService
from services.meter.store import QuarantineStore
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc, retention_pb2, retention_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


def wiring(settings: meter_settings.MeterSettings) -> app.Wire:
    async def wire(runtime: app.Runtime) -> app.Wiring:
        # A few connections of generic plans for one customer's usage reads
        # (MeterStore.reads: plain SELECTs only), beside the runtime's pool.
        reads = await db.create_pool(
            settings.common.database_url,
            min_size=1,
            max_size=4,
            generic_plans=True,
            plain_reads=True,
        )
        store = RetainingMeterStore(runtime.pool, reads)
        service = MeterService(
            store,
            MeterQuotas(
                settings.max_meters_per_tenant,
                settings.max_meters_per_event,
                settings.max_filter_conditions_per_event,
            ),
        )
        billing = internal_channel(settings.billing_addr, tls=settings.common.tls)
        ingest = internal_channel(settings.ingest_addr, tls=settings.common.tls)
        fold_quarantine = FoldQuarantine(QuarantineStore(runtime.pool), service)
        backfiller = Backfiller(
            store,
            service,
            ingest,
            settings.common.service_token,
            settings.backdate_window,
            quarantine=fold_quarantine,
        )
        service.on_created = backfiller.start
        consumer = EventConsumer(
            runtime.js,
            service,
            fold_quarantine,
            durable=settings.consumer_name,
            batch=settings.fetch_batch,
            max_deliveries=settings.max_deliveries,
        )
        retention_store = RetentionStore(runtime.pool)
        retention = Retention(
            retention_store,
            store,
            keep=settings.retention,
            backdate_window=settings.backdate_window,
        )
        return app.Wiring(
            registrations=[
                Registration.of(
                    meter_pb2,
                    "MeterService",
                    meter_pb2_grpc.add_MeterServiceServicer_to_server,
                    MeterServicer(
                        service,
                        store,
                        tenant_limits=settings.tenant_answer_limits,
                        service_limits=settings.service_answer_limits,
                        budget=AnswerBudget(settings.answer_budget_bytes),
                    ),
                ),
                quarantine.registration(fold_quarantine),
                Registration.of(
                    retention_pb2,
                    "RetentionService",
                    retention_pb2_grpc.add_RetentionServiceServicer_to_server,
                    RetentionServicer(retention_store),
                ),
            ],
            resolver=billing_key_resolver(
                billing, settings.common.service_token, settings.common.auth_cache_ttl
            ),
            background=[
                consumer.watch_lag,
                backfiller.resume,
                fold_quarantine.watch_depth,
                retention.run,
                # meter_events' months, from the oldest an event may have on.
                lambda: partitions.keep_ahead(
                    runtime.pool, [METER_EVENTS], settings.backdate_window
                ),
            ],
            workers=[consumer],
            cleanup=[
                backfiller.stop,
                lambda: billing.close(None),
                lambda: ingest.close(None),
                reads.close,
            ],
        )

    return wire


def main() -> None:
    settings = app.load_or_exit(meter_settings.load)
    app.main(sys.argv, settings.common, MIGRATIONS, wiring(settings))


if __name__ == "__main__":
    main()
