-- Pre-aggregation where it pays (services/meter/domain/rollup.py, "Gates").
--
-- A bucket per event costs a write per event and saves no read: most customers
-- send a few events an hour. So buckets are kept only where a customer's rows
-- are many: hour buckets for a (meter, customer, UTC day) once it holds
-- roll_from rows, minute buckets for a (meter, customer, UTC hour) of such a
-- day once it holds its roll_from rows. Below that, reads take the raw rows,
-- which are then fewer than roll_from.
--
-- n:         the day's (hour's) stored rows that count (skip_reason IS NULL),
--            counted until the gate is past (then a fold only reads it).
-- roll_from: the threshold set when the row was made (a later release may use
--            another); 0 when retention or a bulk load rolled the whole day.
--            n >= roll_from: every row of the day (hour) is in the hour
--            (minute) buckets; n < roll_from: none is.
-- Hour gates exist only in rolled days.
CREATE TABLE meter.usage_gates (
    meter_key   integer          NOT NULL,
    customer_id text COLLATE "C" NOT NULL,
    grain       "char"           NOT NULL CHECK (grain IN ('d', 'h')),
    start       timestamptz      NOT NULL,
    n           bigint           NOT NULL,
    roll_from   bigint           NOT NULL,
    PRIMARY KEY (meter_key, customer_id, grain, start)
) WITH (fillfactor = 80);

-- A read over every customer finds the days (hours) it must read raw.
CREATE INDEX usage_gates_open ON meter.usage_gates (meter_key, grain, start)
    WHERE n < roll_from;

-- Everything stored so far was rolled up at every grain (migration 0006).
INSERT INTO meter.usage_gates
SELECT e.meter_key, e.customer_id, g.grain,
    date_bin(g.step, e.event_time, '0001-01-01 00:00:00+00'), count(*), 0
FROM meter.meter_events e
CROSS JOIN (VALUES ('d'::"char", interval '1 day'), ('h', interval '1 hour')) AS g (grain, step)
WHERE e.skip_reason IS NULL
GROUP BY 1, 2, 3, 4;
