"""Prometheus metrics, served by each service on its own port
(USAGEBILLING_METRICS_PORT, bound to USAGEBILLING_HOST).

Every series is defined here, once, in REGISTRY (not prometheus_client's
global one); `serve(service)` exports the series of that service only (OWN):
ingest shows no consumer lag, billing no outbox depth. The gRPC series have the
names and labels of go-grpc-prometheus, which the usual Grafana gRPC dashboards
read. No `_created` series: they double the count and no dashboard uses them."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.registry import Collector

disable_created_metrics()  # type: ignore[no-untyped-call]

# Kept equal to pyproject.toml's version (tests/unit/common/test_metrics.py).
VERSION = "0.1.0"

REGISTRY = CollectorRegistry(auto_describe=True)

GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server",
    ["grpc_service", "grpc_method", "grpc_type"],
    registry=REGISTRY,
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
    registry=REGISTRY,
)
GRPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status, on the server",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "usagebilling_build_info",
    "Always 1; the labels say which build runs",
    ["version", "revision", "python"],
    registry=REGISTRY,
)
# Set by services/common/readiness.py every USAGEBILLING_READINESS_INTERVAL.
READY = Gauge(
    "usagebilling_ready",
    "1 when the last readiness check of a dependency (postgres, nats) answered, else 0",
    ["dependency"],
    registry=REGISTRY,
)
EVENTS = Counter(
    "usagebilling_events_total",
    "Events received by ingest, by result",
    ["result"],
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "usagebilling_outbox_depth",
    "Accepted batches waiting in ingest's outbox for JetStream",
    registry=REGISTRY,
)
RATE_SHARE = Gauge(
    "usagebilling_ingest_rate_share",
    "The part (0.05 to 1) of USAGEBILLING_INGEST_RATE_LIMIT tenants get now: below 1"
    " while meter has more than a second of backlog (services/ingest/domain/backpressure.py)",
    registry=REGISTRY,
)
CONSUMER_LAG = Gauge(
    "usagebilling_consumer_lag_messages",
    "Messages of the EVENTS stream not yet folded by meter",
    registry=REGISTRY,
)
CONSUMER_BATCH_SECONDS = Histogram(
    "usagebilling_consumer_batch_seconds",
    "Time to fold and commit one fetched batch",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
EVENTS_FOLDED = Counter(
    "usagebilling_meter_rows_folded_total",
    "New (meter, event) rows folded by meter",
    registry=REGISTRY,
)
INVOICES = Counter(
    "usagebilling_invoices_total",
    "Invoices built and finalized by billing",
    ["action"],
    registry=REGISTRY,
)
BILLING_FAILURES = Counter(
    "usagebilling_billing_failures_total",
    "Billing periods whose invoice is held because they cannot be priced, counted once per"
    " period (when first recorded, or when the reason changes), by reason",
    ["reason"],
    registry=REGISTRY,
)
# Dead letters: stage "relay" (ingest) or "fold" (meter).
QUARANTINED = Counter(
    "usagebilling_quarantined_total",
    "Messages a stage set aside after bounded retries, by stage",
    ["stage"],
    registry=REGISTRY,
)
QUARANTINE_DEPTH = Gauge(
    "usagebilling_quarantine_depth",
    "Messages currently in quarantine, by stage",
    ["stage"],
    registry=REGISTRY,
)

COMMON: tuple[Collector, ...] = (GRPC_STARTED, GRPC_HANDLED, GRPC_SECONDS, BUILD_INFO, READY)
# The series each service exports besides COMMON.
OWN: dict[str, tuple[Collector, ...]] = {
    "ingest": (EVENTS, OUTBOX_DEPTH, QUARANTINED, QUARANTINE_DEPTH, RATE_SHARE),
    "meter": (
        CONSUMER_LAG,
        CONSUMER_BATCH_SECONDS,
        EVENTS_FOLDED,
        QUARANTINED,
        QUARANTINE_DEPTH,
    ),
    "billing": (INVOICES, BILLING_FAILURES),
}


def registry_of(service: str) -> CollectorRegistry:
    """What `service` exports: COMMON, its OWN series, and the process's
    (process_*, python_gc_*, python_info)."""
    registry = CollectorRegistry()
    collectors: Iterable[Collector] = (*COMMON, *OWN[service])
    for collector in collectors:
        registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def set_build_info() -> None:
    """usagebilling_build_info: the revision is the image's (USAGEBILLING_REVISION,
    from the Dockerfile's REVISION build argument), "unknown" in a checkout."""
    BUILD_INFO.labels(
        VERSION, os.environ.get("USAGEBILLING_REVISION") or "unknown", platform.python_version()
    ).set(1)


def serve(service: str, host: str, port: int) -> None:
    """Serves `service`'s /metrics on host:port from a daemon thread; port 0
    disables it."""
    set_build_info()
    if not port:
        return
    try:
        start_http_server(port, addr=host, registry=registry_of(service))
    except OSError as exc:
        # Imported here: config imports readiness, which imports this module.
        from services.common.config import ConfigError

        # One line naming the setting, not a traceback (a port another program holds).
        raise ConfigError(
            f"USAGEBILLING_METRICS_PORT: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
