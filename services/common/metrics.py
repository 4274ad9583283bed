"""Prometheus metrics, served by each service on its own port
(USAGEBILLING_METRICS_PORT). The series are defined here, once, so that every
service exports the same names."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

GRPC_REQUESTS = Counter(
    "usagebilling_grpc_requests_total",
    "gRPC calls served, by method and status code",
    ["method", "code"],
)
GRPC_SECONDS = Histogram(
    "usagebilling_grpc_request_seconds",
    "gRPC call duration",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS = Counter("usagebilling_events_total", "Events received by ingest, by result", ["result"])
OUTBOX_DEPTH = Gauge(
    "usagebilling_outbox_depth", "Accepted batches waiting in ingest's outbox for JetStream"
)
CONSUMER_LAG = Gauge(
    "usagebilling_consumer_lag_messages", "Messages of the EVENTS stream not yet folded by meter"
)
CONSUMER_BATCH_SECONDS = Histogram(
    "usagebilling_consumer_batch_seconds",
    "Time to fold and commit one fetched batch",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENTS_FOLDED = Counter(
    "usagebilling_meter_rows_folded_total", "New (meter, event) rows folded by meter"
)
INVOICES = Counter(
    "usagebilling_invoices_total", "Invoices built and finalized by billing", ["action"]
)
BILLING_FAILURES = Counter(
    "usagebilling_billing_failures_total",
    "Billing periods whose invoice is held because they cannot be priced, counted once per"
    " period (when first recorded, or when the reason changes), by reason",
    ["reason"],
)
# Dead letters: stage "relay" (ingest) or "fold" (meter).
QUARANTINED = Counter(
    "usagebilling_quarantined_total",
    "Messages a stage set aside after bounded retries, by stage",
    ["stage"],
)
QUARANTINE_DEPTH = Gauge(
    "usagebilling_quarantine_depth", "Messages currently in quarantine, by stage", ["stage"]
)
# Set by services/common/readiness.py every USAGEBILLING_READINESS_INTERVAL.
READY = Gauge(
    "usagebilling_ready",
    "1 when the last readiness check of a dependency (postgres, nats) answered, else 0",
    ["dependency"],
)


def serve(port: int) -> None:
    """Serves /metrics on `port` from a daemon thread; 0 disables it."""
    if port:
        start_http_server(port)
