-- Usage pre-aggregated per (meter, customer, dimensions) and UTC minute and
-- hour, maintained by the fold in the transaction that stores the rows
-- (services/meter/store.py: fold), so that a usage read costs what its windows
-- cover, not what its events number. Reads combine these buckets with the raw
-- rows of at most two partial minutes per window (services/meter/domain/rollup.py).
-- Skipped rows (skip_reason set) are never rolled up.
--
-- grain: 'm' (bucket_start on a UTC minute) or 'h' (on a UTC hour).
-- dims:  the row's dimensions, '{}' when the meter has none (meter_events
--        holds NULL then: both read as "" for every key).
-- n, total, lo, hi: count, sum, min and max of the values (value is 1 for
--        COUNT, NULL for UNIQUE_COUNT: total/lo/hi stay NULL then).
-- latest_*: the greatest (event_time, event_id COLLATE "C") and its value.
CREATE TABLE meter.usage_rollups (
    meter_key       integer          NOT NULL,
    grain           "char"           NOT NULL CHECK (grain IN ('m', 'h')),
    customer_id     text COLLATE "C" NOT NULL,
    bucket_start    timestamptz      NOT NULL,
    dims            jsonb            NOT NULL,
    n               bigint           NOT NULL,
    total           numeric,
    lo              numeric,
    hi              numeric,
    latest_time     timestamptz      NOT NULL,
    latest_event_id text COLLATE "C" NOT NULL,
    latest_value    numeric,
    PRIMARY KEY (meter_key, grain, customer_id, bucket_start, dims)
) WITH (fillfactor = 80);  -- room for HOT updates: a bucket is updated in place many times

-- Reads for every customer (the billing cycle, QueryUsage without customer_id)
-- and the customers of an edge minute.
CREATE INDEX usage_rollups_by_time ON meter.usage_rollups (meter_key, grain, bucket_start);

-- UNIQUE_COUNT: the distinct values of each bucket (a count of distinct values
-- over a range is not a sum of the buckets' counts). Costs rows per distinct
-- value per bucket, not per event.
CREATE TABLE meter.usage_rollup_values (
    meter_key    integer          NOT NULL,
    grain        "char"           NOT NULL CHECK (grain IN ('m', 'h')),
    customer_id  text COLLATE "C" NOT NULL,
    bucket_start timestamptz      NOT NULL,
    dims         jsonb            NOT NULL,
    text_value   text COLLATE "C" NOT NULL,
    PRIMARY KEY (meter_key, grain, customer_id, bucket_start, dims, text_value)
);

-- The rows already stored.
INSERT INTO meter.usage_rollups
SELECT e.meter_key, g.grain, e.customer_id, date_trunc(g.unit, e.event_time, 'UTC'),
       coalesce(e.dims, '{}'), count(*), sum(e.value), min(e.value), max(e.value),
       (array_agg(e.event_time ORDER BY e.event_time DESC, e.event_id DESC))[1],
       (array_agg(e.event_id ORDER BY e.event_time DESC, e.event_id DESC))[1],
       (array_agg(e.value ORDER BY e.event_time DESC, e.event_id DESC))[1]
FROM meter.meter_events e
CROSS JOIN (VALUES ('m'::"char", 'minute'), ('h'::"char", 'hour')) AS g (grain, unit)
WHERE e.skip_reason IS NULL
GROUP BY 1, 2, 3, 4, 5;

INSERT INTO meter.usage_rollup_values
SELECT DISTINCT e.meter_key, g.grain, e.customer_id, date_trunc(g.unit, e.event_time, 'UTC'),
       coalesce(e.dims, '{}'), e.text_value
FROM meter.meter_events e
CROSS JOIN (VALUES ('m'::"char", 'minute'), ('h'::"char", 'hour')) AS g (grain, unit)
WHERE e.skip_reason IS NULL AND e.text_value IS NOT NULL;
