-- Per-row retries, so that one batch the relay cannot publish never holds up
-- the rows behind it: the relay claims only rows that are due, and a failure
-- pushes the row's next attempt back (exponentially).
ALTER TABLE ingest.outbox
    ADD COLUMN attempts        integer     NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at timestamptz NOT NULL DEFAULT now(),
    ADD COLUMN last_error      text;

-- Dead letters of the relay: outbox rows that failed for a reason of their own
-- (not a NATS outage) after bounded attempts. Their events stay in
-- ingest.events; QuarantineService lists, replays or discards them. The id is
-- the outbox row's msg_id, so a replay publishes with the same Nats-Msg-Ids.
CREATE TABLE ingest.quarantine (
    id              uuid        PRIMARY KEY,
    tenant_id       text        NOT NULL,
    payload         bytea       NOT NULL,
    event_ids       text[]      NOT NULL,
    reason          text        NOT NULL,
    attempts        integer     NOT NULL,
    accepted_at     timestamptz NOT NULL,
    quarantined_at  timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz NOT NULL DEFAULT now()
);
-- ListQuarantined: newest first, for all tenants or one.
CREATE INDEX quarantine_by_time ON ingest.quarantine (quarantined_at DESC, id DESC);
CREATE INDEX quarantine_by_tenant ON ingest.quarantine (tenant_id, quarantined_at DESC, id DESC);
