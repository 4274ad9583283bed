-- Every index costs each accepted event a write. ReplayEvents (a meter's
-- backfill, rare) reads the tenant's time range through events_by_time and
-- filters the names; the busy write path keeps one index less.
DROP INDEX ingest.events_by_name;
