-- Periods whose invoice could not be built from their data (for example a line
-- beyond the int64 range of minor units). The invoice of such a period is held,
-- not issued without the line; the period is tried again on every run, and its
-- row goes when it is invoiced. One row per period, so that the failure is
-- logged and counted once, not on every scheduler tick.
CREATE TABLE billing.period_failures (
    tenant_id       text        NOT NULL,
    subscription_id uuid        NOT NULL REFERENCES billing.subscriptions (id),
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    reason          text        NOT NULL,
    cause           text        NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at  timestamptz NOT NULL,
    attempts        integer     NOT NULL DEFAULT 1,
    PRIMARY KEY (subscription_id, period_start)
);
CREATE INDEX period_failures_by_tenant ON billing.period_failures (tenant_id, subscription_id);
