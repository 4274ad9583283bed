"""Cross-cutting plumbing shared by the services: never domain rules."""
