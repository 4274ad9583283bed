"""The outbox relay: publishes accepted batches to JetStream and deletes an
outbox row only after JetStream acknowledged it. A crash or a NATS outage
repeats work (absorbed by Nats-Msg-Id and by meter's dedupe), never loses it.

No row can hold up the others:
- a batch larger than the server's max_payload goes out in parts that fit,
  each with its own deterministic Nats-Msg-Id (`<msg_id>.<part>`);
- the relay claims only rows that are due, and a row that fails waits
  (exponentially longer each time) while the rows behind it go out;
- a row that fails for a reason of its own (a subject it cannot have, a
  payload the server refuses) is moved to the quarantine after bounded
  attempts; failures that are nobody's fault (NATS away, timeouts) are
  retried without end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from google.protobuf.message import DecodeError

from services.common import metrics, tracing
from services.common.ids import is_uuid
from services.common.jetstream import EVENTS_SUBJECT_PREFIX
from services.common.logs import get_logger
from services.common.quarantine import QuarantinedRecord
from services.ingest.store import RELAY_STAGE, IngestStore, OutboxRow
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)

# Room left in each message for the headers (Nats-Msg-Id and the status line),
# which the server counts against max_payload together with the payload.
HEADER_ROOM = 1024
PUBLISH_TIMEOUT = 10.0
FIRST_BACKOFF = 0.5


class Unpublishable(Exception):
    """A batch that cannot be published as it is, whatever the state of NATS."""


# Errors that are the batch's own: retrying them does not help.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    Unpublishable,
    nats.errors.BadSubjectError,
    nats.errors.MaxPayloadError,
    nats.errors.BadHeaderError,
    # JetStream's 400: e.g. a message larger than the stream's max_msg_size.
    nats.js.errors.BadRequestError,
)


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_ERRORS)


def subject_for(tenant_id: str) -> str:
    """The tenant's subject; Unpublishable when the tenant id is not a UUID (only
    a UUID is sure to be one subject token: no spaces, dots or wildcards)."""
    if not is_uuid(tenant_id):
        raise Unpublishable(f"tenant_id {tenant_id[:64]!r} is not a UUID, so not a subject token")
    return f"{EVENTS_SUBJECT_PREFIX}.{tenant_id}"


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _field_size(payload_size: int) -> int:
    """A length-delimited field with a one-byte tag (field numbers below 16)."""
    return 1 + _varint_size(payload_size) + payload_size


def parse_batch(payload: bytes) -> ingest_pb2.EventBatch:
    try:
        return ingest_pb2.EventBatch.FromString(payload)
    except DecodeError as exc:
        raise Unpublishable(f"payload: not an EventBatch ({exc})") from None


def event_ids(payload: bytes) -> list[str]:
    """The ids of the events a payload holds; empty when it cannot be parsed."""
    try:
        return [e.event_id for e in parse_batch(payload).events]
    except Unpublishable:
        return []


def split(msg_id: str, payload: bytes, limit: int) -> list[tuple[str, bytes]]:
    """(Nats-Msg-Id, payload) messages of at most `limit` bytes each that
    together hold the batch's events in order. A batch that fits is one message
    with the row's own id; a larger one is cut greedily into parts with the ids
    `<msg_id>.<n>`, the same for the same payload and limit, so that a
    republished part is a duplicate JetStream drops. Unpublishable when the
    payload is not an EventBatch or one event alone does not fit."""
    if len(payload) <= limit:
        return [(msg_id, payload)]
    batch = parse_batch(payload)
    head = _field_size(len(batch.tenant_id.encode())) if batch.tenant_id else 0
    parts: list[list[ingest_pb2.Event]] = []
    size = limit  # forces a new part for the first event
    for event in batch.events:
        entry = _field_size(event.ByteSize())
        if head + entry > limit:
            raise Unpublishable(
                f"event {event.event_id[:64]!r} alone is {head + entry} bytes;"
                f" the NATS server takes at most {limit} per message"
            )
        if size + entry > limit:
            parts.append([])
            size = head
        parts[-1].append(event)
        size += entry
    messages = []
    for number, events in enumerate(parts):
        data = ingest_pb2.EventBatch(tenant_id=batch.tenant_id, events=events).SerializeToString()
        if len(data) > limit:  # the size arithmetic above is wrong: never publish it
            raise Unpublishable(f"part {number} is {len(data)} bytes, over {limit}")
        messages.append((f"{msg_id}.{number}", data))
    return messages


def _describe(exc: BaseException) -> str:
    text = str(exc)
    kind = type(exc).__name__
    return f"{kind}: {text}" if text and text != kind else kind


class Publisher:
    """Publishes one outbox batch (in parts when needed) to the tenant's subject."""

    def __init__(self, nc: Any, *, timeout: float = PUBLISH_TIMEOUT) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._timeout = timeout

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    def messages(self, msg_id: str, payload: bytes) -> list[tuple[str, bytes]]:
        return split(msg_id, payload, int(self._nc.max_payload) - HEADER_ROOM)

    async def publish(
        self, msg_id: str, tenant_id: str, payload: bytes, traceparent: str | None = None
    ) -> None:
        """Returns when JetStream acknowledged every part; raises otherwise
        (is_permanent tells whether a retry can help). When traced, the
        publish joins the trace of the call that accepted the batch
        (`traceparent`, kept with its outbox row) and each message carries it
        on to meter in its headers."""
        subject = subject_for(tenant_id)
        with tracing.producing(
            "publish EVENTS",
            traceparent,
            **{"messaging.system": "nats", "messaging.message.id": msg_id},
        ) as trace_headers:
            await asyncio.gather(
                *(
                    self._js.publish(
                        subject,
                        data,
                        headers={"Nats-Msg-Id": part_id, **trace_headers},
                        timeout=self._timeout,
                    )
                    for part_id, data in self.messages(msg_id, payload)
                )
            )

    async def attempt(
        self, msg_id: str, tenant_id: str, payload: bytes, traceparent: str | None = None
    ) -> BaseException | None:
        """publish, with the error returned instead of raised."""
        try:
            await self.publish(msg_id, tenant_id, payload, traceparent)
        except Exception as exc:
            return exc
        return None


