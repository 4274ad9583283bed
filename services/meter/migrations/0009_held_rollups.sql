-- The held aggregations (gauges, seats: services/meter/domain/gauges.py)
-- pre-aggregated, so that their usage reads cost what the windows cover, not
-- what the events number (services/meter/held.py).
--
-- A line (meter, customer, dimensions, and a seat's item) holds each event's
-- value until its next event, in (event_time, event_id COLLATE "C") order, 0
-- before its first. An event's step is its value minus its line's previous
-- value, so a group's level at t is the sum of the steps at or before t, and
-- its integral over [a, b) is level(a-) * (b - a) + b * D - M over the steps in
-- [a, b), with D the sum of the steps and M the sum of step * t (t in
-- microseconds since 1970, exact).
--
-- step: set by the fold, in the transaction that stores the row, for the rows
--       of held meters (NULL for every other meter, and for a held row until
--       its line is folded: the mark that makes the fold add each event once).
--       A late event changes its successor's step (updated in place).
ALTER TABLE meter.meter_events ADD COLUMN step numeric;

-- Each line's rows in order, to find a new event's neighbours (only held rows).
CREATE INDEX meter_events_lines ON meter.meter_events
    (meter_key, customer_id, (coalesce(dims::text, '')), (coalesce(text_value, '')),
     event_time, event_id)
    WHERE step IS NOT NULL;

-- Per (meter, customer, dimensions) and UTC minute, hour and day: n events,
-- d = sum of their steps, m = sum of step * t. Days serve the level before a
-- range (the sum of every earlier bucket's d), kept forever as usage_rollups are.
CREATE TABLE meter.held_rollups (
    meter_key    integer          NOT NULL,
    grain        "char"           NOT NULL CHECK (grain IN ('m', 'h', 'd')),
    customer_id  text COLLATE "C" NOT NULL,
    bucket_start timestamptz      NOT NULL,
    dims         jsonb            NOT NULL,
    n            bigint           NOT NULL,
    d            numeric          NOT NULL,
    m            numeric          NOT NULL,
    PRIMARY KEY (meter_key, grain, customer_id, bucket_start, dims)
) WITH (fillfactor = 80);

CREATE INDEX held_rollups_by_time ON meter.held_rollups (meter_key, grain, bucket_start);

-- The rows already stored.
UPDATE meter.meter_events e SET step = s.step
FROM (
    SELECT x.meter_key, x.customer_id, x.event_time, x.event_id,
        x.value - coalesce(lag(x.value) OVER (
            PARTITION BY x.meter_key, x.customer_id, coalesce(x.dims::text, ''),
                coalesce(x.text_value, '')
            ORDER BY x.event_time, x.event_id COLLATE "C"), 0) AS step
    FROM meter.meter_events x
    WHERE x.skip_reason IS NULL AND x.meter_key IN (
        SELECT key FROM meter.meters WHERE aggregation IN ('TIME_WEIGHTED_AVG',
            'TIME_WEIGHTED_SUM', 'SEATS_END', 'SEATS_MAX', 'SEATS_PRORATED'))
) s
WHERE e.meter_key = s.meter_key AND e.customer_id = s.customer_id
    AND e.event_time = s.event_time AND e.event_id = s.event_id;

INSERT INTO meter.held_rollups
SELECT e.meter_key, g.grain, e.customer_id, date_trunc(g.unit, e.event_time, 'UTC'),
    coalesce(e.dims, '{}'), count(*), sum(e.step),
    sum(e.step * (extract(epoch FROM e.event_time) * 1000000))
FROM meter.meter_events e
CROSS JOIN (VALUES ('m'::"char", 'minute'), ('h', 'hour'), ('d', 'day')) AS g (grain, unit)
WHERE e.step IS NOT NULL
GROUP BY 1, 2, 3, 4, 5;
