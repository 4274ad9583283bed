-- Who may call: tenants and their API keys (stored only as SHA-256 hashes).
CREATE TABLE billing.tenants (
    tenant_id  text        PRIMARY KEY DEFAULT gen_random_uuid()::text,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing.api_keys (
    tenant_id   text        NOT NULL REFERENCES billing.tenants (tenant_id),
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    key_hash    text        NOT NULL UNIQUE,
    description text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE billing.customers (
    tenant_id   text        NOT NULL,
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    external_id text        NOT NULL,
    name        text        NOT NULL DEFAULT '',
    email       text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, external_id)
);

-- A product and its usage prices are immutable once created, so the prices
-- live with it as JSON (decimals as strings).
CREATE TABLE billing.products (
    tenant_id         text        NOT NULL,
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name              text        NOT NULL,
    currency          text        NOT NULL,
    billing_interval  text        NOT NULL,
    fixed_price_minor bigint      NOT NULL DEFAULT 0,
    usage_prices      jsonb       NOT NULL DEFAULT '[]',
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE billing.subscriptions (
    tenant_id   text        NOT NULL,
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    customer_id uuid        NOT NULL REFERENCES billing.customers (id),
    product_id  uuid        NOT NULL REFERENCES billing.products (id),
    start_time  timestamptz NOT NULL,
    -- Set by a cancellation: billing stops here.
    end_time    timestamptz,
    canceled_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX subscriptions_by_customer ON billing.subscriptions (tenant_id, customer_id);

-- One invoice per subscription and period, whoever builds it and how often.
CREATE TABLE billing.invoices (
    tenant_id       text        NOT NULL,
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    number          text        NOT NULL DEFAULT '',
    customer_id     uuid        NOT NULL,
    subscription_id uuid        NOT NULL REFERENCES billing.subscriptions (id),
    period_start    timestamptz NOT NULL,
    period_end      timestamptz NOT NULL,
    currency        text        NOT NULL,
    status          text        NOT NULL,
    lines           jsonb       NOT NULL,
    subtotal_minor  bigint      NOT NULL,
    total_minor     bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finalized_at    timestamptz,
    voided_at       timestamptz,
    published_at    timestamptz,
    UNIQUE (subscription_id, period_start)
);
CREATE INDEX invoices_by_tenant ON billing.invoices (tenant_id, period_start DESC, id DESC);
CREATE INDEX invoices_drafts ON billing.invoices (tenant_id, period_end) WHERE status = 'DRAFT';
CREATE INDEX invoices_unpublished ON billing.invoices (finalized_at)
    WHERE finalized_at IS NOT NULL AND published_at IS NULL;

-- Per-tenant gapless invoice numbers, taken in the finalizing transaction.
CREATE TABLE billing.invoice_numbers (
    tenant_id   text   PRIMARY KEY,
    last_number bigint NOT NULL
);
