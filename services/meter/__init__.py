"""Meter service: meter definitions, exactly-once folding of events into rollups, usage queries."""
