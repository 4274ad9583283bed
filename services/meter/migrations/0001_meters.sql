-- Meter definitions.
CREATE TABLE meter.meters (
    tenant_id        text        NOT NULL,
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    name             text        NOT NULL,
    event_name       text        NOT NULL,
    aggregation      text        NOT NULL,
    property         text        NOT NULL DEFAULT '',
    filter           jsonb,
    group_by         text[]      NOT NULL DEFAULT '{}',
    measurement_unit text        NOT NULL DEFAULT '',
    description      text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    archived_at      timestamptz,
    backfill_state   text        NOT NULL DEFAULT 'RUNNING',
    UNIQUE (tenant_id, name)
);
CREATE INDEX meters_by_event ON meter.meters (tenant_id, event_name) WHERE archived_at IS NULL;

-- One row per (meter, event) that the meter matched: the processed key that
-- makes folding idempotent, and the value the event contributes. Rows with a
-- skip_reason record why an event was not counted (missing property, ...).
CREATE TABLE meter.meter_events (
    tenant_id   text        NOT NULL,
    meter_id    uuid        NOT NULL,
    event_id    text        NOT NULL,
    customer_id text        NOT NULL,
    event_time  timestamptz NOT NULL,
    value       numeric,
    text_value  text,
    dims        jsonb       NOT NULL DEFAULT '{}',
    skip_reason text,
    PRIMARY KEY (tenant_id, meter_id, event_id)
);
CREATE INDEX meter_events_usage
    ON meter.meter_events (tenant_id, meter_id, customer_id, event_time)
    WHERE skip_reason IS NULL;
