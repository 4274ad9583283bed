"""The outbox relay: publishes accepted batches to JetStream and deletes an
outbox row only after JetStream acknowledged it. A crash or a NATS outage
repeats work (absorbed by Nats-Msg-Id and by meter's dedupe), never loses it."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from services.common import metrics
from services.common.jetstream import EVENTS_SUBJECT_PREFIX
from services.common.logs import get_logger
from services.ingest.store import IngestStore

log = get_logger(__name__)


def subject_for(tenant_id: str) -> str:
    return f"{EVENTS_SUBJECT_PREFIX}.{tenant_id}"


class Relay:
    def __init__(
        self, store: IngestStore, js: Any, *, batch: int = 64, poll_seconds: float = 1.0
    ) -> None:
        self._store = store
        self._js = js
        self._batch = batch
        self._poll = poll_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called after a commit so that new rows go out without waiting a poll."""
        self._wake.set()

    async def relay_once(self) -> int:
        async with self._store.claim_outbox(self._batch) as rows:
            if rows:
                await asyncio.gather(
                    *(
                        self._js.publish(
                            subject_for(row.tenant_id),
                            row.payload,
                            headers={"Nats-Msg-Id": row.msg_id},
                            timeout=10,
                        )
                        for row in rows
                    )
                )
        return len(rows)

    async def watch_depth(self, every: float = 5.0) -> None:
        """Keeps the outbox-depth gauge current (a NATS outage shows as growth)."""
        while True:
            with contextlib.suppress(Exception):
                metrics.OUTBOX_DEPTH.set(await self._store.outbox_depth())
            await asyncio.sleep(every)

    async def run(self) -> None:
        backoff = 0.2
        while True:
            self._wake.clear()
            try:
                sent = await self.relay_once()
                backoff = 0.2
            except Exception as exc:  # NATS or PostgreSQL away: retry, nothing is lost
                log.warning("relay_retry", error=repr(exc), retry_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if sent == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)
