"""Webhook delivery: a durable JetStream consumer on the BILLING stream turns
each message into one delivery row per endpoint that wants it (then acks),
and a sender POSTs due deliveries, signed per Standard Webhooks, retrying on
the configured schedule.

At least once: a message is acked only after its rows are written, and a row
is leased while in flight (next_attempt_at moves past the attempt's timeout),
so a billing that dies mid-attempt leaves it due again. The webhook-id is
derived from the message's Nats-Msg-Id, so every retry (and a JetStream
redelivery) uses the same one. One attempt per endpoint at a time, each with
its own timeout: a slow receiver holds up only itself."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import json
import socket
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import nats.errors
from aiohttp.abc import AbstractResolver, ResolveResult
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError, Message
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.billing.domain import webhooks as rules
from services.billing.domain.webhooks import Policy
from services.billing.webhooks_store import Attempt, DeliveryRecord, EndpointRecord, WebhookStore
from services.common.jetstream import BILLING_STREAM, BILLING_SUBJECT_PREFIX
from services.common.logs import get_logger
from usagebilling.billing.v1 import alert_pb2, credit_pb2, invoice_pb2, webhook_pb2

log = get_logger(__name__)

DURABLE = "billing-webhooks"
DISABLED_SUBJECT = f"{BILLING_SUBJECT_PREFIX}.webhook.endpoint_disabled"
RESPONSE_BYTES = 1024
# How often an idle sender looks for due deliveries: those another replica
# enqueued, and retries coming due. This replica's new deliveries and freed
# endpoints wake it at once (Webhooks.wake).
POLL_SECONDS = 1.0
PUBLISH_TIMEOUT = 5.0


def proto_endpoint(record: EndpointRecord) -> webhook_pb2.WebhookEndpoint:
    message = webhook_pb2.WebhookEndpoint(
        id=record.id,
        url=record.url,
        event_types=record.event_types,
        description=record.description,
        enabled=record.enabled,
        disabled_reason=record.disabled_reason,
    )
    if record.failing_since is not None:
        message.failing_since.FromDatetime(record.failing_since)
    message.create_time.FromDatetime(record.created_at)
    return message


def message_type(event_type: str) -> type[Message] | None:
    """The protobuf message a BILLING subject carries, or None for one that
    webhooks do not send."""
    if event_type in ("invoice.finalized",):
        return invoice_pb2.InvoiceFinalized
    if event_type == "invoice.voided":
        return invoice_pb2.InvoiceVoided
    if event_type == "usage.threshold_reached":
        return alert_pb2.UsageThresholdReached
    if event_type == "webhook.endpoint_disabled":
        return webhook_pb2.WebhookEndpointDisabled
    if event_type.startswith("credit.") and event_type in rules.EVENT_TYPES:
        return credit_pb2.CreditEvent
    return None


def webhook_id(nats_msg_id: str) -> str:
    """A stable webhook-id from the message's Nats-Msg-Id (ids of the outbox,
    unique per message by construction)."""
    digest = hashlib.sha256(nats_msg_id.encode()).digest()[:20]
    return "msg_" + base64.b32encode(digest).decode().lower().rstrip("=")


class RefusedAddress(OSError):
    pass


class GuardedResolver(AbstractResolver):
    """Resolves as aiohttp would, then refuses a host any of whose addresses
    is private (unless allowed). The connection goes to the addresses checked
    here, so a DNS answer that changes between a check and the connect
    (rebinding) cannot slip past."""

    def __init__(self, allowed: Callable[[str], bool]) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allowed = allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if not self._allowed(result["host"]):
                raise RefusedAddress(f"{host} resolves to {result['host']}, a private address")
        return results

    async def close(self) -> None:
        await self._inner.close()


async def check_destination(url: str, allowed: Callable[[str], bool]) -> None:
    """Raises WebhookRuleError (naming url) when the URL's host is, or
    resolves to, an address deliveries may not reach."""
    host = rules.check_url(url)
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None)
        except OSError as exc:
            raise rules.WebhookRuleError(f"url: host {host!r} does not resolve ({exc})") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        if not allowed(str(address)):
            raise rules.WebhookRuleError(
                f"url: {host!r} is a loopback, link-local or private address ({address}),"
                " which webhooks may not reach"
            )


class Webhooks:
    def __init__(self, store: WebhookStore, js: Any, policy: Policy) -> None:
        self._store = store
        self._js = js
        self._policy = policy
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # endpoint id -> its attempt
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Has the sender look for due deliveries now, not at its next poll."""
        self._wake.set()

    # From the BILLING stream to delivery rows.

    async def enqueue(self, subject: str, data: bytes, msg_id: str, published: datetime) -> int:
        """Rows for one BILLING message; returns how many endpoints want it."""
        event_type = subject.removeprefix(BILLING_SUBJECT_PREFIX + ".")
        kind = message_type(event_type)
        if kind is None:
            return 0
        try:
            message = kind.FromString(data)
        except DecodeError:
            log.warning("webhook_message_undecodable", subject=subject)
            return 0
        tenant_id = str(getattr(message, "tenant_id", ""))
        if not tenant_id:
            return 0
        # An endpoint gets the messages published after it was created.
        endpoints = [
            e
            for e in await self._store.endpoints_for(tenant_id, event_type)
            if e.created_at <= published
        ]
        if not endpoints:
            return 0
        body = json.dumps(
            {
                "type": event_type,
                "timestamp": published.astimezone(UTC).isoformat().replace("+00:00", "Z"),
                "data": MessageToDict(message, preserving_proto_field_name=True),
            },
            separators=(",", ":"),
        )
        await self._store.enqueue(
            tenant_id,
            [e.id for e in endpoints],
            webhook_id(msg_id),
            event_type,
            body,
            datetime.now(UTC),
        )
        self.wake()
        return len(endpoints)

    async def consume(self, stopping: asyncio.Event) -> None:
        subscription = None
        while not stopping.is_set():
            try:
                if subscription is None:
                    subscription = await self._js.pull_subscribe(
                        f"{BILLING_SUBJECT_PREFIX}.>",
                        durable=DURABLE,
                        stream=BILLING_STREAM,
                        config=ConsumerConfig(
                            ack_policy=AckPolicy.EXPLICIT,
                            deliver_policy=DeliverPolicy.ALL,
                            ack_wait=30,
                        ),
                    )
                messages = await subscription.fetch(100, timeout=1)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except Exception as exc:
                log.warning("webhook_fetch_failed", error=repr(exc))
                subscription = None
                await asyncio.sleep(1)
                continue
            for message in messages:
                try:
                    headers = message.headers or {}
                    meta = message.metadata
                    msg_id = headers.get("Nats-Msg-Id") or f"{meta.stream}-{meta.sequence.stream}"
                    await self.enqueue(message.subject, message.data, msg_id, meta.timestamp)
                    await message.ack()
                except Exception as exc:  # not acked: JetStream redelivers it
                    log.warning("webhook_enqueue_failed", subject=message.subject, error=repr(exc))

    # Sending.

    async def attempt(
        self, session: aiohttp.ClientSession, delivery: DeliveryRecord, endpoint: EndpointRecord
    ) -> Attempt:
        now = datetime.now(UTC)
        body = delivery.payload.encode()
        headers = rules.headers(endpoint.secrets(now), delivery.message_id, now, body)
        started = time.monotonic()
        try:
            await check_literal(endpoint.url, self._policy.allowed)
            async with session.post(
                endpoint.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._policy.timeout.total_seconds()),
            ) as response:
                answer = await response.content.read(RESPONSE_BYTES)
                return Attempt(
                    response.status,
                    int((time.monotonic() - started) * 1000),
                    answer.decode("utf-8", "replace"),
                    "",
                )
        except Exception as exc:
            error = "timeout" if isinstance(exc, TimeoutError) else repr(exc)
            return Attempt(0, int((time.monotonic() - started) * 1000), "", error[:500])

    async def _deliver(self, session: aiohttp.ClientSession, delivery: DeliveryRecord) -> None:
        try:
            endpoint = (await self._store.endpoints_by_id([delivery.endpoint_id])).get(
                delivery.endpoint_id
            )
            if endpoint is None:
                return
            outcome = await self.attempt(session, delivery, endpoint)
            now = datetime.now(UTC)
            next_at = rules.next_attempt(self._policy.schedule, delivery.attempts + 1, now)
            await self._store.record_attempt(delivery.id, outcome, now, next_at)
            log.info(
                "webhook_attempt",
                tenant_id=delivery.tenant_id,
                endpoint_id=endpoint.id,
                webhook_id=delivery.message_id,
                attempt=delivery.attempts + 1,
                status_code=outcome.status_code,
                latency_ms=outcome.latency_ms,
                error=outcome.error,
            )
            disabled = await self._store.record_health(
                endpoint.id, outcome.succeeded, now, self._policy.disable_after
            )
            if disabled is not None:
                await self._announce_disabled(disabled)
        except Exception as exc:  # the lease ends and the delivery is due again
            log.warning("webhook_delivery_failed", delivery_id=delivery.id, error=repr(exc))

    async def _announce_disabled(self, endpoint: EndpointRecord) -> None:
        log.warning(
            "webhook_endpoint_disabled",
            tenant_id=endpoint.tenant_id,
            endpoint_id=endpoint.id,
            reason=endpoint.disabled_reason,
        )
        if self._js is None:
            return
        payload = webhook_pb2.WebhookEndpointDisabled(
            tenant_id=endpoint.tenant_id, endpoint=proto_endpoint(endpoint)
        )
        since = endpoint.failing_since.isoformat() if endpoint.failing_since else ""
        try:
            await self._js.publish(
                DISABLED_SUBJECT,
                payload.SerializeToString(),
                headers={"Nats-Msg-Id": f"webhook-disabled-{endpoint.id}-{since}"},
                timeout=PUBLISH_TIMEOUT,
            )
        except Exception as exc:
            log.warning("webhook_disabled_publish_failed", endpoint_id=endpoint.id, error=repr(exc))

    async def send(self, stopping: asyncio.Event) -> None:
        lease = self._policy.timeout + timedelta(seconds=5)
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._policy.allowed), limit=0, force_close=True
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stopping.is_set():
                self._wake.clear()  # before the claim: a wake during it is kept
                room = self._policy.max_in_flight - len(self._in_flight)
                due: Sequence[DeliveryRecord] = []
                if room > 0:
                    try:
                        due = await self._store.claim_due(
                            datetime.now(UTC), lease, room, list(self._in_flight)
                        )
                    except Exception as exc:
                        log.warning("webhook_claim_failed", error=repr(exc))
                for delivery in due:
                    task = asyncio.create_task(self._deliver(session, delivery))
                    self._in_flight[delivery.endpoint_id] = task
                    task.add_done_callback(self._finished(delivery.endpoint_id))
                if not due:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            for task in list(self._in_flight.values()):
                task.cancel()

    def _finished(self, endpoint_id: str) -> Callable[[asyncio.Task[None]], None]:
        def done(_: asyncio.Task[None]) -> None:
            self._in_flight.pop(endpoint_id, None)
            self._wake.set()  # the endpoint's next delivery may be due

        return done

    async def run(self) -> None:
        stopping = asyncio.Event()
        await asyncio.gather(self.consume(stopping), self.send(stopping))


async def check_literal(url: str, allowed: Callable[[str], bool]) -> None:
    """aiohttp connects to an IP literal without asking the resolver: check it here."""
    host = rules.check_url(url).strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return
    if not allowed(str(address)):
        raise RefusedAddress(f"{host} is a private address")
