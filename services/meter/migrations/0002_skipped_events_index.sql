-- GetMeter reports how many matching events each meter skipped, by reason: a
-- partial index keeps that count cheap on meters with millions of counted events
-- (skipped rows are few, so it costs the fold next to nothing).
CREATE INDEX meter_events_skipped
    ON meter.meter_events (tenant_id, meter_id, skip_reason)
    WHERE skip_reason IS NOT NULL;
