-- SEATS_MAX pre-aggregated (services/meter/held.py, domain/gauges.py Span): the
-- most items active at one instant of a window is not a function of a bucket's
-- n, d and m, so SEATS_MAX's buckets also keep
--
-- peak: the most the sum of the bucket's steps from its start reaches at one
--       of its instants: the bucket's start (0 there when no step is at it) and
--       each distinct event time in it, all the steps at one time added
--       together (an item added and removed at one instant is never active).
--       A window's most is then the level before it plus the most, over its
--       pieces in time order, of the d of the pieces before one plus its peak.
--       NULL for the other held meters (nothing reads it). Peaks are not
--       additive: the fold recomputes those of the buckets it changes (a
--       minute's from its rows, an hour's from its minutes, a day's from its
--       hours).
ALTER TABLE meter.held_rollups ADD COLUMN peak numeric;

-- The buckets already stored: minutes from their rows, then hours from the
-- minutes, then days from the hours.
UPDATE meter.held_rollups r SET peak = p.peak FROM (
    SELECT meter_key, customer_id, dims, start,
        CASE WHEN min(t) > start THEN greatest(max(run), 0) ELSE max(run) END AS peak
    FROM (
        SELECT *, sum(d) OVER (PARTITION BY meter_key, customer_id, dims, start ORDER BY t) AS run
        FROM (
            SELECT e.meter_key, e.customer_id, coalesce(e.dims, '{}') AS dims,
                date_bin('1 minute', e.event_time, '0001-01-01 00:00:00+00') AS start,
                e.event_time AS t, sum(e.step) AS d
            FROM meter.meter_events e
            WHERE e.step IS NOT NULL
                AND e.meter_key IN (SELECT key FROM meter.meters WHERE aggregation = 'SEATS_MAX')
            GROUP BY 1, 2, 3, 4, 5
        ) AS a
    ) AS x
    GROUP BY 1, 2, 3, 4
) AS p
WHERE r.meter_key = p.meter_key AND r.grain = 'm' AND r.customer_id = p.customer_id
    AND r.bucket_start = p.start AND r.dims = p.dims;

UPDATE meter.held_rollups r SET peak = p.peak FROM (
    SELECT meter_key, customer_id, dims, start,
        CASE WHEN min(t) > start THEN greatest(max(run), 0) ELSE max(run) END AS peak
    FROM (
        SELECT c.meter_key, c.customer_id, c.dims, c.bucket_start AS t,
            date_bin('1 hour', c.bucket_start, '0001-01-01 00:00:00+00') AS start,
            sum(c.d) OVER (PARTITION BY c.meter_key, c.customer_id, c.dims,
                date_bin('1 hour', c.bucket_start, '0001-01-01 00:00:00+00')
                ORDER BY c.bucket_start) - c.d + c.peak AS run
        FROM meter.held_rollups c WHERE c.grain = 'm' AND c.peak IS NOT NULL
    ) AS x
    GROUP BY 1, 2, 3, 4
) AS p
WHERE r.meter_key = p.meter_key AND r.grain = 'h' AND r.customer_id = p.customer_id
    AND r.bucket_start = p.start AND r.dims = p.dims;

UPDATE meter.held_rollups r SET peak = p.peak FROM (
    SELECT meter_key, customer_id, dims, start,
        CASE WHEN min(t) > start THEN greatest(max(run), 0) ELSE max(run) END AS peak
    FROM (
        SELECT c.meter_key, c.customer_id, c.dims, c.bucket_start AS t,
            date_bin('1 day', c.bucket_start, '0001-01-01 00:00:00+00') AS start,
            sum(c.d) OVER (PARTITION BY c.meter_key, c.customer_id, c.dims,
                date_bin('1 day', c.bucket_start, '0001-01-01 00:00:00+00')
                ORDER BY c.bucket_start) - c.d + c.peak AS run
        FROM meter.held_rollups c WHERE c.grain = 'h' AND c.peak IS NOT NULL
    ) AS x
    GROUP BY 1, 2, 3, 4
) AS p
WHERE r.meter_key = p.meter_key AND r.grain = 'd' AND r.customer_id = p.customer_id
    AND r.bucket_start = p.start AND r.dims = p.dims;
