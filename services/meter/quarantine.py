"""meter's quarantine (stage "fold"): the events the fold set aside, and the
QuarantineService backend that lists, replays and discards them.

The consumer and the backfill set aside only the events at fault
(services.meter.isolation), one row per message and reason, or the raw bytes of
a message that cannot be decoded. A replay folds the events again, now, into
the tenant's current meters: the meter_events primary key refuses what was
folded before, so each event counts once however often it is replayed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime

from google.protobuf.message import DecodeError

from services.common import metrics
from services.common.errors import Unavailable
from services.common.logs import get_logger
from services.common.quarantine import QuarantinedRecord
from services.meter.isolation import REASON_LIMIT, describe
from services.meter.service import MeterService
from services.meter.store import QuarantineRecord, QuarantineStore
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)

STAGE = "fold"


def _text(value: str) -> str:
    # A label stored in a text column, which cannot hold NUL (the payload keeps
    # the exact bytes).
    return value.replace("\x00", "\\x00")


def events_fingerprint(tenant_id: str, event_ids: Sequence[str]) -> bytes:
    """The same events of one tenant set aside again (a redelivered message, a
    backfill started over) find their row again. Each part goes in with its
    length, so that no two lists of ids hash alike."""
    digest = hashlib.sha256(b"events")
    for part in (tenant_id, *sorted(event_ids)):
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.digest()


def raw_fingerprint(data: bytes) -> bytes:
    return hashlib.sha256(b"raw\x00" + data).digest()


def _reason(reasons: Sequence[str]) -> str:
    return "; ".join(dict.fromkeys(reasons))[:REASON_LIMIT]


def _record(record: QuarantineRecord) -> QuarantinedRecord:
    return QuarantinedRecord(
        id=record.id,
        tenant_id=record.tenant_id,
        stage=STAGE,
        reason=record.reason,
        event_ids=record.event_ids,
        attempts=record.attempts,
        quarantine_time=record.quarantined_at,
        last_attempt_time=record.last_attempt_at,
        size_bytes=record.size_bytes,
    )


class FoldQuarantine:
    """Sets events aside (consumer, backfill) and implements
    services.common.quarantine.QuarantineBackend over them."""

    def __init__(self, store: QuarantineStore, service: MeterService) -> None:
        self._store = store
        self._service = service

    async def set_aside(
        self, tenant_id: str, failed: Sequence[tuple[ingest_pb2.Event, str]], attempts: int
    ) -> None:
        """One row per reason, holding the events that failed for it."""
        by_reason: dict[str, list[ingest_pb2.Event]] = defaultdict(list)
        for event, reason in failed:
            by_reason[reason].append(event)
        for reason, events in by_reason.items():
            ids = [e.event_id for e in events]
            payload = ingest_pb2.EventBatch(tenant_id=tenant_id, events=events)
            new = await self._store.add(
                tenant_id=_text(tenant_id),
                fingerprint=events_fingerprint(tenant_id, ids),
                payload=payload.SerializeToString(),
                decodable=True,
                reason=_text(reason),
                event_ids=[_text(i) for i in ids],
                attempts=attempts,
            )
            if new:
                metrics.QUARANTINED.labels(stage=STAGE).inc()
            log.error(
                "events_quarantined",
                tenant_id=tenant_id,
                events=len(ids),
                first_event_id=ids[0],
                reason=reason,
                new=new,
            )
        await self.refresh_depth()

    async def set_aside_raw(self, tenant_id: str, data: bytes, reason: str, attempts: int) -> None:
        """A message that cannot be decoded, as it came (its tenant from its subject)."""
        new = await self._store.add(
            tenant_id=_text(tenant_id),
            fingerprint=raw_fingerprint(data),
            payload=data,
            decodable=False,
            reason=_text(reason)[:REASON_LIMIT],
            event_ids=[],
            attempts=attempts,
        )
        if new:
            metrics.QUARANTINED.labels(stage=STAGE).inc()
        log.error("message_quarantined", tenant_id=tenant_id, size=len(data), reason=reason)
        await self.refresh_depth()

    # --- QuarantineBackend -----------------------------------------------------------

    async def list_records(
        self, tenant_id: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[QuarantinedRecord]:
        return [_record(r) for r in await self._store.page(tenant_id or "", after, limit)]

    async def replay(self, ids: Sequence[str]) -> tuple[list[str], list[QuarantinedRecord]]:
        """Folds each row's events into its tenant's current meters, isolating
        again: the events that fold leave the row, the row goes when none is
        left, and otherwise keeps the rest with the new reason."""
        rows = await self._store.payloads(ids)
        replayed: list[str] = []
        failed: list[QuarantinedRecord] = []
        decoded: list[tuple[QuarantineRecord, ingest_pb2.EventBatch]] = []
        for record, payload in rows:
            try:
                decoded.append((record, ingest_pb2.EventBatch.FromString(payload)))
            except DecodeError as exc:
                kept = await self._store.failed_again(
                    record.id,
                    fingerprint=raw_fingerprint(payload),
                    payload=payload,
                    reason=_text(f"undecodable: {describe(exc)}")[:REASON_LIMIT],
                    event_ids=record.event_ids,
                )
                if kept is not None:
                    failed.append(_record(kept))
        if decoded:
            outcomes, _ = await self._service.fold_isolating(
                [batch for _, batch in decoded], [()] * len(decoded)
            )
            for outcome in outcomes:
                if outcome.retry is not None:  # what did fold counts once when retried
                    raise Unavailable("the database is unavailable; retry later") from outcome.retry
            for (record, batch), outcome in zip(decoded, outcomes, strict=True):
                if not outcome.failed:
                    replayed.append(record.id)
                    continue
                events = [e for e, _ in outcome.failed]
                ids_left = [e.event_id for e in events]
                kept = await self._store.failed_again(
                    record.id,
                    fingerprint=events_fingerprint(batch.tenant_id, ids_left),
                    payload=ingest_pb2.EventBatch(
                        tenant_id=batch.tenant_id, events=events
                    ).SerializeToString(),
                    reason=_text(_reason([r for _, r in outcome.failed])),
                    event_ids=[_text(i) for i in ids_left],
                )
                if kept is not None:
                    failed.append(_record(kept))
        if replayed:
            await self._store.remove(replayed)
        log.info("quarantine_replayed", replayed=len(replayed), failed=len(failed))
        await self.refresh_depth()
        return replayed, failed

    async def discard(self, ids: Sequence[str]) -> int:
        count = await self._store.remove(ids)
        log.info("quarantine_discarded", discarded=count)
        await self.refresh_depth()
        return count

    # --- the depth gauge ---------------------------------------------------------------

    async def refresh_depth(self) -> None:
        with contextlib.suppress(Exception):
            metrics.QUARANTINE_DEPTH.labels(stage=STAGE).set(await self._store.depth())

    async def watch_depth(self, every: float = 15.0) -> None:
        while True:
            await self.refresh_depth()
            await asyncio.sleep(every)
