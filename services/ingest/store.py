"""ingest's SQL: the event log and the outbox (schema `ingest`)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.common.errors import NotFound

_INSERT_EVENTS = """
INSERT INTO ingest.events (tenant_id, event_id, customer_id, event_name, event_time, metadata)
SELECT $1, e.event_id, e.customer_id, e.event_name, e.event_time, e.metadata
FROM unnest($2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::jsonb[])
     AS e(event_id, customer_id, event_name, event_time, metadata)
ON CONFLICT (tenant_id, event_id) DO NOTHING
RETURNING event_id
"""

_COLUMNS = "event_id, customer_id, event_name, event_time, metadata"


@dataclass(frozen=True)
class EventRow:
    """An event as the log stores it: the time is always set (the server's when
    the client sent none)."""

    event_id: str
    customer_id: str
    event_name: str
    event_time: datetime
    metadata: dict[str, Any]


def _stored(row: asyncpg.Record) -> EventRow:
    return EventRow(
        event_id=row["event_id"],
        customer_id=row["customer_id"],
        event_name=row["event_name"],
        event_time=row["event_time"],
        metadata=row["metadata"],
    )


class IngestStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def store_batch(
        self, tenant_id: str, events: Sequence[EventRow], outbox_payload: Any
    ) -> set[str]:
        """Inserts the events that are new for the tenant and, in the same
        transaction, one outbox row for them. `outbox_payload(new_ids)` builds
        the bytes to publish. Returns the ids that were new."""
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
                [e.metadata for e in events],
            )
            new_ids = {r["event_id"] for r in rows}
            if new_ids:
                await conn.execute(
                    "INSERT INTO ingest.outbox (tenant_id, payload, event_count)"
                    " VALUES ($1, $2, $3)",
                    tenant_id,
                    outbox_payload(new_ids),
                    len(new_ids),
                )
        return new_ids

    async def get_event(self, tenant_id: str, event_id: str) -> EventRow:
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM ingest.events WHERE tenant_id = $1 AND event_id = $2",
            tenant_id,
            event_id,
        )
        if row is None:
            raise NotFound(f"event_id: no event {event_id!r}")
        return _stored(row)

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
    ) -> list[EventRow]:
        """Newest first; `after` is the (event_time, event_id) of the last row seen."""
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
        rows = await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM ingest.events WHERE {' AND '.join(conditions)}"
            f" ORDER BY event_time DESC, event_id DESC LIMIT {arg(limit)}",
            *args,
        )
        return [_stored(r) for r in rows]

    async def replay(
        self,
        tenant_id: str,
        event_names: Sequence[str],
        start: datetime,
        end: datetime,
        page: int = 1000,
    ) -> AsyncIterator[EventRow]:
        """Oldest first, in pages (keyset), so no transaction stays open."""
        after: tuple[datetime, str] | None = None
        while True:
            rows = await self.pool.fetch(
                f"SELECT {_COLUMNS} FROM ingest.events"
                " WHERE tenant_id = $1 AND event_name = ANY($2::text[])"
                " AND event_time >= $3 AND event_time < $4"
                " AND ($5::timestamptz IS NULL OR (event_time, event_id) > ($5, $6))"
                " ORDER BY event_time, event_id LIMIT $7",
                tenant_id,
                list(event_names),
                start,
                end,
                after[0] if after else None,
                after[1] if after else "",
                page,
            )
            for row in rows:
                yield _stored(row)
            if len(rows) < page:
                return
            after = (rows[-1]["event_time"], rows[-1]["event_id"])

    # The outbox, read by the relay.

    async def outbox_depth(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM ingest.outbox"))

    @asynccontextmanager
    async def claim_outbox(self, limit: int) -> AsyncIterator[list[OutboxRow]]:
        """Locks up to `limit` outbox rows (other relays skip them) for the body
        of the `async with`; deletes them when the body finishes normally, leaves
        them for the next try when it raises."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT id, msg_id, tenant_id, payload FROM ingest.outbox"
                " ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                limit,
            )
            claimed = [
                OutboxRow(r["id"], str(r["msg_id"]), r["tenant_id"], r["payload"]) for r in rows
            ]
            yield claimed
            if claimed:
                await conn.execute(
                    "DELETE FROM ingest.outbox WHERE id = ANY($1::bigint[])",
                    [r.id for r in claimed],
                )


@dataclass(frozen=True)
class OutboxRow:
    id: int
    msg_id: str
    tenant_id: str
    payload: bytes
