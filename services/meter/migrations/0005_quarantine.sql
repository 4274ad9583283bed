-- Events the fold set aside because they could not be stored (a dead letter
-- queue), so that the messages behind them flow on. Their events stay in
-- ingest's log as well; ReplayQuarantined folds them again, once.
CREATE TABLE meter.quarantine (
    id              uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id       text        NOT NULL,
    -- What was set aside, so that a redelivered message or a repeated backfill
    -- finds its row again instead of adding one: a hash of the tenant and the
    -- event ids, or of the raw bytes.
    fingerprint     bytea       NOT NULL UNIQUE,
    -- A serialized usagebilling.ingest.v1.EventBatch holding only the events at
    -- fault; when `decodable` is false, the raw bytes of a message that could
    -- not be decoded.
    payload         bytea       NOT NULL,
    decodable       boolean     NOT NULL,
    reason          text        NOT NULL,
    event_ids       text[]      NOT NULL,
    attempts        integer     NOT NULL,
    quarantined_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz NOT NULL DEFAULT now()
);
-- ListQuarantined: newest first, for every tenant or for one.
CREATE INDEX quarantine_newest ON meter.quarantine (quarantined_at, id);
CREATE INDEX quarantine_by_tenant ON meter.quarantine (tenant_id, quarantined_at, id);
