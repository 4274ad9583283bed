-- Late usage (services/billing/domain/late.py): once no event can still
-- arrive for a finalized period, the cycle re-prices it once and bills the
-- difference on the subscription's next invoice, as a LATE_USAGE line. One row
-- per (subscription, period) checked, written when the period is re-priced:
-- the primary key makes that once, whoever runs the cycle and how often.
-- `line` is the LATE_USAGE line (an invoice line's JSON), NULL when nothing
-- differed; `billed_on_invoice_id` is set in the transaction that finalizes
-- the invoice carrying it (cleared again if that invoice is voided).
--
-- Additive only: replicas of the release before neither read nor write it
-- (their invoices simply carry no late lines).
CREATE TABLE billing.late_usage_checks (
    tenant_id            text        NOT NULL,
    subscription_id      uuid        NOT NULL REFERENCES billing.subscriptions (id),
    period_start         timestamptz NOT NULL,
    period_end           timestamptz NOT NULL,
    -- The period's invoice compared with (its current one, not void).
    invoice_id           uuid        NOT NULL REFERENCES billing.invoices (id),
    checked_at           timestamptz NOT NULL,
    line                 jsonb,
    amount_minor         bigint      NOT NULL DEFAULT 0,
    billed_on_invoice_id uuid        REFERENCES billing.invoices (id),
    PRIMARY KEY (subscription_id, period_start)
);
CREATE INDEX late_usage_checks_pending ON billing.late_usage_checks (subscription_id)
    WHERE line IS NOT NULL AND billed_on_invoice_id IS NULL;
CREATE INDEX late_usage_checks_billed_on ON billing.late_usage_checks (billed_on_invoice_id)
    WHERE billed_on_invoice_id IS NOT NULL;

-- Periods finalized before this release are not re-priced: their meter rows
-- may be gone (meter's retention keeps the backdating window and a week), and
-- a re-price on missing usage would credit what was rightly billed. They are
-- recorded as checked, with no line.
INSERT INTO billing.late_usage_checks
    (tenant_id, subscription_id, period_start, period_end, invoice_id, checked_at)
SELECT tenant_id, subscription_id, period_start, period_end, id, now()
FROM billing.invoices
WHERE status = 'FINALIZED' AND subscription_id IS NOT NULL
ON CONFLICT DO NOTHING;
