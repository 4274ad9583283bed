-- The event log of record, and the transactional outbox the relay publishes from.
CREATE TABLE ingest.events (
    tenant_id   text        NOT NULL,
    event_id    text        NOT NULL,
    customer_id text        NOT NULL,
    event_name  text        NOT NULL,
    event_time  timestamptz NOT NULL,
    metadata    jsonb       NOT NULL DEFAULT '{}',
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, event_id)
);

-- ListEvents (newest first) and ReplayEvents (by event name and time).
CREATE INDEX events_by_time ON ingest.events (tenant_id, event_time DESC, event_id DESC);
CREATE INDEX events_by_name ON ingest.events (tenant_id, event_name, event_time);

-- One row per accepted batch: the EventBatch protobuf to publish. msg_id is the
-- Nats-Msg-Id, random so that it never repeats even if the sequence restarts.
CREATE TABLE ingest.outbox (
    id          bigserial   PRIMARY KEY,
    msg_id      uuid        NOT NULL DEFAULT gen_random_uuid(),
    tenant_id   text        NOT NULL,
    payload     bytea       NOT NULL,
    event_count integer     NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
