"""ingest's SQL: the event log, the outbox and its quarantine (schema `ingest`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from math import copysign
from typing import Any

import asyncpg

from services.common.errors import NotFound
from services.common.partitions import MonthlyTable
from services.common.quarantine import QuarantinedRecord

# The log of record, by month of event_time (kept forever: nothing drops a month).
EVENT_LOG = MonthlyTable("ingest", "events", "event_time")

# ingest.event_ids holds the key that makes ingest idempotent (the log is
# partitioned by time, migration 0005): an event goes into the log only when its
# id was new there. The batch holds each event_id once (validation.triage).
_INSERT_EVENTS = """
WITH batch AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])
         AS e(event_id, customer_id, event_name, event_time, metadata)
), new AS (
    INSERT INTO ingest.event_ids (tenant_id, event_id, event_time)
    SELECT $1, event_id, event_time FROM batch
    ON CONFLICT (tenant_id, event_id) DO NOTHING
    RETURNING event_id
)
INSERT INTO ingest.events (tenant_id, event_id, customer_id, event_name, event_time, metadata)
SELECT $1, e.event_id, e.customer_id, e.event_name, e.event_time, e.metadata
FROM batch e JOIN new USING (event_id)
RETURNING event_id
"""

_COLUMNS_OF_E = "e.event_id, e.customer_id, e.event_name, e.event_time, e.metadata"
# About an event's encoded size in bytes: its text fields and its metadata as
# JSON text (a Struct encodes to about as much; the caller measures exactly),
# plus the timestamp and field tags.
_SIZE_ESTIMATE = (
    "octet_length(event_id) + octet_length(customer_id) + octet_length(event_name)"
    " + octet_length(metadata::text) + 32"
)
# ReplayEvents reads this many rows, or about this many bytes, at a time: a
# replay holds one page (as rows, then as messages) while its client reads.
REPLAY_PAGE_ROWS = 500
REPLAY_PAGE_BYTES = 1024 * 1024

# Metadata values keep their protobuf kind through jsonb. jsonb holds numbers as
# `numeric`, which keeps a fraction's written digits ("100.0" comes back as
# 100.0, a double) but has no negative zero, and orjson writes every double of
# magnitude 1e16 or more in exponent form ("1e+16"), which `numeric` reads as an
# integer. Those doubles, and -0.0, are stored as a one-element array holding
# their shortest repr (["1e+16"]): a metadata value is never an array, so the
# marker is unambiguous, and every other value is stored as plain JSON.
_EXPONENT_FORM = 1e16
_INT64 = range(-(2**63), 2**63)


def _needs_marker(value: float) -> bool:
    return not -_EXPONENT_FORM < value < _EXPONENT_FORM or (
        value == 0.0 and copysign(1.0, value) < 0.0
    )


def encode_metadata(metadata: Mapping[str, Any]) -> Mapping[str, Any]:
    """The metadata as stored in jsonb: itself (the usual case, no copy), or a
    copy with the doubles that need it written as ["<repr>"]."""
    for value in metadata.values():
        if type(value) is float and _needs_marker(value):
            return {
                k: [repr(v)] if type(v) is float and _needs_marker(v) else v
                for k, v in metadata.items()
            }
    return metadata


def _decoded(value: Any) -> Any:
    if type(value) is list:
        return float(value[0])
    if type(value) is int and value not in _INT64:
        # A row stored before the marker existed: a double such as 1e19 that
        # jsonb had turned into an integer. A double is what it was.
        return float(value)
    return value


def decode_metadata(stored: dict[str, Any]) -> dict[str, Any]:
    """The metadata as ingest accepted it: str, int (int64), float or bool."""
    for value in stored.values():
        if type(value) is list or (type(value) is int and value not in _INT64):
            return {k: _decoded(v) for k, v in stored.items()}
    return stored


@dataclass(frozen=True)
class EventRow:
    """An event as the log stores it: the time is always set (the server's when
    the client sent none)."""

    event_id: str
    customer_id: str
    event_name: str
    event_time: datetime
    metadata: Mapping[str, Any]  # str, int (int64), float or bool values


def _stored(row: asyncpg.Record) -> EventRow:
    return EventRow(
        event_id=row["event_id"],
        customer_id=row["customer_id"],
        event_name=row["event_name"],
        event_time=row["event_time"],
        metadata=decode_metadata(row["metadata"]),
    )


class IngestStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def store_batch(
        self,
        tenant_id: str,
        events: Sequence[EventRow],
        outbox_payload: Any,
        traceparent: str | None = None,
    ) -> set[str]:
        """Inserts the events that are new for the tenant and, in the same
        transaction, one outbox row for them. `outbox_payload(new_ids)` builds
        the bytes to publish; `traceparent` is the trace the relay's publish
        joins. Returns the ids that were new."""
        if not events:
            return set()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                _INSERT_EVENTS,
                tenant_id,
                [e.event_id for e in events],
                [e.customer_id for e in events],
                [e.event_name for e in events],
                [e.event_time for e in events],
                [encode_metadata(e.metadata) for e in events],
            )
            new_ids = {r["event_id"] for r in rows}
            if new_ids:
                await conn.execute(
                    "INSERT INTO ingest.outbox (tenant_id, payload, event_count, traceparent)"
                    " VALUES ($1, $2, $3, $4)",
                    tenant_id,
                    outbox_payload(new_ids),
                    len(new_ids),
                    traceparent,
                )
        return new_ids

    async def get_event(self, tenant_id: str, event_id: str) -> EventRow:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS_OF_E} FROM ingest.event_ids k JOIN ingest.events e"
            " ON e.tenant_id = k.tenant_id AND e.event_time = k.event_time"
            " AND e.event_id = k.event_id WHERE k.tenant_id = $1 AND k.event_id = $2",
            tenant_id,
            event_id,
        )
        if row is None:
            raise NotFound(f"event_id: no event {event_id!r}")
        return _stored(row)

    async def _sized_page(
        self, where: str, args: list[Any], order: str, limit: int, max_bytes: int
    ) -> tuple[list[EventRow], bool]:
        """Up to `limit` rows matching `where` in `order`, cut once their
        estimated size (_SIZE_ESTIMATE) passes `max_bytes`: rows whose
        predecessors already make `max_bytes` are left out (the first row is
        always in). The sizes are summed in PostgreSQL over the keys alone, so
        rows past the cut are never sent here. Also says whether rows past
        the returned ones were left out (by the limit or by size); a full page
        of exactly `limit` rows says False (the caller asks for one row more
        to learn whether more follow)."""
        n = len(args)
        rows = await self.pool.fetch(
            f"WITH candidates AS (SELECT event_id, event_time, {_SIZE_ESTIMATE} AS size"
            f" FROM ingest.events WHERE {where} ORDER BY {order} LIMIT ${n + 1}),"
            " sized AS (SELECT event_id, event_time, size,"
            f" sum(size) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) - size AS before,"
            " count(*) OVER () AS candidates FROM candidates)"
            f" SELECT {_COLUMNS_OF_E}, s.candidates FROM sized s JOIN ingest.events e"
            " ON e.tenant_id = $1 AND e.event_time = s.event_time AND e.event_id = s.event_id"
            f" WHERE s.before < ${n + 2}"
            f" ORDER BY {order.replace('event_', 'e.event_')}",
            *args,
            limit,
            max_bytes,
        )
        more = bool(rows) and int(rows[0]["candidates"]) > len(rows)
        return [_stored(r) for r in rows], more

    async def list_events(
        self,
        tenant_id: str,
        *,
        customer_id: str,
        event_name: str,
        start: datetime | None,
        end: datetime | None,
        after: tuple[datetime, str] | None,
        limit: int,
        max_bytes: int,
    ) -> tuple[list[EventRow], bool]:
        """Newest first; `after` is the (event_time, event_id) of the last row
        seen. At most `limit` rows and about `max_bytes` of them (_sized_page:
        at least one row); the flag says rows past them were left out by size."""
        conditions = ["tenant_id = $1"]
        args: list[Any] = [tenant_id]

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if customer_id:
            conditions.append(f"customer_id = {arg(customer_id)}")
        if event_name:
            conditions.append(f"event_name = {arg(event_name)}")
        if start:
            conditions.append(f"event_time >= {arg(start)}")
        if end:
            conditions.append(f"event_time < {arg(end)}")
        if after:
            conditions.append(f"(event_time, event_id) < ({arg(after[0])}, {arg(after[1])})")
        return await self._sized_page(
            " AND ".join(conditions), args, "event_time DESC, event_id DESC", limit, max_bytes
        )

    async def replay(
        self,
        tenant_id: str,
        event_names: Sequence[str],
        start: datetime,
        end: datetime,
        page: int = REPLAY_PAGE_ROWS,
        page_bytes: int = REPLAY_PAGE_BYTES,
    ) -> AsyncIterator[EventRow]:
        """Oldest first, in pages (keyset), so no transaction stays open. A
        page is at most `page` rows and about `page_bytes` (at least one row),
        so what one replay holds at once stays bounded however wide events are."""
        after: tuple[datetime, str] | None = None
        while True:
            rows, more = await self._sized_page(
                "tenant_id = $1 AND event_name = ANY($2::text[])"
                " AND event_time >= $3 AND event_time < $4"
                " AND ($5::timestamptz IS NULL OR (event_time, event_id) > ($5, $6))",
                [
                    tenant_id,
                    list(event_names),
                    start,
                    end,
                    after[0] if after else None,
                    after[1] if after else "",
                ],
                "event_time, event_id",
                page,
                page_bytes,
            )
            for row in rows:
                yield row
            if not rows or (len(rows) < page and not more):
                return
            after = (rows[-1].event_time, rows[-1].event_id)

    # The outbox, read by the relay, and its dead letters (ingest.quarantine).

    async def outbox_depth(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM ingest.outbox"))

    @asynccontextmanager
    async def claim_outbox(
        self, limit: int, max_bytes: int = 8 * 1024 * 1024
    ) -> AsyncIterator[OutboxClaim]:
        """Locks up to `limit` due outbox rows, oldest first, whose payloads
        together stay within `max_bytes` (the first row is always taken), for the
        body of the `async with`, which reports each row's outcome on the claim.
        Other relays skip locked rows; rows waiting for a retry are not due. When
        the body finishes normally the outcomes are written in the same
        transaction; when it raises, nothing changes. Rows without an outcome
        stay as they were.

        The byte bound keeps the relay's memory flat however large the calls
        were: 64 rows of 4 MiB would otherwise be held and parsed at once."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Sizes first (octet_length reads the TOAST header, not the value),
            # then lock and load only the rows within the budget.
            sizes = await conn.fetch(
                "SELECT id, octet_length(payload) AS size FROM ingest.outbox"
                " WHERE next_attempt_at <= now() ORDER BY id LIMIT $1",
                limit,
            )
            chosen: list[int] = []
            total = 0
            for r in sizes:
                if chosen and total + r["size"] > max_bytes:
                    break
                chosen.append(r["id"])
                total += r["size"]
            rows = await conn.fetch(
                "SELECT id, msg_id, tenant_id, payload, attempts, traceparent FROM ingest.outbox"
                " WHERE id = ANY($1::bigint[]) AND next_attempt_at <= now()"
                " ORDER BY id FOR UPDATE SKIP LOCKED",
                chosen,
            )
            claim = OutboxClaim(
                [
                    OutboxRow(
                        r["id"],
                        str(r["msg_id"]),
                        r["tenant_id"],
                        r["payload"],
                        r["attempts"],
                        r["traceparent"],
                    )
                    for r in rows
                ]
            )
            yield claim
            if claim.sent_ids:
                await conn.execute(
                    "DELETE FROM ingest.outbox WHERE id = ANY($1::bigint[])", claim.sent_ids
                )
            if claim.retries:
                await conn.execute(
                    "UPDATE ingest.outbox o SET attempts = o.attempts + 1, last_error = r.error,"
                    " next_attempt_at = now() + make_interval(secs => r.delay)"
                    " FROM unnest($1::bigint[], $2::text[], $3::float8[]) AS r(id, error, delay)"
                    " WHERE o.id = r.id",
                    [r[0] for r in claim.retries],
                    [r[1] for r in claim.retries],
                    [r[2] for r in claim.retries],
                )
            for outbox_id, reason, event_ids in claim.quarantined:
                await conn.execute(
                    "WITH moved AS (DELETE FROM ingest.outbox WHERE id = $1"
                    " RETURNING msg_id, tenant_id, payload, attempts, created_at)"
                    " INSERT INTO ingest.quarantine"
                    " (id, tenant_id, payload, event_ids, reason, attempts, accepted_at)"
                    " SELECT msg_id, tenant_id, payload, $2::text[], $3, attempts + 1, created_at"
                    " FROM moved",
                    outbox_id,
                    list(event_ids),
                    reason,
                )

    async def quarantine_depth(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM ingest.quarantine"))

    async def list_quarantined(
        self, tenant_id: str | None, after: tuple[datetime, str] | None, limit: int
    ) -> list[QuarantinedRecord]:
        """Newest first; `after` is the (quarantined_at, id) of the last row seen."""
        rows = await self.pool.fetch(
            f"SELECT {_QUARANTINE_COLUMNS} FROM ingest.quarantine"
            " WHERE ($1::text IS NULL OR tenant_id = $1)"
            " AND ($2::timestamptz IS NULL OR (quarantined_at, id) < ($2, $3::uuid))"
            " ORDER BY quarantined_at DESC, id DESC LIMIT $4",
            tenant_id,
            after[0] if after else None,
            after[1] if after else None,
            limit,
        )
        return [_quarantined(r) for r in rows]

    async def quarantined_payloads(
        self, ids: Sequence[str]
    ) -> list[tuple[QuarantinedRecord, bytes]]:
        """The named quarantined batches with their payloads, in the order of `ids`."""
        rows = await self.pool.fetch(
            f"SELECT {_QUARANTINE_COLUMNS}, payload FROM ingest.quarantine"
            " WHERE id = ANY($1::uuid[])",
            list(ids),
        )
        by_id = {str(r["id"]): (_quarantined(r), bytes(r["payload"])) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    async def release_quarantined(self, ids: Sequence[str]) -> int:
        """Deletes the named rows (published by a replay, or discarded); returns how many."""
        result = await self.pool.execute(
            "DELETE FROM ingest.quarantine WHERE id = ANY($1::uuid[])", list(ids)
        )
        return int(result.split()[-1])

    async def quarantine_failed_again(
        self, record_id: str, reason: str
    ) -> QuarantinedRecord | None:
        """Records a failed replay; the updated row, or None when it is gone."""
        row = await self.pool.fetchrow(
            "UPDATE ingest.quarantine SET reason = $2, attempts = attempts + 1,"
            " last_attempt_at = now() WHERE id = $1::uuid"
            f" RETURNING {_QUARANTINE_COLUMNS}",
            record_id,
            reason,
        )
        return _quarantined(row) if row is not None else None


@dataclass(frozen=True)
class OutboxRow:
    id: int
    msg_id: str
    tenant_id: str
    payload: bytes
    # Failed attempts so far.
    attempts: int = 0
    # The trace of the call that accepted the batch (W3C traceparent), if traced.
    traceparent: str | None = None


@dataclass
class OutboxClaim:
    """The rows of one claim and what became of each (see claim_outbox)."""

    rows: list[OutboxRow]
    sent_ids: list[int] = field(default_factory=list)
    # (id, error, seconds until the next attempt)
    retries: list[tuple[int, str, float]] = field(default_factory=list)
    # (id, reason, the event ids it holds)
    quarantined: list[tuple[int, str, Sequence[str]]] = field(default_factory=list)

    def sent(self, row: OutboxRow) -> None:
        self.sent_ids.append(row.id)

    def retry(self, row: OutboxRow, error: str, delay: float) -> None:
        self.retries.append((row.id, error, delay))

    def quarantine(self, row: OutboxRow, reason: str, event_ids: Sequence[str]) -> None:
        self.quarantined.append((row.id, reason, event_ids))


RELAY_STAGE = "relay"
_QUARANTINE_COLUMNS = (
    "id, tenant_id, reason, event_ids, attempts, quarantined_at, last_attempt_at,"
    " octet_length(payload) AS size_bytes"
)


def _quarantined(row: asyncpg.Record) -> QuarantinedRecord:
    return QuarantinedRecord(
        id=str(row["id"]),
        tenant_id=row["tenant_id"],
        stage=RELAY_STAGE,
        reason=row["reason"],
        event_ids=tuple(row["event_ids"]),
        attempts=row["attempts"],
        quarantine_time=row["quarantined_at"],
        last_attempt_time=row["last_attempt_at"],
        size_bytes=row["size_bytes"],
    )
