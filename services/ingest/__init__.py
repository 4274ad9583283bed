"""ingest: accepts usage events, stores them durably, relays them to JetStream."""
