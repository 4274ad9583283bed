"""The JetStream consumer: every meter replica pulls from one durable consumer,
folds a fetched batch in one transaction (per-event dedupe in the store), and
acks only after the commit. Redelivery never double-counts; a message that
cannot be decoded is terminated and logged, not retried forever."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
from google.protobuf.message import DecodeError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
from services.common.logs import get_logger
from services.meter.service import MeterService
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)


class EventConsumer:
    def __init__(self, js: Any, service: MeterService, *, durable: str, batch: int) -> None:
        self._js = js
        self._service = service
        self._durable = durable
        self._batch = batch

    async def _subscribe(self) -> Any:
        return await self._js.pull_subscribe(
            f"{EVENTS_SUBJECT_PREFIX}.>",
            durable=self._durable,
            stream=EVENTS_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=30,
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
            await self._service.fold_batches(batches)
        except Exception as exc:
            log.warning("fold_failed", error=repr(exc), messages=len(good))
            for message in good:
                await message.nak(delay=1)
            return
        for message in good:
            await message.ack()

    async def run(self) -> None:
        subscription = None
        while True:
            try:
                if subscription is None:
                    subscription = await self._subscribe()
                messages = await subscription.fetch(self._batch, timeout=1)
            except nats.errors.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fetch_failed", error=repr(exc))
                subscription = None
                await asyncio.sleep(1)
                continue
            await self.handle(messages)
