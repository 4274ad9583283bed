"""The ingest use case: judge a batch, store the new events and their outbox
row in one transaction, report what happened."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common import metrics, tracing
from services.common.errors import ResourceExhausted
from services.common.logs import get_logger
from services.ingest import convert
from services.ingest.domain.fold_cost import call_cost
from services.ingest.domain.rate_limit import RateLimiter
from services.ingest.domain.validation import (
    Rejection,
    check_batch_size,
    effective_time,
    triage,
)
from services.ingest.meter_weights import WeightSource
from services.ingest.store import EventRow, IngestStore
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejections: list[Rejection]


def _cut(limiter: RateLimiter) -> str:
    if limiter.share >= 1:
        return ""
    return f"; {limiter.share:.0%} of {limiter.rate:g} while meter has a backlog"


class Ingestor:
    def __init__(
        self,
        store: IngestStore,
        on_commit: Callable[[], None],
        backdate_window: timedelta,
        limiter: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        weights: WeightSource | None = None,
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._backdate_window = backdate_window
        self._limiter = limiter
        self._clock = clock
        self._weights = weights

    def _admit(self, tenant_id: str, events: Sequence[ingest_pb2.Event]) -> None:
        """Limits before work: a call over the tenant's rate is refused whole,
        before anything is converted or stored. The call costs what its events
        cost meter to fold (services.ingest.domain.fold_cost: row units, at
        least one per event); rejected and duplicate events count too."""
        if self._limiter is None or not events:
            return
        weights = self._weights.weights(tenant_id) if self._weights is not None else {}
        cost = call_cost((e.event_name for e in events), weights)
        wait = self._limiter.acquire(tenant_id, cost, self._clock())
        if wait > 0:
            metrics.EVENTS.labels("rate_limited").inc(len(events))
            # Rounded up to milliseconds: a client that waits this long passes.
            retry_after = math.ceil(wait * 1000) / 1000
            raise ResourceExhausted(
                f"events: the tenant's ingest rate of {self._limiter.current:g} row units/s"
                f" (burst {self._limiter.burst}{_cut(self._limiter)}) is reached;"
                f" none of the {len(events)} events"
                f" ({cost} row units: events times the meters that count them) was stored,"
                f" retry after {retry_after:g} s",
                retry_after=retry_after,
            )

    async def ingest(
        self, tenant_id: str, events: Sequence[ingest_pb2.Event], now: datetime
    ) -> IngestResult:
        """Raises InvalidArgument for a call over the batch limit and
        ResourceExhausted (retry_after in seconds) over the tenant's rate; in
        both cases nothing is stored."""
        check_batch_size(len(events))
        self._admit(tenant_id, events)
        incoming = [convert.incoming(e) for e in events]
        verdict = triage(incoming, now, self._backdate_window)
        valid = [incoming[i] for i in verdict.valid]
        new_events = [
            EventRow(
                event_id=e.event_id,
                customer_id=e.customer_id,
                event_name=e.event_name,
                event_time=effective_time(e, now),
                metadata=e.metadata,
            )
            for e in valid
        ]
        # What is published is the event as sent, with the server's time filled in.
        stamped = {}
        for index, event in zip(verdict.valid, new_events, strict=True):
            message = events[index]
            if not message.HasField("timestamp"):
                message.timestamp.CopyFrom(convert.to_timestamp(event.event_time))
            stamped[event.event_id] = message

        def payload(new_ids: set[str]) -> bytes:
            batch = ingest_pb2.EventBatch(
                tenant_id=tenant_id,
                events=[m for event_id, m in stamped.items() if event_id in new_ids],
            )
            return batch.SerializeToString()

        new_ids = await self._store.store_batch(
            tenant_id, new_events, payload, tracing.traceparent()
        )
        if new_ids:
            self._on_commit()
        result = IngestResult(
            accepted=len(new_ids),
            duplicates=len(verdict.duplicate_in_batch) + len(valid) - len(new_ids),
            rejections=verdict.rejections,
        )
        metrics.EVENTS.labels("accepted").inc(result.accepted)
        metrics.EVENTS.labels("duplicate").inc(result.duplicates)
        metrics.EVENTS.labels("rejected").inc(len(result.rejections))
        log.info(
            "events_ingested",
            accepted=result.accepted,
            duplicate=result.duplicates,
            rejected=len(result.rejections),
        )
        return result
