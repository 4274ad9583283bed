-- The trace an accepted batch belongs to (a W3C traceparent), so that the
-- relay's publish, asynchronous and maybe in another replica, joins the trace
-- of the IngestEvents call that accepted it (services/common/tracing.py).
-- NULL when tracing is off.
ALTER TABLE ingest.outbox ADD COLUMN traceparent text;
