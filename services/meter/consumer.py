"""The JetStream consumer: every meter replica pulls from one durable consumer,
folds a fetched batch in one transaction (per-event dedupe in the store), and
acks only after the commit. Redelivery never double-counts.

Nothing a tenant sends can hold up the others: when a batch's fold fails,
services.meter.isolation commits every event that can be folded and names the
events at fault, which go to the quarantine (meter.quarantine) before their
message is acked. A transient failure (PostgreSQL away) naks the message with
a growing delay instead, until it was delivered `max_deliveries` times; after
that its events that still fail are set aside too. A message that cannot be
decoded is set aside as raw bytes and terminated."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import nats.errors
from google.protobuf.message import DecodeError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common import metrics, tracing
from services.common.jetstream import EVENTS_STREAM, EVENTS_SUBJECT_PREFIX
from services.common.logs import get_logger
from services.meter.isolation import Failure, classify, describe
from services.meter.quarantine import FoldQuarantine
from services.meter.service import MeterService
from usagebilling.ingest.v1 import ingest_pb2

log = get_logger(__name__)

# A message not acked in this time is redelivered (to any replica).
ACK_WAIT_SECONDS = 15
# A message is retried on these failures until it was delivered
# max_deliveries times; data errors are isolated at once.
RETRY_ON = frozenset({Failure.TRANSIENT, Failure.OTHER})
MAX_NAK_DELAY = 30.0


def _deliveries(message: Any) -> int:
    try:
        return int(message.metadata.num_delivered)
    except Exception:  # not a JetStream message: a first delivery
        return 1


def nak_delay(deliveries: int) -> float:
    """1, 2, 4, ... seconds after the 1st, 2nd, 3rd delivery, at most 30."""
    return float(min(2 ** max(deliveries - 1, 0), MAX_NAK_DELAY))


class EventConsumer:
    """A fetch loop feeding `workers` fold tasks: while one batch is being
    written to PostgreSQL the next is decoded, so the process keeps both its
    own core and the database busy."""

    def __init__(
        self,
        js: Any,
        service: MeterService,
        quarantine: FoldQuarantine,
        *,
        durable: str,
        batch: int,
        workers: int = 2,
        max_deliveries: int = 10,
        stream: str = EVENTS_STREAM,
        subject_prefix: str = EVENTS_SUBJECT_PREFIX,
    ) -> None:
        self._js = js
        self._service = service
        self._quarantine = quarantine
        self._durable = durable
        self._batch = batch
        self._workers = workers
        self._max_deliveries = max_deliveries
        self._stream = stream
        self._prefix = subject_prefix
        self._stopping = asyncio.Event()

    async def _subscribe(self) -> Any:
        return await self._js.pull_subscribe(
            f"{self._prefix}.>",
            durable=self._durable,
            stream=self._stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=ACK_WAIT_SECONDS,
                max_ack_pending=20_000,
            ),
        )

    async def handle(self, messages: list[Any]) -> None:
        decoded: list[tuple[Any, ingest_pb2.EventBatch]] = []
        for message in messages:
            try:
                decoded.append((message, ingest_pb2.EventBatch.FromString(message.data)))
            except DecodeError as exc:
                await self._set_aside_raw(message, exc)
        if not decoded:
            return
        # When traced: each message's fold joins the trace its headers carry
        # (the IngestEvents call that accepted its events).
        with tracing.consuming(
            "process EVENTS", [m.headers for m, _ in decoded], **{"messaging.system": "nats"}
        ):
            await self._fold(decoded)

    async def _fold(self, decoded: list[tuple[Any, ingest_pb2.EventBatch]]) -> None:
        try:
            with metrics.CONSUMER_BATCH_SECONDS.time():
                folded = await self._service.fold_batches([batch for _, batch in decoded])
        except Exception as exc:
            log.warning(
                "fold_failed", error=repr(exc), kind=classify(exc).value, messages=len(decoded)
            )
            await self._isolate(decoded, exc)
            return
        metrics.EVENTS_FOLDED.inc(folded)
        for message, _ in decoded:
            await message.ack()

    def _final(self, message: Any) -> bool:
        return _deliveries(message) >= self._max_deliveries

    async def _isolate(
        self, decoded: list[tuple[Any, ingest_pb2.EventBatch]], error: BaseException
    ) -> None:
        """After a failed fold: commits what can be folded, sets aside the
        events at fault, naks what is better retried."""
        retry_on = [frozenset() if self._final(m) else RETRY_ON for m, _ in decoded]
        try:
            outcomes, folded = await self._service.fold_isolating(
                [batch for _, batch in decoded], retry_on, error
            )
        except Exception as exc:  # the meters could not even be loaded
            log.warning("fold_retry", error=repr(exc), messages=len(decoded))
            for message, _ in decoded:
                await message.nak(delay=nak_delay(_deliveries(message)))
            return
        metrics.EVENTS_FOLDED.inc(folded)
        for (message, batch), outcome in zip(decoded, outcomes, strict=True):
            if outcome.retry is not None:
                await message.nak(delay=nak_delay(_deliveries(message)))
                continue
            if outcome.failed:
                try:
                    await self._quarantine.set_aside(
                        batch.tenant_id, outcome.failed, _deliveries(message)
                    )
                except Exception as exc:
                    await self._not_set_aside(message, exc)
                    continue
            await message.ack()

    async def _set_aside_raw(self, message: Any, exc: DecodeError) -> None:
        subject: str = message.subject or ""
        prefix = f"{self._prefix}."
        tenant = subject[len(prefix) :] if subject.startswith(prefix) else ""
        try:
            await self._quarantine.set_aside_raw(
                tenant, message.data, f"undecodable: {describe(exc)}", _deliveries(message)
            )
        except Exception as error:
            await self._not_set_aside(message, error)
            return
        await message.term()

    async def _not_set_aside(self, message: Any, exc: BaseException) -> None:
        """The quarantine itself failed: retried while that may help; in the
        end the message is terminated (its events stay in ingest's log)."""
        if classify(exc) is Failure.TRANSIENT or not self._final(message):
            log.warning("quarantine_retry", error=repr(exc), subject=message.subject)
            await message.nak(delay=nak_delay(_deliveries(message)))
            return
        log.error("quarantine_failed", error=repr(exc), subject=message.subject)
        await message.term()

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
            except (nats.errors.TimeoutError, TimeoutError):
                continue  # nothing to fetch (nats.py raises either, by version and path)
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
                info = await self._js.consumer_info(self._stream, self._durable)
                metrics.CONSUMER_LAG.set(info.num_pending + info.num_ack_pending)
            await asyncio.sleep(every)

    async def stop(self) -> None:
        """Stops fetching; `run` returns once what was fetched is committed and acked."""
        self._stopping.set()
