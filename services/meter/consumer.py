"""The JetStream consumer: every meter replica pulls from one durable consumer,
folds a fetched batch in one transaction (per-event dedupe in the store), and
acks only after the commit. Redelivery never double-counts; a message that
cannot be decoded is terminated and logged, not retried forever."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from google.protobuf.message import DecodeError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common import metrics
from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
from services.common.logs import get_logger
from services.meter.service import MeterService
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)

# A message not acked in this time is redelivered (to any replica).
ACK_WAIT_SECONDS = 15


class EventConsumer:
    """A fetch loop feeding `workers` fold tasks: while one batch is being
    written to PostgreSQL the next is decoded, so the process keeps both its
    own core and the database busy."""

    def __init__(
        self, js: Any, service: MeterService, *, durable: str, batch: int, workers: int = 2
    ) -> None:
        self._js = js
        self._service = service
        self._durable = durable
        self._batch = batch
        self._workers = workers
        self._stopping = asyncio.Event()

    async def _subscribe(self) -> Any:
        return await self._js.pull_subscribe(
            f"{EVENTS_SUBJECT_PREFIX}.>",
            durable=self._durable,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT_SECONDS,
                max_ack_pending=20_000,
            ),
        )

    async def handle(self, messages: list[Any]) -> None:
        batches: list[ingest_pb2.EventBatch] = []
        good: list[Any] = []
        for message in messages:
            try:
                batches.append(ingest_pb2.EventBatch.FromString(message.data))
                good.append(message)
            except DecodeError:
                log.error("poison_message", subject=message.subject, size=len(message.data))
                await message.term()
        try:
            with metrics.CONSUMER_BATCH_SECONDS.time():
                metrics.EVENTS_FOLDED.inc(await self._service.fold_batches(batches))
        except Exception as exc:
            log.warning("fold_failed", error=repr(exc), messages=len(good))
            for message in good:
                await message.nak(delay=1)
            return
        for message in good:
            await message.ack()

    async def _work(self, queue: asyncio.Queue[list[Any] | None]) -> None:
        while (messages := await queue.get()) is not None:
            await self.handle(messages)

    async def _fetch(self, queue: asyncio.Queue[list[Any] | None]) -> None:
        subscription = None
        while not self._stopping.is_set():
            try:
                if subscription is None:
                    subscription = await self._subscribe()
                messages = await subscription.fetch(self._batch, timeout=1)
            except nats.errors.TimeoutError:
                continue
            except Exception as exc:
                log.warning("fetch_failed", error=repr(exc))
                subscription = None
                await asyncio.sleep(1)
                continue
            await queue.put(messages)

    async def run(self) -> None:
        queue: asyncio.Queue[list[Any] | None] = asyncio.Queue(maxsize=self._workers)
        workers = [asyncio.create_task(self._work(queue)) for _ in range(self._workers)]
        try:
            await self._fetch(queue)
            # Stopping: the batches already fetched are folded and acked.
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()

    async def watch_lag(self, every: float = 5.0) -> None:
        """Keeps the consumer-lag gauge current: messages not yet delivered plus
        those delivered but not acknowledged."""
        while True:
            with contextlib.suppress(Exception):
                info = await self._js.consumer_info(EVENTS_STREAM, self._durable)
                metrics.CONSUMER_LAG.set(info.num_pending + info.num_ack_pending)
            await asyncio.sleep(every)

    async def stop(self) -> None:
        """Stops fetching; `run` returns once what was fetched is committed and acked."""
        self._stopping.set()
