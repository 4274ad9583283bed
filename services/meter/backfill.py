"""Backfill: a new meter counts the events ingest already holds for its event
name within the backdating window, replayed over gRPC. Folding is idempotent
per (meter, event), so events the consumer folds meanwhile count once. An event
that cannot be folded (services.meter.isolation) goes to the quarantine and the
backfill goes on: only a replay that keeps failing marks the meter FAILED."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc

from services.common.auth import on_behalf_of
from services.common.logs import get_logger
from services.meter import convert
from services.meter.quarantine import FoldQuarantine
from services.meter.service import MeterService
from services.meter.store import MeterRecord, MeterStore, QuarantineStore
from usagebilling.ingest.v1 import ingest_pb2, ingest_pb2_grpc

log = get_logger(__name__)

CHUNK = 1000
# A replay that fails is tried again after 0.5, 1, 2, 4 s; then the meter is FAILED.
ATTEMPTS = 5
RETRY_DELAY = 0.5


class Backfiller:
    def __init__(
        self,
        store: MeterStore,
        service: MeterService,
        ingest: grpc.aio.Channel,
        service_token: str,
        window: timedelta,
        *,
        retry_delay: float = RETRY_DELAY,
        quarantine: FoldQuarantine | None = None,
    ) -> None:
        self._store = store
        self._service = service
        self._quarantine = quarantine or FoldQuarantine(QuarantineStore(store.pool), service)
        self._ingest = ingest_pb2_grpc.IngestServiceStub(ingest)
        self._service_token = service_token
        self._window = window
        self._retry_delay = retry_delay
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, record: MeterRecord) -> None:
        task = asyncio.create_task(self.backfill(record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def backfill(self, record: MeterRecord) -> None:
        """Replays and folds, then marks the meter DONE. A failed replay (ingest
        restarting, say) is retried from the start, which folding makes safe; after
        `ATTEMPTS` failures the meter is marked FAILED."""
        now = datetime.now(UTC)
        request = ingest_pb2.ReplayEventsRequest(
            event_names=[record.event_name],
            start_time=convert.to_timestamp(now - self._window),
            end_time=convert.to_timestamp(now + timedelta(minutes=10)),
        )
        for attempt in range(1, ATTEMPTS + 1):
            try:
                folded, set_aside = await self._replay(record, request, attempt)
            except asyncio.CancelledError:
                raise  # stays RUNNING: resumed at the next start
            except Exception as exc:
                if attempt == ATTEMPTS:
                    log.error("backfill_failed", meter_id=record.id, error=repr(exc))
                    await self._store.set_backfill_state(record.tenant_id, record.id, "FAILED")
                    return
                log.warning("backfill_retry", meter_id=record.id, attempt=attempt, error=repr(exc))
                await asyncio.sleep(self._retry_delay * 2 ** (attempt - 1))
                continue
            await self._store.set_backfill_state(record.tenant_id, record.id, "DONE")
            log.info("backfill_done", meter_id=record.id, folded=folded, set_aside=set_aside)
            return

    async def _replay(
        self, record: MeterRecord, request: ingest_pb2.ReplayEventsRequest, attempt: int
    ) -> tuple[int, int]:
        """The new rows, and how many events were set aside."""
        folded = set_aside = 0
        chunk: list[Any] = []
        stream = self._ingest.ReplayEvents(
            request, metadata=on_behalf_of(self._service_token, record.tenant_id)
        )

        async def fold() -> None:
            nonlocal folded, set_aside
            new, failed = await self._service.fold_for_meter(record, chunk)
            if failed:
                await self._quarantine.set_aside(record.tenant_id, failed, attempt)
            folded += new
            set_aside += len(failed)

        async for event in stream:
            chunk.append(event)
            if len(chunk) >= CHUNK:
                await fold()
                chunk = []
        await fold()
        return folded, set_aside

    async def resume(self) -> None:
        """Restarts backfills that a stopped process left running (idempotent)."""
        for record in await self._store.meters_with_backfill_running():
            self.start(record)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
