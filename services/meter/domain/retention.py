"""How far meter's retention may drop per-event rows (pure).

Retention drops whole months of meter_events (the rows of each (meter, event));
the rollups stay. It never drops a month that holds an instant any of these
still needs: the retention setting's own span, an event ingest may still accept
(the backdating window, plus MARGIN for a relay or quarantine that hands an
event over late), a backfill still running (it replays the backdating window
back from when it started), or an open billing period of any tenant (billing
reports each tenant's oldest, services.billing.scheduler)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

# Aggregations whose value in a window depends on every event before it (a
# gauge's reading or a seat holds until the next event of its line:
# domain.gauges). Their per-event rows are the only record of that state, so
# while any meter of these exists (archived too: its history stays queryable)
# retention drops nothing.
HELD_AGGREGATIONS = (
    "TIME_WEIGHTED_AVG",
    "TIME_WEIGHTED_SUM",
    "SEATS_END",
    "SEATS_MAX",
    "SEATS_PRORATED",
)

# Slack on top of the backdating window: an event accepted at the window's edge
# may reach meter later (the relay retries, ingest's quarantine is replayed).
MARGIN = timedelta(days=7)


def month_start(at: datetime) -> datetime:
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def keep_from(
    now: datetime,
    *,
    keep: timedelta,
    backdate_window: timedelta,
    open_periods: datetime | None,
    backfills_started: Iterable[datetime] = (),
    held_meters: bool = False,
) -> datetime | None:
    """The start of the oldest month retention must keep: every month wholly
    before it may go. None when nothing may go, because billing has not
    reported any tenant's open periods yet (meter cannot know what they need),
    or because a meter of a HELD_AGGREGATIONS exists (`held_meters`).

    `open_periods` is the earliest start of an open billing period that billing
    reported (over all tenants); `backfills_started` are when the running
    backfills began."""
    if open_periods is None or held_meters:
        return None
    needed = [now - keep, now - backdate_window - MARGIN, open_periods]
    needed += [started - backdate_window - MARGIN for started in backfills_started]
    return month_start(min(needed))
