-- meter_events, partitioned by month of event_time (services/common/partitions.py
-- makes the months ahead of time; the DEFAULT partition takes any other row, so a
-- fold never fails for want of a month). The primary key already holds
-- event_time, so it stays the processed key that makes folding idempotent:
-- one (meter, event) always comes with the same customer and time (migration
-- 0003), so a repeat lands in the same partition and conflicts there. COPY and
-- INSERT ... ON CONFLICT DO NOTHING route each row to its partition.
--
-- Partitions are what retention drops (services/meter/retention.py): whole
-- months of per-event rows, never the rollups.
CREATE TABLE meter.meter_events_by_month (
    LIKE meter.meter_events INCLUDING DEFAULTS INCLUDING STORAGE,
    PRIMARY KEY (meter_key, customer_id, event_time, event_id)
) PARTITION BY RANGE (event_time);

CREATE TABLE meter.meter_events_default PARTITION OF meter.meter_events_by_month DEFAULT;

-- A partition for every month meter_events holds (and the current one), before
-- the rows move, so that none lands in DEFAULT.
DO $$
DECLARE
    m timestamptz;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', event_time, 'UTC') FROM meter.meter_events
        UNION SELECT date_trunc('month', now(), 'UTC')
    LOOP
        EXECUTE format(
            'CREATE TABLE meter.%I PARTITION OF meter.meter_events_by_month'
            ' FOR VALUES FROM (%L) TO (%L)',
            'meter_events_' || to_char(m AT TIME ZONE 'UTC', 'YYYY_MM'),
            m,
            m + interval '1 month'
        );
    END LOOP;
END
$$;

INSERT INTO meter.meter_events_by_month SELECT * FROM meter.meter_events;
DROP TABLE meter.meter_events;
ALTER TABLE meter.meter_events_by_month RENAME TO meter_events;
ALTER INDEX meter.meter_events_by_month_pkey RENAME TO meter_events_pkey;
-- GetMeter's skip counters (skipped rows are few).
CREATE INDEX meter_events_skipped ON meter.meter_events (meter_key, skip_reason)
    WHERE skip_reason IS NOT NULL;

-- What billing last reported per tenant (RetentionService.ReportOpenPeriods):
-- the start of the tenant's oldest billing period not yet invoiced. Retention
-- never drops a month at or after the earliest of these.
CREATE TABLE meter.retention_floors (
    tenant_id   text        PRIMARY KEY,
    keep_since  timestamptz NOT NULL,
    reported_at timestamptz NOT NULL DEFAULT now()
);

-- How far retention has dropped: meter_events holds no row before
-- dropped_before. One row, written in the transaction that drops the months;
-- none while nothing was ever dropped.
CREATE TABLE meter.retention (
    one            boolean     PRIMARY KEY DEFAULT true CHECK (one),
    dropped_before timestamptz NOT NULL,
    dropped_at     timestamptz NOT NULL DEFAULT now()
);
