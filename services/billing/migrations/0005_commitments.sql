-- Spend commitments per billing period (services/billing/domain/commitments.py):
-- {"minimum_spend_minor": int, "maximum_spend_minor": int}, 0 meaning none.
-- A product's, and a subscription's own, which replaces the product's whole
-- (NULL: none on the product; the product's on the subscription).
ALTER TABLE billing.products ADD COLUMN commitment jsonb;
ALTER TABLE billing.subscriptions ADD COLUMN commitment jsonb;