class Relay:
    def __init__(
        self,
        store: IngestStore,
        publisher: Publisher,
        *,
        max_attempts: int = 5,
        max_backoff: timedelta = timedelta(seconds=10),
        batch: int = 64,
        poll_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._max_attempts = max_attempts
        self._max_backoff = max(max_backoff.total_seconds(), 0.1)
        self._batch = batch
        self._poll = poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called after a commit so that new rows go out without waiting a poll."""
        self._wake.set()

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try of a row that has failed `attempts` times."""
        return min(FIRST_BACKOFF * 2.0 ** min(attempts - 1, 32), self._max_backoff)

    async def relay_once(self) -> int:
        """Publishes the due rows of one claim; returns how many it claimed."""
        if not self._publisher.connected:
            return 0  # every publish would fail: no row is at fault, none is charged
        quarantined = 0
        transient: list[tuple[OutboxRow, BaseException]] = []
        async with self._store.claim_outbox(self._batch) as claim:
            results = await asyncio.gather(
                *(
                    self._publisher.attempt(r.msg_id, r.tenant_id, r.payload, r.traceparent)
                    for r in claim.rows
                )
            )
            for row, error in zip(claim.rows, results, strict=True):
                attempts = row.attempts + 1
                if error is None:
                    claim.sent(row)
                    continue
                reason = _describe(error)
                permanent = is_permanent(error)
                if permanent and attempts >= self._max_attempts:
                    claim.quarantine(row, reason, event_ids(row.payload))
                    quarantined += 1
                    log.warning(
                        "relay_quarantined",
                        outbox_id=row.id,
                        tenant_id=row.tenant_id,
                        msg_id=row.msg_id,
                        attempts=attempts,
                        reason=reason,
                    )
                    continue
                delay = self.backoff(attempts)
                claim.retry(row, reason, delay)
                if permanent:
                    log.warning(
                        "relay_row_failed",
                        outbox_id=row.id,
                        tenant_id=row.tenant_id,
                        attempts=attempts,
                        error=reason,
                        retry_in=delay,
                    )
                else:
                    transient.append((row, error))
        if transient:  # one line, not one per row: these are about NATS, not the rows
            log.warning("relay_retry", rows=len(transient), error=_describe(transient[0][1]))
        if quarantined:
            metrics.QUARANTINED.labels(RELAY_STAGE).inc(quarantined)
            metrics.QUARANTINE_DEPTH.labels(RELAY_STAGE).inc(quarantined)
        return len(claim.rows)

    async def watch_depth(self, every: float = 5.0) -> None:
        """Keeps the outbox and quarantine gauges current (a NATS outage shows as
        outbox growth)."""
        while True:
            with contextlib.suppress(Exception):
                metrics.OUTBOX_DEPTH.set(await self._store.outbox_depth())
                metrics.QUARANTINE_DEPTH.labels(RELAY_STAGE).set(
                    await self._store.quarantine_depth()
                )
            await asyncio.sleep(every)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            self._wake.clear()
            try:
                claimed = await self.relay_once()
                backoff = 0.2
            except Exception as exc:  # PostgreSQL away: retry, nothing is lost
                log.warning("relay_retry", error=repr(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if claimed == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)


class RelayQuarantine:
    """ingest's QuarantineService backend: outbox batches set aside by the relay."""

    def __init__(self, store: IngestStore, publisher: Publisher) -> None:
        self._store = store
        self._publisher = publisher

    async def list_records(
        self, tenant_id: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[QuarantinedRecord]:
        return await self._store.list_quarantined(tenant_id, after, limit)

    async def replay(self, ids: Sequence[str]) -> tuple[list[str], list[QuarantinedRecord]]:
        """Publishes each named batch now (same Nats-Msg-Ids as before, and meter
        drops events it already has, so a repeat counts nothing twice)."""
        held = await self._store.quarantined_payloads(ids)
        results = await asyncio.gather(
            *(self._publisher.attempt(r.id, r.tenant_id, payload) for r, payload in held)
        )
        replayed = [r.id for (r, _), error in zip(held, results, strict=True) if error is None]
        failed: list[QuarantinedRecord] = []
        for (record, _), error in zip(held, results, strict=True):
            if error is not None:
                again = await self._store.quarantine_failed_again(record.id, _describe(error))
                if again is not None:
                    failed.append(again)
        if replayed:
            await self._store.release_quarantined(replayed)
            log.info("relay_quarantine_replayed", ids=replayed)
        await self._refresh_depth()
        return replayed, failed

    async def discard(self, ids: Sequence[str]) -> int:
        count = await self._store.release_quarantined(ids)
        log.info("relay_quarantine_discarded", ids=list(ids), count=count)
        await self._refresh_depth()
        return count

    async def _refresh_depth(self) -> None:
        metrics.QUARANTINE_DEPTH.labels(RELAY_STAGE).set(await self._store.quarantine_depth())
