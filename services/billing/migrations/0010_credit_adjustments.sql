-- AdjustCredits (services/billing/credits.py): one row per idempotency key,
-- for credits (amount > 0: a grant that never expires) and debits (amount < 0)
-- alike, so that one key names one adjustment whatever its sign.
-- entry_key: the ledger entry the call answers ("grant:<grant id>" for a
-- credit, "debit:<seq, 19 digits>" for a debit, revision 0: debits of one
-- minute are taken in the order made). A debit takes
-- from the grants open at effective_at (a whole minute) in draw order;
-- settlement replays it with the usage (services/billing/domain/credits.py).
CREATE TABLE billing.credit_adjustments (
    tenant_id       text        NOT NULL,
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    seq             bigserial   NOT NULL,
    idempotency_key text        NOT NULL,
    customer_id     uuid        NOT NULL REFERENCES billing.customers (id),
    credit_type_id  uuid        NOT NULL REFERENCES billing.credit_types (id),
    amount          numeric     NOT NULL CHECK (amount <> 0),
    effective_at    timestamptz NOT NULL,
    reason          text        NOT NULL,
    entry_key       text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, idempotency_key)
);
CREATE INDEX credit_adjustments_debits
    ON billing.credit_adjustments (tenant_id, customer_id, credit_type_id, effective_at)
    WHERE amount < 0;

-- The credits adjusted before this migration: grants of source 'adjustment'
-- (source_key 'adjust:<idempotency key>').
INSERT INTO billing.credit_adjustments (tenant_id, idempotency_key, customer_id,
    credit_type_id, amount, effective_at, reason, entry_key, created_at)
SELECT tenant_id, substr(source_key, 8), customer_id, credit_type_id, amount,
    effective_at, description, 'grant:' || id, created_at
FROM billing.credit_grants WHERE source = 'adjustment';
