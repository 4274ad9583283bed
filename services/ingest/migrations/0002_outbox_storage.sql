-- The outbox payload is protobuf that lives for milliseconds: storing it
-- uncompressed saves PostgreSQL the compression work on every accepted batch.
ALTER TABLE ingest.outbox ALTER COLUMN payload SET STORAGE EXTERNAL;
