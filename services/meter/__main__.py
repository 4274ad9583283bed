"""`python -m services.meter [serve|migrate]`: wires meter's parts together."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common import app, quarantine
from services.common.auth_client import billing_key_resolver
from services.common.channels import internal_channel
from services.common.grpc_server import Registration
from services.meter import settings as meter_settings
from services.meter.api import MeterServicer
from services.meter.backfill import Backfiller
from services.meter.consumer import EventConsumer
from services.meter.domain.aggregation import MeterQuotas
from services.meter.quarantine import FoldQuarantine
from services.meter.service import AnswerBudget, MeterService
from services.meter.store import MeterStore, QuarantineStore
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


def wiring(settings: meter_settings.MeterSettings) -> app.Wire:
    async def wire(runtime: app.Runtime) -> app.Wiring:
        store = MeterStore(runtime.pool)
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
            ],
            resolver=billing_key_resolver(
                billing, settings.common.service_token, settings.common.auth_cache_ttl
            ),
            background=[consumer.watch_lag, backfiller.resume, fold_quarantine.watch_depth],
            workers=[consumer],
            cleanup=[backfiller.stop, lambda: billing.close(None), lambda: ingest.close(None)],
        )

    return wire


def main() -> None:
    settings = app.load_or_exit(meter_settings.load)
    app.main(sys.argv, settings.common, MIGRATIONS, wiring(settings))


if __name__ == "__main__":
    main()
