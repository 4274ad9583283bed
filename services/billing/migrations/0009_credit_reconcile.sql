-- Late usage beyond settlement's recheck window (services/billing/credits.py,
-- "Reconciliation"): when an account's settled days were last compared with
-- meter's day totals (NULL: never). Shared by the replicas, so that each
-- account is compared once per USAGEBILLING_CREDITS_RECONCILE, not once per
-- replica.
ALTER TABLE billing.credit_accounts ADD COLUMN reconciled_at timestamptz;
