"""`python -m services.meter [serve|migrate]`: wires meter's parts together."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from services.common import app
from services.common.auth import CachedKeyResolver
from services.common.auth_client import RemoteKeyResolver
from services.common.grpc_server import Registration
from services.meter import settings as meter_settings
from services.meter.api import MeterServicer
from services.meter.backfill import Backfiller
from services.meter.consumer import EventConsumer
from services.meter.service import MeterService
from services.meter.store import MeterStore
from usagebilling.meter.v1 import meter_pb2, meter_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


def wiring(settings: meter_settings.MeterSettings) -> app.Wire:
    async def wire(runtime: app.Runtime) -> app.Wiring:
        store = MeterStore(runtime.pool)
        service = MeterService(store)
        billing = grpc.aio.insecure_channel(settings.billing_addr)
        ingest = grpc.aio.insecure_channel(settings.ingest_addr)
        backfiller = Backfiller(
            store, service, ingest, settings.common.admin_token, settings.backdate_window
        )
        service.on_created = backfiller.start
        consumer = EventConsumer(
            runtime.js, service, durable=settings.consumer_name, batch=settings.fetch_batch
        )
        return app.Wiring(
            registrations=[
                Registration(
                    meter_pb2_grpc.add_MeterServiceServicer_to_server,
                    MeterServicer(service, store),
                    meter_pb2.DESCRIPTOR.services_by_name["MeterService"].full_name,
                )
            ],
            resolver=CachedKeyResolver(
                RemoteKeyResolver(billing),
                ttl=settings.common.auth_cache_ttl.total_seconds(),
            ),
            background=[consumer.watch_lag, backfiller.resume],
            workers=[consumer],
            cleanup=[backfiller.stop, lambda: billing.close(None), lambda: ingest.close(None)],
        )

    return wire


def main() -> None:
    settings: meter_settings.MeterSettings = app.load_or_exit(meter_settings.load)
    app.main(sys.argv, lambda: settings, lambda s: s.common, MIGRATIONS, wiring(settings))


if __name__ == "__main__":
    main()
