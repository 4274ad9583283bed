"""Which service may call which RPC of another for a tenant.

Each service has its own token (USAGEBILLING_SERVICE_TOKEN, the one it
presents) and knows its callers' tokens only by their SHA-256
(USAGEBILLING_<CALLER>_TOKEN_SHA256). A caller's token, with the
`x-usagebilling-tenant` header, opens only the methods listed for it below:
exactly the calls the code makes (grep `on_behalf_of`). So a compromised
ingest pod can look up meters and check keys, but not void an invoice or
read another tenant's usage.
"""

from __future__ import annotations

SERVICES = ("ingest", "meter", "billing")

# Full gRPC method -> the services whose token may call it for a tenant.
TENANT_CALLS: dict[str, frozenset[str]] = {
    # billing prices invoices (services/billing/meter_client.py).
    "/usagebilling.meter.v1.MeterService/GetMeter": frozenset({"billing"}),
    "/usagebilling.meter.v1.MeterService/QueryUsage": frozenset({"billing"}),
    # billing reports each tenant's oldest open period, which meter's
    # retention keeps (services/billing/scheduler.py, services/meter/retention.py).
    "/usagebilling.meter.v1.RetentionService/ReportOpenPeriods": frozenset({"billing"}),
    # ingest's fold-weight cache for its rate limit (services/ingest/meter_weights.py).
    "/usagebilling.meter.v1.MeterService/ListMeters": frozenset({"ingest"}),
    # meter's backfill of a new meter (services/meter/backfill.py).
    "/usagebilling.ingest.v1.IngestService/ReplayEvents": frozenset({"meter"}),
    # "does this tenant exist" (services/common/auth_client.py).
    "/usagebilling.billing.v1.AuthService/WhoAmI": frozenset({"ingest", "meter"}),
}

# The gRPC package each service serves (its methods start with "/<package>.").
_PACKAGES = {
    "ingest": "usagebilling.ingest.v1",
    "meter": "usagebilling.meter.v1",
    "billing": "usagebilling.billing.v1",
}


def callers_of(service: str) -> tuple[str, ...]:
    """The services that call `service` for a tenant, in SERVICES order: the
    ones whose token digests `service` must know."""
    prefix = f"/{_PACKAGES[service]}."
    callers = {
        caller
        for method, allowed in TENANT_CALLS.items()
        if method.startswith(prefix)
        for caller in allowed
    }
    return tuple(s for s in SERVICES if s in callers)


def digest_setting(service: str) -> str:
    """The variable holding `service`'s token's SHA-256 (hex)."""
    return f"USAGEBILLING_{service.upper()}_TOKEN_SHA256"


def may_call(service: str, method: str) -> bool:
    return service in TENANT_CALLS.get(method, frozenset())
