"""Fair share when meter falls behind (pure).

The rate limit (domain.rate_limit) keeps any tenant to its share of what
meter folds, but only while meter folds faster than the tenants' shares add
up: on a busy machine (meter starved of CPU, a slow PostgreSQL) a flood within
the limit still builds a backlog in the EVENTS stream, and every other
tenant's events wait behind it. So ingest watches meter's consumer: when its
backlog (the messages waiting for meter, over the rate meter has been taking
them: services/ingest/meter_backlog.py) passes `target` seconds, every
tenant's rate is cut to a share of the setting, multiplicatively; while the
backlog is under half the target it grows back, additively (AIMD, as TCP's
congestion control). A tenant far under its rate, which is what the limit
protects, never notices.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backpressure:
    """The share (floor..1) of the configured rate that tenants get."""

    target: float = 1.0  # seconds of backlog meter may hold before rates shrink
    floor: float = 0.05
    cut: float = 0.5  # multiplied in, each observation over the target
    grow: float = 0.05  # added back, each observation under half the target
    # Messages that make no backlog (one in a fetch, one being folded).
    slack: int = 2
    share: float = 1.0

    def observe(self, pending: int, folded_per_s: float | None) -> float:
        """The share after seeing `pending` messages waiting for meter while
        it takes `folded_per_s` messages a second (recently; 0 when it took
        none while messages waited, as when meter is down; None when not known
        yet: the share holds, unless nothing waits)."""
        if pending <= self.slack:
            backlog = 0.0
        elif folded_per_s is None:
            return self.share
        elif folded_per_s <= 0:
            backlog = float("inf")
        else:
            backlog = pending / folded_per_s
        if backlog > self.target:
            self.share = max(self.floor, self.share * self.cut)
        elif backlog <= self.target / 2:
            self.share = min(1.0, self.share + self.grow)
        return self.share
