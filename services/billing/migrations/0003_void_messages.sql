-- invoice.voided: each voided invoice is published once, after its
-- invoice.finalized. Invoices voided before this version were never announced
-- and are not now (integrations would get years-old news in a burst).
ALTER TABLE billing.invoices ADD COLUMN void_published_at timestamptz;
UPDATE billing.invoices SET void_published_at = voided_at WHERE voided_at IS NOT NULL;
CREATE INDEX invoices_void_unpublished ON billing.invoices (voided_at)
    WHERE voided_at IS NOT NULL AND void_published_at IS NULL;
