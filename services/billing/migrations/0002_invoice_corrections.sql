-- Corrections: a finalized invoice is never changed; it is voided and a new
-- invoice (the next revision) is issued for the same subscription and period.
--
-- Two rules replace UNIQUE (subscription_id, period_start):
-- * (subscription_id, period_start, revision) is unique. The billing cycle only
--   ever inserts revision 0, so it can build a period once, ever, even after
--   that invoice was voided; a correction takes the voided invoice's revision + 1
--   in the voiding transaction, so a voided invoice has at most one successor.
-- * At most one invoice per subscription and period is not void.
ALTER TABLE billing.invoices DROP CONSTRAINT invoices_subscription_id_period_start_key;
ALTER TABLE billing.invoices
    ADD COLUMN revision       integer NOT NULL DEFAULT 0,
    ADD COLUMN replaces_id    uuid REFERENCES billing.invoices (id),
    ADD COLUMN replaced_by_id uuid REFERENCES billing.invoices (id);
ALTER TABLE billing.invoices
    ADD CONSTRAINT invoices_period_revision_key UNIQUE (subscription_id, period_start, revision);
CREATE UNIQUE INDEX invoices_live_period ON billing.invoices (subscription_id, period_start)
    WHERE status <> 'VOID';
