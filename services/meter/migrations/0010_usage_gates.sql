-- Pre-aggregation where it pays (services/meter/domain/rollup.py, "Gates").
--
-- A bucket per event costs a write per event and saves no read: most customers
-- send a few events an hour. So a customer's UTC day of a meter is kept in
-- hour buckets only once it holds hours_from rows, and in minute buckets too
-- once it holds minutes_from rows. Below those, reads take its raw rows, which
-- are then fewer than the threshold.
--
-- n:            the day's stored rows that count (skip_reason IS NULL), counted
--               until the day is past both gates (then a fold only reads it).
-- hours_from,
-- minutes_from: the thresholds set when the row was made (a later release may
--               use others); 0 when retention or a bulk load rolled the day.
--               n >= hours_from: every row of the day is in the hour buckets,
--               else none is; likewise minutes_from and the minute buckets.
CREATE TABLE meter.usage_gates (
    meter_key    integer          NOT NULL,
    customer_id  text COLLATE "C" NOT NULL,
    day          timestamptz      NOT NULL,
    n            bigint           NOT NULL,
    hours_from   bigint           NOT NULL,
    minutes_from bigint           NOT NULL CHECK (minutes_from >= hours_from),
    PRIMARY KEY (meter_key, customer_id, day)
) WITH (fillfactor = 80);

-- A read over every customer finds the days it must read rows of.
CREATE INDEX usage_gates_open ON meter.usage_gates (meter_key, day) WHERE n < minutes_from;

-- Everything stored so far was rolled up at every grain (migration 0006).
INSERT INTO meter.usage_gates
SELECT meter_key, customer_id, date_bin('1 day', event_time, '0001-01-01 00:00:00+00'),
    count(*), 0, 0
FROM meter.meter_events
WHERE skip_reason IS NULL
GROUP BY 1, 2, 3;
