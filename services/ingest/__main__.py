"""`python -m services.ingest [serve|migrate]`: wires ingest's parts together."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common import app, partitions, quarantine
from services.common.auth_client import billing_key_resolver
from services.common.channels import internal_channel
from services.common.grpc_server import Registration
from services.ingest import dodo
from services.ingest import settings as ingest_settings
from services.ingest.api import IngestServicer
from services.ingest.domain.rate_limit import RateLimiter
from services.ingest.meter_backlog import MeterBacklog
from services.ingest.meter_weights import CHANNEL_OPTIONS, MeterWeights
from services.ingest.relay import Publisher, Relay, RelayQuarantine
from services.ingest.service import Ingestor
from services.ingest.store import EVENT_LOG, IngestStore
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc

MIGRATIONS = Path(__file__).parent / "migrations"


def wiring(settings: ingest_settings.IngestSettings) -> app.Wire:
    async def wire(runtime: app.Runtime) -> app.Wiring:
        store = IngestStore(runtime.pool)
        publisher = Publisher(runtime.nc)
        relay = Relay(
            store,
            publisher,
            max_attempts=settings.relay_max_attempts,
            max_backoff=settings.relay_max_backoff,
        )
        limiter = (
            RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
        )
        billing = internal_channel(settings.billing_addr, tls=settings.common.tls)
        # Takes ListMeters pages larger than gRPC's default 4 MiB (see CHANNEL_OPTIONS).
        meter = internal_channel(settings.meter_addr, CHANNEL_OPTIONS, tls=settings.common.tls)
        # Only a limit needs the weights: with none, meter is never asked.
        weights = (
            MeterWeights(
                meter,
                settings.common.service_token,
                refresh_every=max(0.1, settings.weights_refresh.total_seconds()),
            )
            if limiter
            else None
        )
        ingestor = Ingestor(store, relay.wake, settings.backdate_window, limiter, weights=weights)
        backlog = MeterBacklog(runtime.js, limiter, settings.meter_consumer) if limiter else None

        async def close_meter() -> None:
            if weights is not None:
                await weights.close()
            await meter.close(None)

        return app.Wiring(
            registrations=[
                Registration.of(
                    ingest_pb2,
                    "IngestService",
                    ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                    IngestServicer(ingestor, store),
                ),
                quarantine.registration(RelayQuarantine(store, publisher)),
            ],
            resolver=billing_key_resolver(
                billing, settings.common.service_token, settings.common.auth_cache_ttl
            ),
            background=[
                relay.run,
                relay.watch_depth,
                # A limit shrinks while meter falls behind (domain.backpressure).
                *([backlog.run] if backlog else []),
                # The log's months, from the oldest an event may have on.
                lambda: partitions.keep_ahead(runtime.pool, [EVENT_LOG], settings.backdate_window),
            ],
            cleanup=[lambda: billing.close(None), close_meter],
            http_routes={dodo.PATH: dodo.handler},
        )

    return wire


def main() -> None:
    settings = app.load_or_exit(ingest_settings.load)
    app.main(sys.argv, settings.common, MIGRATIONS, wiring(settings))


if __name__ == "__main__":
    main()
