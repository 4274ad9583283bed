"""The ingest use case: judge a batch, store the new events and their outbox
row in one transaction, report what happened."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common import metrics
from services.common.logs import get_logger
from services.ingest import convert
from services.ingest.domain.validation import Rejection, effective_time, triage
from services.ingest.store import EventRow, IngestStore
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    rejections: list[Rejection]


class Ingestor:
    def __init__(
        self, store: IngestStore, on_commit: Callable[[], None], backdate_window: timedelta
    ) -> None:
        self._store = store
        self._on_commit = on_commit
        self._backdate_window = backdate_window

    async def ingest(
        self, tenant_id: str, events: Sequence[ingest_pb2.Event], now: datetime
    ) -> IngestResult:
        incoming = [convert.incoming(e) for e in events]
        verdict = triage(incoming, now, self._backdate_window)
        valid = [incoming[i] for i in verdict.valid]
        new_events = [
            EventRow(
                event_id=e.event_id,
                customer_id=e.customer_id,
                event_name=e.event_name,
                event_time=effective_time(e, now),
                metadata=dict(e.metadata),
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

        new_ids = await self._store.store_batch(tenant_id, new_events, payload)
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
