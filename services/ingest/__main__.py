"""`python -m services.ingest [serve|migrate]`: wires ingest's parts together."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from services.common import app
from services.common.auth import CachedKeyResolver
from services.common.auth_client import RemoteKeyResolver
from services.common.grpc_server import Registration
from services.ingest import settings as ingest_settings
from services.ingest.api import IngestServicer
from services.ingest.relay import Relay
from services.ingest.service import Ingestor
from services.ingest.store import IngestStore
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


def wiring(settings: ingest_settings.IngestSettings) -> app.Wire:
    async def wire(runtime: app.Runtime) -> app.Wiring:
        store = IngestStore(runtime.pool)
        relay = Relay(store, runtime.js)
        ingestor = Ingestor(store, relay.wake, settings.backdate_window)
        billing = grpc.aio.insecure_channel(settings.billing_addr)
        return app.Wiring(
            registrations=[
                Registration(
                    ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                    IngestServicer(ingestor, store),
                    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name,
                )
            ],
            resolver=CachedKeyResolver(
                RemoteKeyResolver(billing),
                ttl=settings.common.auth_cache_ttl.total_seconds(),
            ),
            background=[relay.run, relay.watch_depth],
            cleanup=[lambda: billing.close(None)],
        )

    return wire


def main() -> None:
    settings: ingest_settings.IngestSettings = app.load_or_exit(ingest_settings.load)
    app.main(sys.argv, lambda: settings, lambda s: s.common, MIGRATIONS, wiring(settings))


if __name__ == "__main__":
    main()
