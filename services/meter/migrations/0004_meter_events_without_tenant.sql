-- A row's tenant is its meter's: the column was written for every contribution
-- and never read. Without it the consumer COPYs its rows exactly as the domain
-- folds them (services/meter/domain/matching.py: FoldedEvent).
ALTER TABLE meter.meter_events DROP COLUMN tenant_id;
