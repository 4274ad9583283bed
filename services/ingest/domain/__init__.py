"""ingest's pure rules: what makes an event acceptable (no I/O, no clock reads)."""
