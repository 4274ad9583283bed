-- Webhooks and usage alerts (services/billing/webhooks*.py, alerts*.py).

-- A tenant's endpoint. previous_secret signs too until previous_secret_until
-- (a rotation's overlap). failing_since: the first failure since the last success.
CREATE TABLE billing.webhook_endpoints (
    tenant_id              text        NOT NULL,
    id                     uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    url                    text        NOT NULL,
    event_types            text[]      NOT NULL,
    description            text        NOT NULL DEFAULT '',
    secret                 text        NOT NULL,
    previous_secret        text        NOT NULL DEFAULT '',
    previous_secret_until  timestamptz,
    enabled                boolean     NOT NULL DEFAULT true,
    disabled_reason        text        NOT NULL DEFAULT '',
    failing_since          timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_tenant ON billing.webhook_endpoints (tenant_id, created_at, id);

-- One BILLING message for one endpoint. message_id (the webhook-id header) is
-- derived from the message, so a redelivered JetStream message finds its row
-- (the unique key) and every retry sends the same id. next_attempt_at is
-- also the lease of an attempt in flight: a sender that dies leaves it due.
CREATE TABLE billing.webhook_deliveries (
    tenant_id         text        NOT NULL,
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    endpoint_id       uuid        NOT NULL REFERENCES billing.webhook_endpoints (id) ON DELETE CASCADE,
    message_id        text        NOT NULL,
    event_type        text        NOT NULL,
    payload           text        NOT NULL,
    status            text        NOT NULL DEFAULT 'PENDING',
    attempts          integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz,
    last_attempt_at   timestamptz,
    status_code       integer     NOT NULL DEFAULT 0,
    latency_ms        bigint      NOT NULL DEFAULT 0,
    response_body     text        NOT NULL DEFAULT '',
    error             text        NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, message_id)
);
CREATE INDEX webhook_deliveries_due ON billing.webhook_deliveries (next_attempt_at)
    WHERE status = 'PENDING';
CREATE INDEX webhook_deliveries_endpoint ON billing.webhook_deliveries (endpoint_id, created_at DESC, id);

-- A threshold on a meter's usage per billing period; customer_id NULL: every customer.
CREATE TABLE billing.usage_alerts (
    tenant_id     text        NOT NULL,
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    meter_id      text        NOT NULL,
    customer_id   uuid        REFERENCES billing.customers (id),
    quantity      numeric     CHECK (quantity > 0),
    amount_minor  bigint      CHECK (amount_minor > 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((quantity IS NULL) <> (amount_minor IS NULL))
);
CREATE INDEX usage_alerts_tenant ON billing.usage_alerts (tenant_id, created_at, id);

-- Once per alert, customer and period: the primary key. published: the
-- usage.threshold_reached message is acked by JetStream.
CREATE TABLE billing.usage_alert_firings (
    tenant_id      text        NOT NULL,
    alert_id       uuid        NOT NULL REFERENCES billing.usage_alerts (id) ON DELETE CASCADE,
    customer_id    uuid        NOT NULL,
    period_start   timestamptz NOT NULL,
    payload        bytea       NOT NULL,
    published      boolean     NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (alert_id, customer_id, period_start)
);
CREATE INDEX usage_alert_firings_unpublished ON billing.usage_alert_firings (created_at)
    WHERE NOT published;
