-- The event log, partitioned by month of event_time (services/common/partitions.py
-- makes the months ahead of time; a DEFAULT partition takes any other row, so an
-- insert never fails). The log of record is kept forever: partitions bound the
-- size of the indexes the write path touches (this month's) and of each vacuum,
-- and let an operator move old months to cheaper storage, but nothing drops them.
--
-- A unique key of a partitioned table must hold the partition key, and
-- (tenant_id, event_id) does not: a retry may carry the same event_id with
-- another time, and must still be a duplicate. So the key that makes ingest
-- idempotent moves to ingest.event_ids, not partitioned, which also tells where
-- an event_id lives (its event_time). The log's own key, (tenant_id,
-- event_time, event_id), is also ListEvents' and ReplayEvents' order, which
-- events_by_time used to serve.
CREATE TABLE ingest.event_ids (
    tenant_id  text        NOT NULL,
    event_id   text        NOT NULL,
    event_time timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

CREATE TABLE ingest.events_by_month (
    tenant_id   text        NOT NULL,
    event_id    text        NOT NULL,
    customer_id text        NOT NULL,
    event_name  text        NOT NULL,
    event_time  timestamptz NOT NULL,
    metadata    jsonb       NOT NULL DEFAULT '{}',
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_time, event_id)
) PARTITION BY RANGE (event_time);

CREATE TABLE ingest.events_default PARTITION OF ingest.events_by_month DEFAULT;

-- A partition for every month the log holds (and the current one), before the
-- rows move, so that none lands in DEFAULT.
DO $$
DECLARE
    m timestamptz;
BEGIN
    FOR m IN
        SELECT DISTINCT date_trunc('month', event_time, 'UTC') FROM ingest.events
        UNION SELECT date_trunc('month', now(), 'UTC')
    LOOP
        EXECUTE format(
            'CREATE TABLE ingest.%I PARTITION OF ingest.events_by_month FOR VALUES FROM (%L) TO (%L)',
            'events_' || to_char(m AT TIME ZONE 'UTC', 'YYYY_MM'),
            m,
            m + interval '1 month'
        );
    END LOOP;
END
$$;

INSERT INTO ingest.event_ids (tenant_id, event_id, event_time)
SELECT tenant_id, event_id, event_time FROM ingest.events;
INSERT INTO ingest.events_by_month
SELECT tenant_id, event_id, customer_id, event_name, event_time, metadata, ingested_at
FROM ingest.events;

DROP TABLE ingest.events;
ALTER TABLE ingest.events_by_month RENAME TO events;
ALTER INDEX ingest.events_by_month_pkey RENAME TO events_pkey;
