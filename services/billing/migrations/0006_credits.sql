-- Credits (services/billing/credits.py, domain/credits.py).

-- A unit credits are counted in: CUSTOM (precision 0..3) or CURRENCY.
CREATE TABLE billing.credit_types (
    tenant_id             text        NOT NULL,
    id                    uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name                  text        NOT NULL,
    kind                  text        NOT NULL,
    precision             smallint    NOT NULL,
    currency              text        NOT NULL DEFAULT '',
    low_balance_threshold numeric,
    created_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

-- A product's credits: {"included": [{"credit_type_id", "amount", "rollover",
-- "priority"}], "prices": {"<meter id>": {"credit_type_id", "rate", "overage_rule"}}}.
ALTER TABLE billing.products ADD COLUMN credits jsonb NOT NULL DEFAULT '{}';

-- A priced grant (a top-up) is billed on a finalized one-off invoice that
-- belongs to no subscription.
ALTER TABLE billing.invoices ALTER COLUMN subscription_id DROP NOT NULL;

-- A grant. source_key makes each grant happen once: "api:<idempotency key>",
-- "product:<subscription>:<credit type>:<period start>", "adjust:<key>".
CREATE TABLE billing.credit_grants (
    tenant_id       text        NOT NULL,
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    seq             bigserial   NOT NULL,
    customer_id     uuid        NOT NULL REFERENCES billing.customers (id),
    credit_type_id  uuid        NOT NULL REFERENCES billing.credit_types (id),
    amount          numeric     NOT NULL CHECK (amount > 0),
    effective_at    timestamptz NOT NULL,
    expires_at      timestamptz CHECK (expires_at > effective_at),
    priority        integer     NOT NULL DEFAULT 0,
    source          text        NOT NULL,
    source_key      text        NOT NULL,
    description     text        NOT NULL DEFAULT '',
    -- Included credits of one subscription and type form a chain (rollover).
    chain           text        NOT NULL DEFAULT '',
    rollover        jsonb,
    price_minor     bigint      NOT NULL DEFAULT 0,
    price_currency  text        NOT NULL DEFAULT '',
    invoice_id      uuid,
    subscription_id uuid,
    period_start    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, source_key)
);
CREATE INDEX credit_grants_by_account ON billing.credit_grants (tenant_id, customer_id, credit_type_id);

-- One customer's balance of one type: the row every change of it locks.
-- state: what each grant (and "deficit") has left at settled_until.
-- dirty_from: a grant took effect before settled_until: settle again from it.
-- balance: the running sum of the account's entries in recording order.
CREATE TABLE billing.credit_accounts (
    tenant_id      text        NOT NULL,
    customer_id    uuid        NOT NULL REFERENCES billing.customers (id),
    credit_type_id uuid        NOT NULL REFERENCES billing.credit_types (id),
    settled_until  timestamptz,
    dirty_from     timestamptz,
    state          jsonb       NOT NULL DEFAULT '{}',
    balance        numeric     NOT NULL DEFAULT 0,
    low_armed      boolean     NOT NULL DEFAULT true,
    PRIMARY KEY (tenant_id, customer_id, credit_type_id)
);

-- The ledger: immutable entries. entry_key names what an entry is about
-- ("grant:<id>", "draw:<meter>:<minute>", "over:draw:...", "expire:<grant>",
-- "rollover:<grant>", "repay:<grant>"); revision 0 is the first entry, each
-- correction (late usage) adds the next revision, so none is entered twice.
CREATE TABLE billing.credit_ledger (
    tenant_id      text        NOT NULL,
    id             bigserial   PRIMARY KEY,
    customer_id    uuid        NOT NULL,
    credit_type_id uuid        NOT NULL,
    kind           text        NOT NULL,
    entry_key      text        NOT NULL,
    revision       integer     NOT NULL,
    amount         numeric     NOT NULL,
    balance_after  numeric     NOT NULL,
    effective_at   timestamptz NOT NULL,
    allocations    jsonb       NOT NULL DEFAULT '{}',
    grant_id       text        NOT NULL DEFAULT '',
    meter_id       text        NOT NULL DEFAULT '',
    window_start   timestamptz,
    window_end     timestamptz,
    quantity       numeric     NOT NULL DEFAULT 0,
    uncovered      numeric     NOT NULL DEFAULT 0,
    description    text        NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz,
    UNIQUE (tenant_id, customer_id, credit_type_id, entry_key, revision)
);
CREATE INDEX credit_ledger_by_account
    ON billing.credit_ledger (tenant_id, customer_id, credit_type_id, effective_at);
CREATE INDEX credit_ledger_by_tenant ON billing.credit_ledger (tenant_id, created_at, id);
CREATE INDEX credit_ledger_unpublished ON billing.credit_ledger (id) WHERE published_at IS NULL;
